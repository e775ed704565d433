"""A Starlette app for the fault tests, run under uvicorn and set up by environment variables.

* ``FAULTS_DSN``: a PostgreSQL DSN. ``/db`` then runs ``SELECT 1`` on an instrumented asyncpg
  pool, answering 503 when the database cannot be reached (the way a careful app does).
* ``FAULTS_RAISING_LOG_SINK=1``: every structlog call is counted in
  ``faults_app_log_calls_total{event}`` and then reaches a sink that raises ``OSError`` (a
  full disk). Otherwise logs are JSON lines on stdout.
* ``FAULTS_MAX_LABEL_VALUES``: the middleware's label cap, to provoke label overflow.

``/slow`` moves the middleware's clock forward by 5 s, so it is a slow request without
sleeping; ``/block`` blocks the event loop for 0.15 s, three times the monitor's threshold.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import structlog
from prometheus_client import Counter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_perfmon import LoopMonitor, PerfMonMiddleware, instrument_pool, metrics_endpoint
from asgi_perfmon.logconfig import configure_logging
from asgi_perfmon.pool import InstrumentedPool

DSN = os.environ.get("FAULTS_DSN")
CAP = os.environ.get("FAULTS_MAX_LABEL_VALUES")
# asyncpg also raises InternalClientError ("cannot switch to state 12; another operation is
# in progress") from a query on a connection the stopping server has just dropped.
DATABASE_DOWN = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

LOG_CALLS = Counter("faults_app_log_calls", "structlog calls that reached the sink", ["event"])


def count_then_pass(_: Any, __: str, event: MutableMapping[str, Any]) -> Any:
    LOG_CALLS.labels(str(event.get("event"))).inc()
    return event


class FullDisk:
    """A structlog logger whose every write fails."""

    def msg(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


if os.environ.get("FAULTS_RAISING_LOG_SINK") == "1":
    structlog.configure(
        processors=[count_then_pass, structlog.processors.JSONRenderer()],
        logger_factory=lambda *args: FullDisk(),
        cache_logger_on_first_use=True,
    )
else:
    configure_logging(json=True, stream=sys.stdout)


class JumpingClock:
    """``perf_counter`` plus an offset that ``/slow`` moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.perf_counter() + self.offset


clock = JumpingClock()
pool: InstrumentedPool | None = None


async def plain(request: Request) -> Response:
    return PlainTextResponse("ok")


async def slow(request: Request) -> Response:
    clock.offset += 5.0
    return PlainTextResponse("slow")


async def block(request: Request) -> Response:
    time.sleep(0.15)  # noqa: ASYNC251 - the stall the loop monitor must report
    return PlainTextResponse("blocked")


async def db(request: Request) -> Response:
    assert pool is not None, "/db needs FAULTS_DSN"
    try:
        value = await pool.fetchval("SELECT 1")
    except DATABASE_DOWN as error:
        return PlainTextResponse(f"database unavailable: {type(error).__name__}", 503)
    return PlainTextResponse(str(value))


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global pool
    if DSN:
        pool = instrument_pool(await asyncpg.create_pool(DSN, min_size=2, max_size=8))
    try:
        yield
    finally:
        if pool is not None:
            await pool.close()


routes = [Route(path, plain) for path in ("/plain", "/r1", "/r2", "/r3", "/r4", "/r5")]
app = Starlette(
    routes=[
        *routes,
        Route("/slow", slow),
        Route("/block", block),
        Route("/db", db),
        Route("/metrics", metrics_endpoint),
    ],
    lifespan=lifespan,
)
app.add_middleware(
    PerfMonMiddleware,
    clock=clock,
    max_label_values=int(CAP) if CAP else None,
    loop_monitor=LoopMonitor(blocked_threshold=0.05),
)
