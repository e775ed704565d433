"""Build ``grafana/dashboards/asgi-perfmon.json`` from the panel list below.

Run ``python grafana/build_dashboard.py`` after editing this file to rewrite the JSON, or
``python grafana/build_dashboard.py --check`` to fail when the committed JSON is stale. An app
that sets asgi-perfmon's ``namespace`` gets its own copy with
``python grafana/build_dashboard.py --namespace myapp --output myapp.json``. Only the standard
library is used, so it runs anywhere.

Every panel gets the same shape: the ``${datasource}`` data source, a unit, thresholds, a
one-line description and a place on the 24-column grid. The expressions use the default metric
names of the SPEC catalogue (no ``namespace``), and filter on the ``$job``, ``$instance`` and
(for HTTP metrics) ``$route`` variables.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Json = dict[str, Any]

DASHBOARD_PATH = Path(__file__).resolve().parent / "dashboards" / "asgi-perfmon.json"
UID = "asgi-perfmon"
SCHEMA_VERSION = 41  # Grafana 11.6 / 12; older Grafana versions load it as well
DATASOURCE: Json = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
GRID_WIDTH = 24

# Label matchers. `job` is single-valued; `instance` and `route` are multi-valued with "All".
BASE = 'job="$job", instance=~"$instance"'
HTTP = f'{BASE}, http_route=~"$route"'

# Latency SLO shown as a threshold on the latency panels; the alert rules default to the same.
LATENCY_SLO_S = 0.5

GREEN, ORANGE, RED, BLUE = "green", "orange", "red", "blue"
STATUS_CLASS_COLORS = (
    ("1xx", "purple"),
    ("2xx", GREEN),
    ("3xx", BLUE),
    ("4xx", ORANGE),
    ("5xx", RED),
)


@dataclass(frozen=True)
class Target:
    """One Prometheus query of a panel."""

    expr: str
    legend: str = "__auto"
    instant: bool = False
    heatmap: bool = False


@dataclass(frozen=True)
class Spec:
    """One panel: what it shows, how it is drawn and how wide it is."""

    kind: str  # "timeseries", "stat" or "heatmap"
    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str
    thresholds: tuple[tuple[str, float | None], ...] = ((GREEN, None),)
    width: int = 8
    height: int = 8
    show_thresholds: str = "off"  # timeseries: "off", "dashed", "line+area", ...
    min: float | None = 0
    max: float | None = None
    stack: bool = False
    bars: bool = False
    legend_table: bool = True
    no_value: str | None = None
    graph: bool = True  # stat: sparkline
    text_mode: str = "auto"  # stat
    overrides: tuple[Json, ...] = field(default=())


@dataclass(frozen=True)
class Row:
    """A dashboard row and the panels under it."""

    title: str
    panels: tuple[Spec, ...]


def rate(metric: str, matchers: str = HTTP, by: str = "", window: str = RATE) -> str:
    """``sum [by (...)] (rate(metric{matchers}[window]))``."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{matchers}}}[{window}]))"


def quantile(q: float, histogram: str, matchers: str = HTTP, by: str = "") -> str:
    """``histogram_quantile(q, sum by (by, le) (rate(histogram_bucket{...}[...])))``."""
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, {rate(f'{histogram}_bucket', matchers, labels)})"


def ratio_or_zero(part: str, whole: str) -> str:
    """``part / whole``, and 0 where ``whole`` has series but ``part`` has none yet.

    A counter series with a label value (a 5xx status, an error outcome) appears only once the
    first such event happened; without the fallback a healthy service would show "No data".
    """
    return f"({part} / {whole}) or ({whole} * 0)"


def ts(title: str, description: str, *targets: Target, unit: str, **kw: Any) -> Spec:
    return Spec("timeseries", title, description, targets, unit, **kw)


def stat(title: str, description: str, *targets: Target, unit: str, **kw: Any) -> Spec:
    return Spec("stat", title, description, targets, unit, width=3, height=4, **kw)


def color_override(series: str, color: str) -> Json:
    """A field override giving the series named ``series`` a fixed colour."""
    return {
        "matcher": {"id": "byName", "options": series},
        "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": color}}],
    }


