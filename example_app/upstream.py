"""A stand-in for the third-party HTTP services the example app calls, served on loopback.

``GET /{resource}`` answers after a short, resource-specific delay (a few tens of ms, like a
nearby service) with a small JSON document; ``?delay=0.3`` makes it answer after exactly that
many seconds, which the tests and the load generator use. Run it with
``uvicorn example_app.upstream:app``.
"""

from __future__ import annotations

import asyncio
import random

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

MAX_DELAY_S = 5.0

# Typical answer times (low, high) in seconds; ``delay`` overrides them.
TYPICAL_DELAYS: dict[str, tuple[float, float]] = {
    "weather": (0.02, 0.08),
    "news": (0.03, 0.12),
    "quotes": (0.01, 0.05),
}


def answer_delay(resource: str, requested: str | None) -> float:
    """The seconds to wait before answering: the requested delay (capped), else a typical one."""
    if requested is not None:
        try:
            return min(max(float(requested), 0.0), MAX_DELAY_S)
        except ValueError:
            return 0.0
    low, high = TYPICAL_DELAYS.get(resource, (0.01, 0.05))
    return random.uniform(low, high)


async def resource(request: Request) -> JSONResponse:
    name = request.path_params["resource"]
    delay = answer_delay(name, request.query_params.get("delay"))
    await asyncio.sleep(delay)
    return JSONResponse({"resource": name, "delay_s": round(delay, 4), "value": random.random()})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/health", health), Route("/{resource}", resource)])
