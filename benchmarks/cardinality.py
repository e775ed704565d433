"""Section 4: memory and series count against distinct raw paths.

Each variant runs in a process of its own and receives requests for distinct raw paths,
alternating a matched route (``/items/{n}``) and an unmatched path (``/no/such/page/{n}``).
At checkpoints it records the process RSS (after a full collection) and the series count of
its exposition. Growth is measured from the first checkpoint to the last, so start-up and
warm-up allocations do not count.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import sys
from typing import Any

from benchmarks import variants
from benchmarks.driver import Lifespan, call, http_scope
from benchmarks.worker import run_workers

FULL_CHECKPOINTS = (10_000, 25_000, 50_000, 100_000)
SMOKE_CHECKPOINTS = (200, 400, 600)


def rss_bytes() -> int:
    """The resident set size of this process now (``/proc``), else its peak."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def _request(number: int) -> tuple[str, int]:
    if number % 2:
        return f"/items/{number}", 200
    return f"/no/such/page/{number}", 404


async def _measure(name: str, checkpoints: list[int]) -> dict[str, Any]:
    instrumented = variants.build(name)
    lifespan = Lifespan(instrumented.app)
    await lifespan.start()
    points: list[dict[str, int]] = []
    sent = 0
    try:
        for checkpoint in checkpoints:
            while sent < checkpoint:
                sent += 1
                path, expected = _request(sent)
                status = await call(instrumented.app, http_scope("GET", path))
                if status != expected:
                    msg = f"{path} answered {status}"
                    raise RuntimeError(msg)
            gc.collect()
            points.append(
                {"paths": sent, "rss_bytes": rss_bytes(), "series": instrumented.series()}
            )
    finally:
        await lifespan.stop()
    first, last = points[0], points[-1]
    return {
        "checkpoints": points,
        "rss_growth_bytes": last["rss_bytes"] - first["rss_bytes"],
        "series_growth": last["series"] - first["series"],
        "paths_from": first["paths"],
        "paths_to": last["paths"],
    }


def measure(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Worker entry: distinct paths up to each checkpoint for variant ``name``."""
    return asyncio.run(_measure(name, [int(c) for c in arguments["checkpoints"]]))


def run(names: list[str], *, smoke: bool) -> dict[str, Any]:
    """RSS and series growth per variant, half matched and half unmatched raw paths."""
    checkpoints = list(SMOKE_CHECKPOINTS if smoke else FULL_CHECKPOINTS)
    results = run_workers(
        "cardinality",
        {name: {"checkpoints": checkpoints} for name in names},
        parallel=3 if smoke else 1,
        timeout=1800,
    )
    return {
        "paths": "alternating /items/{n} (matched) and /no/such/page/{n} (unmatched), n distinct",
        "checkpoints": checkpoints,
        "variants": results,
    }
