"""The ``cached`` decorator and ``watch_cache``: accounting, expiry, eviction, single-flight."""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cachetools
import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from asgi_perfmon import context
from asgi_perfmon.cache import cached, watch_cache
from asgi_perfmon.context import RequestContext

REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def requests(registry: CollectorRegistry, name: str, result: str) -> float | None:
    return registry.get_sample_value("cache_requests_total", {"cache_name": name, "result": result})


def evictions(registry: CollectorRegistry, name: str, reason: str) -> float | None:
    return registry.get_sample_value(
        "cache_evictions_total", {"cache_name": name, "reason": reason}
    )


def entries(registry: CollectorRegistry, name: str) -> tuple[float | None, float | None]:
    labels = {"cache_name": name}
    return (
        registry.get_sample_value("cache_entries", labels),
        registry.get_sample_value("cache_max_entries", labels),
    )


@pytest.fixture
def request_context() -> Iterator[RequestContext]:
    """A request in flight, as the middleware would set it."""
    request = RequestContext(request_id="r-1")
    token = context._current.set(request)
    yield request
    context._current.reset(token)


# --- accounting ---------------------------------------------------------------------------


async def test_hits_and_misses_are_counted(registry: CollectorRegistry) -> None:
    calls: list[int] = []

    @cached("users", maxsize=10, registry=registry)
    async def load_user(user_id: int) -> str:
        calls.append(user_id)
        return f"user {user_id}"

    assert await load_user(1) == "user 1"
    assert await load_user(1) == "user 1"
    assert await load_user(2) == "user 2"

    assert calls == [1, 2]
    assert requests(registry, "users", "hit") == 1
    assert requests(registry, "users", "miss") == 2
    assert entries(registry, "users") == (2, 10)
    assert load_user.cache_info() == (1, 2, 10, 2)


def test_sync_functions_are_cached_too(registry: CollectorRegistry) -> None:
    calls: list[str] = []

    @cached("settings", maxsize=4, registry=registry)
    def setting(key: str, *, default: str = "") -> str:
        calls.append(key)
        return key.upper() or default

    assert setting("a") == "A"
    assert setting("a") == "A"
    assert setting("a", default="x") == "A"  # other keywords, other key

    assert calls == ["a", "a"]
    assert requests(registry, "settings", "hit") == 1
    assert requests(registry, "settings", "miss") == 2


def test_the_decorated_function_keeps_its_nature_and_name(registry: CollectorRegistry) -> None:
    async def load(key: int) -> int:
        return key

    def compute(key: int) -> int:
        return key

    cached_load = cached("a", maxsize=1, registry=registry)(load)
    cached_compute = cached("b", maxsize=1, registry=registry)(compute)

    assert inspect.iscoroutinefunction(cached_load)
    assert not inspect.iscoroutinefunction(cached_compute)
    assert (cached_load.__name__, cached_load.__wrapped__) == ("load", load)
    assert (cached_compute.__name__, cached_compute.__wrapped__) == ("compute", compute)


async def test_the_request_breakdown_gets_hits_and_misses(
    registry: CollectorRegistry, request_context: RequestContext
) -> None:
    @cached("users", maxsize=10, registry=registry)
    async def load_user(user_id: int) -> int:
        return user_id

    await load_user(1)
    await load_user(1)
    await load_user(1)
    await load_user(2)

    assert (request_context.cache_hits, request_context.cache_misses) == (2, 2)


def test_sync_calls_from_many_threads_are_all_counted(registry: CollectorRegistry) -> None:
    @cached("squares", maxsize=8, registry=registry)
    def square(n: int) -> int:
        return n * n

    def work() -> None:
        for i in range(1000):
            assert square(i % 10) == (i % 10) ** 2

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    hits, misses = requests(registry, "squares", "hit"), requests(registry, "squares", "miss")
    assert hits is not None
    assert misses is not None
    assert hits + misses == 8000
    assert misses >= 10
    assert entries(registry, "squares") == (8, 8)


# --- expiry, eviction, invalidation -------------------------------------------------------


