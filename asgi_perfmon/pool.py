"""asyncpg pool and query metrics, without monkeypatching asyncpg.

How it is wired:

* :func:`instrument_pool` returns an :class:`InstrumentedPool`, a facade over an existing
  ``asyncpg.Pool``. Its ``acquire()`` keeps both asyncpg forms (``async with pool.acquire()``
  and ``await pool.acquire()`` + ``release``) and measures the wait, the waiters and the
  timeouts. ``execute``, ``executemany``, ``fetch``, ``fetchrow``, ``fetchval``, ``fetchmany``
  and the ``copy_*`` shortcuts go through that same ``acquire()``; every other attribute is
  the pool's own.
* The shortcuts time each call themselves. A connection the application holds gets asyncpg's
  public query logger (``Connection.add_query_logger``) from ``acquire()`` until it is
  released through the facade, which removes it before the pool runs its reset query; so a
  pool created before ``instrument_pool`` works too. asyncpg calls the logger with
  ``call_soon`` in the querying task's context, so the per-request breakdown and
  :func:`db_operation` names are seen there. The logger is kept off the shortcuts because it
  costs more than timing them directly, and because asyncpg drops it with a lost
  connection before the failing query resumes.
* Pool sizes are read at scrape time by one collector per registry (several pools by name).
  In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) scrape-time collectors only see the
  scraping process, so each pool is sampled instead: a task writes ``livesum`` gauges every
  ``sample_interval`` seconds, and the scrape adds the processes up.

What is not seen: explicit prepared statements (``con.prepare(...)``), cursors, and the
``copy_*`` methods of a connection (the pool's ``copy_*`` shortcuts are timed as ``COPY``);
queries on connections acquired from the pool itself rather than the facade; queries in the
pool's ``init`` and ``setup`` hooks; on a connection the application holds, a query that fails
because the connection was lost (asyncpg drops the logger with the connection; the shortcuts
do count it). A connection released through the pool itself instead of the facade keeps the
logger, and later shortcut queries on it would be counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric

from asgi_perfmon._labels import (
    DEFAULT_MAX_LABEL_VALUES,
    BoundedFamilies,
    validate_max_label_values,
)
from asgi_perfmon._logging import FailureLog
from asgi_perfmon._registry import (
    metric_name,
    resolve_namespace,
    resolve_registry,
    shared_matching,
)
from asgi_perfmon.context import current_operation, current_request

__all__ = [
    "DB_BUCKETS",
    "InstrumentedPool",
    "db_operation",
    "instrument_pool",
    "sql_operation_name",
]


DB_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Buckets for query durations and acquire waits, in seconds: finer than the HTTP ones at the
low end, where most queries and nearly all uncontended acquires fall."""

DEFAULT_SAMPLE_INTERVAL = 5.0
"""Seconds between two samples of the pool sizes in multiprocess mode."""

SQL_OPERATIONS = frozenset(
    {
        "ALTER", "ANALYZE", "BEGIN", "CALL", "CHECKPOINT", "CLOSE", "CLUSTER", "COMMENT",
        "COMMIT", "COPY", "CREATE", "DEALLOCATE", "DECLARE", "DELETE", "DISCARD", "DO", "DROP",
        "END", "EXECUTE", "EXPLAIN", "FETCH", "GRANT", "IMPORT", "INSERT", "LISTEN", "LOCK",
        "MERGE", "MOVE", "NOTIFY", "PREPARE", "REFRESH", "REINDEX", "RELEASE", "RESET",
        "REVOKE", "ROLLBACK", "SAVEPOINT", "SELECT", "SET", "SHOW", "START", "TABLE",
        "TRUNCATE", "UNLISTEN", "UPDATE", "VACUUM", "VALUES", "WITH",
    }
)  # fmt: skip
"""First SQL keywords used as ``db_operation_name``; anything else is ``OTHER``."""
OTHER_OPERATION = "OTHER"

_FIRST_KEYWORD = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/|\()*([A-Za-z]+)", re.DOTALL)
_POOL_LABELS = ("pool_name",)
_OPERATION_LABELS = ("pool_name", "db_operation_name", "outcome")
_ERROR_LABELS = ("pool_name", "db_operation_name", "error_type")

_operation_name: ContextVar[str | None] = ContextVar("asgi_perfmon_db_operation", default=None)


