"""What the benchmark ran on: CPU, core count, load, Python and package versions."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "asgi-perfmon",
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "pydantic",
    "prometheus-client",
    "structlog",
    "prometheus-fastapi-instrumentator",
    "starlette-exporter",
    "opentelemetry-instrumentation-asgi",
    "opentelemetry-sdk",
    "opentelemetry-exporter-prometheus",
    "asyncpg",
    "matplotlib",
)


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    """The cores this process may run on (what ``nproc`` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, or ``[]`` where unknown."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that matter here (None: not installed)."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def wrk_version() -> str | None:
    """``wrk``'s version line, or None when it is not installed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    completed = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    first = (completed.stdout or completed.stderr).splitlines()
    return first[0].strip() if first else "unknown"


def revision() -> str | None:
    """The git commit measured, with ``+dirty`` if ``asgi_perfmon/`` has local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
            check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "asgi_perfmon"], cwd=root,
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def describe() -> dict[str, Any]:
    """Everything above, with the time."""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "revision": revision(),
        "cpu": cpu_model(),
        "cores": cores(),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "load_average_at_start": load_average(),
        "wrk": wrk_version(),
        "packages": versions(),
    }
