"""A Starlette app answering a deterministic mix of statuses, for the load tests.

``tests/test_load.py`` runs it under uvicorn and sends request ``i`` as ``MIX[i % len(MIX)]``,
so the client knows the route and status of every request it sends. Every response carries
``X-Worker-Pid``, so the client also knows which worker answered. ``/hold`` answers its first
chunk (the worker's pid) and then never finishes: a request that stays in flight.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import NamedTuple

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_perfmon import PerfMonMiddleware, metrics_endpoint
from asgi_perfmon._types import Message, Receive, Scope, Send

POST_BODY = b"p" * 100


class Kind(NamedTuple):
    """One kind of request: what the client sends and what the metrics must say about it."""

    method: str
    path: str
    route: str
    status: int


MIX: tuple[Kind, ...] = (
    Kind("GET", "/ok", "/ok", 200),
    Kind("POST", "/items", "/items", 201),
    Kind("GET", "/items/2", "/items/{item_id}", 200),
    Kind("GET", "/items/3", "/items/{item_id}", 404),
    Kind("GET", "/no/such/path", "__unmatched__", 404),
    Kind("GET", "/fail", "/fail", 500),
    Kind("GET", "/ok", "/ok", 200),
    Kind("POST", "/items", "/items", 201),
    Kind("GET", "/raise", "/raise", 500),
    Kind("GET", "/items/4", "/items/{item_id}", 200),
)
"""Four in ten answer 200, and two in ten each 201, 404 and 500 (one of those by raising)."""


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def create_item(request: Request) -> Response:
    body = await request.body()
    return JSONResponse({"received": len(body)}, status_code=201)


async def item(request: Request) -> Response:
    item_id = request.path_params["item_id"]
    if item_id % 2:
        return PlainTextResponse("no such item", status_code=404)
    return JSONResponse({"item_id": item_id})


async def fail(request: Request) -> Response:
    return PlainTextResponse("failed", status_code=500)


async def raise_error(request: Request) -> Response:
    raise RuntimeError("load test failure")


async def pid(request: Request) -> Response:
    return JSONResponse({"pid": os.getpid()})


async def hold(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        yield f"{os.getpid()}\n".encode()
        await asyncio.Event().wait()  # never set: the request stays in flight

    return StreamingResponse(chunks(), media_type="text/plain")


class WorkerPidHeader:
    """Outermost wrapper adding ``X-Worker-Pid`` to every response, error pages included."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self._header = (b"x-worker-pid", str(os.getpid()).encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self._header]
            await send(message)

        await self.app(scope, receive, send_with_pid if scope["type"] == "http" else send)


starlette_app = Starlette(
    routes=[
        Route("/ok", ok),
        Route("/items", create_item, methods=["POST"]),
        Route("/items/{item_id:int}", item),
        Route("/fail", fail),
        Route("/raise", raise_error),
        Route("/pid", pid),
        Route("/hold", hold),
        Route("/metrics", metrics_endpoint),
    ]
)
starlette_app.add_middleware(PerfMonMiddleware)
app = WorkerPidHeader(starlette_app)