def latency_thresholds() -> tuple[tuple[str, float | None], ...]:
    return ((GREEN, None), (ORANGE, LATENCY_SLO_S), (RED, 2 * LATENCY_SLO_S))


def ratio_thresholds(warn: float, crit: float) -> tuple[tuple[str, float | None], ...]:
    return ((GREEN, None), (ORANGE, warn), (RED, crit))


REQUESTS = "http_server_request_duration_seconds_count"
DURATION = "http_server_request_duration_seconds"
FIVE_XX = f'{HTTP}, http_response_status_code=~"5.."'
FOUR_XX = f'{HTTP}, http_response_status_code=~"4.."'
USED = f'{BASE}, state="used"'
POOL = "instance, pool_name"

ROWS: tuple[Row, ...] = (
    Row(
        "Overview",
        (
            stat(
                "Request rate",
                "HTTP requests per second over the selected routes and instances.",
                Target(rate(REQUESTS)),
                unit="reqps",
                thresholds=((BLUE, None),),
            ),
            stat(
                "5xx error ratio",
                "Share of requests answered with a 5xx status.",
                Target(ratio_or_zero(rate(REQUESTS, FIVE_XX), rate(REQUESTS))),
                unit="percentunit",
                thresholds=ratio_thresholds(0.01, 0.05),
                max=1,
            ),
            stat(
                "p95 latency",
                f"95th percentile request duration; the default SLO is {LATENCY_SLO_S} s.",
                Target(quantile(0.95, DURATION)),
                unit="s",
                thresholds=latency_thresholds(),
            ),
            stat(
                "In-flight requests",
                "Requests being handled right now.",
                Target(f"sum (http_server_active_requests{{{HTTP}}})"),
                unit="short",
                thresholds=((GREEN, None), (ORANGE, 50), (RED, 100)),
            ),
            stat(
                "Slow requests",
                "Requests per second at or over the slow-request threshold (logged as "
                "slow_request).",
                Target(rate("http_server_slow_requests_total")),
                unit="reqps",
                thresholds=((GREEN, None), (ORANGE, 0.1), (RED, 1)),
            ),
            stat(
                "Event loop lag p99",
                "99th percentile delay of a ready callback on the event loop.",
                Target(quantile(0.99, "asyncio_event_loop_lag_seconds", BASE)),
                unit="s",
                thresholds=((GREEN, None), (ORANGE, 0.05), (RED, 0.1)),
            ),
            stat(
                "DB pool saturation",
                "Fullest connection pool: connections in use over the pool's maximum.",
                Target(
                    f"max (sum by ({POOL}) (db_client_connection_count{{{USED}}}) "
                    f"/ sum by ({POOL}) (db_client_connection_max{{{BASE}}}))"
                ),
                unit="percentunit",
                thresholds=ratio_thresholds(0.8, 0.95),
                max=1,
            ),
            stat(
                "Instances down",
                "Scrape targets of this job that Prometheus cannot reach (up == 0).",
                Target(f"sum (1 - up{{{BASE}}})"),
                unit="short",
                thresholds=((GREEN, None), (RED, 1)),
                graph=False,
            ),
        ),
    ),
    Row(
        "Traffic",
        (
            ts(
                "Requests by route",
                "HTTP requests per second per route template.",
                Target(rate(REQUESTS, by="http_route"), "{{http_route}}"),
                unit="reqps",
            ),
            ts(
                "Requests by status class",
                "HTTP requests per second per status class (2xx, 4xx, 5xx, ...).",
                Target(
                    "sum by (status_class) (label_replace(rate(http_server_request_duration_"
                    f'seconds_count{{{HTTP}}}[{RATE}]), "status_class", "${{1}}xx", '
                    '"http_response_status_code", "([0-9]).*"))',
                    "{{status_class}}",
                ),
                unit="reqps",
                stack=True,
                overrides=tuple(color_override(name, color) for name, color in STATUS_CLASS_COLORS),
            ),
            ts(
                "5xx error ratio by route",
                "Share of each route's requests answered with a 5xx status.",
                Target(
                    ratio_or_zero(
                        rate(REQUESTS, FIVE_XX, "http_route"), rate(REQUESTS, by="http_route")
                    ),
                    "{{http_route}}",
                ),
                unit="percentunit",
                thresholds=ratio_thresholds(0.01, 0.05),
                show_thresholds="dashed",
                max=1,
            ),
            ts(
                "4xx ratio by route",
                "Share of each route's requests answered with a 4xx status (client errors).",
                Target(
                    ratio_or_zero(
                        rate(REQUESTS, FOUR_XX, "http_route"), rate(REQUESTS, by="http_route")
                    ),
                    "{{http_route}}",
                ),
                unit="percentunit",
                thresholds=ratio_thresholds(0.1, 0.25),
                max=1,
            ),
            ts(
                "Exceptions by type",
                "Unhandled exceptions per second that reached the middleware, by route and type.",
                Target(
                    rate("http_server_exceptions_total", by="http_route, error_type"),
                    "{{http_route}} {{error_type}}",
                ),
                unit="ops",
                thresholds=((GREEN, None), (RED, 0.1)),
                no_value="0",
            ),
            ts(
                "Body bytes received and sent",
                "Request and response body bytes per second actually transferred.",
                Target(rate("http_server_request_body_size_bytes_sum"), "received"),
                Target(rate("http_server_response_body_size_bytes_sum"), "sent"),
                unit="Bps",
                legend_table=False,
            ),
        ),
    ),
    Row(
        "Latency",
        (
            ts(
                "Latency percentiles",
                "p50, p95 and p99 request duration over all selected routes.",
                Target(quantile(0.5, DURATION), "p50"),
                Target(quantile(0.95, DURATION), "p95"),
                Target(quantile(0.99, DURATION), "p99"),
                unit="s",
                thresholds=latency_thresholds(),
                show_thresholds="dashed",
                legend_table=False,
            ),
            ts(
                "p50 latency by route",
                "Median request duration per route.",
                Target(quantile(0.5, DURATION, by="http_route"), "{{http_route}}"),
                unit="s",
                thresholds=latency_thresholds(),
            ),
            ts(
                "p95 latency by route",
                f"95th percentile request duration per route; dashed line: the {LATENCY_SLO_S} s "
                "SLO.",
                Target(quantile(0.95, DURATION, by="http_route"), "{{http_route}}"),
                unit="s",
                thresholds=latency_thresholds(),
                show_thresholds="dashed",
            ),
            ts(
                "p99 latency by route",
                "99th percentile request duration per route: the slowest 1 %.",
                Target(quantile(0.99, DURATION, by="http_route"), "{{http_route}}"),
                unit="s",
                thresholds=latency_thresholds(),
                show_thresholds="dashed",
            ),
            Spec(
                "heatmap",
                "Request duration heatmap",
                "Requests per second in each duration bucket: bands show where latency clusters.",
                (
                    Target(
                        rate(f"{DURATION}_bucket", by="le"),
                        "{{le}}",
                        heatmap=True,
                    ),
                ),
                unit="reqps",
            ),
            ts(
                "Average response time by route",
                "Mean request duration per route (total time over request count).",
                Target(
                    f"{rate(f'{DURATION}_sum', by='http_route')} / "
                    f"{rate(REQUESTS, by='http_route')}",
                    "{{http_route}}",
                ),
                unit="s",
                thresholds=latency_thresholds(),
            ),
            ts(
                "Time to first byte p95 by route",
                "95th percentile time until the first response body byte was sent.",
                Target(
                    quantile(0.95, "http_server_time_to_first_byte_seconds", by="http_route"),
                    "{{http_route}}",
                ),
                unit="s",
                thresholds=latency_thresholds(),
                width=16,
            ),
        ),
    ),
    Row(
        "Slow requests",
        (
            ts(
                "Slow requests by route",
                "Requests per second at or over the slow-request threshold; their breakdown "
                "is in the slow_request log lines.",
                Target(rate("http_server_slow_requests_total", by="http_route"), "{{http_route}}"),
                unit="reqps",
                thresholds=((GREEN, None), (ORANGE, 0.1), (RED, 1)),
                width=12,
            ),
            ts(
                "Slow share by route",
                "Share of each route's requests that were slow.",
                Target(
                    f"{rate('http_server_slow_requests_total', by='http_route')} / "
                    f"{rate(REQUESTS, by='http_route')}",
                    "{{http_route}}",
                ),
                unit="percentunit",
                thresholds=ratio_thresholds(0.01, 0.05),
                show_thresholds="dashed",
                max=1,
                width=12,
            ),
        ),
    ),
    Row(
        "In-flight and aborted requests",
        (
            ts(
                "In-flight requests by route",
                "Requests being handled right now, per route.",
                Target(
                    f"sum by (http_route) (http_server_active_requests{{{HTTP}}})",
                    "{{http_route}}",
                ),
                unit="short",
                thresholds=((GREEN, None), (ORANGE, 50), (RED, 100)),
                width=12,
            ),
            ts(
                "Aborted requests by route and reason",
                "Responses not completed per second: the client left (client_disconnect) or "
                "the app failed mid-stream (error_mid_stream).",
                Target(
                    rate("http_server_aborted_requests_total", by="http_route, reason"),
                    "{{http_route}} {{reason}}",
                ),
                unit="reqps",
                thresholds=((GREEN, None), (ORANGE, 0.1), (RED, 1)),
                no_value="0",
                width=12,
            ),
        ),
    ),
    Row(
        "Operations",
        (
            ts(
                "Operations by name and outcome",
                "Operations timed with asgi_perfmon.timed, per second, by outcome.",
                Target(
                    rate("operation_duration_seconds_count", BASE, "operation, outcome"),
                    "{{operation}} {{outcome}}",
                ),
                unit="ops",
            ),
            ts(
                "Operation p95 by operation",
                "95th percentile duration of each timed operation.",
                Target(
                    quantile(0.95, "operation_duration_seconds", BASE, "operation"),
                    "{{operation}}",
                ),
                unit="s",
                thresholds=latency_thresholds(),
            ),
            ts(
                "Operation error ratio by operation",
                "Share of each operation's calls that raised.",
                Target(
                    ratio_or_zero(
                        rate(
                            "operation_duration_seconds_count",
                            f'{BASE}, outcome="error"',
                            "operation",
                        ),
                        rate("operation_duration_seconds_count", BASE, "operation"),
                    ),
                    "{{operation}}",
                ),
                unit="percentunit",
                thresholds=ratio_thresholds(0.01, 0.05),
                show_thresholds="dashed",
                max=1,
            ),
        ),
    ),
    Row(
        "Database pool",
        (
            ts(
                "Connections used vs max",
                "asyncpg pool connections in use and idle, against the pool's maximum size.",
                Target(
                    f"sum by (pool_name) (db_client_connection_count{{{USED}}})",
                    "{{pool_name}} used",
                ),
                Target(
                    f'sum by (pool_name) (db_client_connection_count{{{BASE}, state="idle"}})',
                    "{{pool_name}} idle",
                ),
                Target(
                    f"sum by (pool_name) (db_client_connection_max{{{BASE}}})",
                    "{{pool_name}} max",
                ),
                unit="short",
            ),
            ts(
                "Pool saturation",
                "Connections in use over the maximum, per instance and pool; at 100 % "
                "requests queue for a connection.",
                Target(
                    f"sum by ({POOL}) (db_client_connection_count{{{USED}}}) "
                    f"/ sum by ({POOL}) (db_client_connection_max{{{BASE}}})",
                    "{{instance}} {{pool_name}}",
                ),
                unit="percentunit",
                thresholds=ratio_thresholds(0.8, 0.95),
                show_thresholds="line+area",
                max=1,
            ),
            ts(
                "Acquire wait p95",
                "95th percentile time a request waited to get a connection from the pool.",
                Target(
                    quantile(0.95, "db_client_connection_wait_time_seconds", BASE, "pool_name"),
                    "{{pool_name}}",
                ),
                unit="s",
                thresholds=((GREEN, None), (ORANGE, 0.05), (RED, 0.1)),
                show_thresholds="dashed",
            ),
            ts(
                "Pending acquirers",
                "Tasks waiting for a pool connection right now.",
                Target(
                    f"sum by (pool_name) (db_client_connection_pending_requests{{{BASE}}})",
                    "{{pool_name}}",
                ),
                unit="short",
                thresholds=((GREEN, None), (ORANGE, 1), (RED, 10)),
            ),
            ts(
                "Acquire timeouts",
                "Connection acquires per second that gave up after their timeout.",
                Target(
                    rate("db_client_connection_timeouts_total", BASE, "pool_name"),
                    "{{pool_name}}",
                ),
                unit="ops",
                thresholds=((GREEN, None), (RED, 0.01)),
                no_value="0",
            ),
            ts(
                "Query p95 by operation",
                "95th percentile query duration per SQL verb or named db_operation.",
                Target(
                    quantile(
                        0.95,
                        "db_client_operation_duration_seconds",
                        BASE,
                        "pool_name, db_operation_name",
                    ),
                    "{{pool_name}} {{db_operation_name}}",
                ),
                unit="s",
                thresholds=((GREEN, None), (ORANGE, 0.1), (RED, 0.5)),
            ),
            ts(
                "Queries by operation and outcome",
                "Queries per second per SQL verb or named db_operation, ok or error.",
                Target(
                    rate(
                        "db_client_operation_duration_seconds_count",
                        BASE,
                        "db_operation_name, outcome",
                    ),
                    "{{db_operation_name}} {{outcome}}",
                ),
                unit="ops",
                width=24,
            ),
        ),
    ),
    Row(
        "Caches",
        (
            ts(
                "Hit ratio by cache",
                "Share of cache lookups answered from the cache.",
                Target(
                    ratio_or_zero(
                        rate("cache_requests_total", f'{BASE}, result="hit"', "cache_name"),
                        rate("cache_requests_total", BASE, "cache_name"),
                    ),
                    "{{cache_name}}",
                ),
                unit="percentunit",
                thresholds=((RED, None), (ORANGE, 0.5), (GREEN, 0.8)),
                show_thresholds="dashed",
                max=1,
                width=6,
            ),
            ts(
                "Lookups by cache and result",
                "Cache lookups per second, hits and misses.",
                Target(
                    rate("cache_requests_total", BASE, "cache_name, result"),
                    "{{cache_name}} {{result}}",
                ),
                unit="ops",
                width=6,
            ),
            ts(
                "Entries vs max by cache",
                "Entries held by each cache against its maximum size.",
                Target(f"sum by (cache_name) (cache_entries{{{BASE}}})", "{{cache_name}} entries"),
                Target(f"sum by (cache_name) (cache_max_entries{{{BASE}}})", "{{cache_name}} max"),
                unit="short",
                width=6,
            ),
            ts(
                "Evictions by cache and reason",
                "Entries removed per second: size (cache full), expired (TTL) or invalidated.",
                Target(
                    rate("cache_evictions_total", BASE, "cache_name, reason"),
                    "{{cache_name}} {{reason}}",
                ),
                unit="ops",
                no_value="0",
                width=6,
            ),
        ),
    ),
    Row(
        "Event loop",
        (
            ts(
                "Event loop lag",
                "p50 and p99 delay of a ready callback on each instance's event loop.",
                Target(
                    quantile(0.5, "asyncio_event_loop_lag_seconds", BASE, "instance"),
                    "{{instance}} p50",
                ),
                Target(
                    quantile(0.99, "asyncio_event_loop_lag_seconds", BASE, "instance"),
                    "{{instance}} p99",
                ),
                unit="s",
                thresholds=((GREEN, None), (ORANGE, 0.05), (RED, 0.1)),
                show_thresholds="dashed",
                width=12,
            ),
            ts(
                "Event loop blocked",
                "Times per minute the loop did not turn for the blocked threshold; the "
                "event_loop_blocked log line has the stack.",
                Target(
                    f"{rate('asyncio_event_loop_blocked_total', BASE, 'instance')} * 60",
                    "{{instance}}",
                ),
                unit="cpm",
                thresholds=((GREEN, None), (RED, 1)),
                bars=True,
                width=9,
            ),
            Spec(
                "stat",
                "Blocked events in range",
                "Times the event loop was blocked over the whole dashboard time range.",
                (
                    Target(
                        f"sum (increase(asyncio_event_loop_blocked_total{{{BASE}}}[$__range]))",
                        instant=True,
                    ),
                ),
                "short",
                thresholds=((GREEN, None), (ORANGE, 1), (RED, 10)),
                width=3,
                graph=False,
            ),
        ),
    ),
    Row(
        "Process",
        (
            ts(
                "CPU usage",
                "CPU time used per second by each process; 100 % is one full core.",
                Target(f"rate(process_cpu_seconds_total{{{BASE}}}[{RATE}])", "{{instance}}"),
                unit="percentunit",
                thresholds=((GREEN, None), (ORANGE, 0.8), (RED, 0.95)),
                show_thresholds="dashed",
                legend_table=False,
            ),
            ts(
                "Resident memory",
                "Resident set size of each process.",
                Target(f"process_resident_memory_bytes{{{BASE}}}", "{{instance}}"),
                unit="bytes",
                legend_table=False,
            ),
            ts(
                "Open file descriptors",
                "Open file descriptors (sockets included) against each process's limit.",
                Target(f"process_open_fds{{{BASE}}}", "{{instance}} open"),
                Target(f"process_max_fds{{{BASE}}}", "{{instance}} max"),
                unit="short",
                legend_table=False,
            ),
            ts(
                "GC collections by generation",
                "Python garbage collector runs per second, per generation.",
                Target(
                    rate("python_gc_collections_total", BASE, "generation"),
                    "gen {{generation}}",
                ),
                unit="ops",
                legend_table=False,
            ),
            ts(
                "Label overflows",
                "Label values per second folded into __overflow__ because a metric hit its "
                "cardinality cap.",
                Target(
                    rate("asgi_perfmon_label_overflow_total", BASE, "metric"),
                    "{{metric}}",
                ),
                unit="ops",
                thresholds=((GREEN, None), (ORANGE, 0.001)),
                no_value="0",
                legend_table=False,
            ),
            Spec(
                "stat",
                "asgi-perfmon version",
                "Library version reported by the instances (more than one: a rollout is "
                "under way).",
                (
                    Target(
                        f"count by (version) (asgi_perfmon_info{{{BASE}}})",
                        "{{version}}",
                        instant=True,
                    ),
                ),
                "short",
                thresholds=((BLUE, None),),
                width=4,
                text_mode="name",
                graph=False,
            ),
        ),
    ),
)


