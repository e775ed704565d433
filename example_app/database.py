"""The database: a throwaway PostgreSQL when none is configured, the pool, the schema, the SQL.

Every query holds its connection only inside ``async with pool.acquire()``; nothing keeps a
connection between requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from asgi_perfmon.pool import InstrumentedPool, db_operation, instrument_pool
from example_app.settings import COMMAND_TIMEOUT_S, POOL_MAX_SIZE, POOL_MIN_SIZE

if TYPE_CHECKING:
    from tests._postgres import PostgresCluster

logger = structlog.get_logger("example_app")

POOL_NAME = "main"
_SCHEMA_LOCK = 5_317_001  # any constant: serialises schema creation across workers

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""
USER_COLUMNS = "id, name, email, created_at, updated_at"

Record = dict[str, Any]


@asynccontextmanager
async def database_url(configured: str | None) -> AsyncIterator[str]:
    """``configured``, else the DSN of a throwaway PostgreSQL removed on exit."""
    if configured:
        yield configured
        return
    with ExitStack() as stack:
        cluster = await asyncio.to_thread(_start_postgres, stack)
        logger.info(
            "embedded_postgres_started",
            directory=str(cluster.directory),
            port=cluster.port,
            bin_dir=str(cluster.bin_dir),
        )
        try:
            yield cluster.dsn
        finally:
            await asyncio.to_thread(stack.close)
            logger.info("embedded_postgres_removed", directory=str(cluster.directory))


def _start_postgres(stack: ExitStack) -> PostgresCluster:
    """The tests' cluster starter: system server binaries, else those of the pgserver wheel;
    as root the server runs as ``nobody``. Importing it (pytest) and running initdb/pg_ctl
    block, hence a worker thread."""
    from tests._postgres import start_postgres

    return stack.enter_context(start_postgres())


@asynccontextmanager
async def open_pool(dsn: str) -> AsyncIterator[InstrumentedPool]:
    """The application's one pool (min 2, max 10, 60 s command timeout), closed on exit."""
    raw = await asyncpg.create_pool(
        dsn,
        min_size=POOL_MIN_SIZE,
        max_size=POOL_MAX_SIZE,
        command_timeout=COMMAND_TIMEOUT_S,
    )
    pool = instrument_pool(raw, name=POOL_NAME)
    try:
        yield pool
    finally:
        await pool.close()


async def create_schema(pool: InstrumentedPool) -> None:
    """Create the tables if they are missing (idempotent, safe with several workers)."""
    with db_operation("create_schema"):
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            await connection.execute(SCHEMA)


def _record(row: Any) -> Record:
    return dict(row.items())


async def insert_user(pool: InstrumentedPool, name: str, email: str, password_hash: str) -> Record:
    """Insert a user; ``asyncpg.UniqueViolationError`` if the email is taken."""
    with db_operation("insert_user"):
        async with pool.acquire() as connection:
            row = await connection.fetchrow(
                "INSERT INTO users (name, email, password_hash) VALUES ($1, $2, $3) "
                f"RETURNING {USER_COLUMNS}",
                name,
                email,
                password_hash,
            )
    return _record(row)


async def select_user(pool: InstrumentedPool, user_id: int) -> Record | None:
    """One user, or ``None``."""
    with db_operation("select_user"):
        async with pool.acquire() as connection:
            row = await connection.fetchrow(
                f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", user_id
            )
    return None if row is None else _record(row)


async def update_user(pool: InstrumentedPool, user_id: int, name: str, email: str) -> Record | None:
    """Change a user's name and email; ``None`` if there is no such user."""
    with db_operation("update_user"):
        async with pool.acquire() as connection:
            row = await connection.fetchrow(
                "UPDATE users SET name = $2, email = $3, updated_at = now() WHERE id = $1 "
                f"RETURNING {USER_COLUMNS}",
                user_id,
                name,
                email,
            )
    return None if row is None else _record(row)


async def delete_user(pool: InstrumentedPool, user_id: int) -> bool:
    """Delete a user; whether there was one."""
    with db_operation("delete_user"):
        async with pool.acquire() as connection:
            status: str = await connection.execute("DELETE FROM users WHERE id = $1", user_id)
    return status == "DELETE 1"


async def select_users_page(pool: InstrumentedPool, after: int, limit: int) -> list[Record]:
    """Up to ``limit`` users with ids above ``after``, by id (keyset paging: no OFFSET scan)."""
    with db_operation("select_users_page"):
        async with pool.acquire() as connection:
            rows = await connection.fetch(
                f"SELECT {USER_COLUMNS} FROM users WHERE id > $1 ORDER BY id LIMIT $2",
                after,
                limit,
            )
    return [_record(row) for row in rows]


async def user_stats(pool: InstrumentedPool, extra_seconds: float) -> Record:
    """Counts for the report; ``extra_seconds`` stands for a heavy query (``pg_sleep``)."""
    with db_operation("user_stats"):
        async with pool.acquire() as connection:
            row = await connection.fetchrow(
                "SELECT (SELECT count(*) FROM users) AS users, "
                "(SELECT max(updated_at) FROM users) AS last_change FROM pg_sleep($1)",
                extra_seconds,
            )
    return {"users": row["users"], "last_change": row["last_change"]}


async def recent_users(pool: InstrumentedPool, limit: int) -> list[Record]:
    """The users changed most recently."""
    with db_operation("recent_users"):
        async with pool.acquire() as connection:
            rows = await connection.fetch(
                f"SELECT {USER_COLUMNS} FROM users ORDER BY updated_at DESC LIMIT $1", limit
            )
    return [_record(row) for row in rows]


async def ping(pool: InstrumentedPool) -> datetime:
    """The server's clock: proves a connection can be had and used."""
    with db_operation("ping"):
        async with pool.acquire(timeout=2.0) as connection:
            now: datetime = await connection.fetchval("SELECT now()")
    return now
