"""Where did the soak's memory go? The soak's traffic against the example app, traced.

A diagnostic, not part of any run: ``python -m benchmarks.soak_trace [SECONDS] [FRAMES]``.
The server loads ``benchmarks.soak_trace:app`` (the example app with a SIGUSR1 handler). The
warm-up runs untraced, at full speed; when it ends, the first SIGUSR1 starts tracemalloc,
and at the end the second dumps a snapshot. Every block in it was allocated after the
warm-up and is still alive: the lines holding most of them are printed, with their stacks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import FrameType

SNAPSHOT_DIR = "SOAK_TRACE_DIR"
FRAMES = "SOAK_TRACE_FRAMES"
SNAPSHOT = "snapshot.pickle"

if os.environ.get(SNAPSHOT_DIR):  # inside the server
    from example_app.main import app  # noqa: F401 - what uvicorn serves

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        if not tracemalloc.is_tracing():
            tracemalloc.start(int(os.environ.get(FRAMES, "4")))
            return
        target = Path(os.environ[SNAPSHOT_DIR]) / SNAPSHOT
        tracemalloc.take_snapshot().dump(f"{target}.tmp")
        os.replace(f"{target}.tmp", target)

    signal.signal(signal.SIGUSR1, _on_signal)


def _wait_for(target: Path) -> None:
    while not target.exists():
        time.sleep(0.2)


async def _traced(url: str, pid: int, directory: Path, seconds: float) -> None:
    from benchmarks import soak, soak_traffic

    setting = soak.settings(seconds)

    async def at_warmup_end() -> None:
        await asyncio.sleep(setting["warmup_s"])
        os.kill(pid, signal.SIGUSR1)  # tracing starts

    tracing = asyncio.create_task(at_warmup_end())
    result = await soak_traffic.run(
        url, pid, seconds=seconds, warmup_s=setting["warmup_s"], interval_s=setting["interval_s"]
    )
    await tracing
    os.kill(pid, signal.SIGUSR1)  # the snapshot
    await asyncio.to_thread(_wait_for, directory / SNAPSHOT)
    first, last = result.samples[0], result.samples[-1]
    print(f"RSS {first['rss_bytes'] / 2**20:.2f} -> {last['rss_bytes'] / 2**20:.2f} MiB, "
          f"{last['requests']:,} requests")  # fmt: skip


def _report(directory: Path, top: int = 12) -> None:
    snapshot = tracemalloc.Snapshot.load(str(directory / SNAPSHOT))
    by_line = snapshot.statistics("traceback")
    total = sum(stat.size for stat in by_line)
    print(f"allocated after the warm-up and still alive: {total / 1024:,.0f} KiB")
    for stat in by_line[:top]:
        print(f"\n{stat.size / 1024:,.1f} KiB in {stat.count:,} blocks")
        for line in stat.traceback.format(most_recent_first=True):
            print(f"    {line}")


def main(argv: list[str]) -> int:
    from benchmarks import soak

    seconds = float(argv[0]) if argv else 300.0
    frames = argv[1] if len(argv) > 1 else "4"
    with tempfile.TemporaryDirectory(prefix="perfmon-soak-trace-") as work:
        directory = Path(work)
        env = {SNAPSHOT_DIR: str(directory), FRAMES: frames}
        with soak.servers(directory / "app.log", app="benchmarks.soak_trace:app", env=env) as app:
            started = time.monotonic()
            asyncio.run(_traced(app.url, app.process.pid, directory, seconds))
            print(f"traced run: {time.monotonic() - started:.0f} s")
        _report(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