@contextmanager
def db_operation(name: str) -> Iterator[None]:
    """Label the queries run inside the block ``db_operation_name=name``.

    Use a fixed name per call site (``"load_user"``), never a value derived from input: the
    name becomes a label value. It wins over the enclosing ``timed`` operation and the SQL verb.
    """
    if not isinstance(name, str) or not name:
        msg = f"db_operation() needs a non-empty string name, got {name!r}."
        raise ValueError(msg)
    token = _operation_name.set(name)
    try:
        yield
    finally:
        _operation_name.reset(token)


@lru_cache(maxsize=1024)
def sql_operation_name(query: str) -> str:
    """The first SQL keyword of ``query``, upper-cased, if it is a known one, else ``OTHER``.

    Leading whitespace, comments and parentheses are skipped. The SQL text itself is never
    used as a label.
    """
    match = _FIRST_KEYWORD.match(query)
    keyword = match.group(1).upper() if match else ""
    return keyword if keyword in SQL_OPERATIONS else OTHER_OPERATION


def _operation_for(query: str, default: str | None = None) -> str:
    """``db_operation`` name > enclosing ``timed`` operation > ``default`` or the SQL verb."""
    return _operation_name.get() or current_operation() or default or sql_operation_name(query)


@dataclass(frozen=True)
class PoolSizes:
    """What the public ``asyncpg.Pool`` API says about one pool's connections."""

    used: int
    idle: int
    min: int
    max: int


def read_pool_sizes(pool: Any) -> PoolSizes | None:
    """The sizes of ``pool``, or ``None`` when it is closing or closed."""
    if pool.is_closing():
        return None
    size, idle = pool.get_size(), pool.get_idle_size()
    return PoolSizes(used=size - idle, idle=idle, min=pool.get_min_size(), max=pool.get_max_size())


