"""Run an ASGI app under a real uvicorn subprocess for the tests that need a server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RunningServer:
    """A uvicorn subprocess: its base URL, its combined stdout/stderr file and its process."""

    url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def start_uvicorn(
    app: str,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    ready_path: str = "/metrics",
    timeout: float = 20.0,
) -> Iterator[RunningServer]:
    """Start ``uvicorn app`` on a free port; yield once ``ready_path`` answers; stop it after.

    The server runs in its own process group with SIGTERM for a graceful shutdown (lifespan
    shutdown runs), then SIGKILL for anything left after 10 s.
    """
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="uvicorn-", suffix=".log")[1])
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1",
               "--port", str(port), *args]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=environment,
            cwd=REPO_ROOT, start_new_session=True,
        )  # fmt: skip
    server = RunningServer(f"http://127.0.0.1:{port}", log_path, process)
    try:
        _wait_until_ready(server, ready_path, timeout)
        yield server
    finally:
        _stop(process)


def _wait_until_ready(server: RunningServer, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            msg = f"uvicorn exited with {server.process.returncode}:\n{server.log()}"
            raise RuntimeError(msg)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + path, timeout=1).status_code < 500:
                return
        time.sleep(0.1)
    msg = f"uvicorn did not answer {path} within {timeout} s:\n{server.log()}"
    raise RuntimeError(msg)


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate a helper process (Prometheus); kill it if it has not exited within 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
