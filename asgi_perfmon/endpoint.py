"""The ``/metrics`` endpoint: Prometheus text or OpenMetrics, gzip, multiprocess, bearer token.

What a scrape collects, and how it survives broken collectors, is in ``_scrape``.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import os
import secrets
import struct
import time
import zlib
from dataclasses import dataclass

import anyio.to_thread
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from asgi_perfmon._registry import resolve_registry
from asgi_perfmon._scrape import (
    OPENMETRICS_EOF,
    Encoder,
    LoopSlices,
    Scrape,
    loop_exposition,
    multiprocess,
    scrape_failures,
)
from asgi_perfmon._types import Receive, Scope, Send

_MIN_GZIP_BYTES = 1024
_GZIP_LEVEL = 6
_GZIP_STEP = 16 * 1024
"""Bytes compressed per step on the loop: a fraction of a millisecond at level 6."""


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
        scrape = _ScrapeRequest(
            encoder=encoder,
            names=set(request.query_params.getlist("name[]")) or None,
            openmetrics=content_type.startswith("application/openmetrics-text"),
            gzip_accepted=self._gzip_accepted(request),
        )
        if multiprocess():
            body, gzipped = await anyio.to_thread.run_sync(self._render_in_thread, scrape)
        else:
            body, gzipped = await self._render_on_loop(scrape)
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

    async def _render_on_loop(self, scrape: _ScrapeRequest) -> tuple[bytes, bool]:
        """Collect, encode and compress on the event loop, a slice at a time (see ``_scrape``).

        The lock-free families are rendered first, then the other collectors, one per step;
        a collector that is slow by itself holds the loop for as long as it takes.
        """
        slices = LoopSlices()
        rendered = scrape.names is None  # filtered scrapes collect them like any other
        on_loop: list[bytes] = []
        if rendered:
            on_loop = await loop_exposition(
                self._registry, self._failures, slices, openmetrics=scrape.openmetrics
            )
        pieces = []
        collected = Scrape(
            self._registry, self._failures, scrape.names, without_loop_families=rendered
        )
        for piece in collected.pieces(scrape.encoder):
            pieces.append(piece)
            await slices.pause()
        pieces += on_loop
        if scrape.openmetrics:
            pieces.append(OPENMETRICS_EOF)
        if not scrape.gzips(pieces):
            return b"".join(pieces), False
        return await _gzip(pieces, slices), True

    def _render_in_thread(self, scrape: _ScrapeRequest) -> tuple[bytes, bool]:
        """Multiprocess mode: merging the processes' files is file I/O, done in a worker thread
        (zlib releases the GIL while it compresses)."""
        pieces = list(Scrape(self._registry, self._failures, scrape.names).pieces(scrape.encoder))
        if scrape.openmetrics:
            pieces.append(OPENMETRICS_EOF)
        body = b"".join(pieces)
        if not scrape.gzips(pieces):
            return body, False
        return gzip.compress(body, compresslevel=_GZIP_LEVEL), True


@dataclass(frozen=True)
class _ScrapeRequest:
    """What one scrape asked for."""

    encoder: Encoder
    names: set[str] | None
    openmetrics: bool
    gzip_accepted: bool

    def gzips(self, pieces: list[bytes]) -> bool:
        """Whether to compress a body made of ``pieces``."""
        return self.gzip_accepted and sum(map(len, pieces)) >= _MIN_GZIP_BYTES


async def _gzip(pieces: list[bytes], slices: LoopSlices) -> bytes:
    """``gzip.compress(b"".join(pieces), compresslevel=6)``, byte for byte, compressed a step
    of ``_GZIP_STEP`` bytes at a time so that the loop can run in between."""
    compressor = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    compressed = [_gzip_header()]
    crc = size = 0
    for piece in pieces:
        view = memoryview(piece)
        for start in range(0, len(view), _GZIP_STEP):
            step = view[start : start + _GZIP_STEP]
            compressed.append(compressor.compress(step))
            crc = zlib.crc32(step, crc)
            await slices.pause()
        size += len(piece)
    compressed.append(compressor.flush())
    compressed.append(struct.pack("<LL", crc, size & 0xFFFFFFFF))
    return b"".join(compressed)


def _gzip_header() -> bytes:
    """The header ``gzip.compress`` writes: deflate, no flags, the time, no extra flags for
    level 6, unknown OS."""
    return struct.pack("<BBBBLBB", 0x1F, 0x8B, 8, 0, int(time.time()), 0, 255)


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