async def test_an_entry_expires_after_its_ttl(registry: CollectorRegistry) -> None:
    clock = FakeClock()
    calls: list[int] = []

    @cached("tokens", maxsize=10, ttl=10, clock=clock, registry=registry)
    async def token(user_id: int) -> int:
        calls.append(user_id)
        return len(calls)

    assert await token(1) == 1
    clock.advance(9.99)
    assert await token(1) == 1
    clock.advance(0.02)
    assert await token(1) == 2

    assert calls == [1, 1]
    assert evictions(registry, "tokens", "expired") == 1
    assert evictions(registry, "tokens", "size") == 0
    assert entries(registry, "tokens") == (1, 10)


def test_expired_entries_are_counted_when_they_leave(registry: CollectorRegistry) -> None:
    clock = FakeClock()

    @cached("short", maxsize=10, ttl=5, clock=clock, registry=registry)
    def echo(value: int) -> int:
        return value

    for value in range(3):
        echo(value)
    clock.advance(3)
    echo(3)
    clock.advance(3)  # the first three are now older than 5 s, the last one is not
    echo(3)

    assert evictions(registry, "short", "expired") == 3
    assert entries(registry, "short") == (1, 10)


async def test_the_least_recently_used_entry_is_evicted_for_size(
    registry: CollectorRegistry,
) -> None:
    calls: list[int] = []

    @cached("small", maxsize=2, registry=registry)
    async def load(key: int) -> int:
        calls.append(key)
        return key

    await load(1)
    await load(2)
    await load(1)  # 1 is now the most recently used
    await load(3)  # evicts 2
    await load(1)
    await load(2)  # evicts 3

    assert calls == [1, 2, 3, 2]
    assert evictions(registry, "small", "size") == 2
    assert evictions(registry, "small", "invalidated") == 0
    assert entries(registry, "small") == (2, 2)


async def test_invalidate_and_clear(registry: CollectorRegistry) -> None:
    calls: list[tuple[int, int]] = []

    @cached("prices", maxsize=10, registry=registry)
    async def price(item: int, *, currency: int = 0) -> int:
        calls.append((item, currency))
        return item * 100 + currency

    await price(1)
    await price(2, currency=1)

    assert price.invalidate(1) is True
    assert price.invalidate(1) is False
    assert price.invalidate(2) is False  # the entry was stored with currency=1
    assert price.invalidate(2, currency=1) is True
    await price(1)
    await price(3)
    price.clear()
    await price(3)

    assert calls == [(1, 0), (2, 1), (1, 0), (3, 0), (3, 0)]
    assert evictions(registry, "prices", "invalidated") == 4
    assert entries(registry, "prices") == (1, 10)


# --- single-flight ------------------------------------------------------------------------


async def _until_all_wait(tasks: list[asyncio.Task[Any]]) -> None:
    for _ in range(10):
        await asyncio.sleep(0)
    assert not any(task.done() for task in tasks)


async def test_twenty_concurrent_misses_call_the_function_once(
    registry: CollectorRegistry,
) -> None:
    gate = asyncio.Event()
    calls: list[int] = []

    @cached("slow", maxsize=10, registry=registry)
    async def slow(key: int) -> str:
        calls.append(key)
        await gate.wait()
        return f"value {key}"

    callers = [asyncio.create_task(slow(7)) for _ in range(20)]
    await _until_all_wait(callers)
    gate.set()
    results = await asyncio.gather(*callers)

    assert results == ["value 7"] * 20
    assert calls == [7]
    assert requests(registry, "slow", "miss") == 20
    assert await slow(7) == "value 7"
    assert requests(registry, "slow", "hit") == 1


async def test_a_cancelled_first_caller_does_not_fail_the_others(
    registry: CollectorRegistry,
) -> None:
    gate = asyncio.Event()
    calls: list[int] = []

    @cached("slow", maxsize=10, registry=registry)
    async def slow(key: int) -> str:
        calls.append(key)
        await gate.wait()
        return f"value {key}"

    first = asyncio.create_task(slow(1))
    others = [asyncio.create_task(slow(1)) for _ in range(19)]
    await _until_all_wait([first, *others])
    first.cancel()
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*others)

    assert first.cancelled()
    assert results == ["value 1"] * 19
    assert calls == [1]
    assert await slow(1) == "value 1"
    assert calls == [1]


