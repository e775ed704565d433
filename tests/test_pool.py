"""asyncpg pool and query metrics, against a real PostgreSQL server started by the suite."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from asgi_perfmon import context
from asgi_perfmon.context import RequestContext
from asgi_perfmon.pool import (
    InstrumentedPool,
    db_operation,
    instrument_pool,
    sql_operation_name,
)
from tests._postgres import PostgresCluster

MakePool = Callable[..., Awaitable[InstrumentedPool]]
REPO = Path(__file__).resolve().parent.parent


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def connections(registry: CollectorRegistry, pool_name: str, state: str) -> float | None:
    return value(registry, "db_client_connection_count", pool_name=pool_name, state=state)


def queries(registry: CollectorRegistry, operation: str, outcome: str = "ok") -> float:
    count = value(
        registry,
        "db_client_operation_duration_seconds_count",
        pool_name="default",
        db_operation_name=operation,
        outcome=outcome,
    )
    return count or 0.0


def waits(registry: CollectorRegistry, pool_name: str = "default") -> float:
    return value(registry, "db_client_connection_wait_time_seconds_count", pool_name=pool_name) or 0


async def logged() -> None:
    """Let asyncpg's query loggers run: it schedules them with ``call_soon``."""
    await asyncio.sleep(0)


@pytest.fixture
async def make_pool(postgres_dsn: str, registry: CollectorRegistry) -> AsyncIterator[MakePool]:
    """Create instrumented pools on the shared server; close them after the test."""
    created: list[InstrumentedPool] = []

    async def make(name: str = "default", **options: Any) -> InstrumentedPool:
        options.setdefault("min_size", 1)
        pool = await asyncpg.create_pool(postgres_dsn, **options)
        facade = instrument_pool(pool, name, registry=registry)
        created.append(facade)
        return facade

    yield make
    for facade in created:
        facade.terminate()


@pytest.fixture
async def table(postgres_dsn: str) -> AsyncIterator[str]:
    """A fresh table ``(id int)`` of the test's own."""
    name = f"items_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(postgres_dsn)
    await connection.execute(f"CREATE TABLE {name} (id int)")
    yield name
    await connection.execute(f"DROP TABLE {name}")
    await connection.close()


# --- operation names (no server needed) ---------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT 1", "SELECT"),
        ("  select * from t", "SELECT"),
        ("-- find them\n/* all of them */ SELECT 1", "SELECT"),
        ("(SELECT 1) UNION (SELECT 2)", "SELECT"),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "WITH"),
        ("insert into t values ($1)", "INSERT"),
        ("BEGIN;", "BEGIN"),
        ("FOOBAR everything", "OTHER"),
        ("", "OTHER"),
        ("42", "OTHER"),
    ],
)
def test_operation_name_is_the_first_sql_keyword_from_a_bounded_list(
    query: str, expected: str
) -> None:
    assert sql_operation_name(query) == expected


def test_db_operation_needs_a_name() -> None:
    with pytest.raises(ValueError, match="non-empty string"), db_operation(""):
        pass


def test_instrument_pool_rejects_what_is_not_a_pool(registry: CollectorRegistry) -> None:
    with pytest.raises(TypeError, match=r"needs an asyncpg\.Pool"):
        instrument_pool(object(), registry=registry)


async def test_instrument_pool_validates_its_options(registry: CollectorRegistry) -> None:
    pool = asyncpg.create_pool("postgresql://nowhere", min_size=0)  # never connected
    with pytest.raises(ValueError, match="pool name"):
        instrument_pool(pool, "", registry=registry)
    with pytest.raises(ValueError, match="sample_interval"):
        instrument_pool(pool, sample_interval=0, registry=registry)
    with pytest.raises(ValueError, match="buckets"):
        instrument_pool(pool, buckets=[0.1, 0.05], registry=registry)
    instrument_pool(pool, "first", buckets=[0.1, 1.0], registry=registry)
    other = asyncpg.create_pool("postgresql://nowhere", min_size=0)
    with pytest.raises(ValueError, match="must match those of the first pool"):
        instrument_pool(other, "second", buckets=[0.5], registry=registry)


# --- sizes --------------------------------------------------------------------------------


@pytest.mark.postgres
async def test_size_gauges_follow_the_connections_held(
    make_pool: MakePool, registry: CollectorRegistry
) -> None:
    pool = await make_pool("main", min_size=1, max_size=4)
    assert value(registry, "db_client_connection_max", pool_name="main") == 4
    assert value(registry, "db_client_connection_min", pool_name="main") == 1
    assert connections(registry, "main", "used") == 0

    async with pool.acquire():
        second = await pool.acquire()
        assert connections(registry, "main", "used") == 2
        idle = connections(registry, "main", "idle")
        assert idle == pool.get_size() - 2
        await pool.release(second)
        assert connections(registry, "main", "used") == 1
    assert connections(registry, "main", "used") == 0
    assert connections(registry, "main", "idle") == pool.get_size()