class PoolSizeCollector:
    """Scrape-time ``db_client_connection_{count,min,max}`` of every instrumented pool.

    Runs in whatever thread renders the scrape; it only reads plain attributes of the pools.
    A pool that is closing is skipped; a pool that cannot be read is logged once and skipped.
    """

    def __init__(self, namespace: str, pools: Callable[[], list[tuple[str, Any]]]) -> None:
        self._namespace = namespace
        self._pools = pools
        self._log_failure = FailureLog()

    def describe(self) -> Iterator[Metric]:
        """The families this collector exports, so the registry knows their names."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        """One sample set per open pool."""
        count, minimum, maximum = self._families()
        for name, pool in self._pools():
            sizes = self._read(name, pool)
            if sizes is None:
                continue
            count.add_metric([name, "idle"], sizes.idle)
            count.add_metric([name, "used"], sizes.used)
            minimum.add_metric([name], sizes.min)
            maximum.add_metric([name], sizes.max)
        yield from (count, minimum, maximum)

    def _read(self, name: str, pool: Any) -> PoolSizes | None:
        try:
            return read_pool_sizes(pool)
        except Exception as error:
            self._log_failure.record("pool", error, event="collector_failed", pool_name=name)
            return None

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        name = self._namespace
        return (
            GaugeMetricFamily(
                metric_name(name, "db_client_connection_count"),
                "Connections in the pool, by state (idle or used).",
                labels=["pool_name", "state"],
            ),
            GaugeMetricFamily(
                metric_name(name, "db_client_connection_min"),
                "Minimum number of connections the pool keeps open.",
                labels=list(_POOL_LABELS),
            ),
            GaugeMetricFamily(
                metric_name(name, "db_client_connection_max"),
                "Maximum number of connections the pool may open.",
                labels=list(_POOL_LABELS),
            ),
        )


class PoolSizeGauges:
    """The multiprocess form of the size gauges: ``livesum`` gauges written by sampling."""

    def __init__(self, registry: CollectorRegistry, namespace: str) -> None:
        def gauge(name: str, documentation: str, labels: Iterable[str]) -> Gauge:
            return Gauge(
                metric_name(namespace, name),
                documentation,
                list(labels),
                registry=registry,
                multiprocess_mode="livesum",
            )

        self._count = gauge(
            "db_client_connection_count",
            "Connections in the pool, by state (idle or used).",
            ("pool_name", "state"),
        )
        self._min = gauge(
            "db_client_connection_min",
            "Minimum number of connections the pool keeps open.",
            _POOL_LABELS,
        )
        self._max = gauge(
            "db_client_connection_max",
            "Maximum number of connections the pool may open.",
            _POOL_LABELS,
        )

    def write(self, name: str, sizes: PoolSizes | None) -> None:
        """Record ``sizes`` for the pool ``name``; ``None`` (closed) records zeros."""
        sizes = sizes or PoolSizes(used=0, idle=0, min=0, max=0)
        self._count.labels(name, "idle").set(sizes.idle)
        self._count.labels(name, "used").set(sizes.used)
        self._min.labels(name).set(sizes.min)
        self._max.labels(name).set(sizes.max)


class PoolMetrics:
    """Every DB client metric family of one registry and namespace, and the pools by name."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        namespace: str,
        buckets: tuple[float, ...],
        max_label_values: int,
        multiprocess: bool,
    ) -> None:
        self.buckets = buckets
        self.multiprocess = multiprocess
        self._pools: dict[str, InstrumentedPool] = {}
        self._lock = threading.Lock()
        families = BoundedFamilies(registry, namespace, max_label_values)
        self.pool_names = families.values("db_client_pool_name")
        self.wait_time = families.histogram(
            "db_client_connection_wait_time_seconds",
            "Time it took to obtain a connection from the pool (timeouts included).",
            _POOL_LABELS,
            buckets,
        )
        self.pending = families.gauge(
            "db_client_connection_pending_requests",
            "Callers waiting for a connection from the pool.",
            _POOL_LABELS,
        )
        self.timeouts = families.counter(
            "db_client_connection_timeouts",
            "Acquires that gave up after their timeout.",
            _POOL_LABELS,
        )
        self.acquire_errors = families.counter(
            "db_client_connection_acquire_errors",
            "Acquires that failed with an error other than a timeout, by type "
            "(e.g. the server cannot be reached).",
            ("pool_name", "error_type"),
        )
        self.duration = families.histogram(
            "db_client_operation_duration_seconds",
            "Duration of database operations, by operation name and outcome.",
            _OPERATION_LABELS,
            buckets,
        )
        self.errors = families.counter(
            "db_client_operation_errors",
            "Database operations that raised, by operation name and exception type.",
            _ERROR_LABELS,
        )
        self.sizes: PoolSizeGauges | None = None
        if multiprocess:
            self.sizes = PoolSizeGauges(registry, namespace)
        else:
            registry.register(PoolSizeCollector(namespace, self.open_pools))

    def open_pools(self) -> list[tuple[str, Any]]:
        """``(name, asyncpg pool)`` of every registered pool that is not closed."""
        with self._lock:
            closed = [name for name, facade in self._pools.items() if facade.pool.is_closing()]
            for name in closed:
                del self._pools[name]
            return [(name, facade.pool) for name, facade in self._pools.items()]

    def register(
        self, name: str, pool: Any, build: Callable[[], InstrumentedPool]
    ) -> InstrumentedPool:
        """The facade for ``pool`` under ``name``: the existing one, or a new one from ``build``.

        Raise ``ValueError`` if ``name`` is taken by another open pool, or ``pool`` is
        already instrumented under another name (its queries would be counted twice).
        """
        with self._lock:
            for other_name, facade in self._pools.items():
                if facade.pool is pool and other_name == name:
                    return facade
                if facade.pool is pool and not pool.is_closing():
                    msg = (
                        f"This pool is already instrumented as {other_name!r}; "
                        "call instrument_pool() once per pool."
                    )
                    raise ValueError(msg)
            existing = self._pools.get(name)
            if existing is not None and not existing.pool.is_closing():
                msg = (
                    f"Another open pool is already instrumented as {name!r}; "
                    "give each pool its own name=."
                )
                raise ValueError(msg)
            facade = self._pools[name] = build()
            return facade


