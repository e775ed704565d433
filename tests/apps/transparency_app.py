"""Fixed behaviours, served bare (``bare``) and through PerfMonMiddleware (``monitored``).

tests/test_transparency.py runs both under uvicorn and compares the raw HTTP responses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.background import BackgroundTask
from starlette.responses import FileResponse, PlainTextResponse

from asgi_perfmon import PerfMonMiddleware, metrics_app

Send = Callable[[dict[str, Any]], Awaitable[None]]
LARGE = b"0123456789abcdef" * 65536  # 1 MiB


async def start(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def body(send: Send, data: bytes = b"", *, more: bool = False) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def text(scope: Any, receive: Any, send: Send) -> None:
    await start(send, 200, [(b"content-type", b"text/plain"), (b"content-length", b"5")])
    await body(send, b"hello")


async def headers(scope: Any, receive: Any, send: Send) -> None:
    await start(send, 201, [(b"set-cookie", b"a=1"), (b"X-Custom", b"One"),
                            (b"set-cookie", b"b=2"), (b"cache-control", b"no-store")])  # fmt: skip
    await body(send, b"created")


async def no_content(scope: Any, receive: Any, send: Send) -> None:
    await start(send, 204, [])
    await body(send)


async def not_modified(scope: Any, receive: Any, send: Send) -> None:
    await start(send, 304, [(b"etag", b'"v1"')])
    await body(send)


async def stream(scope: Any, receive: Any, send: Send) -> None:
    await start(send, 200, [(b"content-type", b"text/plain")])
    for chunk in (b"one\n", b"", b"two\n", b"three\n"):
        await body(send, chunk, more=True)
    await body(send)


async def large(scope: Any, receive: Any, send: Send) -> None:
    await start(send, 200, [(b"content-length", str(len(LARGE)).encode())])
    await body(send, LARGE[:300_000], more=True)
    await body(send, LARGE[300_000:])


async def app_id(scope: Any, receive: Any, send: Send) -> None:
    await start(send, 200, [(b"x-request-id", b"set-by-the-app")])
    await body(send, b"mine")


async def echo(scope: Any, receive: Any, send: Send) -> None:
    received = bytearray()
    while True:
        message = await receive()
        received += message.get("body", b"")
        if not message.get("more_body", False):
            break
    await start(send, 200, [(b"content-length", str(len(received)).encode())])
    await body(send, bytes(received))


async def boom(scope: Any, receive: Any, send: Send) -> None:
    raise LookupError("failed before the response")


async def boom_mid(scope: Any, receive: Any, send: Send) -> None:
    await start(send, 200, [(b"content-type", b"text/plain")])
    await body(send, b"partial", more=True)
    raise LookupError("failed mid-stream")


async def after(scope: Any, receive: Any, send: Send) -> None:
    await text(scope, receive, send)
    raise LookupError("failed after the response")


async def background(scope: Any, receive: Any, send: Send) -> None:
    task = BackgroundTask(asyncio.sleep, 0.01)
    await PlainTextResponse("queued", background=task)(scope, receive, send)


async def file(scope: Any, receive: Any, send: Send) -> None:
    await FileResponse(__file__, stat_result=None)(scope, receive, send)


async def not_found(scope: Any, receive: Any, send: Send) -> None:
    await start(send, 404, [(b"content-length", b"0")])
    await body(send)


ROUTES = {
    "/text": text, "/headers": headers, "/no-content": no_content,
    "/not-modified": not_modified, "/stream": stream, "/large": large, "/app-id": app_id,
    "/echo": echo, "/boom": boom, "/boom-mid": boom_mid, "/after": after,
    "/background": background, "/file": file,
}  # fmt: skip


async def bare(scope: Any, receive: Any, send: Send) -> None:
    await ROUTES.get(scope["path"], not_found)(scope, receive, send)


registry = CollectorRegistry()
_instrumented = PerfMonMiddleware(bare, registry=registry, loop_monitor=False)
_metrics = metrics_app(registry)


async def monitored(scope: Any, receive: Any, send: Send) -> None:
    app = _metrics if scope["path"] == "/metrics" else _instrumented
    await app(scope, receive, send)
