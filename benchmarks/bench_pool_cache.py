"""Overhead of ``instrument_pool`` on a query loop, and of ``cached`` on a cache hit.

Pool: the same ``fetchval`` loop on a bare asyncpg pool and on the instrumented facade, via
the shortcut (``pool.fetchval``, also inside a request, which fills the request's breakdown)
and on a held connection (``async with pool.acquire()``), against a real PostgreSQL
(``PERFMON_TEST_DSN``, else a throwaway cluster as in the tests). Wall time and this process's
CPU time are both reported; the variants take turns in a shuffled order every round, so drift
on a shared machine hits them alike. The instrumentation's own work is also timed in isolation.

Cache: the hit path of ``cached`` against a plain dict memo (async) and ``functools.lru_cache``
(sync), which count nothing.

Reports the median per call over the rounds and the ratio to the baseline, prints a table and
writes ``benchmarks/results/pool_cache.json``. Usage::

    .venv/bin/python benchmarks/bench_pool_cache.py            # about a minute
    .venv/bin/python benchmarks/bench_pool_cache.py --smoke    # a few seconds, for CI
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402
from asyncpg.connection import LoggedQuery  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from asgi_perfmon import context  # noqa: E402
from asgi_perfmon.cache import cached  # noqa: E402
from asgi_perfmon.context import RequestContext  # noqa: E402
from asgi_perfmon.pool import instrument_pool  # noqa: E402
from tests._postgres import dsn_of_any_server  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "pool_cache.json"


@contextlib.contextmanager
def _in_request() -> Iterator[RequestContext]:
    request = RequestContext(request_id="bench")
    token = context._current.set(request)
    try:
        yield request
    finally:
        context._current.reset(token)


async def _per_query_us(
    fetchval: Callable[..., Awaitable[Any]], queries: int
) -> tuple[float, float]:
    """Wall time and this process's CPU time per query, in microseconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    for number in range(queries):
        await fetchval("SELECT $1::int", number)
    await asyncio.sleep(0)  # let the deferred query loggers run, inside the measurement
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall / queries * 1e6, cpu / queries * 1e6


def _held(pool: Any) -> Callable[..., Awaitable[Any]]:
    """``fetchval`` on a connection the caller holds, as request handlers often do."""

    async def fetchval(query: str, *args: Any) -> Any:
        async with pool.acquire() as connection:
            return await connection.fetchval(query, *args)

    return fetchval


