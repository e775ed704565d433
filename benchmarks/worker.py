"""Run one section's measurement for one variant in a process of its own.

``python -m benchmarks.worker SECTION VARIANT '{"json": "arguments"}'`` prints one JSON
object as its last line of output. A process per variant keeps memory, the garbage collector
and starlette-exporter's global registry from leaking between variants.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def run_worker(section: str, variant: str, arguments: dict[str, Any], timeout: float) -> Any:
    """Run ``section`` for ``variant`` in a fresh interpreter and return its JSON answer."""
    command = [sys.executable, "-m", "benchmarks.worker", section, variant, json.dumps(arguments)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env, check=False
    )
    if completed.returncode != 0:
        msg = f"{section} worker for {variant} failed:\n{completed.stderr[-4000:]}"
        raise RuntimeError(msg)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_workers(
    section: str, jobs: dict[str, dict[str, Any]], *, parallel: int, timeout: float
) -> dict[str, Any]:
    """``run_worker`` for every ``variant: arguments`` in ``jobs``, ``parallel`` at a time.

    Measurements run one at a time (``parallel=1``); a smoke run may overlap them.
    """
    if parallel <= 1:
        return {name: run_worker(section, name, args, timeout) for name, args in jobs.items()}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {
            name: pool.submit(run_worker, section, name, args, timeout)
            for name, args in jobs.items()
        }
        return {name: future.result() for name, future in futures.items()}


def _sections() -> dict[str, Callable[[str, dict[str, Any]], Any]]:
    from benchmarks import cardinality, scrape

    return {"scrape": scrape.measure, "cardinality": cardinality.measure}


def main(argv: list[str]) -> int:
    """Entry point of the worker process."""
    section, variant, arguments = argv
    result = _sections()[section](variant, json.loads(arguments))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
