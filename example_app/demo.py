"""``make demo``: the example app on a throwaway PostgreSQL, real traffic, a summary.

Starts the loopback upstream and the example app under uvicorn (and Prometheus, where the
binary is installed) as subprocesses in their own process groups, on free ports, logging into
``.demo/``. Drives traffic with the load generator, then prints a summary read back from
``/metrics`` and ``asgi-perfmon slowlog`` of the app's JSON log.

``DEMO_SECONDS=N``: N seconds of traffic, the summary, then everything stops. Unset: 30 s of
traffic, the summary, then the services stay up (with light traffic) until Ctrl-C. Ctrl-C or
SIGTERM at any point stops everything; nothing is left running.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

from example_app import loadgen
from example_app.summary import format_summary, parse_samples, pools_in_use, summarize

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".demo"
DEFAULT_TRAFFIC_S = 30.0
SCRAPE_INTERVAL_S = 2
BLOCKING_EVERY_S = 7.0
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
RULE_FILES_DIR = REPO / "grafana" / "prometheus"

_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class DemoError(Exception):
    """The demo cannot go on; the message says why and where to look."""


@dataclass
class Service:
    """A subprocess in its own process group, its output going to ``log``."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    stop_signal: signal.Signals

    def group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


@dataclass
class Services:
    """Everything the demo started, stopped in reverse order."""

    started: list[Service] = field(default_factory=list)

    def start(
        self,
        name: str,
        command: Sequence[str],
        log: Path,
        env: dict[str, str],
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> Service:
        with log.open("wb") as output:
            process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                start_new_session=True,  # own process group: our Ctrl-C is not theirs
            )
        service = Service(name, process, log, stop_signal)
        self.started.append(service)
        return service

    def stop_all(self) -> list[str]:
        """Stop every service gracefully, killing what does not stop; the names killed."""
        killed: list[str] = []
        for service in reversed(self.started):
            if not _stop(service):
                killed.append(service.name)
        return killed


def _signal_group(service: Service, signum: signal.Signals) -> None:
    try:
        os.killpg(service.process.pid, signum)
    except ProcessLookupError:
        return


