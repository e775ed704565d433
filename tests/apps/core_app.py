"""A Starlette app for the tests that need a real server: streaming, disconnects, workers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_perfmon import PerfMonMiddleware, metrics_endpoint


async def pid(request: Request) -> Response:
    return JSONResponse({"pid": os.getpid()})


async def stream(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for n in range(3):
            await asyncio.sleep(0.1)
            yield f"chunk {n}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


async def endless(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 1024
            await asyncio.sleep(0.01)

    return StreamingResponse(chunks(), media_type="application/octet-stream")


async def background(request: Request) -> Response:
    return PlainTextResponse("queued", background=BackgroundTask(asyncio.sleep, 0.5))


async def boom(request: Request) -> Response:
    raise LookupError("handler failed")


async def upload(request: Request) -> Response:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
    return JSONResponse({"received": size})


app = Starlette(
    routes=[
        Route("/pid", pid),
        Route("/stream", stream),
        Route("/endless", endless),
        Route("/background", background),
        Route("/boom", boom),
        Route("/upload", upload, methods=["POST"]),
        Route("/metrics", metrics_endpoint),
    ]
)
app.add_middleware(PerfMonMiddleware)