async def _pool_rounds(
    dsn: str, rounds: int, queries: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    bare = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    raw = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    instrumented = instrument_pool(raw, "bench", registry=CollectorRegistry())
    variants: dict[str, Callable[..., Awaitable[Any]]] = {
        "bare": bare.fetchval,
        "instrumented": instrumented.fetchval,
        "in_request": instrumented.fetchval,
        "bare_held": _held(bare),
        "instrumented_held": _held(instrumented),
    }
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    try:
        for fetchval in variants.values():  # warm up both connections
            await _per_query_us(fetchval, max(queries // 10, 10))
        for _ in range(rounds):
            random.shuffle(order)  # no variant always runs right after another
            for name in order:
                with _in_request() if name == "in_request" else contextlib.nullcontext():
                    round_wall, round_cpu = await _per_query_us(variants[name], queries)
                wall[name].append(round_wall)
                cpu[name].append(round_cpu)
    finally:
        await bare.close()
        await instrumented.close()
    return wall, cpu


def _per_call_us(action: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        action()
    return (time.perf_counter() - start) / calls * 1e6


async def _instrumentation_work_us(dsn: str, calls: int) -> dict[str, float]:
    """The instrumentation's own work per query, timed in isolation (no server round trip).

    A shortcut (``pool.fetchval``) pays the acquire bookkeeping (pending gauge, wait
    histogram) and recording the query. A held connection also pays adding and removing
    asyncpg's query logger, plus asyncpg's own logging, which only the loop measures.
    """
    raw = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    facade = instrument_pool(raw, "isolated", registry=CollectorRegistry())
    try:
        async with facade.acquire() as connection:
            query = LoggedQuery("SELECT $1::int", (1,), None, 0.0004, None, None, None)
            recorder = facade._recorder

            def bookkeeping() -> None:
                facade._pending.inc()
                facade._pending.dec()
                facade._observe_wait(0.0001)

            def logger_on_and_off() -> None:
                facade._watch(connection)
                facade._unwatch(connection)

            parts = {
                "acquire_bookkeeping": _per_call_us(bookkeeping, calls),
                "record_query": _per_call_us(lambda: recorder(query), calls),
                "held_connection_logger_on_off": _per_call_us(logger_on_and_off, calls),
            }
            with _in_request() as request:
                parts["record_query_in_request"] = _per_call_us(lambda: recorder(query), calls)
                request.statements.clear()
    finally:
        await facade.close()
    parts["shortcut_total"] = parts["acquire_bookkeeping"] + parts["record_query"]
    return {name: round(value, 3) for name, value in parts.items()}


async def _per_async_call_ns(function: Callable[[int], Awaitable[int]], calls: int) -> float:
    start = time.perf_counter()
    for number in range(calls):
        await function(number & 63)
    return (time.perf_counter() - start) / calls * 1e9


def _per_sync_call_ns(function: Callable[[int], int], calls: int) -> float:
    start = time.perf_counter()
    for number in range(calls):
        function(number & 63)
    return (time.perf_counter() - start) / calls * 1e9


def _memo(function: Callable[[int], Awaitable[int]]) -> Callable[[int], Awaitable[int]]:
    """The cheapest async cache there is: a dict, no eviction, no counting."""
    values: dict[int, int] = {}

    async def memoized(key: int) -> int:
        if key not in values:
            values[key] = await function(key)
        return values[key]

    return memoized


async def _cache_rounds(rounds: int, calls: int) -> dict[str, list[float]]:
    async def load(key: int) -> int:
        return key

    def compute(key: int) -> int:
        return key

    registry = CollectorRegistry()
    variants_async: dict[str, Callable[[int], Awaitable[int]]] = {
        "dict_memo": _memo(load),
        "cached_async": cached("bench_async", maxsize=128, registry=registry)(load),
    }
    variants_sync: dict[str, Callable[[int], int]] = {
        "lru_cache": functools.lru_cache(maxsize=128)(compute),
        "cached_sync": cached("bench_sync", maxsize=128, registry=registry)(compute),
    }
    timings: dict[str, list[float]] = {name: [] for name in [*variants_async, *variants_sync]}
    for _ in range(rounds):
        for name, async_function in variants_async.items():
            timings[name].append(await _per_async_call_ns(async_function, calls))
        for name, sync_function in variants_sync.items():
            timings[name].append(_per_sync_call_ns(sync_function, calls))
    return timings


def _summary(timings: dict[str, list[float]], baseline: str, unit: str) -> dict[str, Any]:
    base = statistics.median(timings[baseline])
    return {
        name: {
            f"median_{unit}": round(statistics.median(values), 3),
            f"min_{unit}": round(min(values), 3),
            f"ratio_to_{baseline}": round(statistics.median(values) / base, 4),
            "rounds": len(values),
        }
        for name, values in timings.items()
    }


def _print_table(title: str, summary: dict[str, Any], unit: str) -> None:
    print(f"\n{title}")
    print(f"  {'variant':<18} {'median ' + unit:>12} {'min ' + unit:>12} {'ratio':>8}")
    for name, row in summary.items():
        ratio = next(value for key, value in row.items() if key.startswith("ratio_to_"))
        print(
            f"  {name:<14} {row[f'median_{unit}']:>12.3f} {row[f'min_{unit}']:>12.3f} {ratio:>8.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run both benchmarks, print the tables and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--queries", type=int, default=2000, help="queries per round")
    parser.add_argument("--calls", type=int, default=200_000, help="cache calls per round")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.queries, args.calls = 3, 200, 20_000

    with dsn_of_any_server() as dsn:
        pool_wall, pool_cpu = asyncio.run(_pool_rounds(dsn, args.rounds, args.queries))
        isolated = asyncio.run(_instrumentation_work_us(dsn, args.calls // 10))
    cache_timings = asyncio.run(_cache_rounds(args.rounds, args.calls))
    pool_summary = {
        "wall": _summary(pool_wall, "bare", "us"),
        "client_cpu": _summary(pool_cpu, "bare", "us"),
        "instrumentation_work_us": isolated,
    }
    cache_summary = {
        **_summary({k: cache_timings[k] for k in ("dict_memo", "cached_async")}, "dict_memo", "ns"),
        **_summary({k: cache_timings[k] for k in ("lru_cache", "cached_sync")}, "lru_cache", "ns"),
    }
    rounds = f"{args.queries} queries x {args.rounds} rounds"
    _print_table(f"fetchval loop, wall time per query ({rounds})", pool_summary["wall"], "us")
    _print_table(
        f"fetchval loop, client CPU per query ({rounds})", pool_summary["client_cpu"], "us"
    )
    print("\ninstrumentation work per query, in isolation (us)")
    for name, value in isolated.items():
        print(f"  {name:<30} {value:>8.3f}")
    _print_table(
        f"cache hit, per call ({args.calls} calls x {args.rounds} rounds)", cache_summary, "ns"
    )

    result = {
        "parameters": {"rounds": args.rounds, "queries": args.queries, "calls": args.calls,
                       "smoke": args.smoke},
        "environment": {"python": platform.python_version(), "asyncpg": asyncpg.__version__,
                        "machine": platform.machine(), "cpus": os.cpu_count(),
                        "load_average": os.getloadavg()},
        "pool_fetchval_per_query": pool_summary,
        "cache_hit_per_call": cache_summary,
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
