"""A minimal in-process ASGI server: requests straight into the app, no network, no parsing.

It sends what uvicorn sends (ASGI 3.0, spec 2.3, so Starlette's streaming response listens
for a disconnect as it does under uvicorn), answers ``receive`` with the body and then, once
the response is complete, with ``http.disconnect``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from asgi_perfmon._types import Message, Scope

Headers = list[tuple[bytes, bytes]]

BASE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"host", b"127.0.0.1:8000"),
    (b"user-agent", b"perfmon-bench/1.0"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
)


@dataclass
class Reply:
    """What the app sent back."""

    status: int = 0
    headers: Headers = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)


def http_scope(
    method: str, path: str, query: bytes = b"", headers: tuple[tuple[bytes, bytes], ...] = ()
) -> Scope:
    """A fresh scope as uvicorn builds it for ``method path?query``."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": method,
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": _merge(BASE_HEADERS, headers),
        "state": {},
    }


def _merge(
    base: tuple[tuple[bytes, bytes], ...], extra: tuple[tuple[bytes, bytes], ...]
) -> Headers:
    """``base`` with the headers named in ``extra`` replaced by ``extra``'s."""
    replaced = {name for name, _ in extra}
    return [header for header in base if header[0] not in replaced] + list(extra)


def json_request(method: str, path: str, payload: object) -> tuple[Scope, bytes]:
    """A scope and body for a JSON request."""
    body = json.dumps(payload).encode()
    headers = ((b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()))
    return http_scope(method, path, headers=headers), body


async def call(app: Any, scope: Scope, body: bytes = b"") -> int:
    """Run one request through ``app``; return the status (the body is discarded).

    The loop turns once after every request, as it does under a server (where each request
    is a task of its own): timers such as asgi-perfmon's event-loop probe run in between.
    """
    done = asyncio.Event()
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    status = 0

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        kind = message["type"]
        if kind == "http.response.start":
            status = message["status"]
        elif kind == "http.response.body" and not message.get("more_body", False):
            done.set()

    await app(scope, receive, send)
    done.set()
    await asyncio.sleep(0)  # let the loop turn between requests, as it does under a server
    return status


async def fetch(app: Any, scope: Scope, body: bytes = b"") -> Reply:
    """Run one request through ``app`` and keep the whole response."""
    done = asyncio.Event()
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    reply = Reply()

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            reply.body += message.get("body", b"")
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    done.set()
    return reply


class Lifespan:
    """Runs an app's lifespan: ``await start()`` before traffic, ``await stop()`` after."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Send ``lifespan.startup`` and wait until the app completed it."""
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._task = asyncio.create_task(self._app(scope, self._inbox.get, self._outbox.put))
        await self._inbox.put({"type": "lifespan.startup"})
        await self._expect("lifespan.startup.complete")

    async def stop(self) -> None:
        """Send ``lifespan.shutdown`` and wait for the app to finish it."""
        if self._task is None:
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        await self._expect("lifespan.shutdown.complete")
        await self._task

    async def _expect(self, kind: str) -> None:
        message = await asyncio.wait_for(self._outbox.get(), timeout=10)
        if message["type"] != kind:
            msg = f"lifespan: expected {kind}, got {message}"
            raise RuntimeError(msg)