def thresholds(spec: Spec) -> Json:
    return {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for color, value in spec.thresholds],
    }


def target_json(target: Target, ref_id: str) -> Json:
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": target.expr,
        "format": "heatmap" if target.heatmap else "time_series",
        "instant": target.instant,
        "legendFormat": target.legend,
        "range": not target.instant,
        "refId": ref_id,
    }


def field_defaults(spec: Spec, color_mode: str) -> Json:
    defaults: Json = {
        "color": {"mode": color_mode},
        "thresholds": thresholds(spec),
        "unit": spec.unit,
    }
    if spec.min is not None:
        defaults["min"] = spec.min
    if spec.max is not None:
        defaults["max"] = spec.max
    if spec.no_value is not None:
        defaults["noValue"] = spec.no_value
    return defaults


def timeseries_parts(spec: Spec) -> tuple[Json, Json]:
    """The ``fieldConfig`` and ``options`` of a time series panel."""
    custom: Json = {
        "axisBorderShow": False,
        "axisCenteredZero": False,
        "axisColorMode": "text",
        "axisLabel": "",
        "axisPlacement": "auto",
        "barAlignment": 0,
        "drawStyle": "bars" if spec.bars else "line",
        "fillOpacity": 80 if spec.bars else (30 if spec.stack else 10),
        "gradientMode": "none",
        "hideFrom": {"legend": False, "tooltip": False, "viz": False},
        "insertNulls": False,
        "lineInterpolation": "linear",
        "lineWidth": 1,
        "pointSize": 4,
        "scaleDistribution": {"type": "linear"},
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if spec.stack else "none"},
        "thresholdsStyle": {"mode": spec.show_thresholds},
    }
    defaults = field_defaults(spec, "palette-classic")
    defaults["custom"] = custom
    legend: Json = {
        "calcs": ["mean", "max", "lastNotNull"] if spec.legend_table else [],
        "displayMode": "table" if spec.legend_table else "list",
        "placement": "bottom",
        "showLegend": True,
    }
    options: Json = {"legend": legend, "tooltip": {"mode": "multi", "sort": "desc"}}
    return {"defaults": defaults, "overrides": list(spec.overrides)}, options


