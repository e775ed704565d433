"""A raw Starlette app whose endpoint blocks the event loop, for the loop-monitor tests.

``BLOCKING_APP_MODE=block`` (default) calls ``time.sleep(0.3)`` inside ``async def``;
``BLOCKING_APP_MODE=await`` awaits ``asyncio.sleep(0.3)`` instead, the same app without the
blocking call. Logs are JSON lines on stdout, uvicorn's included.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from structlog.contextvars import bound_contextvars

from asgi_perfmon._types import ASGIApp, Receive, Scope, Send
from asgi_perfmon.logconfig import configure_logging
from asgi_perfmon.loop_monitor import LoopMonitor

BLOCK = os.environ.get("BLOCKING_APP_MODE", "block") == "block"

configure_logging(json=True, stream=sys.stdout)
registry = CollectorRegistry()
monitor = LoopMonitor(registry=registry)


async def work(request: Request) -> Response:
    if BLOCK:
        time.sleep(0.3)  # noqa: ASYNC251 - the blocking call the monitor must name
    else:
        await asyncio.sleep(0.3)
    return PlainTextResponse("done")


async def metrics(request: Request) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with monitor:
        yield


class RequestIdMiddleware:
    """Binds the ``x-request-id`` header for the request, so uvicorn's access line has it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers", []))
        request_id = headers.get(b"x-request-id", b"-").decode("latin-1")
        with bound_contextvars(request_id=request_id):
            await self.app(scope, receive, send)


app = RequestIdMiddleware(
    Starlette(routes=[Route("/work", work), Route("/metrics", metrics)], lifespan=lifespan)
)
