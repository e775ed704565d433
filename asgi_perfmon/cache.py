"""Cache hit-rate metrics: the ``cached`` decorator, and ``watch_cache`` for existing caches.

``cached`` and ``watch_cache`` export the same families, ``cache_requests_total{cache_name,
result}``, ``cache_evictions_total{cache_name,reason}``, ``cache_entries{cache_name}`` and
``cache_max_entries{cache_name}``, and prometheus-client refuses two collectors exporting one
name in a registry. So both feed one :class:`CacheSources` per registry and namespace: a list
of named *sources*, each able to take a :class:`CacheSnapshot` of its cumulative counts. A
source is the store behind a ``cached`` function (plain integers: no Prometheus object on the
hot path), a function with ``cache_info()`` (``functools.lru_cache``, cachetools
``@cached(..., info=True)``) or a cachetools ``Cache``. Sources are held weakly, so a cache that
is garbage collected disappears from the metrics; several sources under one name add up.

The sources are exported by a scrape-time :class:`CacheCollector` in a single process. In
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), scrape-time collectors only see the scraping
process, so a :class:`CacheSampler` thread turns the snapshots into counter increments and
``livesum`` gauges every few seconds and once more at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, ParamSpec, Protocol, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from asgi_perfmon._labels import (
    DEFAULT_MAX_LABEL_VALUES,
    BoundedLabels,
    LabelValues,
    overflow_counter,
)
from asgi_perfmon._logging import FailureLog
from asgi_perfmon._registry import metric_name, resolve_namespace, resolve_registry, shared
from asgi_perfmon.context import current_request

__all__ = [
    "CacheCollector",
    "CacheInfo",
    "CacheSampler",
    "CacheSnapshot",
    "CacheSources",
    "CachedFunction",
    "cached",
    "watch_cache",
]

P = ParamSpec("P")
R = TypeVar("R")


EVICTION_REASONS = ("size", "expired", "invalidated")
SAMPLE_INTERVAL = 5.0
"""Seconds between two samples of the caches in multiprocess mode (read at every sample)."""

_MISSING: Any = object()
_KEYWORDS = object()


@dataclass(frozen=True)
class CacheSnapshot:
    """Cumulative counts of one cache at one moment; ``None`` where the cache does not tell."""

    entries: int
    max_entries: int | None = None
    hits: int | None = None
    misses: int | None = None
    evictions: Mapping[str, int] | None = None


class CacheInfo(NamedTuple):
    """``cache_info()`` of a ``cached`` function, shaped like ``functools.lru_cache``'s."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class CachedFunction(Protocol[P, R]):
    """What ``cached`` returns: the function, plus ``invalidate``, ``clear`` and ``cache_info``."""

    __wrapped__: Callable[P, R]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Drop the entry for these arguments; ``True`` if there was one."""
        ...

    def clear(self) -> None:
        """Drop every entry."""
        ...

    def cache_info(self) -> CacheInfo:
        """Hits, misses, maximum and current size."""
        ...


def _weak_reference(target: object) -> Callable[[], Any]:
    """A weak reference to ``target``, or a strong one if it cannot be referenced weakly."""
    if inspect.ismethod(target):
        return weakref.WeakMethod(target)
    try:
        return weakref.ref(target)
    except TypeError:
        return lambda: target


class _Source:
    """One watched cache, held weakly, and how to read it."""

    def __init__(self, target: object, read: Callable[[Any], CacheSnapshot]) -> None:
        self._reference = _weak_reference(target)
        self._read = read

    def watches(self, target: object) -> bool:
        return self._reference() is target

    def snapshot(self) -> CacheSnapshot | None:
        """The counts now, or ``None`` once the cache has been garbage collected."""
        target = self._reference()
        return None if target is None else self._read(target)


class CacheSources:
    """The caches of one registry and namespace, by ``cache_name``."""

    def __init__(self, names: BoundedLabels[tuple[str, ...]]) -> None:
        self._names = names
        self._by_name: dict[str, list[_Source]] = {}
        self._lock = threading.Lock()
        self._log_failure = FailureLog()
        self.on_add: Callable[[], None] | None = None

    def add(self, name: str, target: object, read: Callable[[Any], CacheSnapshot]) -> None:
        """Watch ``target`` as ``name`` (bounded); watching it again is a no-op."""
        name = self._names.labels(name)[0]
        with self._lock:
            sources = self._by_name.setdefault(name, [])
            if not any(source.watches(target) for source in sources):
                sources.append(_Source(target, read))
        if self.on_add is not None:
            self.on_add()

    def read(self) -> dict[str, list[tuple[_Source, CacheSnapshot]]]:
        """The snapshots by name of the sources that could be read; caches gone are dropped."""
        with self._lock:
            by_name = {name: list(sources) for name, sources in self._by_name.items()}
        snapshots: dict[str, list[tuple[_Source, CacheSnapshot]]] = {}
        for name, sources in by_name.items():
            read = [(source, self._snapshot(name, source)) for source in sources]
            if live := [(source, snapshot) for source, snapshot in read if snapshot is not None]:
                snapshots[name] = live
        return snapshots

    def _snapshot(self, name: str, source: _Source) -> CacheSnapshot | None:
        try:
            snapshot = source.snapshot()
        except Exception as error:
            self._log_failure.record("cache", error, event="collector_failed", cache_name=name)
            return None
        if snapshot is None:
            self._forget(name, source)
        return snapshot

    def _forget(self, name: str, source: _Source) -> None:
        """Drop a source whose cache is gone, and the name once it has no source left."""
        with self._lock:
            sources = self._by_name.get(name, [])
            if source in sources:
                sources.remove(source)
            if not sources:
                self._by_name.pop(name, None)


def merge(snapshots: list[CacheSnapshot]) -> CacheSnapshot:
    """The sum of several caches' snapshots; an unbounded one makes the sum unbounded."""
    maxima = [snapshot.max_entries for snapshot in snapshots]
    return CacheSnapshot(
        entries=sum(snapshot.entries for snapshot in snapshots),
        max_entries=None if None in maxima else sum(cast("list[int]", maxima)),
        hits=_sum_known(snapshot.hits for snapshot in snapshots),
        misses=_sum_known(snapshot.misses for snapshot in snapshots),
        evictions=_sum_evictions(snapshot.evictions for snapshot in snapshots),
    )


