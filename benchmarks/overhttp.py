"""Section 2: requests/s and p99 over HTTP, one uvicorn worker per variant on loopback.

Every variant runs in its own uvicorn process (one worker, access log off, uvicorn's default
event loop and HTTP implementation, lifespan on, so asgi-perfmon's event-loop monitor runs).
The load generator is ``wrk`` (one thread, a fixed number of keep-alive connections; a Lua
script gives every request a fresh ``/items/{n}`` so per-path caches miss), or the bundled
Python generator where wrk is missing.

Every round loads each variant right next to a run of the bare app (bare first in one round,
second in the next), in an order that rotates from round to round. The ratio and the CPU
overhead of a variant are the medians of those adjacent pairs: on a shared machine the load
drifts within seconds, and a comparison 4 s apart is far steadier than one 30 s apart.
Requests/s, p50 and p99 are medians over all of a variant's runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import variants

REPO = Path(__file__).resolve().parent.parent
Pair = tuple[dict[str, float], dict[str, float]]
"""One run of a variant and the bare app's run next to it."""
PREFIX = "/items/"
WRK_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/items/" .. counter)
end
"""


@dataclass(frozen=True)
class Settings:
    """How much load to apply."""

    rounds: int
    seconds: float
    warmup_seconds: float
    connections: int


FULL = Settings(rounds=9, seconds=4.0, warmup_seconds=2.0, connections=16)
SMOKE = Settings(rounds=1, seconds=1.0, warmup_seconds=0.0, connections=8)


@dataclass(frozen=True)
class Server:
    """A running uvicorn for one variant."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(name: str) -> Server:
    port = _free_port()
    log = Path(tempfile.mkstemp(prefix="bench-uvicorn-", suffix=".log")[1])
    command = [
        sys.executable, "-m", "uvicorn", "benchmarks.variants:uvicorn_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, variants.VARIANT_ENV: name, "PYTHONPATH": str(REPO)}
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            start_new_session=True,
        )  # fmt: skip
    return Server(name, port, process, log)