async def test_errors_are_shared_by_waiters_but_not_cached(registry: CollectorRegistry) -> None:
    gate = asyncio.Event()
    calls: list[int] = []

    @cached("flaky", maxsize=10, registry=registry)
    async def flaky(key: int) -> int:
        calls.append(key)
        await gate.wait()
        if len(calls) == 1:
            raise ConnectionError("backend down")
        return key

    callers = [asyncio.create_task(flaky(5)) for _ in range(5)]
    await _until_all_wait(callers)
    gate.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)

    assert [type(outcome) for outcome in outcomes] == [ConnectionError] * 5
    assert await flaky(5) == 5
    assert await flaky(5) == 5
    assert calls == [5, 5]
    assert entries(registry, "flaky") == (1, 10)


async def test_a_load_invalidated_while_in_flight_is_not_stored(
    registry: CollectorRegistry,
) -> None:
    gate = asyncio.Event()
    version = 1

    @cached("config", maxsize=10, registry=registry)
    async def config(key: str) -> int:
        seen = version
        await gate.wait()
        return seen

    stale = asyncio.create_task(config("a"))
    await _until_all_wait([stale])
    version = 2
    config.invalidate("a")
    gate.set()

    assert await stale == 1  # the caller who asked before the invalidation
    assert await config("a") == 2
    assert await config("a") == 2


def test_a_sync_call_invalidated_meanwhile_is_not_stored(registry: CollectorRegistry) -> None:
    calls: list[int] = []

    @cached("config", maxsize=10, registry=registry)
    def config(key: str) -> int:
        calls.append(1)
        if len(calls) == 1:
            config.invalidate("other")  # e.g. another thread invalidating meanwhile
        return len(calls)

    assert config("a") == 1
    assert config("a") == 2
    assert config("a") == 2


async def test_a_failed_load_nobody_waits_for_leaves_no_unretrieved_exception(
    registry: CollectorRegistry,
) -> None:
    gate = asyncio.Event()
    handled: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: handled.append(ctx))

    @cached("lonely", maxsize=1, registry=registry)
    async def lonely(key: int) -> int:
        await gate.wait()
        raise RuntimeError("nobody is listening")

    caller = asyncio.create_task(lonely(1))
    await _until_all_wait([caller])
    caller.cancel()
    gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()

    assert handled == []
    assert entries(registry, "lonely") == (0, 1)


# --- keys and configuration ---------------------------------------------------------------


async def test_unhashable_arguments_raise_a_clear_type_error(registry: CollectorRegistry) -> None:
    @cached("lists", maxsize=10, registry=registry)
    async def total(values: list[int]) -> int:
        return sum(values)

    @cached("sets", maxsize=10, registry=registry)
    def size(*, values: set[int]) -> int:
        return len(values)

    with pytest.raises(TypeError, match=r"cached\('lists'\) .* must be hashable .*list"):
        await total([1, 2])
    with pytest.raises(TypeError, match=r"cached\('sets'\) .* must be hashable .*set"):
        size(values={1})
    with pytest.raises(TypeError, match="must be hashable"):
        total.invalidate([1, 2])
    assert await total((1, 2)) == 3  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"maxsize": 0}, "maxsize"),
        ({"maxsize": -1}, "maxsize"),
        ({"maxsize": True}, "maxsize"),
        ({"maxsize": 1.5}, "maxsize"),
        ({"maxsize": 1, "ttl": 0}, "ttl"),
        ({"maxsize": 1, "ttl": -5}, "ttl"),
        ({"maxsize": 1, "ttl": float("inf")}, "ttl"),
    ],
)
def test_invalid_options_raise_value_error(
    registry: CollectorRegistry, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cached("x", registry=registry, **options)


def test_a_name_is_required(registry: CollectorRegistry) -> None:
    with pytest.raises(ValueError, match="cache name"):
        cached("", maxsize=1, registry=registry)
    with pytest.raises(ValueError, match="cache name"):
        watch_cache("", functools.lru_cache(lambda: 1), registry=registry)


def test_generators_are_refused(registry: CollectorRegistry) -> None:
    def numbers() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match="generator"):
        cached("gen", maxsize=1, registry=registry)(numbers)