class _QueryRecorder:
    """Records finished queries: asyncpg's logger on held connections, and the shortcuts."""

    def __init__(self, pool_name: str, metrics: PoolMetrics) -> None:
        self.reset_queries: set[str] = set()
        self._pool_name = pool_name
        self._metrics = metrics
        self._log_failure = FailureLog()

    def __call__(self, record: Any) -> None:
        """Called by asyncpg (via ``call_soon``) with a ``LoggedQuery`` after each query."""
        # The reset query only gets here if a connection was released around the facade.
        if record.query not in self.reset_queries:
            self.record_safely(record.query, record.elapsed, record.exception)

    def record_safely(
        self,
        statement: str,
        seconds: float,
        error: BaseException | None,
        default_operation: str | None = None,
    ) -> None:
        """:meth:`record`, logging (once) instead of raising if the instrumentation fails."""
        try:
            self.record(statement, seconds, error, default_operation=default_operation)
        except Exception as failure:
            self._log_failure.record(
                "pool", failure, event="query_recording_failed", pool_name=self._pool_name
            )

    def record(
        self,
        statement: str,
        seconds: float,
        error: BaseException | None,
        *,
        default_operation: str | None = None,
    ) -> None:
        """Count one finished query in the metrics and in the request being served."""
        operation = _operation_for(statement, default_operation)
        outcome = "ok" if error is None else "error"
        self._metrics.duration.labels(self._pool_name, operation, outcome).observe(seconds)
        if error is not None:
            error_type = type(error).__name__
            self._metrics.errors.labels(self._pool_name, operation, error_type).inc()
        request = current_request()
        if request is not None:
            request.add_query(statement, seconds, failed=error is not None)


class _AcquireContext:
    """What ``InstrumentedPool.acquire()`` returns: awaitable and an async context manager."""

    __slots__ = ("_connection", "_owner", "_timeout")

    def __init__(self, owner: InstrumentedPool, timeout: float | None) -> None:
        self._owner = owner
        self._timeout = timeout
        self._connection: Any = None

    def __await__(self) -> Generator[Any, None, Any]:
        return self._owner._acquire(self._timeout).__await__()

    async def __aenter__(self) -> Any:
        self._connection = await self._owner._acquire(self._timeout)
        return self._connection

    async def __aexit__(self, *exc_info: object) -> None:
        connection, self._connection = self._connection, None
        await self._owner.release(connection)


