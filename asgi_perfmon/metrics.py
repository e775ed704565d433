"""The HTTP and websocket metric families of the middleware, built once per registry."""

from __future__ import annotations

import math
import os
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Gauge

from asgi_perfmon._labels import BoundedFamilies
from asgi_perfmon._logging import FailureLog
from asgi_perfmon._registry import metric_name, shared_matching

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
"""Request duration buckets in seconds (the OpenTelemetry HTTP semantic conventions' advice)."""

SIZE_BUCKETS: tuple[float, ...] = tuple(float(4**n) for n in range(3, 13))
"""Body size buckets in bytes: 64 B to 16 MiB."""

STANDARD_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "QUERY"}
)
OTHER_METHOD = "_OTHER"

_HTTP = ("http_request_method", "http_route")
_MAX_CACHED_SERIES = 10_000


def validate_buckets(buckets: Sequence[float]) -> tuple[float, ...]:
    """Raise ``ValueError`` unless ``buckets`` are finite, positive and increasing."""
    values = tuple(float(b) for b in buckets)
    finite = [b for b in values if not math.isinf(b)]
    if not finite or any(b <= 0 for b in finite) or finite != sorted(set(finite)):
        msg = f"buckets must be positive, strictly increasing numbers, got {list(buckets)!r}."
        raise ValueError(msg)
    return values


class RouteSeries:
    """The labelled children for one (method, route, custom labels), fetched once and reused."""

    __slots__ = (
        "_by_status",
        "_duration",
        "aborted",
        "active",
        "exceptions",
        "labels",
        "next_exemplar_at",
        "request_size",
        "response_size",
        "slow",
        "time_to_first_byte",
    )

    def __init__(
        self, metrics: HttpMetrics, method: str, route: str, custom: tuple[str, ...] = ()
    ) -> None:
        self.labels = (method, route, *custom)
        """The label values every family of the request starts with."""
        self.active: Any = metrics.active.labels(*self.labels)
        self.time_to_first_byte: Any = metrics.time_to_first_byte.labels(*self.labels)
        self.request_size: Any = metrics.request_size.labels(*self.labels)
        self.response_size: Any = metrics.response_size.labels(*self.labels)
        self.slow: Any = metrics.slow.labels(*self.labels)
        self.aborted = metrics.aborted
        self.exceptions = metrics.exceptions
        self._duration = metrics.duration
        self._by_status: dict[int, Any] = {}
        self.next_exemplar_at = 0.0

    def duration(self, status: int) -> Any:
        """The duration histogram child for ``status``."""
        child = self._by_status.get(status)
        if child is None:
            child = self._duration.labels(*self.labels, str(status))
            if 100 <= status <= 599:
                self._by_status[status] = child
        return child

    def record(
        self,
        status: int,
        duration: float,
        time_to_first_byte: float,
        received: int,
        sent: int,
        exemplar: dict[str, str] | None,
    ) -> None:
        """Record one finished request."""
        child = self._by_status.get(status) or self.duration(status)
        if exemplar is None:
            child.observe(duration)
        else:
            child.observe(duration, exemplar)
        self.time_to_first_byte.observe(time_to_first_byte)
        self.request_size.observe(received)
        self.response_size.observe(sent)


class LoopRouteSeries(RouteSeries):
    """The series of a single process, whose histograms are ``HistogramChild``: recorded by
    updating their counts in place, without a call per histogram. Recording is a fifth of the
    middleware's work per request, and the four ``observe`` calls were a quarter of that."""

    __slots__ = ()

    def record(
        self,
        status: int,
        duration: float,
        time_to_first_byte: float,
        received: int,
        sent: int,
        exemplar: dict[str, str] | None,
    ) -> None:
        """Record one finished request."""
        child = self._by_status.get(status) or self.duration(status)
        if exemplar is None:
            child.counts[bisect_left(child.bounds, duration)] += 1
            child.sum += duration
        else:
            child.observe(duration, exemplar)
        child = self.time_to_first_byte
        child.counts[bisect_left(child.bounds, time_to_first_byte)] += 1
        child.sum += time_to_first_byte
        child = self.request_size
        child.counts[bisect_left(child.bounds, received)] += 1
        child.sum += received
        child = self.response_size
        child.counts[bisect_left(child.bounds, sent)] += 1
        child.sum += sent


class WebSocketSeries:
    """The labelled children for the websocket connections of one route."""

    __slots__ = ("active", "duration", "received", "sent")

    def __init__(self, metrics: HttpMetrics, route: str) -> None:
        self.active: Any = metrics.ws_active.labels(route)
        self.duration: Any = metrics.ws_duration.labels(route)
        self.received: Any = metrics.ws_messages.labels(route, "received")
        self.sent: Any = metrics.ws_messages.labels(route, "sent")


class InFlight(Protocol):
    """A request in flight, as the active-requests gauge counts it when scraped."""

    def active_series(self) -> RouteSeries: ...


