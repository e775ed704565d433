"""CPU cost of ``LoopMonitor`` at its default settings on an idle event loop.

Runs an idle loop for ``--seconds`` without the monitor, then with it, and reports the
process CPU time (all threads: the probe on the loop thread and the watchdog thread) as a
share of one core. Usage::

    .venv/bin/python benchmarks/bench_loop_monitor.py            # 10 s per run
    .venv/bin/python benchmarks/bench_loop_monitor.py --smoke    # 1 s per run, for CI
    .venv/bin/python benchmarks/bench_loop_monitor.py --loop uvloop --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import CollectorRegistry

from asgi_perfmon.loop_monitor import LoopMonitor


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _idle(seconds: float, monitored: bool) -> tuple[float, float]:
    registry = CollectorRegistry()
    monitor = LoopMonitor(registry=registry) if monitored else None
    if monitor is not None:
        monitor.start()
    cpu, wall = _cpu_seconds(), time.perf_counter()
    await asyncio.sleep(seconds)
    cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
    if monitor is not None:
        monitor.stop()
        probes = registry.get_sample_value("asyncio_event_loop_lag_seconds_count") or 0.0
        if probes < seconds / 0.1 * 0.8:
            msg = f"the probe ran only {probes:.0f} times in {seconds} s"
            raise RuntimeError(msg)
    return cpu, wall


def _runner(loop_name: str) -> Callable[[Coroutine[Any, Any, tuple[float, float]]], Any]:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


def main(argv: list[str] | None = None) -> int:
    """Measure and print the monitor's CPU cost; exit 1 if it is 1% of a core or more."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="idle time per run")
    parser.add_argument("--smoke", action="store_true", help="1 s per run (quick check)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    seconds = 1.0 if args.smoke else args.seconds
    run = _runner(args.loop)
    base_cpu, base_wall = run(_idle(seconds, monitored=False))
    mon_cpu, mon_wall = run(_idle(seconds, monitored=True))
    extra = max(mon_cpu / mon_wall - base_cpu / base_wall, 0.0)
    result = {
        "loop": args.loop,
        "seconds": seconds,
        "idle_cpu_percent": round(100 * base_cpu / base_wall, 4),
        "monitored_cpu_percent": round(100 * mon_cpu / mon_wall, 4),
        "monitor_cost_percent_of_a_core": round(100 * extra, 4),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32} {value}")
    return 0 if extra < 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