def _stop(service: Service) -> bool:
    """``stop_signal`` to the server, wait; SIGKILL its group if it hangs or left children.

    Only the server gets the signal: its children (``initdb`` while the app starts) must run
    to the end, so that its shutdown can remove what they made. Whether it stopped by itself.
    """
    if service.process.poll() is None:
        service.process.send_signal(service.stop_signal)
    try:
        service.process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _signal_group(service, signal.SIGKILL)
        service.process.wait()
        return False
    if service.group_alive():
        _signal_group(service, signal.SIGKILL)
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A plain GET (the demo is a script, not a server: blocking is fine here)."""
    try:
        with _no_proxy.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_ready(service: Service, url: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll ``url`` until it answers 200; ``DemoError`` if the service dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise DemoError(f"{service.name} exited during start-up:\n{tail(service.log)}")
        try:
            if http_get(url, timeout=2.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise DemoError(f"{service.name} not ready after {timeout_s:.0f} s:\n{tail(service.log)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path})"
    return "\n".join(f"    {line}" for line in text.splitlines()[-lines:])


def uvicorn_command(app: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", app,
        "--host", "127.0.0.1", "--port", str(port),
        "--lifespan", "on", "--no-access-log", "--timeout-graceful-shutdown", "5",
    ]  # fmt: skip


def rule_files() -> list[Path]:
    """The alert and recording rules shipped in ``grafana/prometheus/``, if any."""
    return sorted(
        path
        for pattern in ("*rules*.yml", "*rules*.yaml", "rules/*.yml", "rules/*.yaml")
        for path in RULE_FILES_DIR.glob(pattern)
    )


def prometheus_config(app_port: int, rules: Sequence[Path]) -> str:
    """A ``prometheus.yml`` scraping the app every few seconds (JSON is valid YAML)."""
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
        },
        "rule_files": [str(path) for path in rules],
        "scrape_configs": [
            {
                "job_name": "example-app",
                "static_configs": [{"targets": [f"127.0.0.1:{app_port}"]}],
            }
        ],
    }
    return json.dumps(config, indent=2) + "\n"


@dataclass
class Ports:
    upstream: int = field(default_factory=free_port)
    app: int = field(default_factory=free_port)
    prometheus: int = field(default_factory=free_port)


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def start_services(services: Services, ports: Ports, with_prometheus: bool) -> Service | None:
    """Start upstream, app (and Prometheus); wait until they answer. The Prometheus service."""
    env = base_env()
    upstream = services.start(
        "upstream",
        uvicorn_command("example_app.upstream:app", ports.upstream),
        WORK / "upstream.out",
        env,
    )
    app_env = {
        **env,
        # Never a DATABASE_URL that happens to be set in the shell: the app writes a table.
        "DATABASE_URL": os.environ.get("DEMO_DATABASE_URL", ""),
        "EXAMPLE_UPSTREAM_URL": f"http://127.0.0.1:{ports.upstream}",
        "EXAMPLE_LOG_FILE": str(WORK / "app.log"),
        "EXAMPLE_ENABLE_BLOCKING": "1",
    }
    app = services.start(
        "app",
        uvicorn_command("example_app.main:app", ports.app),
        WORK / "app.out",
        app_env,
        stop_signal=signal.SIGINT,  # uvicorn's graceful shutdown: the lifespan closes the pool
    )
    prometheus = start_prometheus(services, ports) if with_prometheus else None
    wait_ready(upstream, f"http://127.0.0.1:{ports.upstream}/health")
    wait_ready(app, f"http://127.0.0.1:{ports.app}/health")
    if prometheus is not None:
        try:
            wait_ready(prometheus, f"http://127.0.0.1:{ports.prometheus}/-/ready", 20.0)
        except DemoError as error:
            print(f"note: Prometheus did not come up, going on without it: {error}")
            return None
    return prometheus


def start_prometheus(services: Services, ports: Ports) -> Service:
    directory = WORK / "prometheus"
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "prometheus.yml"
    config.write_text(prometheus_config(ports.app, rule_files()))
    binary = shutil.which("prometheus") or "prometheus"
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{ports.prometheus}",
        "--storage.tsdb.retention.time=1d",
    ]
    return services.start("prometheus", command, directory / "prometheus.out", base_env())


def banner(ports: Ports, prometheus: Service | None) -> str:
    app = f"http://127.0.0.1:{ports.app}"
    database = (
        "DEMO_DATABASE_URL (as set)"
        if os.environ.get("DEMO_DATABASE_URL")
        else "a throwaway PostgreSQL started by the app, removed when it stops"
    )
    lines = [
        "asgi-perfmon demo",
        f"  app         {app}   (API docs: {app}/docs)",
        f"  /metrics    {app}/metrics",
        f"  upstream    http://127.0.0.1:{ports.upstream}",
        f"  database    {database}",
        f"  app log     {_shown(WORK / 'app.log')}   (JSON lines; server output: app.out)",
    ]
    if prometheus is not None:
        lines.append(
            f"  prometheus  http://127.0.0.1:{ports.prometheus}   "
            f"(scrapes the app every {SCRAPE_INTERVAL_S} s; config "
            f"{_shown(WORK / 'prometheus' / 'prometheus.yml')})"
        )
    else:
        lines.append("  prometheus  not installed: skipped (the demo works without it)")
    return "\n".join(lines)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


async def sample_pool_peak(metrics_url: str, stop: asyncio.Event) -> dict[str, float]:
    """The most connections in use per pool, sampled from ``/metrics`` every half second."""
    peak: dict[str, float] = {}
    url = f"{metrics_url}?name[]=db_client_connection_count"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while not stop.is_set():
            try:
                async with session.get(url) as response:
                    text = await response.text()
                for name, used in pools_in_use(parse_samples(text)).items():
                    peak[name] = max(peak.get(name, 0.0), used)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    return peak


@dataclass
class Run:
    stats: loadgen.Stats
    peak_pool_used: dict[str, float]


async def drive(app_url: str, seconds: float) -> Run:
    """The traffic, with the pool sampled alongside for its peak."""
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_pool_peak(f"{app_url}/metrics", stop))
    try:
        stats = await loadgen.run_load(app_url, seconds, blocking_every_s=BLOCKING_EVERY_S)
    finally:
        stop.set()
        peak = await sampler
    return Run(stats, peak)


def print_summary(app_url: str, run: Run) -> None:
    status, body = http_get(f"{app_url}/metrics")
    if status != 200:
        print(f"could not read {app_url}/metrics (HTTP {status})")
        return
    summary = summarize(body.decode(), run.stats.elapsed_s, run.peak_pool_used)
    print(f"\nSummary, read back from {app_url}/metrics:")
    print(format_summary(summary))


def print_blocked_loop(log: Path) -> None:
    """How often the watchdog caught the opt-in blocking endpoint, and where."""
    events = [e for e in _log_events(log) if e.get("event") == "event_loop_blocked"]
    if not events:
        return
    print(f"\nevent_loop_blocked logged {len(events)} times; the watchdog's stack points at:")
    stack = events[-1].get("stack") or ""
    frames = stack.splitlines() if isinstance(stack, str) else [str(f) for f in stack]
    ours = [frame for frame in frames if "example_app" in frame] or frames[-3:]
    for frame in ours[-3:]:
        print(f"    {_shown(Path(frame)) if frame.startswith('/') else frame}")


RATE_QUERY = "sum(rate(http_server_request_duration_seconds_count[10s]))"
P95_QUERY = (
    "histogram_quantile(0.95, sum by (http_route, le) "
    "(rate(http_server_request_duration_seconds_bucket[1m])))"
)


def prometheus_value(base_url: str, query: str) -> float | None:
    """The first value of an instant query, or ``None`` (no data, or no answer)."""
    url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    try:
        status, body = http_get(url)
        result = json.loads(body)["data"]["result"] if status == 200 else []
        return float(result[0]["value"][1]) if result else None
    except (OSError, ValueError, KeyError, IndexError):
        return None


def print_prometheus(ports: Ports, prometheus: Service | None) -> None:
    """What Prometheus made of the scrapes, and where to look further."""
    if prometheus is None:
        return
    base = f"http://127.0.0.1:{ports.prometheus}"
    rate = prometheus_value(base, RATE_QUERY)
    seen = "no data yet (its first scrapes take ~5 s)" if rate is None else f"{rate:.1f} req/s"
    graph = urllib.parse.urlencode({"g0.expr": P95_QUERY, "g0.tab": "0", "g0.range_input": "5m"})
    rules = ", ".join(_shown(path) for path in rule_files()) or "none"
    print(f"\nPrometheus ({base}): {RATE_QUERY} = {seen}")
    print(f"    p95 by route: {base}/graph?{graph}")
    print(f"    rules loaded: {rules} (alerts: {base}/alerts)")


def print_slow_request(log: Path) -> None:
    """The slowest ``slow_request`` line, one part per line: the breakdown says why."""
    events = [e for e in _log_events(log) if e.get("event") == "slow_request"]
    if not events:
        return
    slowest = max(events, key=lambda e: float(e.get("duration_s") or 0))
    head = {k: slowest.get(k) for k in ("route", "status", "duration_s", "ttfb_s", "request_id")}
    print(f"\nThe slowest slow_request line in {_shown(log)}, in parts:")
    print(f"    {json.dumps(head)[1:-1]}")
    for part in ("operations", "db", "cache"):
        print(f"    {part}: {json.dumps(slowest.get(part))}")


def _log_events(log: Path) -> Iterator[dict[str, Any]]:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            yield event


def print_slowlog(log: Path) -> None:
    from asgi_perfmon.cli import main as perfmon

    print(f"\n$ asgi-perfmon slowlog {_shown(log)}")
    sys.stdout.flush()
    perfmon(["slowlog", "--no-progress", str(log)])


def remove_stray_postgres(log: Path) -> list[str]:
    """Backstop: stop a throwaway PostgreSQL the app did not remove (it was killed)."""
    removed = []
    for event in _log_events(log):
        if event.get("event") != "embedded_postgres_started":
            continue
        directory = Path(str(event.get("directory")))
        pid_file = directory / "data" / "postmaster.pid"
        if pid_file.exists():
            _kill_postmaster(pid_file)
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(str(directory))
    return removed


def _kill_postmaster(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGQUIT)  # PostgreSQL's immediate shutdown
    except (OSError, ValueError, IndexError):
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pid_file.exists():
        time.sleep(0.1)


def traffic_seconds() -> tuple[float, bool]:
    """Seconds of traffic and whether to stop afterwards (``DEMO_SECONDS``)."""
    raw = os.environ.get("DEMO_SECONDS", "").strip()
    if not raw:
        return DEFAULT_TRAFFIC_S, False
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DemoError(f"DEMO_SECONDS must be a positive number of seconds, got {raw!r}.")
    return seconds, True


def _sigterm_as_sigint(signum: int, frame: FrameType | None) -> None:
    os.kill(os.getpid(), signal.SIGINT)  # one path for both: KeyboardInterrupt or task cancel


@contextmanager
def interrupts_ignored() -> Iterator[None]:
    """Cleanup runs to the end: a second Ctrl-C must not leave half the services up."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def prepare_workdir() -> None:
    WORK.mkdir(exist_ok=True)
    for name in ("app.log", "app.out", "upstream.out"):
        (WORK / name).unlink(missing_ok=True)
    shutil.rmtree(WORK / "prometheus", ignore_errors=True)