def stat_parts(spec: Spec) -> tuple[Json, Json]:
    """The ``fieldConfig`` and ``options`` of a stat panel."""
    options: Json = {
        "colorMode": "value",
        "graphMode": "area" if spec.graph else "none",
        "justifyMode": "auto",
        "orientation": "auto",
        "percentChangeColorMode": "standard",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "showPercentChange": False,
        "textMode": spec.text_mode,
        "wideLayout": True,
    }
    defaults = field_defaults(spec, "thresholds")
    return {"defaults": defaults, "overrides": list(spec.overrides)}, options


def heatmap_parts(spec: Spec) -> tuple[Json, Json]:
    """The ``fieldConfig`` and ``options`` of a heatmap of pre-bucketed Prometheus data."""
    defaults = field_defaults(spec, "palette-classic")
    defaults["custom"] = {
        "hideFrom": {"legend": False, "tooltip": False, "viz": False},
        "scaleDistribution": {"type": "linear"},
    }
    options: Json = {
        "calculate": False,
        "cellGap": 1,
        "cellValues": {"unit": spec.unit},
        "color": {
            "exponent": 0.5,
            "fill": "dark-orange",
            "mode": "scheme",
            "reverse": False,
            "scale": "exponential",
            "scheme": "Oranges",
            "steps": 64,
        },
        "exemplars": {"color": "rgba(255,0,255,0.7)"},
        "filterValues": {"le": 1e-9},
        "legend": {"show": True},
        "rowsFrame": {"layout": "auto"},
        "showValue": "never",
        "tooltip": {"mode": "single", "showColorScale": False, "yHistogram": True},
        "yAxis": {"axisPlacement": "left", "reverse": False, "unit": "s"},
    }
    return {"defaults": defaults, "overrides": list(spec.overrides)}, options


