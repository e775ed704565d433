"""The example service: users, an upstream aggregate, a report that is sometimes slow.

Run it with ``uvicorn example_app.main:app`` (``DATABASE_URL`` unset: it starts a throwaway
PostgreSQL of its own). ``example_app/README.md`` maps each performance guideline to the code.
"""

from __future__ import annotations

import asyncio
import random
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, cast

import aiohttp
import asyncpg
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response, status
from pydantic import Field

from asgi_perfmon import PerfMonMiddleware, configure_logging, metrics_endpoint, timed
from asgi_perfmon.cache import watch_cache
from asgi_perfmon.pool import InstrumentedPool
from example_app import database, upstream_client
from example_app.settings import Settings, get_settings
from example_app.users import (
    EmailTaken,
    User,
    UserCreate,
    UserNotFound,
    UserPage,
    UserService,
    UserUpdate,
)

MAX_DELAY_S = 5.0
MAX_ID = 2**63 - 1  # PostgreSQL bigint: larger ids are invalid input, not a database error
Delay = Annotated[float, Field(ge=0, le=MAX_DELAY_S)]
UserId = Annotated[int, Path(ge=1, le=MAX_ID)]


@dataclass(frozen=True)
class Resources:
    """What the lifespan opens and every request shares."""

    settings: Settings
    pool: InstrumentedPool
    http: aiohttp.ClientSession
    users: UserService


@contextmanager
def app_logging(settings: Settings) -> Iterator[None]:
    """JSON lines into ``EXAMPLE_LOG_FILE`` when set (the demo's slowlog reads it), else stderr."""
    if settings.log_file is None:
        configure_logging(level=settings.log_level)
        yield
        return
    with open(settings.log_file, "a", buffering=1, encoding="utf-8") as stream:
        configure_logging(json=True, level=settings.log_level, stream=stream)
        try:
            yield
        finally:
            configure_logging(json=True, level=settings.log_level, stream=sys.stderr)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """Open everything once at start-up, close it all at shutdown (in reverse order)."""
    settings = get_settings()
    async with AsyncExitStack() as stack:
        stack.enter_context(app_logging(settings))
        dsn = await stack.enter_async_context(database.database_url(settings.database_url))
        pool = await stack.enter_async_context(database.open_pool(dsn))
        await database.create_schema(pool)
        http = await stack.enter_async_context(
            upstream_client.new_session(settings.upstream_timeout_s)
        )
        yield {"resources": Resources(settings, pool, http, UserService(pool, settings))}


async def resources(request: Request) -> Resources:
    """The shared resources (``async``: a sync dependency would hop to the thread pool)."""
    return cast(Resources, request.state.resources)


Shared = Annotated[Resources, Depends(resources)]


def create_app() -> FastAPI:
    """The application: routes, the middleware, ``/metrics``."""
    settings = get_settings()
    watch_cache("settings", get_settings)
    app = FastAPI(title="asgi-perfmon example", lifespan=lifespan)
    app.add_middleware(PerfMonMiddleware)
    app.add_route("/metrics", metrics_endpoint)
    _add_user_routes(app)
    _add_service_routes(app)
    if settings.enable_blocking:
        _add_blocking_route(app)
    return app


def _add_user_routes(app: FastAPI) -> None:
    @app.post("/users", status_code=status.HTTP_201_CREATED)
    async def create_user(new: UserCreate, shared: Shared) -> User:
        try:
            return await shared.users.create(new)
        except EmailTaken:
            raise HTTPException(status.HTTP_409_CONFLICT, "email already registered") from None

    @app.get("/users")
    async def list_users(
        shared: Shared,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    ) -> UserPage:
        return await shared.users.page(after, limit)

    @app.get("/users/{user_id}")
    async def get_user(user_id: UserId, shared: Shared) -> User:
        try:
            return await shared.users.get(user_id)
        except UserNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such user") from None

    @app.put("/users/{user_id}")
    async def update_user(user_id: UserId, change: UserUpdate, shared: Shared) -> User:
        try:
            return await shared.users.update(user_id, change)
        except UserNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such user") from None
        except EmailTaken:
            raise HTTPException(status.HTTP_409_CONFLICT, "email already registered") from None

    @app.delete("/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
    async def delete_user(user_id: UserId, shared: Shared) -> Response:
        try:
            await shared.users.delete(user_id)
        except UserNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such user") from None
        return Response(status_code=status.HTTP_204_NO_CONTENT)


def _add_service_routes(app: FastAPI) -> None:
    @app.get("/overview")
    async def overview(
        shared: Shared,
        delay: Annotated[list[Delay] | None, Query(max_length=len(upstream_client.SOURCES))] = None,
    ) -> dict[str, Any]:
        """Weather, news and quotes from the upstream, fetched concurrently."""
        base = shared.settings.upstream_url
        return await upstream_client.fetch_all(shared.http, base, delay or ())

    @app.get("/report")
    async def report(
        shared: Shared, delay: Annotated[Delay | None, Query()] = None
    ) -> dict[str, Any]:
        """Sometimes slow: ``delay`` (seconds) forces the slow path, for tests and demos."""
        if delay is None:
            delay = _report_delay(shared.settings.slow_report_rate)
        return await build_report(shared, delay)

    @app.get("/health")
    async def health(shared: Shared) -> dict[str, Any]:
        try:
            now = await database.ping(shared.pool)
        except (
            OSError,
            asyncio.TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
        ) as error:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, type(error).__name__) from None
        return {"status": "ok", "database_time": now.isoformat()}

    @app.get("/config")
    async def config() -> dict[str, Any]:
        settings = get_settings()
        return {
            "upstream_url": settings.upstream_url,
            "user_cache_size": settings.user_cache_size,
            "user_cache_ttl_s": settings.user_cache_ttl_s,
            "blocking_endpoint": settings.enable_blocking,
        }


def _report_delay(slow_rate: float) -> float:
    """Now and then a heavy query: over the 1 s slow-request threshold."""
    if random.random() < slow_rate:
        return random.uniform(1.0, 1.5)
    return random.uniform(0.0, 0.02)


@timed("report.build", slow_threshold=1.0)
async def build_report(shared: Resources, delay: float) -> dict[str, Any]:
    """Statistics and recent users (two queries at once) and a quote from the upstream."""
    stats, recent, quote = await asyncio.gather(
        database.user_stats(shared.pool, delay),
        database.recent_users(shared.pool, 5),
        upstream_client.fetch(shared.http, shared.settings.upstream_url, "quotes"),
    )
    return {"stats": stats, "recent": [User(**r) for r in recent], "quote": quote}


def _add_blocking_route(app: FastAPI) -> None:
    @app.get("/blocking")
    async def blocking(
        shared: Shared, seconds: Annotated[float, Query(gt=0, le=2.0)] = 0.3
    ) -> dict[str, Any]:
        """THE ANTI-PATTERN, on purpose: a blocking HTTP call inside ``async def``.

        The whole event loop (every other request) stalls for ``seconds``; the loop monitor's
        watchdog logs ``event_loop_blocked`` with this line in its stack.
        """
        url = f"{shared.settings.upstream_url}/quotes?delay={seconds:g}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=10) as answer:
            return {"blocked_s": seconds, "status": answer.status}


app = create_app()
