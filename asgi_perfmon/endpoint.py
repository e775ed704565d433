"""The ``/metrics`` endpoint: Prometheus text or OpenMetrics, gzip, multiprocess, bearer token."""

from __future__ import annotations

import gzip
import hmac
import os

import anyio.to_thread
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from asgi_perfmon._registry import resolve_registry
from asgi_perfmon._types import Receive, Scope, Send

_MIN_GZIP_BYTES = 1024


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
        self._registry = registry
        self._expected_authorization = None if token is None else f"Bearer {token}".encode()
        self._disable_compression = disable_compression

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
        if self._expected_authorization is None:
            return True
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        return hmac.compare_digest(given, self._expected_authorization)

    def _gzip_accepted(self, request: Request) -> bool:
        if self._disable_compression:
            return False
        return "gzip" in request.headers.get("accept-encoding", "").lower()

    def _render(
        self, accept: str, names: list[str], gzip_accepted: bool
    ) -> tuple[bytes, str, bool]:
        """Collect, encode and compress, off the event loop (collectors may be slow; zlib
        releases the GIL while it compresses)."""
        registry = _scrape_registry(self._registry)
        if names:
            registry = registry.restricted_registry(names)  # type: ignore[assignment]
        encoder, content_type = choose_encoder(accept)
        body = encoder(registry)
        gzipped = gzip_accepted and len(body) >= _MIN_GZIP_BYTES
        if gzipped:
            body = gzip.compress(body, compresslevel=6)
        return body, content_type, gzipped


def _scrape_registry(registry: CollectorRegistry | None) -> CollectorRegistry:
    """In multiprocess mode a fresh registry merging every process's files, else ``registry``."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return merged
    return resolve_registry(registry)


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
