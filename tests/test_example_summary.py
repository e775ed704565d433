"""The demo's summary functions, on a canned ``/metrics`` exposition."""

from __future__ import annotations

import math

import pytest

from example_app.summary import (
    CacheStats,
    format_summary,
    histogram_quantile,
    parse_samples,
    pool_stats,
    pools_in_use,
    requests_per_second,
    route_stats,
    status_classes,
    summarize,
    total_requests,
)

LABELS = 'http_request_method="{m}",http_route="{r}",http_response_status_code="{s}"'


def _series(m: str, r: str, s: str, cumulative: tuple[int, int, int, int], total: float) -> str:
    """One duration histogram series with buckets 0.01, 0.1, 1.0 and +Inf."""
    labels = LABELS.format(m=m, r=r, s=s)
    name = "http_server_request_duration_seconds"
    bounds = ("0.01", "0.1", "1.0", "+Inf")
    pairs = zip(bounds, cumulative, strict=True)
    lines = [f'{name}_bucket{{{labels},le="{le}"}} {n}' for le, n in pairs]
    lines += [f"{name}_count{{{labels}}} {cumulative[-1]}", f"{name}_sum{{{labels}}} {total}"]
    return "\n".join(lines) + "\n"


EXPOSITION = (
    "# HELP http_server_request_duration_seconds Duration of HTTP server requests.\n"
    "# TYPE http_server_request_duration_seconds histogram\n"
    + _series("GET", "/users/{user_id}", "200", (80, 100, 100, 100), 0.9)
    + _series("GET", "/users/{user_id}", "404", (10, 20, 20, 20), 0.1)
    + _series("GET", "/report", "200", (0, 0, 8, 10), 7.5)
    + _series("POST", "/users", "422", (5, 5, 5, 5), 0.02)
    + """\
# HELP http_server_slow_requests_total Requests at or over the slow-request threshold.
# TYPE http_server_slow_requests_total counter
http_server_slow_requests_total{http_request_method="GET",http_route="/report"} 2.0
# HELP db_client_connection_count Connections of the pool by state.
# TYPE db_client_connection_count gauge
db_client_connection_count{pool_name="main",state="idle"} 3.0
db_client_connection_count{pool_name="main",state="used"} 7.0
# HELP db_client_connection_max Largest number of connections allowed.
# TYPE db_client_connection_max gauge
db_client_connection_max{pool_name="main"} 10.0
# HELP db_client_connection_wait_time_seconds Time waiting for a connection.
# TYPE db_client_connection_wait_time_seconds histogram
db_client_connection_wait_time_seconds_bucket{pool_name="main",le="0.001"} 90.0
db_client_connection_wait_time_seconds_bucket{pool_name="main",le="0.01"} 100.0
db_client_connection_wait_time_seconds_bucket{pool_name="main",le="+Inf"} 100.0
db_client_connection_wait_time_seconds_count{pool_name="main"} 100.0
db_client_connection_wait_time_seconds_sum{pool_name="main"} 0.2
# HELP cache_requests_total Cache lookups.
# TYPE cache_requests_total counter
cache_requests_total{cache_name="users",result="hit"} 75.0
cache_requests_total{cache_name="users",result="miss"} 25.0
cache_requests_total{cache_name="settings",result="hit"} 0.0
cache_requests_total{cache_name="settings",result="miss"} 0.0
# HELP asyncio_event_loop_blocked_total Times the loop stalled.
# TYPE asyncio_event_loop_blocked_total counter
asyncio_event_loop_blocked_total 3.0
"""
)


def test_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    buckets = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (math.inf, 100.0)]

    # rank 95 lies in (0.5, 1.0], 5 of its 10 observations in: halfway.
    assert 0.75 == pytest.approx(histogram_quantile(0.95, buckets))
    # rank 25 in the first bucket interpolates from 0.
    assert 0.05 == pytest.approx(histogram_quantile(0.25, buckets))


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    buckets = [(0.1, 1.0), (1.0, 2.0), (math.inf, 10.0)]

    assert 1.0 == histogram_quantile(0.95, buckets)


def test_quantile_of_nothing_is_none() -> None:
    assert histogram_quantile(0.95, []) is None
    assert histogram_quantile(0.95, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.95, [(0.1, 1.0), (1.0, 2.0)]) is None  # no +Inf bucket


def test_quantile_ignores_bucket_order() -> None:
    buckets = [(math.inf, 100.0), (1.0, 100.0), (0.5, 90.0), (0.1, 50.0)]

    assert 0.75 == pytest.approx(histogram_quantile(0.95, buckets))


def test_total_and_rate() -> None:
    samples = parse_samples(EXPOSITION)

    assert 135.0 == total_requests(samples)
    assert 13.5 == requests_per_second(135.0, 10.0)
    assert 0.0 == requests_per_second(135.0, 0.0)


def test_status_classes() -> None:
    assert {"2xx": 110.0, "4xx": 25.0} == status_classes(parse_samples(EXPOSITION))


def test_routes_merge_statuses_and_sort_busiest_first() -> None:
    routes = route_stats(parse_samples(EXPOSITION))

    assert [("GET", "/users/{user_id}"), ("GET", "/report"), ("POST", "/users")] == [
        (r.method, r.route) for r in routes
    ]
    users, report, _ = routes
    assert 120.0 == users.count
    assert 1.0 / 120 == pytest.approx(users.avg_s)
    # 120 observations, rank 114: 90 at or under 0.01, the other 30 in (0.01, 0.1].
    assert 0.01 + 0.09 * (24 / 30) == pytest.approx(users.p95_s)
    assert 2.0 == report.slow
    assert 1.0 == report.p95_s  # rank 9.5 lies in +Inf: the highest finite bound


def test_pool_usage_and_acquire_wait() -> None:
    samples = parse_samples(EXPOSITION)

    (pool,) = pool_stats(samples, {"main": 10.0})

    assert ("main", 7.0, 3.0, 10.0, 100.0, 10.0) == (
        pool.name,
        pool.used,
        pool.idle,
        pool.max,
        pool.acquires,
        pool.peak_used,
    )
    assert 0.001 + 0.009 * (5 / 10) == pytest.approx(pool.wait_p95_s)
    assert {"main": 7.0} == pools_in_use(samples)


def test_cache_hit_ratio() -> None:
    summary = summarize(EXPOSITION, elapsed_s=10.0)

    assert [CacheStats("settings", 0.0, 0.0), CacheStats("users", 75.0, 25.0)] == summary.caches
    assert summary.caches[0].hit_ratio is None
    assert 0.75 == summary.caches[1].hit_ratio


def test_summary_totals_slow_requests_and_loop_stalls() -> None:
    summary = summarize(EXPOSITION, elapsed_s=10.0)

    assert 2.0 == summary.slow_total
    assert 3.0 == summary.loop_blocked
    assert 13.5 == summary.requests_per_second


def test_loop_blocked_is_none_without_a_monitor() -> None:
    assert summarize("", elapsed_s=1.0).loop_blocked is None


def test_format_summary_names_every_part() -> None:
    text = format_summary(summarize(EXPOSITION, elapsed_s=10.0, peak_pool_used={"main": 10.0}))

    assert "135 requests in 10.0 s = 13.5 req/s (110 2xx, 25 4xx)" in text
    assert "GET /users/{user_id}" in text
    assert "db pool 'main': max 10, peak 10 in use, 7 in use now; 100 acquires" in text
    assert "cache 'users': hit ratio 75.0% (75 hits, 25 misses)" in text
    assert "slow requests (>= threshold): 2" in text
    assert "event loop blocked: 3 times" in text
