"""A FastAPI app that makes every metric family on the Grafana dashboard move.

``tests/test_grafana.py`` runs it under uvicorn, drives :data:`TRAFFIC` at it and has a real
Prometheus scrape it, so that every panel and every recording rule can be shown to return data.
``GRAFANA_TARGET_DSN`` is the PostgreSQL server of the asyncpg pool. Each route exists to feed
particular panels:

* ``/items/{item_id}``: a ``cached`` lookup (hits, misses, size and TTL evictions) inside a
  ``timed`` operation; ``DELETE`` invalidates the entry.
* ``/users/{user_id}``: a query through the instrumented pool inside a ``timed`` operation.
* ``/lookup/{n}``: a named ``db_operation``; more names than the pool's label cap, so the
  label overflow counter moves.
* ``/saturate``: holds a connection for a while, so the small pool saturates, acquirers queue
  and wait; ``/timeout`` holds the whole pool and then times out acquiring one more.
* ``/slow``: over the slow-request threshold. ``/block``: blocks the event loop.
* ``/fail``: an operation that raises, answered 500. ``/stream-fail``: fails mid-stream, an
  aborted request. ``/echo``: request and response bodies.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

from asgi_perfmon import PerfMonMiddleware, metrics_endpoint
from asgi_perfmon.cache import cached
from asgi_perfmon.pool import InstrumentedPool, db_operation, instrument_pool
from asgi_perfmon.timing import timed

SLOW_REQUEST_THRESHOLD_S = 0.1
POOL_MAX_SIZE = 2
POOL_LABEL_CAP = 6  # db_operation_name values: SELECT, lookup_0..4, then __overflow__
LOOKUP_NAMES = 8

TRAFFIC: tuple[tuple[str, str, int], ...] = (
    # (method, path, weight); "{n}" is replaced by a number from 0 to 15.
    ("GET", "/items/{n}", 12),
    ("GET", "/users/{n}", 8),
    ("GET", "/lookup/{n}", 3),
    ("GET", "/saturate", 3),
    ("GET", "/timeout", 1),
    ("GET", "/slow", 2),
    ("GET", "/block", 1),
    ("GET", "/fail", 1),
    ("GET", "/stream-fail", 1),
    ("POST", "/echo", 2),
    ("DELETE", "/items/{n}", 1),
    ("GET", "/no-such-route", 1),
)
"""The request mix the test drives; every route appears at least once a second or so."""


class Unavailable(Exception):
    """The lookup failed on purpose."""


@cached("items", maxsize=8, ttl=2.0)
async def load_item(item_id: int) -> dict[str, Any]:
    await asyncio.sleep(0.002)
    return {"id": item_id, "name": f"item {item_id}"}


@timed("flaky_dependency")
async def call_flaky_dependency() -> None:
    await asyncio.sleep(0.001)
    raise Unavailable("the dependency is down")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, InstrumentedPool]]:
    raw = await asyncpg.create_pool(
        os.environ["GRAFANA_TARGET_DSN"], min_size=1, max_size=POOL_MAX_SIZE
    )
    pool = instrument_pool(raw, "default", max_label_values=POOL_LABEL_CAP)
    try:
        yield {"pool": pool}
    finally:
        await pool.close()


def pool_of(request: Request) -> InstrumentedPool:
    pool: InstrumentedPool = request.state.pool
    return pool


app = FastAPI(lifespan=lifespan)
app.add_middleware(PerfMonMiddleware, slow_request_threshold=SLOW_REQUEST_THRESHOLD_S)
app.add_route("/metrics", metrics_endpoint)


@app.get("/items/{item_id}")
async def get_item(item_id: int) -> dict[str, Any]:
    async with timed("render_item"):
        return await load_item(item_id)


@app.delete("/items/{item_id}", status_code=204)
async def forget_item(item_id: int) -> Response:
    load_item.invalidate(item_id)
    return Response(status_code=204)


@app.get("/users/{user_id}")
async def get_user(user_id: int, request: Request) -> dict[str, Any]:
    async with timed("load_user"):
        row = await pool_of(request).fetchrow(
            "SELECT $1::int AS id, 'user ' || $1::text AS name", user_id
        )
    return dict(row)


@app.get("/lookup/{n}")
async def lookup(n: int, request: Request) -> dict[str, int]:
    with db_operation(f"lookup_{n % LOOKUP_NAMES}"):
        value = await pool_of(request).fetchval("SELECT $1::int", n)
    return {"value": value}


@app.get("/saturate")
async def saturate(request: Request) -> dict[str, str]:
    await pool_of(request).execute("SELECT pg_sleep(0.15)")
    return {"status": "ok"}


@app.get("/timeout")
async def timeout(request: Request) -> Response:
    pool = pool_of(request)
    try:
        async with (
            pool.acquire(timeout=1.0),
            pool.acquire(timeout=1.0),
            pool.acquire(timeout=0.01),  # the pool has two connections: times out
        ):
            pass
    except asyncio.TimeoutError:
        return PlainTextResponse("no connection", status_code=503)
    return PlainTextResponse("unexpected: a third connection", status_code=200)


@app.get("/slow")
async def slow() -> dict[str, str]:
    await asyncio.sleep(SLOW_REQUEST_THRESHOLD_S * 1.5)
    return {"status": "slow"}


@app.get("/block")
async def block() -> dict[str, str]:
    time.sleep(0.15)  # noqa: ASYNC251 - blocks the event loop on purpose
    return {"status": "blocked the loop"}


@app.get("/fail")
async def fail() -> None:
    await call_flaky_dependency()


@app.get("/stream-fail")
async def stream_fail() -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"first chunk\n"
        raise Unavailable("the stream broke")

    return StreamingResponse(chunks(), media_type="text/plain")


@app.post("/echo")
async def echo(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")
