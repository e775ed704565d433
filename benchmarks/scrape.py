"""Section 3: ``/metrics`` after traffic over many routes: render time, size, loop stall.

Each variant runs in a process of its own. Traffic covers ``routes`` routes x 4 methods x
5 statuses, then the variant's own ``/metrics`` endpoint (the one its docs recommend) is
scraped in process, the way Prometheus scrapes: ``Accept`` preferring OpenMetrics and
``Accept-Encoding: gzip``. A 1 ms timer on the event loop measures the longest time the loop
did not turn while the scrape was in flight (the stall other requests would see), against an
idle baseline of the same length.
"""

from __future__ import annotations

import asyncio
import gzip
import statistics
import time
from typing import Any

from benchmarks import variants
from benchmarks.driver import Lifespan, call, fetch, http_scope
from benchmarks.worker import run_workers

PROMETHEUS_ACCEPT = (
    b"application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    b"version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
PROBE_INTERVAL = 0.001
TEN_K_ROUTES = 18
"""Routes whose traffic gives asgi-perfmon about 10,000 series (~556 series per route)."""
FULL_ROUTES = 200


class LagProbe:
    """A timer re-armed every ``interval`` on the loop; the longest gap is the stall."""

    def __init__(self, interval: float = PROBE_INTERVAL) -> None:
        self._interval = interval
        self._last = 0.0
        self._max_gap = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start ticking on the running loop."""
        self._last = time.perf_counter()
        self._max_gap = 0.0
        self._arm()

    def _arm(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self._interval, self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        self._max_gap = max(self._max_gap, now - self._last)
        self._last = now
        self._arm()

    def stop(self) -> float:
        """Stop; the longest time (ms) the loop ran late beyond the timer interval."""
        if self._handle is not None:
            self._handle.cancel()
        gap = max(self._max_gap, time.perf_counter() - self._last)
        return max(gap - self._interval, 0.0) * 1000


async def _traffic(app: Any, routes: int) -> int:
    requests = 0
    for index in range(routes):
        for method in variants.METHODS:
            for status in variants.STATUSES:
                scope = http_scope(method, f"/r{index}/key", query=f"status={status}".encode())
                answered = await call(app, scope)
                if answered != status:
                    msg = f"/r{index}/key answered {answered}, expected {status}"
                    raise RuntimeError(msg)
                requests += 1
    return requests


async def _one_scrape(app: Any) -> dict[str, float]:
    headers = ((b"accept", PROMETHEUS_ACCEPT), (b"accept-encoding", b"gzip"))
    probe = LagProbe()
    probe.start()
    start = time.perf_counter()
    reply = await fetch(app, http_scope("GET", "/metrics", headers=headers))
    elapsed = time.perf_counter() - start
    stall = probe.stop()
    if reply.status != 200:
        msg = f"/metrics answered {reply.status}"
        raise RuntimeError(msg)
    body = bytes(reply.body)
    gzipped = (b"content-encoding", b"gzip") in reply.headers
    plain = gzip.decompress(body) if gzipped else body
    probe.start()
    await asyncio.sleep(elapsed)
    idle = probe.stop()
    return {
        "render_ms": elapsed * 1000,
        "stall_ms": stall,
        "idle_stall_ms": idle,
        "bytes_sent": len(body),
        "bytes_uncompressed": len(plain),
        "gzip": gzipped,
        "openmetrics": plain.rstrip().endswith(b"# EOF"),
    }


async def _measure(name: str, routes: int, scrapes: int) -> dict[str, Any]:
    instrumented = variants.build(name, extra_routes=routes)
    lifespan = Lifespan(instrumented.app)
    await lifespan.start()
    try:
        requests = await _traffic(instrumented.app, routes)
        await _one_scrape(instrumented.app)  # warm-up
        results = [await _one_scrape(instrumented.app) for _ in range(scrapes)]
    finally:
        await lifespan.stop()
    return {
        "routes": routes,
        "requests": requests,
        "series": instrumented.series(),
        "scrapes": scrapes,
        "render_ms_median": round(statistics.median(r["render_ms"] for r in results), 2),
        "stall_ms_median": round(statistics.median(r["stall_ms"] for r in results), 2),
        "stall_ms_max": round(max(r["stall_ms"] for r in results), 2),
        "idle_stall_ms_max": round(max(r["idle_stall_ms"] for r in results), 2),
        "bytes_sent": int(results[-1]["bytes_sent"]),
        "bytes_uncompressed": int(results[-1]["bytes_uncompressed"]),
        "gzip": bool(results[-1]["gzip"]),
        "openmetrics": bool(results[-1]["openmetrics"]),
    }


def measure(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Worker entry: traffic, then ``scrapes`` scrapes of variant ``name``."""
    return asyncio.run(_measure(name, int(arguments["routes"]), int(arguments["scrapes"])))


def run(names: list[str], *, smoke: bool) -> dict[str, Any]:
    """Every variant with a ``/metrics`` endpoint, at ~10k series and (full run) 200 routes."""
    sizes = {"10k_series": (TEN_K_ROUTES, 2 if smoke else 15)}
    if not smoke:
        sizes["200_routes"] = (FULL_ROUTES, 5)
    measured = [name for name in names if name not in variants.UNINSTRUMENTED]
    results = {
        size: run_workers(
            "scrape",
            {name: {"routes": routes, "scrapes": scrapes} for name in measured},
            parallel=3 if smoke else 1,
            timeout=900,
        )
        for size, (routes, scrapes) in sizes.items()
    }
    return {
        "scrape_headers": {"accept": PROMETHEUS_ACCEPT.decode(), "accept-encoding": "gzip"},
        "probe_interval_ms": PROBE_INTERVAL * 1000,
        "methods": list(variants.METHODS),
        "statuses": list(variants.STATUSES),
        "sizes": results,
    }