@pytest.mark.postgres
async def test_several_pools_are_told_apart_by_name(
    make_pool: MakePool, registry: CollectorRegistry
) -> None:
    primary = await make_pool("primary", max_size=3)
    replica = await make_pool("replica", max_size=5)

    async with replica.acquire():
        assert connections(registry, "replica", "used") == 1
        assert connections(registry, "primary", "used") == 0
    await primary.fetchval("SELECT 1")

    assert value(registry, "db_client_connection_max", pool_name="primary") == 3
    assert value(registry, "db_client_connection_max", pool_name="replica") == 5
    assert waits(registry, "primary") == 1
    assert waits(registry, "replica") == 1


@pytest.mark.postgres
async def test_a_closed_pool_leaves_the_scrape_working(
    make_pool: MakePool, registry: CollectorRegistry
) -> None:
    closing = await make_pool("closing")
    staying = await make_pool("staying")
    await closing.close()

    text = generate_latest(registry).decode()

    assert 'db_client_connection_max{pool_name="closing"}' not in text
    assert (
        value(registry, "db_client_connection_max", pool_name="staying") == staying.get_max_size()
    )


class _UnreadablePool:
    """A pool whose size cannot be read: the collector must skip it, not fail the scrape."""

    def acquire(self) -> None: ...
    def release(self) -> None: ...
    def is_closing(self) -> bool:
        return False

    def get_size(self) -> int:
        raise RuntimeError("cannot read the size")

    def get_idle_size(self) -> int:
        return 0


@pytest.mark.postgres
async def test_a_pool_that_cannot_be_read_is_logged_once_and_skipped(
    make_pool: MakePool, registry: CollectorRegistry
) -> None:
    await make_pool("healthy", max_size=2)
    instrument_pool(_UnreadablePool(), "broken", registry=registry)

    with structlog.testing.capture_logs() as logs:
        generate_latest(registry)
        generate_latest(registry)

    assert value(registry, "db_client_connection_max", pool_name="healthy") == 2
    assert value(registry, "db_client_connection_max", pool_name="broken") is None
    failures = [log for log in logs if log["event"] == "collector_failed"]
    assert [(f["pool_name"], f["error_type"]) for f in failures] == [("broken", "RuntimeError")]


@pytest.mark.postgres
async def test_a_pool_is_instrumented_once_per_name(
    make_pool: MakePool, registry: CollectorRegistry
) -> None:
    pool = await make_pool("one")
    assert instrument_pool(pool.pool, "one", registry=registry) is pool
    assert instrument_pool(pool, "one", registry=registry) is pool
    with pytest.raises(ValueError, match="already instrumented as 'one'"):
        instrument_pool(pool.pool, "two", registry=registry)
    other = await asyncpg.create_pool(pool.pool._connect_args[0], min_size=0)
    try:
        with pytest.raises(ValueError, match="own name"):
            instrument_pool(other, "one", registry=registry)
        await pool.close()
        assert instrument_pool(other, "one", registry=registry).pool is other
    finally:
        await other.close()


# --- acquiring ----------------------------------------------------------------------------


@pytest.mark.postgres
async def test_queueing_shows_in_the_wait_histogram_and_pending_gauge(
    make_pool: MakePool, registry: CollectorRegistry
) -> None:
    pool = await make_pool(min_size=2, max_size=2)

    async def hold() -> None:
        async with pool.acquire():
            await asyncio.sleep(0.1)

    holders = [asyncio.create_task(hold()) for _ in range(5)]
    await asyncio.sleep(0.03)
    pending_while_queued = value(
        registry, "db_client_connection_pending_requests", pool_name="default"
    )
    await asyncio.gather(*holders)

    assert pending_while_queued == 3
    assert value(registry, "db_client_connection_pending_requests", pool_name="default") == 0
    assert waits(registry) == 5
    quick = value(
        registry, "db_client_connection_wait_time_seconds_bucket", pool_name="default", le="0.05"
    )
    assert quick == 2  # three holders waited for a release: about 0.1, 0.1 and 0.2 s
    total = value(registry, "db_client_connection_wait_time_seconds_sum", pool_name="default")
    assert total is not None
    assert total >= 0.35


@pytest.mark.postgres
async def test_an_acquire_timeout_is_counted(
    make_pool: MakePool, registry: CollectorRegistry
) -> None:
    pool = await make_pool(max_size=1)

    async with pool.acquire():
        with pytest.raises(asyncio.TimeoutError):
            await pool.acquire(timeout=0.05)

    assert value(registry, "db_client_connection_timeouts_total", pool_name="default") == 1
    assert value(registry, "db_client_connection_pending_requests", pool_name="default") == 0
    assert waits(registry) == 2