# --- watch_cache --------------------------------------------------------------------------


def test_an_lru_cache_function_shows_its_hit_rate(registry: CollectorRegistry) -> None:
    @functools.lru_cache(maxsize=2)
    def config(key: str) -> str:
        return key * 2

    assert watch_cache("config", config, registry=registry) is config
    for key in ["a", "a", "b", "a", "c"]:
        config(key)

    assert requests(registry, "config", "hit") == 2
    assert requests(registry, "config", "miss") == 3
    assert entries(registry, "config") == (2, 2)
    assert evictions(registry, "config", "size") is None  # lru_cache does not tell

    config.cache_clear()
    assert requests(registry, "config", "hit") == 0  # a counter reset, as Prometheus sees it


def test_an_unbounded_lru_cache_has_no_maximum(registry: CollectorRegistry) -> None:
    @functools.cache
    def square(n: int) -> int:
        return n * n

    watch_cache("squares", square, registry=registry)
    square(3)

    assert entries(registry, "squares") == (1, None)


def test_cachetools_caches_are_watched(registry: CollectorRegistry) -> None:
    @cachetools.cached(cachetools.LRUCache(maxsize=5), info=True)
    def with_info(key: int) -> int:
        return key

    @cachetools.cached(cachetools.TTLCache(maxsize=7, ttl=60))
    def without_info(key: int) -> int:
        return key

    plain = cachetools.LRUCache(maxsize=3)
    watch_cache("with_info", with_info, registry=registry)
    watch_cache("without_info", without_info, registry=registry)
    watch_cache("plain", plain, registry=registry)
    for key in [1, 1, 2]:
        with_info(key)
        without_info(key)
    plain["x"] = 1

    assert requests(registry, "with_info", "hit") == 1
    assert requests(registry, "with_info", "miss") == 2
    assert entries(registry, "with_info") == (2, 5)
    assert entries(registry, "without_info") == (2, 7)
    assert requests(registry, "without_info", "hit") is None  # needs info=True
    assert entries(registry, "plain") == (1, 3)


def test_watch_cache_refuses_what_it_cannot_read(registry: CollectorRegistry) -> None:
    @cached("mine", maxsize=1, registry=registry)
    def mine() -> int:
        return 1

    with pytest.raises(TypeError, match=r"needs a functools\.lru_cache function"):
        watch_cache("dict", {}, registry=registry)
    with pytest.raises(ValueError, match="already reports its metrics"):
        watch_cache("twice", mine, registry=registry)


def test_cached_and_watched_caches_share_the_families_of_one_registry(
    registry: CollectorRegistry,
) -> None:
    def build_app() -> tuple[Any, Any]:
        """What an app factory does each time it runs."""

        @cached("users", maxsize=5, registry=registry)
        def user(user_id: int) -> int:
            return user_id

        @functools.lru_cache(maxsize=3)
        def config(key: str) -> str:
            return key

        watch_cache("config", config, registry=registry)
        watch_cache("config", config, registry=registry)  # watching again: no double count
        return user, config

    first_user, first_config = build_app()
    second_user, _ = build_app()
    first_user(1)
    first_user(1)
    second_user(2)
    first_config("a")

    text = generate_latest(registry).decode()
    assert text.count("# TYPE cache_requests_total counter") == 1
    assert requests(registry, "users", "hit") == 1  # two live caches named "users" add up
    assert requests(registry, "users", "miss") == 2
    assert entries(registry, "users") == (2, 10)
    assert requests(registry, "config", "miss") == 1


def test_a_garbage_collected_cache_leaves_the_metrics(registry: CollectorRegistry) -> None:
    @cached("temporary", maxsize=1, registry=registry)
    def temporary() -> int:
        return 1

    temporary()
    assert requests(registry, "temporary", "miss") == 1
    del temporary
    gc.collect()

    generate_latest(registry)  # the first scrape notices
    assert requests(registry, "temporary", "miss") is None


