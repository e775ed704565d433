"""The ``/metrics`` endpoint: Prometheus text or OpenMetrics, gzip, multiprocess, bearer token.

What a scrape collects, and how it survives broken collectors, is in ``_scrape``.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import os
import secrets

import anyio.to_thread
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from asgi_perfmon._registry import resolve_registry
from asgi_perfmon._scrape import Encoder, Scrape, loop_exposition, multiprocess, scrape_failures
from asgi_perfmon._types import Receive, Scope, Send

_MIN_GZIP_BYTES = 1024
_OPENMETRICS_EOF = b"# EOF\n"


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
        self._failures = scrape_failures(self._registry)

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
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        names = set(request.query_params.getlist("name[]")) or None
        on_loop = None
        if names is None and not multiprocess():
            on_loop = await loop_exposition(
                self._registry,
                self._failures,
                openmetrics=content_type.startswith("application/openmetrics-text"),
            )
        body, gzipped = await anyio.to_thread.run_sync(
            self._render, encoder, names, on_loop, self._gzip_accepted(request)
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
        self, encoder: Encoder, names: set[str] | None, on_loop: str | None, gzip_accepted: bool
    ) -> tuple[bytes, bool]:
        """Collect, encode and compress in a worker thread (collectors may block; zlib
        releases the GIL while it compresses). ``on_loop``: the lock-free families, already
        rendered on the event loop."""
        scrape = Scrape(
            self._registry, self._failures, names, without_loop_families=on_loop is not None
        )
        body = scrape.encode(encoder)
        if on_loop:
            rendered = on_loop.encode()
            if body.endswith(_OPENMETRICS_EOF):
                body = body[: -len(_OPENMETRICS_EOF)] + rendered + _OPENMETRICS_EOF
            else:
                body += rendered
        gzipped = gzip_accepted and len(body) >= _MIN_GZIP_BYTES
        if gzipped:
            body = gzip.compress(body, compresslevel=6)
        return body, gzipped


class _BearerToken:
    """Checks an ``Authorization`` header against ``Bearer <token>`` in constant time.

    ``hmac.compare_digest`` returns early when its arguments differ in length, so both sides
    are first reduced to HMAC-SHA256 digests (32 bytes) under a key drawn per instance: the
    time taken depends neither on how long the right token is nor on how much of it a guess
    got right.
    """

    def __init__(self, token: str) -> None:
        self._key = secrets.token_bytes(32)
        self._expected = self.digest(token.encode())

    def digest(self, value: bytes) -> bytes:
        """The fixed-length form of ``value`` that is compared."""
        return hmac.new(self._key, value, hashlib.sha256).digest()

    def accepts(self, authorization: bytes) -> bool:
        """Whether ``authorization`` (the raw header value) carries the token; the scheme is
        case-insensitive, as HTTP says."""
        scheme, _, credentials = authorization.partition(b" ")
        token_matches = hmac.compare_digest(self.digest(credentials), self._expected)
        return token_matches and scheme.lower() == b"bearer"


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