@pytest.mark.postgres
async def test_every_way_of_acquiring_is_measured(
    make_pool: MakePool, registry: CollectorRegistry, table: str
) -> None:
    pool = await make_pool(max_size=2)

    async with pool.acquire() as connection:
        await connection.execute(f"INSERT INTO {table} VALUES (1)")
    connection = await pool.acquire()
    await connection.fetch(f"SELECT id FROM {table}")
    await pool.release(connection)
    await pool.execute(f"INSERT INTO {table} VALUES ($1)", 2)
    await pool.executemany(f"INSERT INTO {table} VALUES ($1)", [(3,), (4,)])
    await pool.fetch(f"SELECT id FROM {table}")
    await pool.fetchrow(f"SELECT id FROM {table} LIMIT 1")
    assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 4
    await pool.fetchmany(f"SELECT id FROM {table} WHERE id = $1", [(1,), (2,)])
    await pool.copy_records_to_table(table, records=[(5,), (6,)])
    await logged()

    assert waits(registry) == 9
    assert queries(registry, "INSERT") == 3
    assert queries(registry, "SELECT") == 5
    assert queries(registry, "COPY") == 1
    assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 6


# --- queries ------------------------------------------------------------------------------


@pytest.mark.postgres
async def test_a_query_error_is_counted_by_type(
    make_pool: MakePool, registry: CollectorRegistry
) -> None:
    pool = await make_pool()

    with pytest.raises(asyncpg.UndefinedTableError):
        await pool.fetch("SELECT * FROM no_such_table")
    async with pool.acquire() as connection:
        with pytest.raises(asyncpg.PostgresSyntaxError):
            await connection.execute("SELEKT 1")
    await logged()

    assert queries(registry, "SELECT", "error") == 1
    assert queries(registry, "OTHER", "error") == 1
    errors = {
        (operation, error_type): value(
            registry,
            "db_client_operation_errors_total",
            pool_name="default",
            db_operation_name=operation,
            error_type=error_type,
        )
        for operation, error_type in [
            ("SELECT", "UndefinedTableError"),
            ("OTHER", "PostgresSyntaxError"),
        ]
    }
    assert errors == {
        ("SELECT", "UndefinedTableError"): 1,
        ("OTHER", "PostgresSyntaxError"): 1,
    }


@pytest.mark.postgres
async def test_queries_are_named_by_operation_never_by_sql_text(
    make_pool: MakePool, registry: CollectorRegistry, table: str
) -> None:
    pool = await make_pool()

    await pool.execute(f"INSERT INTO {table} VALUES (1)")
    await pool.fetchval(f"  -- how many\n select count(*) from {table}")
    with db_operation("count_items"):
        await pool.fetchval(f"SELECT count(*) FROM {table}")
    token = context._operation.set("nightly_report")  # what an enclosing timed() sets
    try:
        await pool.fetchval(f"SELECT count(*) FROM {table}")
        with db_operation("inner_name"):
            await pool.fetchval(f"SELECT count(*) FROM {table}")
    finally:
        context._operation.reset(token)
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute(f"DELETE FROM {table}")
    await logged()

    names = {
        sample.labels["db_operation_name"]
        for family in registry.collect()
        if family.name == "db_client_operation_duration_seconds"
        for sample in family.samples
        if sample.name.endswith("_count")
    }
    assert names == {"INSERT", "SELECT", "count_items", "nightly_report", "inner_name",
                     "BEGIN", "DELETE", "COMMIT"}  # fmt: skip
    assert queries(registry, "SELECT") == 1
    # six releases ran the reset query; none of them is counted
    assert sum(queries(registry, name) for name in names) == 8


@pytest.mark.postgres
async def test_the_request_gets_query_totals_and_repeated_statements(
    make_pool: MakePool, registry: CollectorRegistry
) -> None:
    pool = await make_pool()
    request = RequestContext(request_id="r-1")
    token = context._current.set(request)
    try:
        for user_id in range(3):
            await pool.fetchval("SELECT $1::int", user_id)
        await asyncio.gather(*(pool.fetchval("SELECT 2") for _ in range(2)))
        with pytest.raises(asyncpg.UndefinedTableError):
            await pool.fetch("SELECT * FROM no_such_table")
        await logged()
    finally:
        context._current.reset(token)
    await pool.fetchval("SELECT 3")  # outside the request
    await logged()

    assert request.db_queries == 6
    assert request.db_errors == 1
    assert request.db_total_s > 0
    assert request.db_acquire_wait_s > 0
    assert request.repeated_statements() == [
        {"statement": "SELECT $1::int", "count": 3},
        {"statement": "SELECT 2", "count": 2},
    ]