def _sum_known(values: Iterable[int | None]) -> int | None:
    known = [value for value in values if value is not None]
    return sum(known) if known else None


def _sum_evictions(evictions: Iterable[Mapping[str, int] | None]) -> dict[str, int] | None:
    known = [counts for counts in evictions if counts is not None]
    if not known:
        return None
    return {reason: sum(counts.get(reason, 0) for counts in known) for reason in EVICTION_REASONS}


class CacheCollector:
    """Scrape-time cache families for a single process."""

    def __init__(self, namespace: str, sources: CacheSources) -> None:
        self._namespace = namespace
        self._sources = sources

    def describe(self) -> Iterator[Metric]:
        """The families this collector exports, so the registry knows their names."""
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        """One sample set per cache name."""
        requests, evictions, entries, max_entries = self._families()
        for name, read in self._sources.read().items():
            snapshot = merge([snapshot for _, snapshot in read])
            entries.add_metric([name], snapshot.entries)
            if snapshot.max_entries is not None:
                max_entries.add_metric([name], snapshot.max_entries)
            if snapshot.hits is not None:
                requests.add_metric([name, "hit"], snapshot.hits)
            if snapshot.misses is not None:
                requests.add_metric([name, "miss"], snapshot.misses)
            for reason, count in (snapshot.evictions or {}).items():
                evictions.add_metric([name, reason], count)
        yield from (requests, evictions, entries, max_entries)

    def _families(
        self,
    ) -> tuple[CounterMetricFamily, CounterMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        namespace = self._namespace
        return (
            CounterMetricFamily(
                metric_name(namespace, "cache_requests"),
                "Cache lookups, by result (hit or miss).",
                labels=["cache_name", "result"],
            ),
            CounterMetricFamily(
                metric_name(namespace, "cache_evictions"),
                "Entries removed from the cache, by reason (size, expired, invalidated).",
                labels=["cache_name", "reason"],
            ),
            GaugeMetricFamily(
                metric_name(namespace, "cache_entries"),
                "Entries in the cache.",
                labels=["cache_name"],
            ),
            GaugeMetricFamily(
                metric_name(namespace, "cache_max_entries"),
                "Capacity of the cache, in entries (in its own size units if it weighs them).",
                labels=["cache_name"],
            ),
        )


class CacheSampler:
    """Multiprocess form: a thread adding the sources' counts to counters and gauges."""

    def __init__(self, registry: CollectorRegistry, namespace: str, sources: CacheSources) -> None:
        self._sources = sources
        self._requests = Counter(
            metric_name(namespace, "cache_requests"),
            "Cache lookups, by result (hit or miss).",
            ["cache_name", "result"],
            registry=registry,
        )
        self._evictions = Counter(
            metric_name(namespace, "cache_evictions"),
            "Entries removed from the cache, by reason (size, expired, invalidated).",
            ["cache_name", "reason"],
            registry=registry,
        )
        self._entries = Gauge(
            metric_name(namespace, "cache_entries"),
            "Entries in the cache.",
            ["cache_name"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._max_entries = Gauge(
            metric_name(namespace, "cache_max_entries"),
            "Capacity of the cache, in entries (in its own size units if it weighs them).",
            ["cache_name"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._last: weakref.WeakKeyDictionary[_Source, CacheSnapshot] = weakref.WeakKeyDictionary()
        self._names: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Sample every ``SAMPLE_INTERVAL`` seconds in a daemon thread, and once more at exit.

        A process forked afterwards (``gunicorn --preload``) gets a thread of its own and
        reports only what its caches count after the fork.
        """
        if self._thread is not None:
            return
        self._start_thread()
        atexit.register(self.sample)
        os.register_at_fork(
            before=self._before_fork,
            after_in_parent=self._after_fork_in_parent,
            after_in_child=self._restart_in_child,
        )

    def _start_thread(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="asgi-perfmon-cache-sampler", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(SAMPLE_INTERVAL)
            self.sample()

    def _before_fork(self) -> None:
        self._lock.acquire()  # no sample in progress, so no cache lock held by this thread

    def _after_fork_in_parent(self) -> None:
        self._lock.release()

    def _restart_in_child(self) -> None:
        """The counts so far are the parent's to report: take them as the baseline."""
        self._lock = threading.Lock()
        for read in self._sources.read().values():
            for source, snapshot in read:
                self._last[source] = snapshot
        self._start_thread()

    def sample(self) -> None:
        """Add what the caches counted since the last sample; set the gauges."""
        with self._lock:
            by_name = self._sources.read()
            for name, read in by_name.items():
                for source, snapshot in read:
                    self._count(name, self._last.get(source), snapshot)
                    self._last[source] = snapshot
                merged = merge([snapshot for _, snapshot in read])
                self._entries.labels(name).set(merged.entries)
                self._max_entries.labels(name).set(merged.max_entries or 0)
            for name in self._names - by_name.keys():  # every cache of that name is gone
                self._entries.labels(name).set(0)
                self._max_entries.labels(name).set(0)
            self._names = set(by_name)

    def _count(self, name: str, last: CacheSnapshot | None, now: CacheSnapshot) -> None:
        previous = last or CacheSnapshot(entries=0)
        for result, before, after in (
            ("hit", previous.hits, now.hits),
            ("miss", previous.misses, now.misses),
        ):
            if after is not None:
                self._requests.labels(name, result).inc(_increase(before, after))
        for reason, after in (now.evictions or {}).items():
            before = (previous.evictions or {}).get(reason)
            self._evictions.labels(name, reason).inc(_increase(before, after))


def _increase(before: int | None, after: int) -> int:
    """How much a cumulative count grew; a count that went down was reset (``cache_clear``)."""
    if before is None or after < before:
        return after
    return after - before


def cache_sources(registry: CollectorRegistry, namespace: str) -> CacheSources:
    """The sources of ``registry`` and ``namespace``, with their exporter, built on first use."""

    def build() -> CacheSources:
        names: BoundedLabels[tuple[str, ...]] = BoundedLabels(
            LabelValues(),
            name=metric_name(namespace, "cache_requests_total"),
            label_count=1,
            max_values=DEFAULT_MAX_LABEL_VALUES,
            overflow=overflow_counter(registry, namespace),
        )
        sources = CacheSources(names)
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            sources.on_add = CacheSampler(registry, namespace, sources).start
        else:
            registry.register(CacheCollector(namespace, sources))
        return sources

    return shared(registry, ("cache", namespace), build)


def _tell_request(*, hit: bool) -> None:
    request = current_request()
    if request is not None:
        request.add_cache_result(hit=hit)


def _make_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    return (*args, _KEYWORDS, *kwargs.items()) if kwargs else args


def _unhashable(cache_name: str, error: TypeError) -> TypeError:
    msg = (
        f"cached({cache_name!r}) builds its key from the arguments, so they must be "
        f"hashable ({error}); pass e.g. a tuple instead of a list, or a frozenset "
        "instead of a set."
    )
    return TypeError(msg)


class _Store:
    """The entries behind one ``cached`` function: LRU order, an optional TTL, and counts.

    A lock makes it safe for sync functions called from several threads. Async loads in
    flight are kept per key, so concurrent misses share one call (single-flight).
    """

    def __init__(
        self, name: str, maxsize: int, ttl: float | None, clock: Callable[[], float]
    ) -> None:
        self.name = name
        self._maxsize = maxsize
        self._ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._deadlines: OrderedDict[Hashable, float] = OrderedDict()  # expiry order
        self._loading: dict[Hashable, asyncio.Task[Any]] = {}
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._evictions = dict.fromkeys(EVICTION_REASONS, 0)
        self.epoch = 0
        """Incremented by every invalidation, so a sync call that began before it
        does not store a stale value."""

    def get(self, key: Hashable) -> Any:
        """The value for ``key`` (counted as a hit), or ``_MISSING`` (counted as a miss)."""
        with self._lock:
            if self._deadlines:
                self._expire()
            try:
                value = self._entries.get(key, _MISSING)
            except TypeError as error:
                raise _unhashable(self.name, error) from None
            if value is _MISSING:
                self._misses += 1
            else:
                self._hits += 1
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any, *, epoch: int) -> None:
        """Store ``value`` unless the cache was invalidated since ``epoch``."""
        with self._lock:
            if epoch == self.epoch:
                self._put(key, value)

    def _put(self, key: Hashable, value: Any) -> None:
        if self._deadlines:
            self._expire()
        if self._entries.pop(key, _MISSING) is _MISSING:
            while len(self._entries) >= self._maxsize:
                oldest, _ = self._entries.popitem(last=False)
                self._deadlines.pop(oldest, None)
                self._evictions["size"] += 1
        self._entries[key] = value
        if self._ttl is not None:
            self._deadlines.pop(key, None)
            self._deadlines[key] = self._clock() + self._ttl

    def _expire(self) -> None:
        now = self._clock()
        while self._deadlines:
            key, deadline = next(iter(self._deadlines.items()))
            if deadline > now:
                return
            del self._deadlines[key]
            del self._entries[key]
            self._evictions["expired"] += 1

    def load(self, key: Hashable, call: Callable[[], Any]) -> asyncio.Task[Any]:
        """The load of ``key`` in flight, or a new one running ``call()`` as its own task."""
        loop = asyncio.get_running_loop()
        with self._lock:
            task = self._loading.get(key)
            if task is None or task.get_loop() is not loop:
                task = loop.create_task(self._load(key, call()), name=f"cached {self.name}")
                task.add_done_callback(_retrieve_exception)
                self._loading[key] = task
            return task

    async def _load(self, key: Hashable, coroutine: Any) -> Any:
        task = asyncio.current_task()
        try:
            value = await coroutine
            with self._lock:
                if self._loading.get(key) is task:  # not invalidated meanwhile
                    self._put(key, value)
            return value
        finally:
            with self._lock:
                if self._loading.get(key) is task:
                    del self._loading[key]

    def invalidate(self, key: Hashable) -> bool:
        try:
            hash(key)
        except TypeError as error:
            raise _unhashable(self.name, error) from None
        with self._lock:
            self.epoch += 1
            self._loading.pop(key, None)
            if self._entries.pop(key, _MISSING) is _MISSING:
                return False
            self._deadlines.pop(key, None)
            self._evictions["invalidated"] += 1
            return True

    def clear(self) -> None:
        with self._lock:
            self.epoch += 1
            self._loading.clear()
            self._evictions["invalidated"] += len(self._entries)
            self._entries.clear()
            self._deadlines.clear()

    def snapshot(self) -> CacheSnapshot:
        with self._lock:
            return CacheSnapshot(
                entries=len(self._entries),
                max_entries=self._maxsize,
                hits=self._hits,
                misses=self._misses,
                evictions=dict(self._evictions),
            )

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, self._maxsize, len(self._entries))


def _retrieve_exception(task: asyncio.Task[Any]) -> None:
    """Mark a failed load as seen even if every caller was cancelled meanwhile."""
    if not task.cancelled():
        task.exception()


def _async_cached(func: Callable[..., Any], store: _Store) -> Callable[..., Any]:
    @functools.wraps(func)
    async def cached_call(*args: Any, **kwargs: Any) -> Any:
        key = (*args, _KEYWORDS, *kwargs.items()) if kwargs else args  # _make_key, inlined
        value = store.get(key)
        _tell_request(hit=value is not _MISSING)
        if value is not _MISSING:
            return value
        # Each caller waits through a shield: a cancelled caller leaves the load running.
        return await asyncio.shield(store.load(key, lambda: func(*args, **kwargs)))

    return cached_call


def _sync_cached(func: Callable[..., Any], store: _Store) -> Callable[..., Any]:
    @functools.wraps(func)
    def cached_call(*args: Any, **kwargs: Any) -> Any:
        key = (*args, _KEYWORDS, *kwargs.items()) if kwargs else args  # _make_key, inlined
        value = store.get(key)
        _tell_request(hit=value is not _MISSING)
        if value is not _MISSING:
            return value
        epoch = store.epoch
        value = func(*args, **kwargs)
        store.put(key, value, epoch=epoch)
        return value

    return cached_call


def cached(
    name: str,
    *,
    maxsize: int,
    ttl: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    registry: CollectorRegistry | None = None,
    namespace: str | None = None,
) -> Callable[[Callable[P, R]], CachedFunction[P, R]]:
    """Cache an async (or sync) function's results, with hit, miss and eviction metrics.

    At most ``maxsize`` entries, least recently used evicted first; with ``ttl``, an entry
    expires ``ttl`` seconds (of ``clock``) after it was stored. Concurrent misses for one key
    of an async function share a single call, which runs as its own task: a cancelled caller
    does not cancel it for the others. Errors are not cached. The arguments form the key and
    must be hashable (``f(1)`` and ``f(x=1)`` are different keys). The decorated function has
    ``.invalidate(*args, **kwargs)``, ``.clear()`` and ``.cache_info()``.
    """
    _validate(name, maxsize, ttl)
    sources = cache_sources(resolve_registry(registry), resolve_namespace(namespace))

    def decorate(func: Callable[P, R]) -> CachedFunction[P, R]:
        if inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func):
            msg = f"cached({name!r}) cannot cache a generator: its values are consumed once."
            raise TypeError(msg)
        store = _Store(name, maxsize, ttl, clock)
        sources.add(name, store, _Store.snapshot)
        wrap = _async_cached if inspect.iscoroutinefunction(func) else _sync_cached
        return cast("CachedFunction[P, R]", _with_controls(wrap(func, store), store))

    return decorate


def _with_controls(wrapper: Callable[..., Any], store: _Store) -> Any:
    def invalidate(*args: Any, **kwargs: Any) -> bool:
        """Drop the entry for these arguments; ``True`` if there was one."""
        return store.invalidate(_make_key(args, kwargs))

    vars(wrapper).update(
        invalidate=invalidate,
        clear=store.clear,
        cache_info=store.cache_info,
        __perfmon_cache__=store.name,
    )
    return wrapper


def _validate(name: str, maxsize: int, ttl: float | None) -> None:
    if not isinstance(name, str) or not name:
        msg = f"The cache name must be a non-empty string, got {name!r}."
        raise ValueError(msg)
    if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
        msg = f"maxsize must be a positive integer, got {maxsize!r}."
        raise ValueError(msg)
    if ttl is not None and not (isinstance(ttl, (int, float)) and 0 < ttl < math.inf):
        msg = f"ttl must be a positive number of seconds or None, got {ttl!r}."
        raise ValueError(msg)


T = TypeVar("T")


def watch_cache(
    name: str,
    func_or_cache: T,
    *,
    registry: CollectorRegistry | None = None,
    namespace: str | None = None,
) -> T:
    """Export an existing cache's metrics as ``cache_name=name``, read when scraped.

    Accepts a ``functools.lru_cache`` function or a cachetools ``@cached(..., info=True)``
    function (hits, misses, entries, maximum, via ``cache_info()``), or a cachetools ``Cache``
    or a cachetools-decorated function without ``info=True`` (entries and maximum only).
    Evictions are not seen. Returns ``func_or_cache`` unchanged.
    """
    if not isinstance(name, str) or not name:
        msg = f"The cache name must be a non-empty string, got {name!r}."
        raise ValueError(msg)
    target, read = _reader_for(func_or_cache)
    cache_sources(resolve_registry(registry), resolve_namespace(namespace)).add(name, target, read)
    return func_or_cache


def _reader_for(obj: object) -> tuple[object, Callable[[Any], CacheSnapshot]]:
    """What to watch in ``obj`` and how to read it; ``TypeError`` if it is no known cache."""
    already = getattr(obj, "__perfmon_cache__", None)
    if already is not None:
        msg = f"This function is cached(...) as {already!r}, which already reports its metrics."
        raise ValueError(msg)
    if callable(getattr(obj, "cache_info", None)):
        return obj, _read_cache_info
    if _is_sized_cache(obj):
        return obj, _read_sized_cache
    inner = getattr(obj, "cache", None)
    if _is_sized_cache(inner):
        return inner, _read_sized_cache
    msg = (
        "watch_cache() needs a functools.lru_cache function, a cachetools-decorated function "
        f"or a cachetools Cache, got {type(obj).__name__}."
    )
    raise TypeError(msg)


def _is_sized_cache(obj: object) -> bool:
    return isinstance(obj, Mapping) and hasattr(obj, "maxsize") and hasattr(obj, "currsize")


def _read_cache_info(func: Any) -> CacheSnapshot:
    info = func.cache_info()
    return CacheSnapshot(
        entries=int(info.currsize),
        max_entries=_finite(info.maxsize),
        hits=int(info.hits),
        misses=int(info.misses),
    )


def _read_sized_cache(cache: Any) -> CacheSnapshot:
    return CacheSnapshot(entries=len(cache), max_entries=_finite(cache.maxsize))


def _finite(value: float | None) -> int | None:
    """``value`` as an int, or ``None`` for an unbounded cache."""
    if value is None or value == math.inf:
        return None
    return int(value)