def _wait_ready(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{server.port}{PREFIX}1"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            msg = f"uvicorn for {server.name} exited:\n{server.log.read_text(errors='replace')}"
            raise RuntimeError(msg)
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return
        time.sleep(0.1)
    msg = f"uvicorn for {server.name} did not answer within {timeout} s"
    raise RuntimeError(msg)


def _stop(server: Server) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
    server.log.unlink(missing_ok=True)


@contextlib.contextmanager
def _servers(names: list[str]) -> Iterator[dict[str, Server]]:
    servers: dict[str, Server] = {}
    try:
        for name in names:
            servers[name] = _start(name)
        for server in servers.values():
            _wait_ready(server)
        yield servers
    finally:
        for server in servers.values():
            _stop(server)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _milliseconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        msg = f"cannot read a wrk latency from {text!r}"
        raise ValueError(msg)
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, float]:
    """Requests/s, p50 and p99 (ms) and the request count from ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    count = re.search(r"(\d+) requests in", output)
    if rps is None or p50 is None or p99 is None or count is None:
        msg = f"unexpected wrk output:\n{output}"
        raise ValueError(msg)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "requests_per_s": float(rps.group(1)),
        "p50_ms": _milliseconds(p50.group(1)),
        "p99_ms": _milliseconds(p99.group(1)),
        "requests": float(count.group(1)),
        "errors": float(errors.group(1)) if errors else 0.0,
    }


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load(
    server: Server, seconds: float, connections: int, script: Path | None
) -> dict[str, float]:
    """One load run; adds the server's CPU time per request, which other load on the
    machine disturbs less than requests/s."""
    before = _cpu_seconds(server.process.pid)
    result = _generate(server, seconds, connections, script)
    after = _cpu_seconds(server.process.pid)
    if before is not None and after is not None and result["requests"]:
        result["server_cpu_us_per_request"] = (after - before) / result["requests"] * 1e6
    return result


def _generate(
    server: Server, seconds: float, connections: int, script: Path | None
) -> dict[str, float]:
    if script is not None:
        command = [
            "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
            "-s", str(script), f"http://127.0.0.1:{server.port}/",
        ]  # fmt: skip
        output = subprocess.run(
            command, capture_output=True, text=True, check=True, timeout=seconds + 30
        ).stdout
        return parse_wrk(output)
    command = [sys.executable, "-m", "benchmarks.loadgen", "127.0.0.1", str(server.port),
               PREFIX, f"{seconds:g}", str(connections)]  # fmt: skip
    output = subprocess.run(
        command, capture_output=True, text=True, check=True, timeout=seconds + 30, cwd=REPO
    ).stdout
    return dict(json.loads(output))


def _uvicorn_stack() -> dict[str, str]:
    loop = "uvloop" if _importable("uvloop") else "asyncio"
    http = "httptools" if _importable("httptools") else "h11"
    return {"loop": loop, "http": http}


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run(names: list[str], *, smoke: bool) -> dict[str, Any]:
    """Load every variant in turn, round by round; medians and ratios to the bare app."""
    settings = SMOKE if smoke else FULL
    wrk = shutil.which("wrk")
    generator = "wrk" if wrk else "python (benchmarks/loadgen.py)"
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as scratch, _servers(names) as servers:
        script = None
        if wrk:
            script = Path(scratch) / "fresh_ids.lua"
            script.write_text(WRK_SCRIPT)
        if settings.warmup_seconds:
            for server in servers.values():
                _load(server, settings.warmup_seconds, settings.connections, script)
        others = [name for name in names if name != variants.BARE]
        pairs: dict[str, list[Pair]] = {name: [] for name in others}
        for round_number in range(settings.rounds):
            shift = round_number % len(others) if others else 0
            for name in others[shift:] + others[:shift]:
                order = [variants.BARE, name] if round_number % 2 == 0 else [name, variants.BARE]
                run = {
                    each: _load(servers[each], settings.seconds, settings.connections, script)
                    for each in order
                }
                samples[name].append(run[name])
                samples[variants.BARE].append(run[variants.BARE])
                pairs[name].append((run[name], run[variants.BARE]))
    return {
        "load_generator": generator,
        "route": "GET /items/{item_id} (a fresh id per request)",
        "uvicorn": _uvicorn_stack(),
        "settings": settings.__dict__,
        "variants": _summary(samples, pairs),
        "raw": samples,
    }


def _paired(pairs: list[Pair], key: str, *, ratio: bool) -> float | None:
    """Median over adjacent pairs of variant/bare (or variant - bare)."""
    values = [(v[key], b[key]) for v, b in pairs if key in v and key in b]
    if not values:
        return None
    return statistics.median(v / b if ratio else v - b for v, b in values)


def _summary(
    samples: dict[str, list[dict[str, float]]],
    pairs: dict[str, list[Pair]],
) -> dict[str, Any]:
    """Medians over each variant's runs; ratios and CPU overheads from the adjacent pairs."""
    summary = {}
    for name, results in samples.items():
        own = pairs.get(name, [(result, result) for result in results])
        cpu = [r["server_cpu_us_per_request"] for r in results if "server_cpu_us_per_request" in r]
        rps_ratio = _paired(own, "requests_per_s", ratio=True)
        p99_ratio = _paired(own, "p99_ms", ratio=True)
        cpu_overhead = _paired(own, "server_cpu_us_per_request", ratio=False)
        summary[name] = {
            "requests_per_s": round(statistics.median(r["requests_per_s"] for r in results), 1),
            "rps_ratio": round(rps_ratio or 0.0, 3),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in results), 2),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in results), 2),
            "p99_ratio": round(p99_ratio or 0.0, 3),
            "server_cpu_us_per_request": round(statistics.median(cpu), 1) if cpu else None,
            "server_cpu_overhead_us": None if cpu_overhead is None else round(cpu_overhead, 1),
            "errors": int(sum(r.get("errors", 0.0) for r in results)),
            "rounds": len(results),
        }
    return summary