class _BrokenCache:
    """A cache-like object whose statistics cannot be read."""

    def cache_info(self) -> None:
        raise RuntimeError("statistics unavailable")


def test_a_cache_that_cannot_be_read_is_logged_once_and_skipped(
    registry: CollectorRegistry,
) -> None:
    broken = _BrokenCache()
    watch_cache("broken", broken, registry=registry)

    @functools.lru_cache(maxsize=2)
    def healthy(key: int) -> int:
        return key

    watch_cache("healthy", healthy, registry=registry)
    healthy(1)

    with structlog.testing.capture_logs() as logs:
        generate_latest(registry)
        generate_latest(registry)

    assert requests(registry, "healthy", "miss") == 1
    assert entries(registry, "broken") == (None, None)
    failures = [(log["cache_name"], log["error_type"]) for log in logs]
    assert failures == [("broken", "RuntimeError")]


def test_the_namespace_prefixes_the_families(registry: CollectorRegistry) -> None:
    @cached("users", maxsize=1, registry=registry, namespace="shop")
    def user(user_id: int) -> int:
        return user_id

    user(1)

    labels = {"cache_name": "users", "result": "miss"}
    assert registry.get_sample_value("shop_cache_requests_total", labels) == 1
    assert registry.get_sample_value("cache_requests_total", labels) is None


def test_cache_names_beyond_the_cap_fold_into_overflow(registry: CollectorRegistry) -> None:
    functions = []
    for index in range(1001):
        function = functools.lru_cache(maxsize=1)(lambda: 1)
        watch_cache(f"cache_{index}", function, registry=registry)
        functions.append(function)
    for function in functions[-2:]:
        function()

    assert requests(registry, "cache_0", "miss") == 0
    assert requests(registry, "cache_999", "miss") == 1
    assert requests(registry, "__overflow__", "miss") == 1
    overflow = registry.get_sample_value(
        "asgi_perfmon_label_overflow_total", {"metric": "cache_requests_total"}
    )
    assert overflow == 1


# --- multiprocess mode --------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import asyncio, functools
    from asgi_perfmon.cache import cached, watch_cache

    @cached("users", maxsize=2)
    async def user(user_id):
        return user_id

    @functools.lru_cache(maxsize=8)
    def config(key):
        return key

    watch_cache("config", config)

    async def main():
        for user_id in [1, 1, 2, 3]:
            await user(user_id)
        config("a"); config("a")

    asyncio.run(main())
    # no explicit flush: the sampler adds the last counts at exit
    """
)


def test_multiprocess_mode_adds_up_every_process(tmp_path: Path) -> None:
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": python_path}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", _WORKER], env=env, check=True, timeout=60)

    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=str(tmp_path))  # type: ignore[no-untyped-call]

    assert requests(merged, "users", "hit") == 2
    assert requests(merged, "users", "miss") == 6
    assert evictions(merged, "users", "size") == 2
    assert requests(merged, "config", "hit") == 2
    assert requests(merged, "config", "miss") == 2
    assert entries(merged, "users") == (4, 4)  # livesum; nobody marked the workers dead


_PRELOADED = textwrap.dedent(
    """
    import os, time
    import asgi_perfmon.cache as cache_module
    cache_module.SAMPLE_INTERVAL = 0.05
    from asgi_perfmon.cache import cached

    @cached("forked", maxsize=4)  # decorated in the parent, as with gunicorn --preload
    def double(x):
        return 2 * x

    double(1)  # the parent's miss, before the fork
    pid = os.fork()
    if pid == 0:
        double(1)  # a hit on the inherited entry
        double(2)  # a miss
        time.sleep(0.5)  # the child's own sampler reports them
        os._exit(0)  # like a worker that ends without running atexit handlers
    os.waitpid(pid, 0)
    """
)


def test_a_forked_worker_reports_its_own_counts_once(tmp_path: Path) -> None:
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": python_path}
    subprocess.run([sys.executable, "-c", _PRELOADED], env=env, check=True, timeout=60)

    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=str(tmp_path))  # type: ignore[no-untyped-call]

    assert requests(merged, "forked", "miss") == 2
    assert requests(merged, "forked", "hit") == 1