PARTS = {"timeseries": timeseries_parts, "stat": stat_parts, "heatmap": heatmap_parts}


def panel_json(spec: Spec, panel_id: int, x: int, y: int) -> Json:
    field_config, options = PARTS[spec.kind](spec)
    return {
        "datasource": DATASOURCE,
        "description": spec.description,
        "fieldConfig": field_config,
        "gridPos": {"h": spec.height, "w": spec.width, "x": x, "y": y},
        "id": panel_id,
        "options": options,
        "targets": [
            target_json(target, chr(ord("A") + index)) for index, target in enumerate(spec.targets)
        ],
        "title": spec.title,
        "type": spec.kind,
    }


def layout(rows: tuple[Row, ...]) -> list[Json]:
    """Rows and panels, placed left to right and wrapped at the grid width."""
    panels: list[Json] = []
    y = 0
    next_id = 1
    for row in rows:
        panels.append(
            {
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                "id": next_id,
                "panels": [],
                "title": row.title,
                "type": "row",
            }
        )
        next_id += 1
        y += 1
        x = 0
        line_height = 0
        for spec in row.panels:
            if x + spec.width > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panels.append(panel_json(spec, next_id, x, y))
            next_id += 1
            x += spec.width
            line_height = max(line_height, spec.height)
        y += line_height
    return panels


