"""The demo's closing summary, computed from one ``/metrics`` exposition.

Each function takes the parsed samples (:func:`parse_samples`) and reads one thing: requests
per second, p95 and average per route, pool usage, cache hit ratios, slow requests. Quantiles
are interpolated inside histogram buckets the way Prometheus' ``histogram_quantile`` does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

Labels = dict[str, str]
Samples = dict[str, list[tuple[Labels, float]]]
"""Sample name (``..._bucket``, ``..._total``) -> every (labels, value) with that name."""

DURATION = "http_server_request_duration_seconds"
SLOW = "http_server_slow_requests_total"
POOL_COUNT = "db_client_connection_count"
POOL_MAX = "db_client_connection_max"
POOL_WAIT = "db_client_connection_wait_time_seconds"
CACHE_REQUESTS = "cache_requests_total"
LOOP_BLOCKED = "asyncio_event_loop_blocked_total"


@dataclass(frozen=True)
class RouteStats:
    """Requests of one method and route template."""

    method: str
    route: str
    count: float
    avg_s: float | None
    p95_s: float | None
    slow: float = 0.0


@dataclass(frozen=True)
class PoolStats:
    """One connection pool: connections in use now and at most, and the acquire wait."""

    name: str
    used: float
    idle: float
    max: float
    acquires: float
    wait_p95_s: float | None
    peak_used: float | None = None


@dataclass(frozen=True)
class CacheStats:
    """Lookups of one cache."""

    name: str
    hits: float
    misses: float

    @property
    def hit_ratio(self) -> float | None:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else None


@dataclass(frozen=True)
class Summary:
    """Everything the demo prints at the end."""

    elapsed_s: float
    total_requests: float
    status_classes: dict[str, float]
    routes: list[RouteStats]
    pools: list[PoolStats]
    caches: list[CacheStats]
    loop_blocked: float | None
    slow_total: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "slow_total", sum(r.slow for r in self.routes))

    @property
    def requests_per_second(self) -> float:
        return requests_per_second(self.total_requests, self.elapsed_s)


def parse_samples(text: str) -> Samples:
    """Every sample of an exposition in the Prometheus text format, grouped by sample name."""
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), sample.value))
    return dict(samples)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of cumulative ``(upper_bound, count)`` buckets, as Prometheus does it.

    Linear interpolation inside the bucket holding the rank; a rank in the ``+Inf`` bucket
    returns the highest finite bound. ``None`` when there are no observations.
    """
    ordered = sorted(buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]):
        return None
    total = ordered[-1][1]
    if total <= 0:
        return None
    rank = q * total
    index = next(i for i, (_, count) in enumerate(ordered) if count >= rank)
    if index == len(ordered) - 1:
        return ordered[-2][0]
    upper, count = ordered[index]
    lower, below = (0.0, 0.0) if index == 0 else ordered[index - 1]
    if index == 0 and upper <= 0:
        return upper
    in_bucket = count - below
    return lower + (upper - lower) * ((rank - below) / in_bucket) if in_bucket else upper


