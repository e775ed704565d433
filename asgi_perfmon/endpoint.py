"""The ``/metrics`` endpoint: Prometheus text or OpenMetrics, gzip, multiprocess, bearer token.

A scrape survives a broken collector: each collector is collected (and, if the encoder
rejects what it returned, encoded) on its own, so one that raises is left out of that scrape
while every other metric is served. The failure counts
``asgi_perfmon_scrape_errors_total{collector}`` and is logged once per collector and error
type. In multiprocess mode an unreadable file in ``PROMETHEUS_MULTIPROC_DIR`` (e.g. one left
empty by a crashed worker) is skipped the same way, as collector ``MultiProcessCollector``.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from asgi_perfmon._labels import DEFAULT_MAX_LABEL_VALUES, BoundedLabels, overflow_counter
from asgi_perfmon._logging import FailureLog
from asgi_perfmon._registry import metric_name, resolve_namespace, resolve_registry, shared
from asgi_perfmon._types import Receive, Scope, Send

_MIN_GZIP_BYTES = 1024
_MULTIPROCESS_FILES = "MultiProcessCollector"

Encoder = Callable[[Collector], bytes]


class MetricsApp:
    """An ASGI app answering ``GET /metrics`` with the registry's exposition.

    Route it directly (``app.add_route("/metrics", metrics_app())``): mounting it would make
    Starlette redirect ``/metrics`` to ``/metrics/``, which scrapers do not follow.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        token: str | None = None,
        disable_compression: bool = False,
    ) -> None:
        if token is None:
            token = os.environ.get("PERFMON_METRICS_TOKEN") or None
        if token is not None and (not isinstance(token, str) or not token.strip()):
            msg = "The /metrics token must be a non-empty string, or None for no token."
            raise ValueError(msg)
        self._registry = resolve_registry(registry)
        self._token = None if token is None else _BearerToken(token)
        self._disable_compression = disable_compression
        self._failures = _scrape_failures(self._registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            msg = "MetricsApp serves HTTP only; route it, do not make it the top-level app."
            raise RuntimeError(msg)
        response = await self.respond(Request(scope, receive))
        await response(scope, receive, send)

    async def respond(self, request: Request) -> Response:
        """The response for one scrape."""
        if request.method not in ("GET", "HEAD"):
            return PlainTextResponse("Method Not Allowed", 405, headers={"Allow": "GET, HEAD"})
        if not self._authorized(request):
            # One constant response for every refusal: it tells nothing about what was wrong.
            return PlainTextResponse(
                "Unauthorized", 401, headers={"WWW-Authenticate": 'Bearer realm="metrics"'}
            )
        accept = request.headers.get("accept", "")
        names = request.query_params.getlist("name[]")
        body, content_type, gzipped = await anyio.to_thread.run_sync(
            self._render, accept, names, self._gzip_accepted(request)
        )
        headers = {
            "Content-Type": content_type,
            "Cache-Control": "no-store",
            "Vary": "Accept, Accept-Encoding",
        }
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        return Response(body, headers=headers)

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        # Starlette decodes header bytes as latin-1, so this gives back the bytes as sent.
        return self._token.accepts(request.headers.get("authorization", "").encode("latin-1"))

    def _gzip_accepted(self, request: Request) -> bool:
        if self._disable_compression:
            return False
        return "gzip" in request.headers.get("accept-encoding", "").lower()

    def _render(
        self, accept: str, names: list[str], gzip_accepted: bool
    ) -> tuple[bytes, str, bool]:
        """Collect, encode and compress, off the event loop (collectors may be slow; zlib
        releases the GIL while it compresses)."""
        encoder, content_type = choose_encoder(accept)
        body = _Scrape(self._registry, self._failures, set(names) or None).encode(encoder)
        gzipped = gzip_accepted and len(body) >= _MIN_GZIP_BYTES
        if gzipped:
            body = gzip.compress(body, compresslevel=6)
        return body, content_type, gzipped


class _BearerToken:
    """Checks an ``Authorization`` header against ``Bearer <token>`` in constant time.

    ``hmac.compare_digest`` returns early when its arguments differ in length, so both sides
    are first reduced to HMAC-SHA256 digests (32 bytes) under a key drawn per instance: the
    time taken depends neither on how long the right token is nor on how much of it a guess
    got right.
    """

    def __init__(self, token: str) -> None:
        self._key = secrets.token_bytes(32)
        self._expected = self.digest(f"Bearer {token}".encode())

    def digest(self, value: bytes) -> bytes:
        """The fixed-length form of ``value`` that is compared."""
        return hmac.new(self._key, value, hashlib.sha256).digest()

    def accepts(self, authorization: bytes) -> bool:
        """Whether ``authorization`` (the raw header value) carries the token."""
        return hmac.compare_digest(self.digest(authorization), self._expected)


class _ScrapeFailures:
    """``asgi_perfmon_scrape_errors_total{collector}`` of one registry, and its log.

    ``collector`` is the collector's class name: bounded by the code, not by input.
    """

    def __init__(self, registry: CollectorRegistry, namespace: str) -> None:
        name = metric_name(namespace, "asgi_perfmon_scrape_errors")
        self.counter = Counter(
            name,
            "Collectors left out of a scrape because they raised (or returned what could not "
            "be encoded), and unreadable multiprocess files skipped.",
            ["collector"],
            registry=registry,
        )
        self._children: BoundedLabels[Any] = BoundedLabels(
            self.counter,
            name=f"{name}_total",
            label_count=1,
            max_values=DEFAULT_MAX_LABEL_VALUES,
            overflow=overflow_counter(registry, namespace),
        )
        self._log = FailureLog()

    def record(self, collector: str, error: Exception, **details: str) -> None:
        """Count one failure of ``collector`` and log the first of each error type."""
        self._children.labels(collector).inc()
        self._log.record(
            "scrape", error, event="collector_failed", collector=collector, details=details
        )


def _scrape_failures(registry: CollectorRegistry) -> _ScrapeFailures:
    """The :class:`_ScrapeFailures` of ``registry``, shared by every endpoint serving it."""
    namespace = resolve_namespace(None)
    return shared(
        registry, ("scrape_errors", namespace), lambda: _ScrapeFailures(registry, namespace)
    )


@dataclass(frozen=True)
class _Group:
    """What one collector returned in this scrape."""

    collector: str
    metrics: list[Metric]


class _Collected:
    """A registry-like view of already collected groups, which the encoders read."""

    def __init__(self, groups: Iterable[_Group]) -> None:
        self._groups = list(groups)

    def collect(self) -> Iterator[Metric]:
        for group in self._groups:
            yield from group.metrics


class _Scrape:
    """One scrape: every collector on its own, so that a broken one is left out alone.

    ``names`` restricts the output to those sample names, like prometheus-client's
    ``restricted_registry``; collectors that describe their names are only run if one of
    them is wanted.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        failures: _ScrapeFailures,
        names: set[str] | None = None,
    ) -> None:
        self._registry = registry
        self._failures = failures
        self._names = names

    def encode(self, encoder: Encoder) -> bytes:
        """The exposition of every collector that could be collected and encoded."""
        groups = [group for group in self._groups() if group.metrics]
        try:
            return encoder(_Collected([*groups, *self._own_groups()]))
        except Exception:
            pass
        # Rarely taken: find the groups the encoder rejects, one at a time.
        groups = [group for group in groups if self._encodes(encoder, group)]
        return encoder(_Collected([*groups, *self._own_groups()]))

    def _groups(self) -> Iterator[_Group]:
        target_info = self._target_info()
        if target_info is not None:
            yield target_info
        for collector in self._collectors():
            yield from self._collect(collector)

    def _own_groups(self) -> list[_Group]:
        """The scrape-error counter, collected last so it includes this scrape's failures."""
        if _multiprocess():
            return []  # it is in this process's files, merged with the others
        return list(self._collect(self._failures.counter))

    def _collectors(self) -> list[Collector]:
        if _multiprocess():
            return [_ProcessFiles(os.environ["PROMETHEUS_MULTIPROC_DIR"], self._failures)]
        # prometheus-client has no public way to list a registry's collectors, and its own
        # collect() stops at the first one that raises.
        with self._registry._lock:
            collectors = dict(self._registry._collector_to_names)
        collectors.pop(self._failures.counter, None)
        return [c for c, names in collectors.items() if self._wanted(names)]

    def _wanted(self, names: Sequence[str]) -> bool:
        """Whether to run a collector that describes ``names`` (none: unknown until run)."""
        return self._names is None or not names or not self._names.isdisjoint(names)

    def _collect(self, collector: Collector) -> Iterator[_Group]:
        name = type(collector).__name__
        try:
            metrics = list(collector.collect())
        except Exception as error:
            self._failures.record(name, error)
            return
        yield _Group(name, [m for m in map(self._restricted, metrics) if m is not None])

    def _encodes(self, encoder: Encoder, group: _Group) -> bool:
        try:
            encoder(_Collected([group]))
        except Exception as error:
            self._failures.record(group.collector, error)
            return False
        return True

    def _restricted(self, metric: Metric) -> Metric | None:
        """``metric`` with only the wanted samples, or ``None`` if none is wanted."""
        if self._names is None:
            return metric
        samples = [sample for sample in metric.samples if sample.name in self._names]
        if not samples:
            return None
        restricted = Metric(metric.name, metric.documentation, metric.type, metric.unit)
        restricted.samples = samples
        return restricted

    def _target_info(self) -> _Group | None:
        labels = None if _multiprocess() else self._registry.get_target_info()
        if not labels:
            return None
        metric = Metric("target", "Target metadata", "info")
        metric.add_sample("target_info", labels, 1)
        restricted = self._restricted(metric)
        return None if restricted is None else _Group("target_info", [restricted])


class _ProcessFiles:
    """The multiprocess collector, skipping the files it cannot read instead of failing."""

    def __init__(self, path: str, failures: _ScrapeFailures) -> None:
        self._path = path
        self._failures = failures

    def collect(self) -> Iterable[Metric]:
        files = glob.glob(os.path.join(self._path, "*.db"))
        try:
            return MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call,no-any-return]
        except Exception:
            readable = [path for path in files if self._readable(path)]
            return MultiProcessCollector.merge(readable)  # type: ignore[no-untyped-call,no-any-return]

    def _readable(self, path: str) -> bool:
        try:
            MultiProcessCollector.merge([path])  # type: ignore[no-untyped-call]
        except FileNotFoundError:
            return False  # removed since the listing (a dead process's live gauges)
        except Exception as error:
            self._failures.record(_MULTIPROCESS_FILES, error, file=os.path.basename(path))
            return False
        return True


def _multiprocess() -> bool:
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


def metrics_app(
    registry: CollectorRegistry | None = None,
    *,
    token: str | None = None,
    disable_compression: bool = False,
) -> MetricsApp:
    """An ASGI app serving ``registry`` (default: prometheus-client's) at the route it is given.

    ``token`` (or ``PERFMON_METRICS_TOKEN``) requires ``Authorization: Bearer <token>``.
    """
    return MetricsApp(registry, token=token, disable_compression=disable_compression)


async def metrics_endpoint(request: Request) -> Response:
    """A Starlette endpoint serving the default registry: ``app.add_route("/metrics", ...)``."""
    return await MetricsApp().respond(request)