def query_variable(name: str, label: str, query: str, *, multi: bool, description: str) -> Json:
    variable: Json = {
        "datasource": DATASOURCE,
        "description": description,
        "hide": 0,
        "includeAll": multi,
        "label": label,
        "multi": multi,
        "name": name,
        "options": [],
        "query": query,
        "refresh": 2,  # on time range change
        "regex": "",
        "sort": 1,
        "type": "query",
    }
    if multi:
        variable["allValue"] = ".*"
        variable["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    return variable


VARIABLES: tuple[Json, ...] = (
    {
        "current": {"selected": False, "text": "Prometheus", "value": "prometheus"},
        "description": "The Prometheus data source that scrapes the service.",
        "hide": 0,
        "includeAll": False,
        "label": "Data source",
        "multi": False,
        "name": "datasource",
        "options": [],
        "query": "prometheus",
        "refresh": 1,
        "regex": "",
        "type": "datasource",
    },
    query_variable(
        "job",
        "Job",
        "label_values(asgi_perfmon_info, job)",
        multi=False,
        description="Prometheus job of the service (every job that exports asgi_perfmon_info).",
    ),
    query_variable(
        "instance",
        "Instance",
        'label_values(asgi_perfmon_info{job="$job"}, instance)',
        multi=True,
        description="Scrape targets (processes or pods) of the job.",
    ),
    query_variable(
        "route",
        "Route",
        f"label_values(http_server_request_duration_seconds_count{{{BASE}}}, http_route)",
        multi=True,
        description="Route templates; filters the HTTP panels only.",
    ),
)


LIBRARY_METRICS = (
    "http_server_request_duration_seconds",
    "http_server_active_requests",
    "http_server_time_to_first_byte_seconds",
    "http_server_request_body_size_bytes",
    "http_server_response_body_size_bytes",
    "http_server_slow_requests_total",
    "http_server_exceptions_total",
    "http_server_aborted_requests_total",
    "websocket_server_active_connections",
    "websocket_server_connection_duration_seconds",
    "websocket_server_messages_total",
    "operation_duration_seconds",
    "db_client_connection_count",
    "db_client_connection_max",
    "db_client_connection_min",
    "db_client_connection_pending_requests",
    "db_client_connection_wait_time_seconds",
    "db_client_connection_timeouts_total",
    "db_client_operation_duration_seconds",
    "cache_requests_total",
    "cache_evictions_total",
    "cache_entries",
    "cache_max_entries",
    "asyncio_event_loop_lag_seconds",
    "asyncio_event_loop_blocked_total",
    "asgi_perfmon_label_overflow_total",
    "asgi_perfmon_info",
)
"""The names asgi-perfmon's ``namespace`` option prefixes (the process and GC metrics of
prometheus-client and Prometheus's ``up`` keep their names)."""

_LIBRARY_METRIC = re.compile(
    r"(?<![\w:])("
    + "|".join(sorted(LIBRARY_METRICS, key=len, reverse=True))
    + r")((?:_bucket|_sum|_count)?)(?![\w:])"
)


def namespaced(expr: str, namespace: str) -> str:
    """``expr`` with every asgi-perfmon metric name prefixed by ``namespace`` and ``_``."""
    if not namespace:
        return expr
    return _LIBRARY_METRIC.sub(lambda m: f"{namespace}_{m.group(1)}{m.group(2)}", expr)


def build(namespace: str = "") -> Json:
    """The dashboard, as the JSON object Grafana imports; ``namespace`` as given to asgi-perfmon."""
    panels = layout(ROWS)
    variables = [dict(variable) for variable in VARIABLES]
    for panel in panels:
        for target in panel.get("targets", []):
            target["expr"] = namespaced(target["expr"], namespace)
    for variable in variables:
        if variable["type"] == "query":
            variable["query"] = namespaced(variable["query"], namespace)
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": (
            "asgi-perfmon: traffic, latency, slow requests, operations, database pool, caches, "
            "event loop and process of an ASGI service."
        ),
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "links": [],
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["asgi-perfmon", "asgi", "fastapi", "starlette", "python"],
        "templating": {"list": variables},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": "ASGI service (asgi-perfmon)",
        "uid": UID,
        "version": 1,
    }


def render(dashboard: Json) -> str:
    """The JSON text as committed: sorted keys, two-space indent, final newline."""
    return json.dumps(dashboard, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the committed JSON differs; write nothing"
    )
    parser.add_argument(
        "--namespace",
        default="",
        help="the namespace your app gives asgi-perfmon (PERFMON_NAMESPACE); the dashboard "
        "is written to standard output, or to --output",
    )
    parser.add_argument("--output", type=Path, help="where to write a --namespace dashboard")
    args = parser.parse_args(argv)
    text = render(build(args.namespace))
    if args.namespace:
        if args.output is None:
            sys.stdout.write(text)
        else:
            args.output.write_text(text, encoding="utf-8")
        return 0
    if args.check:
        current = DASHBOARD_PATH.read_text(encoding="utf-8") if DASHBOARD_PATH.exists() else ""
        if current != text:
            print(f"{DASHBOARD_PATH} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    DASHBOARD_PATH.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {DASHBOARD_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
