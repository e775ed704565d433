"""Section 5: pool and cache instrumentation, measured by ``benchmarks/bench_pool_cache.py``.

That script (maintained with ``asgi_perfmon.pool`` and ``asgi_perfmon.cache``) starts a
throwaway PostgreSQL and writes its own JSON; this section runs it as a subprocess with the
same ``--smoke`` setting and folds its figures into the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_pool_cache.py"
OUTPUT_NAME = "pool_cache.json"


def run(output_dir: Path, *, smoke: bool) -> dict[str, Any]:
    """Run the pool and cache benchmark; its results, or why there are none."""
    if not SCRIPT.exists():
        return {"status": "missing", "note": f"{SCRIPT.relative_to(REPO)} is not there yet"}
    output = output_dir / OUTPUT_NAME
    command = [sys.executable, str(SCRIPT), "--output", str(output)]
    if smoke:
        command.append("--smoke")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, cwd=REPO, env=env,
            timeout=120 if smoke else 1800, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": "failed", "note": "bench_pool_cache.py timed out"}
    if completed.returncode != 0 or not output.exists():
        tail = (completed.stderr or completed.stdout)[-2000:]
        return {"status": "failed", "note": f"exit {completed.returncode}: {tail}"}
    return {"status": "ok", "file": OUTPUT_NAME, **json.loads(output.read_text())}