class InstrumentedPool:
    """An ``asyncpg.Pool`` whose acquires and queries are measured.

    Use it exactly like the pool it wraps (``.pool``): ``acquire()`` (with ``async with`` or
    ``await`` + ``release``), ``fetch``/``fetchrow``/``fetchval``/``fetchmany``/``execute``/
    ``executemany``/``copy_*``, and every other ``Pool`` attribute. ``await`` it, or use
    ``async with``, to initialise a pool created with ``asyncpg.create_pool`` without ``await``.
    Build it with :func:`instrument_pool`.
    """

    def __init__(
        self, pool: Any, name: str, metrics: PoolMetrics, *, sample_interval: float
    ) -> None:
        self._pool = pool
        self._name = name
        self._metrics = metrics
        self._sample_interval = sample_interval
        self._wait_time = metrics.wait_time.labels(name)
        self._pending = metrics.pending.labels(name)
        self._timeouts = metrics.timeouts.labels(name)
        self._recorder = _QueryRecorder(name, metrics)
        self._log_failure = FailureLog()
        self._sampler: asyncio.Task[None] | None = None

    @property
    def pool(self) -> Any:
        """The ``asyncpg.Pool`` behind this facade."""
        return self._pool

    @property
    def name(self) -> str:
        """The ``pool_name`` label of this pool's metrics."""
        return self._name

    def __repr__(self) -> str:
        return f"<InstrumentedPool {self._name!r} of {self._pool!r}>"

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._pool, attribute)

    def acquire(self, *, timeout: float | None = None) -> _AcquireContext:
        """Acquire a connection like ``Pool.acquire``, measuring the wait.

        Its queries are timed by asyncpg's query logger until it is released through this
        facade (``release()`` or the end of ``async with``).
        """
        return _AcquireContext(self, timeout)

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        """Release a connection back to the pool, like ``Pool.release``."""
        self._unwatch(connection)
        await self._pool.release(connection, timeout=timeout)

    async def _acquire(self, timeout: float | None, *, watch: bool = True) -> Any:
        start = perf_counter()
        self._pending.inc()
        try:
            connection = await self._pool.acquire(timeout=timeout)
        except (TimeoutError, asyncio.TimeoutError):
            self._timeouts.inc()
            raise
        except Exception as error:
            self._metrics.acquire_errors.labels(self._name, type(error).__name__).inc()
            raise
        finally:
            self._pending.dec()
            self._observe_wait(perf_counter() - start)
        if watch:
            self._watch(connection)
        if self._metrics.multiprocess and self._sampler is None:
            self.start_sampling()
        return connection

    def _observe_wait(self, seconds: float) -> None:
        self._wait_time.observe(seconds)
        request = current_request()
        if request is not None:
            request.add_acquire_wait(seconds)

    def _watch(self, connection: Any) -> None:
        """Time the queries of a connection the application holds, with asyncpg's logger."""
        try:
            self._recorder.reset_queries.add(connection.get_reset_query())
            connection.add_query_logger(self._recorder)
        except Exception as error:
            self._log_failure.record(
                "pool", error, event="query_logger_failed", pool_name=self._name
            )

    def _unwatch(self, connection: Any) -> None:
        """Remove the logger before release, so the pool's reset query is not logged."""
        # A lost connection's proxy is detached and raises; asyncpg has dropped its loggers.
        with contextlib.suppress(Exception):
            connection.remove_query_logger(self._recorder)

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
        """``Pool.execute``, acquiring through this facade."""
        return await self._run("execute", query, args, kwargs)

    async def executemany(self, command: str, args: Any, **kwargs: Any) -> Any:
        """``Pool.executemany``, acquiring through this facade."""
        return await self._run("executemany", command, (args,), kwargs)

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        """``Pool.fetch``, acquiring through this facade."""
        return await self._run("fetch", query, args, kwargs)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        """``Pool.fetchrow``, acquiring through this facade."""
        return await self._run("fetchrow", query, args, kwargs)

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        """``Pool.fetchval``, acquiring through this facade."""
        return await self._run("fetchval", query, args, kwargs)

    async def fetchmany(self, query: str, args: Any, **kwargs: Any) -> Any:
        """``Pool.fetchmany``, acquiring through this facade."""
        return await self._run("fetchmany", query, (args,), kwargs)

    async def copy_from_table(self, table_name: str, **kwargs: Any) -> Any:
        """``Pool.copy_from_table``, acquiring through this facade, timed as ``COPY``."""
        return await self._run("copy_from_table", table_name, (), kwargs, "COPY")

    async def copy_from_query(self, query: str, *args: Any, **kwargs: Any) -> Any:
        """``Pool.copy_from_query``, acquiring through this facade, timed as ``COPY``."""
        return await self._run("copy_from_query", query, args, kwargs, "COPY")

    async def copy_to_table(self, table_name: str, **kwargs: Any) -> Any:
        """``Pool.copy_to_table``, acquiring through this facade, timed as ``COPY``."""
        return await self._run("copy_to_table", table_name, (), kwargs, "COPY")

    async def copy_records_to_table(self, table_name: str, **kwargs: Any) -> Any:
        """``Pool.copy_records_to_table``, acquiring through this facade, timed as ``COPY``."""
        return await self._run("copy_records_to_table", table_name, (), kwargs, "COPY")

    async def _run(
        self,
        method: str,
        statement: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        operation: str | None = None,
    ) -> Any:
        """Run one connection method and time it here, without asyncpg's query logger.

        The logger costs more than this (it schedules a callback per query, and per reset
        query on release), does not see COPY, and is dropped with a lost connection before
        the failing query resumes; timing here sees every outcome.
        """
        connection = await self._acquire(None, watch=False)
        start, error = perf_counter(), None
        try:
            return await getattr(connection, method)(statement, *args, **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            elapsed = perf_counter() - start
            label = statement if operation is None else f"{method} {statement}"
            try:
                await self._pool.release(connection)
            except BaseException as exc:
                # asyncpg re-raises a failed reset (e.g. the server went away just after the
                # query): the call fails for the caller, so it counts as failed.
                error = error or exc
                raise
            finally:
                self._recorder.record_safely(label, elapsed, error, operation)

    async def close(self) -> None:
        """Close the pool (``Pool.close``) and stop sampling its sizes."""
        try:
            await self._pool.close()
        finally:
            self._stop_sampling()

    def terminate(self) -> None:
        """Terminate the pool (``Pool.terminate``) and stop sampling its sizes."""
        try:
            self._pool.terminate()
        finally:
            self._stop_sampling()

    def __await__(self) -> Generator[Any, None, InstrumentedPool]:
        return self._initialized().__await__()

    async def _initialized(self) -> InstrumentedPool:
        await self._pool
        return self

    async def __aenter__(self) -> InstrumentedPool:
        return await self._initialized()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start_sampling(self) -> None:
        """Multiprocess mode: sample the pool sizes now and every ``sample_interval`` seconds.

        Called by :func:`instrument_pool` when an event loop runs, else on the first acquire.
        """
        self.sample_sizes()
        if self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(
                self._sample_periodically(), name=f"asgi_perfmon pool sampler {self._name}"
            )

    def sample_sizes(self) -> None:
        """Multiprocess mode: write the pool's current sizes to the ``livesum`` gauges."""
        gauges = self._metrics.sizes
        if gauges is None:
            return
        try:
            gauges.write(self._name, read_pool_sizes(self._pool))
        except Exception as error:
            self._log_failure.record("pool", error, event="collector_failed", pool_name=self._name)

    async def _sample_periodically(self) -> None:
        while not self._pool.is_closing():
            await asyncio.sleep(self._sample_interval)
            self.sample_sizes()

    def _stop_sampling(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        self.sample_sizes()


def instrument_pool(
    pool: Any,
    name: str = "default",
    *,
    registry: CollectorRegistry | None = None,
    namespace: str | None = None,
    buckets: Iterable[float] = DB_BUCKETS,
    max_label_values: int = DEFAULT_MAX_LABEL_VALUES,
    multiprocess: bool | None = None,
    sample_interval: float = DEFAULT_SAMPLE_INTERVAL,
) -> InstrumentedPool:
    """Measure an ``asyncpg.Pool``; use the returned facade in its place.

    ``name`` is the ``pool_name`` label; instrumenting the same pool again under the same
    name returns the same facade. ``multiprocess`` defaults to whether
    ``PROMETHEUS_MULTIPROC_DIR`` is set; ``buckets``, ``max_label_values`` and
    ``multiprocess`` take effect when the first pool of a registry is instrumented.
    """
    _validate(name, sample_interval)
    if isinstance(pool, InstrumentedPool):
        pool = pool.pool
    _require_pool(pool)
    metrics = _pool_metrics(
        resolve_registry(registry),
        resolve_namespace(namespace),
        _validated_buckets(buckets),
        validate_max_label_values(max_label_values),
        "PROMETHEUS_MULTIPROC_DIR" in os.environ if multiprocess is None else multiprocess,
    )
    label = metrics.pool_names.labels(name)[0]
    facade = metrics.register(
        label,
        pool,
        lambda: InstrumentedPool(pool, label, metrics, sample_interval=sample_interval),
    )
    if metrics.multiprocess and _loop_is_running():
        facade.start_sampling()
    return facade


def _pool_metrics(
    registry: CollectorRegistry,
    namespace: str,
    buckets: tuple[float, ...],
    max_label_values: int,
    multiprocess: bool,
) -> PoolMetrics:
    return shared_matching(
        registry,
        ("db_client", namespace),
        lambda: PoolMetrics(
            registry,
            namespace=namespace,
            buckets=buckets,
            max_label_values=max_label_values,
            multiprocess=multiprocess,
        ),
        matches=lambda metrics: metrics.buckets == buckets and metrics.multiprocess == multiprocess,
        conflict=(
            "Pools of one registry share their metric families: buckets and multiprocess "
            "must match those of the first pool."
        ),
    )


def _validate(name: str, sample_interval: float) -> None:
    if not isinstance(name, str) or not name:
        msg = f"The pool name must be a non-empty string, got {name!r}."
        raise ValueError(msg)
    if not sample_interval > 0:
        msg = f"sample_interval must be a positive number of seconds, got {sample_interval!r}."
        raise ValueError(msg)


def _validated_buckets(buckets: Iterable[float]) -> tuple[float, ...]:
    values = tuple(float(bucket) for bucket in buckets)
    if not values or any(b <= 0 for b in values) or list(values) != sorted(set(values)):
        msg = f"buckets must be positive, strictly increasing numbers, got {list(values)!r}."
        raise ValueError(msg)
    return values


def _require_pool(pool: Any) -> None:
    needed = ("acquire", "release", "get_size", "get_idle_size", "is_closing")
    missing = [attribute for attribute in needed if not hasattr(pool, attribute)]
    if missing:
        msg = (
            f"instrument_pool() needs an asyncpg.Pool (asyncpg >= 0.29), got {type(pool).__name__} "
            f"without {', '.join(missing)}."
        )
        raise TypeError(msg)


def _loop_is_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