@pytest.mark.postgres
async def test_a_held_connection_is_timed_only_while_it_is_held(
    make_pool: MakePool, registry: CollectorRegistry
) -> None:
    pool = await make_pool(min_size=1, max_size=1)  # one connection, reused throughout

    async with pool.acquire() as connection:
        await connection.fetchval("SELECT 1")
    await pool.pool.fetchval("SELECT 2")  # the raw pool, after the facade released it
    connection = await pool.acquire()
    await connection.fetchval("SELECT 3")
    await pool.pool.release(connection)  # released around the facade: the reset query
    await logged()  # reaches the logger and must be skipped

    assert queries(registry, "SELECT") == 2
    assert sum(queries(registry, name) for name in ("SELECT", "OTHER")) == 2


# --- the server goes away -----------------------------------------------------------------


@pytest.mark.postgres
async def test_a_server_stopped_mid_run_is_counted_and_metrics_recover(
    postgres_cluster: PostgresCluster, registry: CollectorRegistry
) -> None:
    raw = await asyncpg.create_pool(postgres_cluster.dsn, min_size=1, max_size=2)
    pool = instrument_pool(raw, "flaky", registry=registry)
    try:
        assert await pool.fetchval("SELECT 1") == 1
        in_flight = asyncio.create_task(pool.fetchval("SELECT pg_sleep(10)"))
        await asyncio.sleep(0.2)

        await asyncio.to_thread(postgres_cluster.stop)
        with pytest.raises(asyncpg.ConnectionDoesNotExistError):
            await in_flight
        for _ in range(3):
            with pytest.raises(ConnectionRefusedError):
                await pool.fetchval("SELECT 1")
        scrape_while_down = generate_latest(registry).decode()

        await asyncio.to_thread(postgres_cluster.start)
        assert await pool.fetchval("SELECT 1") == 1
        await logged()
    finally:
        await pool.close()

    assert "db_client_connection_acquire_errors_total" in scrape_while_down
    assert (
        value(
            registry,
            "db_client_connection_acquire_errors_total",
            pool_name="flaky",
            error_type="ConnectionRefusedError",
        )
        == 3
    )
    assert (
        value(
            registry,
            "db_client_operation_errors_total",
            pool_name="flaky",
            db_operation_name="SELECT",
            error_type="ConnectionDoesNotExistError",
        )
        == 1
    )
    ok = value(
        registry,
        "db_client_operation_duration_seconds_count",
        pool_name="flaky",
        db_operation_name="SELECT",
        outcome="ok",
    )
    assert ok == 2  # before the stop and after the restart


@pytest.mark.postgres
async def test_pool_gauges_recover_after_a_restart(
    postgres_cluster: PostgresCluster, registry: CollectorRegistry
) -> None:
    raw = await asyncpg.create_pool(postgres_cluster.dsn, min_size=1, max_size=3)
    pool = instrument_pool(raw, "flaky", registry=registry)
    try:
        await asyncio.to_thread(postgres_cluster.stop)
        await asyncio.sleep(0.05)  # the client notices the closed socket
        assert connections(registry, "flaky", "idle") == 0

        await asyncio.to_thread(postgres_cluster.start)
        async with pool.acquire(), pool.acquire():
            assert connections(registry, "flaky", "used") == 2
    finally:
        await pool.close()


# --- multiprocess mode --------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    import asyncpg
    from asgi_perfmon.pool import instrument_pool

    async def main(dsn):
        raw = await asyncpg.create_pool(dsn, min_size=1, max_size=3)
        pool = instrument_pool(raw, "shared", sample_interval=0.05)
        async with pool.acquire():
            await asyncio.sleep(0.2)
            print("holding", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
        await pool.close()

    asyncio.run(main(sys.argv[1]))
    """
)


def _shared_pool_sizes(directory: Path) -> dict[str, float | None]:
    """Read the multiprocess files now (the collector reads them at each collect)."""
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=str(directory))  # type: ignore[no-untyped-call]
    labels = {"pool_name": "shared"}
    return {
        "used": merged.get_sample_value("db_client_connection_count", {**labels, "state": "used"}),
        "min": merged.get_sample_value("db_client_connection_min", labels),
        "max": merged.get_sample_value("db_client_connection_max", labels),
    }


@pytest.mark.postgres
def test_multiprocess_mode_samples_the_sizes_of_every_process(
    postgres_dsn: str, tmp_path: Path
) -> None:
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": python_path}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, postgres_dsn],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "holding"
        while_held = _shared_pool_sizes(tmp_path)
        for worker in workers:
            worker.communicate("\n", timeout=30)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    after_close = _shared_pool_sizes(tmp_path)

    assert [worker.returncode for worker in workers] == [0, 0]
    assert while_held == {"used": 2, "min": 2, "max": 6}  # one held of 1..3, in each process
    assert after_close == {"used": 0, "min": 0, "max": 0}
