"""Calls to the upstream HTTP services: aiohttp, one shared session, concurrent with gather."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiohttp

from asgi_perfmon import timed

SOURCES = ("weather", "news", "quotes")

# One timer per source, declared once: the operation names are fixed, so the label is bounded.
_TIMERS = {source: timed(f"upstream.{source}") for source in SOURCES}


def new_session(timeout_s: float) -> aiohttp.ClientSession:
    """The process's one client session (connection pooling, keep-alive); close it on exit."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=300),
        raise_for_status=True,
    )


async def fetch(
    session: aiohttp.ClientSession, base_url: str, source: str, delay: float | None = None
) -> dict[str, Any]:
    """``GET {base_url}/{source}``, asking the upstream to take ``delay`` seconds if given."""
    params = {} if delay is None else {"delay": f"{delay:g}"}
    async with _TIMERS[source], session.get(f"{base_url}/{source}", params=params) as response:
        body: dict[str, Any] = await response.json()
        return body


async def fetch_all(
    session: aiohttp.ClientSession, base_url: str, delays: Sequence[float | None] = ()
) -> dict[str, Any]:
    """Every source at once: the time of the slowest call, not the sum of all.

    A source that fails is reported as ``{"error": ...}`` instead of failing the others.
    """
    wanted = [*delays, *[None] * (len(SOURCES) - len(delays))][: len(SOURCES)]
    results = await asyncio.gather(
        *(
            fetch(session, base_url, source, delay)
            for source, delay in zip(SOURCES, wanted, strict=True)
        ),
        return_exceptions=True,
    )
    return {
        source: {"error": type(result).__name__} if isinstance(result, Exception) else result
        for source, result in zip(SOURCES, results, strict=True)
    }