def serve_until_interrupted(app_url: str) -> None:
    print("\nThe services stay up with light traffic; press Ctrl-C to stop everything.")
    sys.stdout.flush()
    asyncio.run(
        loadgen.run_load(
            app_url, float("inf"), concurrency=1, progress=False, seed_users=0, think_s=0.5
        )
    )


def run(services: Services) -> None:
    seconds, bounded = traffic_seconds()
    prepare_workdir()
    ports = Ports()
    prometheus = start_services(
        services, ports, with_prometheus=shutil.which("prometheus") is not None
    )
    app_url = f"http://127.0.0.1:{ports.app}"
    print(banner(ports, prometheus))
    print(f"\nDriving traffic for {seconds:g} s (Ctrl-C stops everything)...")
    sys.stdout.flush()
    result = asyncio.run(drive(app_url, seconds))
    print_summary(app_url, result)
    print_prometheus(ports, prometheus)
    print_slow_request(WORK / "app.log")
    print_blocked_loop(WORK / "app.log")
    print_slowlog(WORK / "app.log")
    if not bounded:
        serve_until_interrupted(app_url)


def shutdown(services: Services) -> None:
    with interrupts_ignored():
        print("\nStopping the services...", flush=True)
        killed = services.stop_all()
        strays = remove_stray_postgres(WORK / "app.log")
        shutil.rmtree(WORK / "prometheus" / "data", ignore_errors=True)
    left = [s.name for s in services.started if s.group_alive()]
    if killed:
        print(f"killed (did not stop in {STOP_TIMEOUT_S:.0f} s): {', '.join(killed)}")
    if strays:
        print(f"removed a PostgreSQL the app left behind: {', '.join(strays)}")
    if left:
        print(f"still running, please check: {', '.join(left)}")
    else:
        names = ", ".join(s.name for s in services.started) or "nothing was started"
        print(f"Stopped: {names}. Nothing is left running; logs are in {_shown(WORK)}/.")


def main() -> int:
    # Started in the background by a shell, SIGINT is inherited as ignored: take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm_as_sigint)
    services = Services()
    code = 0
    try:
        run(services)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    except DemoError as error:
        print(f"\ndemo failed: {error}", file=sys.stderr)
        code = 1
    finally:
        shutdown(services)
    return code


if __name__ == "__main__":
    sys.exit(main())
