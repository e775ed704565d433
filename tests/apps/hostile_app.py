"""A Starlette app for the hostile-input tests under a real uvicorn.

Every request is logged as slow: the middleware's clock moves one second each time it is
read, so any request lasts at least a second without anything sleeping. Logs go through
``configure_logging(json=True)`` to the file named by ``HOSTILE_LOG`` (one JSON object per
line is what the tests check), and the app adds a log line of its own carrying the raw path.
"""

from __future__ import annotations

import itertools
import logging
import os

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_perfmon import PerfMonMiddleware, configure_logging, metrics_endpoint

LOG_ENV = "HOSTILE_LOG"

configure_logging(json=True, stream=open(os.environ[LOG_ENV], "a", buffering=1))  # noqa: SIM115

app_log = structlog.get_logger("hostile_app")
stdlib_log = logging.getLogger("hostile_app.stdlib")


async def item(request: Request) -> Response:
    app_log.info("item_served", path=request.url.path[:200], query=request.url.query[:200])
    stdlib_log.info("item %s served", request.path_params["item_id"])
    return PlainTextResponse(f"item {len(request.path_params['item_id'])}")


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/ok", ok),
        Route("/items/{item_id}", item, methods=["GET", "POST"]),
        Route("/metrics", metrics_endpoint),
    ]
)
app.add_middleware(
    PerfMonMiddleware,
    slow_request_threshold=1.0,
    clock=itertools.count(0.0, 1.0).__next__,
)