def summed_buckets(
    samples: Samples, histogram: str, keys: Sequence[str]
) -> dict[tuple[str, ...], list[tuple[float, float]]]:
    """The buckets of ``histogram`` summed over every label but ``keys`` (``sum by (keys, le)``)."""
    sums: dict[tuple[str, ...], dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for labels, value in samples.get(f"{histogram}_bucket", []):
        group = tuple(labels.get(key, "") for key in keys)
        sums[group][float(labels["le"])] += value
    return {group: sorted(by_le.items()) for group, by_le in sums.items()}


def summed(samples: Samples, name: str, keys: Sequence[str]) -> dict[tuple[str, ...], float]:
    """The values of sample ``name`` summed over every label but ``keys``."""
    sums: dict[tuple[str, ...], float] = defaultdict(float)
    for labels, value in samples.get(name, []):
        sums[tuple(labels.get(key, "") for key in keys)] += value
    return dict(sums)


def total_requests(samples: Samples) -> float:
    """Every request the middleware recorded."""
    return sum(value for _, value in samples.get(f"{DURATION}_count", []))


def requests_per_second(total: float, elapsed_s: float) -> float:
    """Average throughput over the run."""
    return total / elapsed_s if elapsed_s > 0 else 0.0


def status_classes(samples: Samples) -> dict[str, float]:
    """Requests by status class: ``{"2xx": 310.0, "4xx": 12.0}``."""
    classes: dict[str, float] = defaultdict(float)
    for (status,), count in summed(
        samples, f"{DURATION}_count", ["http_response_status_code"]
    ).items():
        classes[f"{status[:1]}xx"] += count
    return dict(sorted(classes.items()))


def route_stats(samples: Samples) -> list[RouteStats]:
    """Count, average, p95 and slow requests per method and route, busiest first."""
    keys = ["http_request_method", "http_route"]
    counts = summed(samples, f"{DURATION}_count", keys)
    sums = summed(samples, f"{DURATION}_sum", keys)
    buckets = summed_buckets(samples, DURATION, keys)
    slow = summed(samples, SLOW, keys)
    stats = [
        RouteStats(
            method=method,
            route=route,
            count=count,
            avg_s=sums.get((method, route), 0.0) / count if count else None,
            p95_s=histogram_quantile(0.95, buckets.get((method, route), [])),
            slow=slow.get((method, route), 0.0),
        )
        for (method, route), count in counts.items()
        if count
    ]
    return sorted(stats, key=lambda r: (-r.count, r.route, r.method))


def pool_stats(samples: Samples, peak_used: dict[str, float] | None = None) -> list[PoolStats]:
    """Connections in use, idle and allowed per pool, and the acquire wait."""
    by_state = summed(samples, POOL_COUNT, ["pool_name", "state"])
    maxima = summed(samples, POOL_MAX, ["pool_name"])
    acquires = summed(samples, f"{POOL_WAIT}_count", ["pool_name"])
    waits = summed_buckets(samples, POOL_WAIT, ["pool_name"])
    peaks = peak_used or {}
    return [
        PoolStats(
            name=name,
            used=by_state.get((name, "used"), 0.0),
            idle=by_state.get((name, "idle"), 0.0),
            max=maximum,
            acquires=acquires.get((name,), 0.0),
            wait_p95_s=histogram_quantile(0.95, waits.get((name,), [])),
            peak_used=peaks.get(name),
        )
        for (name,), maximum in sorted(maxima.items())
    ]


def pools_in_use(samples: Samples) -> dict[str, float]:
    """Connections in use per pool right now (sampled during the run for the peak)."""
    return {
        name: value
        for (name, state), value in summed(samples, POOL_COUNT, ["pool_name", "state"]).items()
        if state == "used"
    }


def cache_stats(samples: Samples) -> list[CacheStats]:
    """Hits and misses per cache."""
    results = summed(samples, CACHE_REQUESTS, ["cache_name", "result"])
    names = sorted({name for name, _ in results})
    return [
        CacheStats(name, results.get((name, "hit"), 0.0), results.get((name, "miss"), 0.0))
        for name in names
    ]


def loop_blocked(samples: Samples) -> float | None:
    """How often the event-loop watchdog saw the loop stall (``None``: no monitor running)."""
    values = samples.get(LOOP_BLOCKED)
    return None if values is None else sum(value for _, value in values)


def summarize(
    text: str, elapsed_s: float, peak_pool_used: dict[str, float] | None = None
) -> Summary:
    """The demo's summary of one exposition, for a run of ``elapsed_s`` seconds."""
    samples = parse_samples(text)
    return Summary(
        elapsed_s=elapsed_s,
        total_requests=total_requests(samples),
        status_classes=status_classes(samples),
        routes=route_stats(samples),
        pools=pool_stats(samples, peak_pool_used),
        caches=cache_stats(samples),
        loop_blocked=loop_blocked(samples),
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _count(value: float) -> str:
    return f"{value:,.0f}"


def format_routes(routes: Iterable[RouteStats]) -> list[str]:
    """The per-route table."""
    lines = [f"  {'route':<34} {'requests':>9} {'avg ms':>8} {'p95 ms':>8} {'slow':>5}"]
    lines += [
        f"  {r.method + ' ' + r.route:<34} {_count(r.count):>9} {_ms(r.avg_s):>8} "
        f"{_ms(r.p95_s):>8} {_count(r.slow):>5}"
        for r in routes
    ]
    return lines


def format_pool(pool: PoolStats) -> str:
    """One line per connection pool."""
    peak = "" if pool.peak_used is None else f"peak {_count(pool.peak_used)} in use, "
    return (
        f"  db pool {pool.name!r}: max {_count(pool.max)}, {peak}{_count(pool.used)} in use now; "
        f"{_count(pool.acquires)} acquires, wait p95 {_ms(pool.wait_p95_s)} ms"
    )


def format_cache(cache: CacheStats) -> str:
    """One line per cache."""
    ratio = "-" if cache.hit_ratio is None else f"{cache.hit_ratio:.1%}"
    return (
        f"  cache {cache.name!r}: hit ratio {ratio} "
        f"({_count(cache.hits)} hits, {_count(cache.misses)} misses)"
    )


def format_summary(summary: Summary) -> str:
    """The summary as the demo prints it."""
    classes = ", ".join(f"{_count(n)} {c}" for c, n in summary.status_classes.items())
    lines = [
        f"  {_count(summary.total_requests)} requests in {summary.elapsed_s:.1f} s = "
        f"{summary.requests_per_second:.1f} req/s ({classes or 'none'})",
        "",
        *format_routes(summary.routes),
        "",
        *(format_pool(pool) for pool in summary.pools),
        *(format_cache(cache) for cache in summary.caches),
        f"  slow requests (>= threshold): {_count(summary.slow_total)}",
    ]
    if summary.loop_blocked is not None:
        lines.append(f"  event loop blocked: {_count(summary.loop_blocked)} times")
    return "\n".join(lines)