class HttpMetrics:
    """Every metric family the middleware records, registered in one registry.

    In a single process the active-requests gauge is computed when scraped from
    ``in_flight``, the requests the middleware has begun and not yet recorded: a request then
    needs its route only once, when it is recorded. In multiprocess mode the gauge lives in
    prometheus-client's shared files, and the middleware counts it up and down itself
    (``counts_active`` is True).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        namespace: str,
        buckets: tuple[float, ...],
        max_label_values: int,
        version: str,
        custom_labels: tuple[str, ...] = (),
    ) -> None:
        self.buckets = buckets
        self.max_label_values = max_label_values
        self.custom_labels = custom_labels
        request = [*_HTTP, *custom_labels]
        loop_local = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
        self.counts_active = not loop_local
        self.in_flight: dict[InFlight, None] = {}
        families = BoundedFamilies(registry, namespace, max_label_values, loop_local=loop_local)
        self.duration = families.histogram(
            "http_server_request_duration_seconds",
            "Duration of HTTP server requests, until the last response byte was sent.",
            [*request, "http_response_status_code"],
            buckets,
        )
        self.active = families.gauge(
            "http_server_active_requests",
            "Number of HTTP requests in flight.",
            request,
            count=self._active_children,
        )
        self.time_to_first_byte = families.histogram(
            "http_server_time_to_first_byte_seconds",
            "Time until the first response body byte was sent.",
            request,
            buckets,
        )
        self.request_size = families.histogram(
            "http_server_request_body_size_bytes",
            "Size of HTTP request bodies, counted from the bytes received.",
            request,
            SIZE_BUCKETS,
        )
        self.response_size = families.histogram(
            "http_server_response_body_size_bytes",
            "Size of HTTP response bodies, counted from the bytes sent.",
            request,
            SIZE_BUCKETS,
        )
        self.slow = families.counter(
            "http_server_slow_requests", "Requests at or over the slow-request threshold.", request
        )
        self.exceptions = families.counter(
            "http_server_exceptions",
            "Exceptions raised through the middleware, by type.",
            [*request, "error_type"],
        )
        self.aborted = families.counter(
            "http_server_aborted_requests",
            "Requests whose response was not completed: the client left or the app failed.",
            [*request, "reason"],
        )
        self.ws_active = families.gauge(
            "websocket_server_active_connections", "Open websocket connections.", ["http_route"]
        )
        self.ws_duration = families.histogram(
            "websocket_server_connection_duration_seconds",
            "Duration of websocket connections.",
            ["http_route"],
            (0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0),
        )
        self.ws_messages = families.counter(
            "websocket_server_messages",
            "Websocket messages, by direction.",
            ["http_route", "direction"],
        )
        info = Gauge(
            metric_name(namespace, "asgi_perfmon_info"),
            "asgi-perfmon version (always 1).",
            ["version"],
            registry=registry,
            multiprocess_mode="max",
        )
        info.labels(version).set(1)
        self._series: dict[tuple[str, str, tuple[str, ...]], RouteSeries] = {}
        self._failures = FailureLog()
        self._ws_series: dict[str, WebSocketSeries] = {}

    def _active_children(self) -> Iterator[Any]:
        """The active-gauge child of every request in flight, once per request."""
        for request in list(self.in_flight):  # a copy: collect() may run in another thread
            try:
                yield request.active_series().active
            except Exception as error:
                self._failures.record("active_requests", error)

    def series(self, method: str, route: str, custom: tuple[str, ...] = ()) -> RouteSeries:
        """The children for ``method``, ``route`` and the custom label values, cached."""
        key = (method, route, custom)
        series = self._series.get(key)
        if series is None:
            kind = RouteSeries if self.counts_active else LoopRouteSeries
            series = kind(self, method, route, custom)
            if len(self._series) < _MAX_CACHED_SERIES:
                self._series[key] = series
        return series

    def websocket_series(self, route: str) -> WebSocketSeries:
        """The websocket children for ``route``, cached."""
        series = self._ws_series.get(route)
        if series is None:
            series = WebSocketSeries(self, route)
            if len(self._ws_series) < _MAX_CACHED_SERIES:
                self._ws_series[route] = series
        return series


def http_metrics(
    registry: CollectorRegistry,
    *,
    namespace: str,
    buckets: tuple[float, ...],
    max_label_values: int,
    version: str,
    custom_labels: tuple[str, ...] = (),
) -> HttpMetrics:
    """The middleware's metrics in ``registry``, created on first use and shared after."""
    return shared_matching(
        registry,
        ("http", namespace),
        lambda: HttpMetrics(
            registry,
            namespace=namespace,
            buckets=buckets,
            max_label_values=max_label_values,
            version=version,
            custom_labels=custom_labels,
        ),
        matches=lambda metrics: (
            metrics.buckets == buckets
            and metrics.max_label_values == max_label_values
            and metrics.custom_labels == custom_labels
        ),
        conflict=(
            "This registry already holds the asgi-perfmon HTTP metrics with other buckets, "
            "another label cap or other custom labels; pass the same options, or a separate "
            "registry or namespace."
        ),
    )
