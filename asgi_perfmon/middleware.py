"""``PerfMonMiddleware``: HTTP and websocket metrics, request ids and slow-request logs."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.requests import ClientDisconnect
from structlog.contextvars import bind_contextvars, reset_contextvars

from asgi_perfmon._labels import DEFAULT_MAX_LABEL_VALUES, validate_max_label_values
from asgi_perfmon._logging import FailureLog, log_safely
from asgi_perfmon._registry import resolve_namespace, resolve_registry
from asgi_perfmon._request_id import request_id_of
from asgi_perfmon._request_labels import (
    ExemplarLabeller,
    ExemplarLabels,
    LabelValue,
    RequestLabels,
)
from asgi_perfmon._routes import RouteResolver, route_path
from asgi_perfmon._types import ASGIApp, Message, Receive, Scope, Send
from asgi_perfmon._version import __version__
from asgi_perfmon.context import RequestContext, _current
from asgi_perfmon.loop_monitor import LoopMonitor
from asgi_perfmon.metrics import (
    DEFAULT_BUCKETS,
    OTHER_METHOD,
    STANDARD_METHODS,
    HttpMetrics,
    RouteSeries,
    http_metrics,
    validate_buckets,
)

DEFAULT_SLOW_REQUEST_THRESHOLD = 1.0
EXEMPLAR_INTERVAL = 1.0
"""Seconds between exemplars on one route's series; slow requests always get one.

One a second per series is plenty for a scrape every few seconds, and keeps the cost of
building exemplars off most requests.
"""
MAX_LOGGED_PATH = 512
MAX_REMEMBERED_ROUTES = 4096
"""Series remembered by the route object that served them: routes x methods x custom labels."""


class _Exchange(RequestContext):
    """One HTTP request through the middleware: the context its app sees, and what it has
    done so far. Lives only for that request; what has not happened yet is a class default,
    so building one sets only what the request arrived with."""

    series: RouteSeries | None = None
    status = 0
    first_byte_at: float | None = None
    done_at: float | None = None
    received = 0
    sent = 0
    trailers = False
    disconnected = False
    finished = False

    def __init__(
        self,
        middleware: PerfMonMiddleware,
        scope: Scope,
        request_id: str,
        method: str,
        custom_labels: tuple[str, ...],
        start: float,
    ) -> None:
        # RequestContext's four fields, set here rather than through super(): one call less
        # on every request.
        self.request_id = request_id
        self.method = method
        self._route = None
        self.path = scope["path"]
        self.middleware = middleware
        self.scope = scope
        self.app_at_entry = scope.get("app")  # sub-apps overwrite it
        self.root_path_at_entry = scope.get("root_path", "")  # mounts append to it
        self.custom_labels = custom_labels
        self.start = start

    def _find_route(self) -> str:
        return self.middleware._route_of(self)

    def active_series(self) -> RouteSeries:
        """The series of this request, its route worked out now if not yet known."""
        return self.series or self.middleware._series_of(self)


class PerfMonMiddleware:
    """Pure ASGI middleware recording HTTP and websocket metrics and slow-request logs.

    Add it with ``app.add_middleware(PerfMonMiddleware)``. Every option is keyword-only;
    invalid values raise ``ValueError`` here, at construction.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str | None = None,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        slow_request_threshold: float | None = None,
        exclude_paths: Iterable[str] = ("/metrics",),
        request_id_header: str = "X-Request-ID",
        max_label_values: int | None = None,
        exemplars: bool = True,
        labels: Mapping[str, LabelValue] | None = None,
        exemplar_labels: ExemplarLabels | None = None,
        loop_monitor: LoopMonitor | bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.app = app
        self._slow_threshold = _slow_threshold(slow_request_threshold)
        self._excluded = _exclusions(exclude_paths)
        self._id_header = _header_name(request_id_header)
        self._exemplars = exemplars and "PROMETHEUS_MULTIPROC_DIR" not in os.environ
        self._custom_labels = RequestLabels(labels)
        self._exemplar_labels = ExemplarLabeller(exemplar_labels)
        self._clock = clock
        self._routes = RouteResolver()
        self._log_request_id = _structlog_variable("request_id")
        self._routes_owner: Any = None  # the app whose router was looked up last, and its router
        self._router: Any = None
        self._series_by_route: dict[tuple[int, str, tuple[str, ...]], tuple[Any, RouteSeries]] = {}
        self._metrics: HttpMetrics = http_metrics(
            resolve_registry(registry),
            namespace=resolve_namespace(namespace),
            buckets=validate_buckets(buckets),
            max_label_values=_label_cap(max_label_values),
            version=__version__,
            custom_labels=self._custom_labels.names,
        )
        self._failures = FailureLog()
        self._loop_monitor = _loop_monitor(loop_monitor, registry, namespace)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._serve_other(scope, receive, send)
            return
        path = scope["path"] if not scope.get("root_path") else route_path(scope)
        if path in self._excluded:
            await self.app(scope, receive, send)
            return
        # Every HTTP request runs this frame: the exchange and two small wrappers, no more.
        try:
            exchange = self._begin(scope)
        except Exception as error:
            self._log_failure("begin", error)
            await self.app(scope, receive, send)
            return
        clock = self._clock
        id_header = self._id_header
        request_id = exchange.request_id
        encoded_id = request_id.encode("ascii")

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                exchange.received += len(message.get("body", b""))
            elif message["type"] == "http.disconnect" and exchange.done_at is None:
                exchange.disconnected = True
            return message

        async def send_wrapper(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                message = _with_request_id(message, id_header, encoded_id)
            try:
                await send(message)
            except OSError:
                exchange.disconnected = True
                raise
            if kind == "http.response.body":
                body_length = len(message.get("body", b""))
                if not message.get("more_body", False) and not exchange.trailers:
                    exchange.done_at = now = clock()
                    if body_length:
                        exchange.sent += body_length
                        if exchange.first_byte_at is None:
                            exchange.first_byte_at = now
                elif body_length:  # a chunk of a stream: the clock only for the first one
                    exchange.sent += body_length
                    if exchange.first_byte_at is None:
                        exchange.first_byte_at = clock()
            elif kind == "http.response.start":  # only once the server took it: else a 499
                exchange.status = message["status"]
                exchange.trailers = message.get("trailers", False)
            elif kind == "http.response.trailers" and not message.get("more_trailers", False):
                exchange.done_at = clock()
            elif kind == "http.response.pathsend":
                exchange.sent += _file_size(message["path"])
                exchange.first_byte_at = exchange.done_at = clock()
            if exchange.done_at is not None:  # the last byte went out: the request is done
                self._finish(exchange, None)

        context_token = _current.set(exchange)
        log_token = self._log_request_id.set(request_id)
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except BaseException as error:
            self._fail(exchange, error)
            raise
        else:
            if not exchange.finished:  # the app returned without completing the response
                self._finish(exchange, None)
        finally:
            self._log_request_id.reset(log_token)
            _current.reset(context_token)

    async def _serve_other(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._serve_websocket(scope, receive, send)
        elif kind == "lifespan" and self._loop_monitor is not None:
            await self._serve_lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _begin(self, scope: Scope) -> _Exchange:
        method = scope["method"]
        if method not in STANDARD_METHODS:
            method = OTHER_METHOD
        request_id = request_id_of(scope.get("headers", ()), self._id_header)
        custom = self._custom_labels.values(scope) if self._custom_labels.names else ()
        exchange = _Exchange(self, scope, request_id, method, custom, self._clock())
        metrics = self._metrics
        if metrics.counts_active:  # multiprocess: the gauge is shared, so counted here
            exchange.active_series().active.inc()
        else:
            metrics.in_flight[exchange] = None
        return exchange

    def _series_of(self, exchange: _Exchange) -> RouteSeries:
        """The request's series. For a route object the router named, remembered per object:
        a route keeps its template while it stays where it is in the app."""
        route_object = exchange.scope.get("route")
        key = (id(route_object), exchange.method, exchange.custom_labels)
        known = self._series_by_route.get(key)
        if known is not None and known[0] is route_object and exchange._route is None:
            series = known[1]
            exchange._route = series.labels[1]
        else:
            route, named_by_router = exchange._route, False
            if route is None:
                route, named_by_router = self._route_and_source(exchange)
            series = self._metrics.series(exchange.method, route, exchange.custom_labels)
            exchange._route = route
            if named_by_router and len(self._series_by_route) < MAX_REMEMBERED_ROUTES:
                self._series_by_route[key] = (route_object, series)
        exchange.series = series
        return series

    def _route_of(self, exchange: _Exchange) -> str:
        return self._route_and_source(exchange)[0]

    def _route_and_source(self, exchange: _Exchange) -> tuple[str, bool]:
        """The template of the route that served the request, and True; if the router did not
        say, the one its path matches as it arrived (before mounts changed ``root_path``)."""
        routes = self._routes_of(exchange.app_at_entry)
        scope = exchange.scope
        template = self._routes.served(routes, scope)
        if template is not None:
            return template, True
        root_path = exchange.root_path_at_entry
        if scope["path"] is not exchange.path or scope.get("root_path", "") != root_path:
            scope = {**scope, "path": exchange.path, "root_path": root_path}
        return self._routes.resolve(routes, scope), False

    def _routes_of(self, app: Any) -> Sequence[Any] | None:
        """The top-level routes: those of the app that added this middleware, if any."""
        if app is not self._routes_owner or app is None:
            self._routes_owner = app
            self._router = _router_of(app, self.app)
        routes = getattr(self._router, "routes", None)
        return routes if isinstance(routes, (list, tuple)) else None

    def _fail(self, exchange: _Exchange, error: BaseException) -> None:
        if not _caused_by_client(exchange, error):
            try:
                series = exchange.active_series()
                series.exceptions.labels(*series.labels, type(error).__name__).inc()
            except Exception as failure:
                self._log_failure("exception", failure)
        self._finish(exchange, error)

    def _finish(self, exchange: _Exchange, error: BaseException | None) -> None:
        """Record the request once: when its last byte is sent, or when the app returns."""
        if exchange.finished:
            return
        exchange.finished = True
        try:
            self._metrics.in_flight.pop(exchange, None)
            series = exchange.series or self._series_of(exchange)
            end = exchange.done_at if exchange.done_at is not None else self._clock()
            start = exchange.start
            duration = end - start if end > start else 0.0
            status = exchange.status or _status_without_response(exchange, error)
            if exchange.done_at is None:
                reason = _abort_reason(exchange, error)
                if reason is not None:
                    series.aborted.labels(*series.labels, reason).inc()
            first_byte_at = exchange.first_byte_at if exchange.first_byte_at is not None else end
            slow = duration >= self._slow_threshold
            exemplar = None
            if self._exemplars and (slow or end >= series.next_exemplar_at):
                exemplar = self._exemplar_labels.labels(exchange.scope, exchange.request_id)
                if exemplar is not None:
                    series.next_exemplar_at = end + EXEMPLAR_INTERVAL
            ttfb = first_byte_at - start if first_byte_at > start else 0.0
            series.record(status, duration, ttfb, exchange.received, exchange.sent, exemplar)
            if self._metrics.counts_active:
                series.active.dec()
            if slow:
                series.slow.inc()
                self._log_slow_request(exchange, status, duration)
        except Exception as failure:
            self._log_failure("record", failure)

    def _log_slow_request(self, exchange: _Exchange, status: int, duration: float) -> None:
        ttfb = None if exchange.first_byte_at is None else exchange.first_byte_at - exchange.start
        log_safely(
            "warning",
            "slow_request",
            request_id=exchange.request_id,
            method=exchange.method,
            route=exchange.route,
            path=exchange.path[:MAX_LOGGED_PATH],
            status=status,
            duration_s=round(duration, 6),
            threshold_s=self._slow_threshold,
            ttfb_s=None if ttfb is None else round(ttfb, 6),
            **exchange.breakdown(),
        )

    async def _serve_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            route = self._routes.resolve(self._routes_of(scope.get("app")), scope)
            series = self._metrics.websocket_series(route)
            series.active.inc()
        except Exception as error:
            self._log_failure("websocket", error)
            await self.app(scope, receive, send)
            return
        start = self._clock()

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "websocket.receive":
                series.received.inc()
            return message

        async def send_wrapper(message: Message) -> None:
            await send(message)
            if message["type"] == "websocket.send":
                series.sent.inc()

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            series.duration.observe(max(self._clock() - start, 0.0))
            series.active.dec()

    async def _serve_lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the event-loop monitor from start-up to shutdown; messages pass unchanged."""

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._start_loop_monitor()
            elif message["type"] == "lifespan.shutdown":
                self._stop_loop_monitor()
            return message

        try:
            await self.app(scope, receive_wrapper, send)
        finally:
            self._stop_loop_monitor()

    def _start_loop_monitor(self) -> None:
        try:
            if self._loop_monitor is not None:
                self._loop_monitor.start()
        except Exception as error:
            self._log_failure("loop_monitor", error)

    def _stop_loop_monitor(self) -> None:
        try:
            if self._loop_monitor is not None:
                self._loop_monitor.stop()
        except Exception as error:
            self._log_failure("loop_monitor", error)

    def _log_failure(self, where: str, error: Exception) -> None:
        """Log a failure of the instrumentation once per place and type; the app goes on."""
        self._failures.record(where, error)


def _loop_monitor(
    option: object, registry: CollectorRegistry | None, namespace: str | None
) -> LoopMonitor | None:
    if isinstance(option, LoopMonitor):
        return option
    if option is True:
        return LoopMonitor(registry=registry, namespace=namespace)
    if option is False:
        return None
    msg = f"loop_monitor must be True, False or a LoopMonitor, got {option!r}."
    raise ValueError(msg)


def _structlog_variable(key: str) -> ContextVar[Any]:
    """The context variable behind structlog's ``bind_contextvars(key=...)``.

    Setting it directly binds ``key`` for every log line of the request, exactly as
    ``bind_contextvars`` does, without its per-call name lookups.
    """
    tokens = bind_contextvars(**{key: None})
    reset_contextvars(**tokens)
    return tokens[key].var


def _router_of(app: Any, inner_app: Any) -> Any:
    router = getattr(app, "router", None) or getattr(inner_app, "router", None)
    if router is None and hasattr(inner_app, "routes"):
        router = inner_app
    return router


def _with_request_id(message: Message, name: bytes, request_id: bytes) -> Message:
    """The start message with the request id header added unless the app set one.

    A copy: the app may send the same message again (a prebuilt constant, a Response sent
    twice). Headers may be any iterable, and their names in any case, so both are normalised
    before looking.
    """
    headers = message.get("headers", ())
    if type(headers) is not list and type(headers) is not tuple:
        headers = list(headers)
    for key, _ in headers:
        if key.lower() == name:
            return message if headers is message.get("headers") else {**message, "headers": headers}
    copy = dict(message)
    copy["headers"] = [*headers, (name, request_id)]
    return copy


def _caused_by_client(exchange: _Exchange, error: BaseException | None) -> bool:
    """Whether ``error`` only says that the client went away: cancelled, a send that failed,
    or Starlette's ``ClientDisconnect`` (an upload cut off, a send refused under ASGI 2.4)."""
    if isinstance(error, asyncio.CancelledError):
        return True
    return exchange.disconnected and isinstance(error, (OSError, ClientDisconnect))


def _abort_reason(exchange: _Exchange, error: BaseException | None) -> str | None:
    """Why a response that never completed was cut short, if it was."""
    if exchange.disconnected or _caused_by_client(exchange, error):
        return "client_disconnect"
    if error is not None and exchange.status:
        return "error_mid_stream"
    return None


def _status_without_response(exchange: _Exchange, error: BaseException | None) -> int:
    """499 when the client left before any response, else the 500 the server will send."""
    if error is None:
        return 499 if exchange.disconnected else 500
    return 499 if _caused_by_client(exchange, error) else 500


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _slow_threshold(value: float | None) -> float:
    if value is None:
        raw = os.environ.get("PERFMON_SLOW_REQUEST_THRESHOLD")
        value = DEFAULT_SLOW_REQUEST_THRESHOLD if raw is None else _parse_float(raw)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        msg = f"slow_request_threshold must be a positive number of seconds, got {value!r}."
        raise ValueError(msg)
    return float(value)


def _parse_float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        msg = f"PERFMON_SLOW_REQUEST_THRESHOLD must be a number of seconds, got {raw!r}."
        raise ValueError(msg) from None


def _label_cap(value: int | None) -> int:
    if value is None:
        raw = os.environ.get("PERFMON_MAX_LABEL_VALUES")
        if raw is None:
            return DEFAULT_MAX_LABEL_VALUES
        if not raw.isdigit():
            msg = f"PERFMON_MAX_LABEL_VALUES must be a positive integer, got {raw!r}."
            raise ValueError(msg)
        value = int(raw)
    return validate_max_label_values(value)


def _exclusions(paths: Iterable[str]) -> frozenset[str]:
    if isinstance(paths, str):
        msg = "exclude_paths must be a collection of paths, not a single string."
        raise ValueError(msg)
    excluded = frozenset(paths)
    for path in excluded:
        if not isinstance(path, str) or not path.startswith("/"):
            msg = f"Every path in exclude_paths must be a string starting with '/', got {path!r}."
            raise ValueError(msg)
    return excluded


def _header_name(name: str) -> bytes:
    if not name or not all(c.isalnum() or c in "-_" for c in name) or not name.isascii():
        msg = f"request_id_header must be a valid HTTP header name, got {name!r}."
        raise ValueError(msg)
    return name.lower().encode("ascii")
