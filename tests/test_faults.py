"""Faults: the app keeps answering, each fault is counted or logged once, nothing leaks.

In process: collectors that fail during a scrape, and the bound of the failure log. Under a
real uvicorn (``tests/apps/faults_app.py``): a log sink that raises, unreadable multiprocess
files, and the database stopped and restarted under load.
"""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_perfmon import PerfMonMiddleware, instrument_pool, metrics_app
from asgi_perfmon._logging import MAX_FAILURE_KINDS, FailureLog
from tests._helpers import client
from tests._postgres import PostgresCluster
from tests._uvicorn import RunningServer, start_uvicorn

APP = "tests.apps.faults_app:app"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
SCRAPE_ERRORS = "asgi_perfmon_scrape_errors_total"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """An exposition as {(sample name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of every ``name`` sample whose labels include ``labels``."""
    return sum(
        amount
        for (sample, sample_labels), amount in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


# --- a collector that fails during a scrape -----------------------------------------------


class RaisingCollector:
    """A custom collector whose ``collect()`` raises, describing the name it would export."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily("broken_metric", "never collected")]

    def collect(self) -> Iterator[Metric]:
        raise self.error


class HalfwayCollector:
    """Yields one family, then raises: none of its output may be served."""

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("halfway_first", "served only if the rest is", value=1)
        raise KeyError("lost the rest")


class UnencodableCollector:
    """Returns a sample the encoders reject (its value is not a number)."""

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("unencodable", "a value that is not a number")
        family.add_metric([], "not a number")  # type: ignore[arg-type]
        yield family


class UndescribedCollector:
    """A healthy collector without ``describe()``: its names are known only by collecting."""

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("undescribed_events", "served whatever the others do", value=7)


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def app_with(registry: CollectorRegistry, *collectors: Any) -> Starlette:
    for collector in collectors:
        registry.register(collector)
    app = Starlette(routes=[Route("/r", ok), Route("/metrics", metrics_app(registry))])
    app.add_middleware(PerfMonMiddleware, registry=registry, loop_monitor=False)
    return app


def collector_failures(logs: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    return [
        (log["collector"], log["error_type"])
        for log in logs
        if log["event"] == "collector_failed" and log.get("where") == "scrape"
    ]


@pytest.mark.parametrize("accept", ["text/plain", OPENMETRICS])
async def test_a_collector_that_raises_leaves_every_other_metric_served(
    registry: CollectorRegistry, accept: str
) -> None:
    """The scrape is a 200 with every other metric; the failure is counted in the same
    scrape, once per scrape, and logged once per collector and error type."""
    broken = [RaisingCollector(RuntimeError("backend down")), HalfwayCollector()]
    app = app_with(registry, *broken, UndescribedCollector())
    with structlog.testing.capture_logs() as logs:
        async with client(app) as http:
            await http.get("/r")
            scrapes = [await http.get("/metrics", headers={"Accept": accept}) for _ in range(3)]

    assert [scrape.status_code for scrape in scrapes] == [200, 200, 200]
    first, last = parse(scrapes[0].text), parse(scrapes[-1].text)
    route = {"http_request_method": "GET", "http_route": "/r", "http_response_status_code": "200"}
    assert value(last, "http_server_request_duration_seconds_count", **route) == 1
    assert value(last, "undescribed_events_total") == 7
    assert not {"broken_metric", "halfway_first"} & {name for name, _ in last}
    for collector in ("RaisingCollector", "HalfwayCollector"):
        assert value(first, SCRAPE_ERRORS, collector=collector) == 1
        assert value(last, SCRAPE_ERRORS, collector=collector) == 3
    assert sorted(collector_failures(logs)) == [
        ("HalfwayCollector", "KeyError"),
        ("RaisingCollector", "RuntimeError"),
    ]
    if accept == OPENMETRICS:
        assert scrapes[-1].text.endswith("# EOF\n")
        assert scrapes[-1].text.count("# EOF") == 1


async def test_each_new_error_type_of_a_collector_is_logged_once(
    registry: CollectorRegistry,
) -> None:
    collector = RaisingCollector(RuntimeError("first"))
    app = app_with(registry, collector)
    with structlog.testing.capture_logs() as logs:
        async with client(app) as http:
            await http.get("/metrics")
            await http.get("/metrics")
            collector.error = ConnectionError("second")
            await http.get("/metrics")
            scrape = parse((await http.get("/metrics")).text)

    assert collector_failures(logs) == [
        ("RaisingCollector", "RuntimeError"),
        ("RaisingCollector", "ConnectionError"),
    ]
    assert value(scrape, SCRAPE_ERRORS, collector="RaisingCollector") == 4


@pytest.mark.parametrize("accept", ["text/plain", OPENMETRICS])
async def test_output_the_encoder_rejects_is_left_out_alone(
    registry: CollectorRegistry, accept: str
) -> None:
    app = app_with(registry, UnencodableCollector(), UndescribedCollector())
    async with client(app) as http:
        await http.get("/r")
        response = await http.get("/metrics", headers={"Accept": accept})
        following = parse((await http.get("/metrics", headers={"Accept": accept})).text)

    assert response.status_code == 200
    scrape = parse(response.text)
    assert "unencodable" not in response.text
    assert value(scrape, "undescribed_events_total") == 7
    assert total(scrape, "http_server_request_duration_seconds_count") == 1
    # Found while encoding, after the counter was collected: it shows from the next scrape.
    assert value(following, SCRAPE_ERRORS, collector="UnencodableCollector") == 2


async def test_the_name_filter_with_a_broken_collector(registry: CollectorRegistry) -> None:
    """A broken collector only runs (and fails) when one of its names is asked for; the
    others' wanted samples are served either way, those of undescribed collectors too."""
    app = app_with(registry, RaisingCollector(RuntimeError("down")), UndescribedCollector())
    async with client(app) as http:
        await http.get("/r")
        others = await http.get(
            "/metrics",
            params={"name[]": ["undescribed_events_total", "asgi_perfmon_info", SCRAPE_ERRORS]},
        )
        broken = await http.get("/metrics", params={"name[]": ["broken_metric", SCRAPE_ERRORS]})

    assert (others.status_code, broken.status_code) == (200, 200)
    assert {name for name, _ in parse(others.text)} == {
        "undescribed_events_total",
        "asgi_perfmon_info",
    }
    assert parse(broken.text) == {
        (SCRAPE_ERRORS, (("collector", "RaisingCollector"),)): 1.0,
    }


async def test_target_info_is_still_served(registry: CollectorRegistry) -> None:
    registry.set_target_info({"service": "shop"})
    app = app_with(registry, RaisingCollector(RuntimeError("down")))
    async with client(app) as http:
        everything = parse((await http.get("/metrics")).text)
        only = parse((await http.get("/metrics", params={"name[]": "target_info"})).text)

    assert value(everything, "target_info", service="shop") == 1
    assert only == {("target_info", (("service", "shop"),)): 1.0}


@pytest.mark.uvicorn
def test_multiprocess_scrape_skips_unreadable_files(tmp_path: Path) -> None:
    """A worker that died leaving an empty or garbled file in PROMETHEUS_MULTIPROC_DIR used
    to fail every scrape until the file was deleted; now the file is skipped, counted and
    logged once per error type, and every other metric is served."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    with start_uvicorn(APP, args=["--no-access-log"], env=env) as server:
        for _ in range(5):
            assert httpx.get(f"{server.url}/plain", timeout=10).status_code == 200
        (tmp_path / "histogram_999999.db").write_bytes(b"")
        (tmp_path / "counter_999998.db").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00garbage")
        scrapes = [httpx.get(f"{server.url}/metrics", timeout=10)]
        logged_by_the_first = failure_lines(server)
        scrapes += [httpx.get(f"{server.url}/metrics", timeout=10) for _ in range(2)]
        last = parse(scrapes[-1].text)
        logged = failure_lines(server)
        count = "http_server_request_duration_seconds_count"
        filtered = httpx.get(f"{server.url}/metrics", params={"name[]": count}, timeout=10)

    assert [scrape.status_code for scrape in scrapes] == [200, 200, 200]
    plain = {"http_request_method": "GET", "http_route": "/plain"}
    assert total(last, "http_server_request_duration_seconds_count", **plain) == 5
    assert {name for name, _ in parse(filtered.text)} == {count}  # the filter works here too
    # Two bad files per scrape, counted before the readable files are merged.
    assert value(last, SCRAPE_ERRORS, collector="MultiProcessCollector") == 6
    kinds = [(line["collector"], line["error_type"]) for line in logged]
    assert len(kinds) == len(set(kinds)) >= 1
    assert logged == logged_by_the_first
    assert {line["file"] for line in logged} <= {"histogram_999999.db", "counter_999998.db"}


def failure_lines(server: RunningServer) -> list[dict[str, Any]]:
    return [line for line in json_lines(server) if line.get("event") == "collector_failed"]


def json_lines(server: RunningServer) -> list[dict[str, Any]]:
    lines = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


# --- the failure log stays bounded ------------------------------------------------------------


def test_the_failure_log_is_bounded_however_varied_the_faults() -> None:
    """Repeats of one kind log once; endless new kinds (hostile variety in a field) stop
    being remembered at the cap, so its memory stops growing, with one warning saying so."""
    failures = FailureLog()
    error = RuntimeError("down")
    tracemalloc.start()
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(5000):
                failures.record("pool", error, pool_name="same")
            for n in range(MAX_FAILURE_KINDS):
                failures.record("pool", error, pool_name=f"pool-{n}")
            at_cap = tracemalloc.take_snapshot()
            for n in range(MAX_FAILURE_KINDS, 20 * MAX_FAILURE_KINDS):
                failures.record("pool", error, pool_name=f"pool-{n}" + "x" * 1000)
            later = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()

    growth = sum(
        stat.size_diff
        for stat in later.compare_to(at_cap, "filename")
        if stat.traceback[0].filename.endswith("_logging.py")
    )
    events = Counter(log["event"] for log in logs)
    assert events == {"instrumentation_failed": MAX_FAILURE_KINDS, "failure_log_full": 1}
    assert growth < 10_000


# --- a log sink that raises ---------------------------------------------------------------


@pytest.mark.uvicorn
def test_a_log_sink_that_raises_never_reaches_the_app() -> None:
    """Every structlog call raises OSError (a full disk) during slow requests, loop stalls
    and label overflow: every request is answered 200 and counted, nothing propagates."""
    env = {"FAULTS_RAISING_LOG_SINK": "1", "FAULTS_MAX_LABEL_VALUES": "3"}
    with start_uvicorn(APP, args=["--no-access-log"], env=env) as server:
        paths = ["/slow"] * 5 + ["/block"] * 2 + ["/plain"] * 3 + ["/r1", "/r2", "/r3", "/r4"]
        statuses = [httpx.get(f"{server.url}{path}", timeout=10).status_code for path in paths]
        time.sleep(0.3)  # let the loop monitor's probe log the end of the last stall
        scrape = parse(httpx.get(f"{server.url}/metrics", timeout=10).text)
        alive = server.process.poll() is None
        log = server.log()

    assert statuses == [200] * len(paths)
    assert alive
    assert total(scrape, "http_server_request_duration_seconds_count") == len(paths)
    slow = {"http_request_method": "GET", "http_route": "/slow"}
    assert value(scrape, "http_server_slow_requests_total", **slow) == 5
    assert total(scrape, "asyncio_event_loop_blocked_total") >= 2
    assert total(scrape, "asgi_perfmon_label_overflow_total") >= 4
    # The sink was really called, and raised, for each kind of log line.
    assert value(scrape, "faults_app_log_calls_total", event="slow_request") == 5
    assert total(scrape, "faults_app_log_calls_total", event="event_loop_blocked") >= 2
    assert total(scrape, "faults_app_log_calls_total", event="label_overflow") >= 1
    assert "Traceback" not in log, log
    assert "Exception in" not in log, log


# --- the database stopped and restarted under load ----------------------------------------

LIBRARY_FAILURES = {
    "instrumentation_failed",
    "collector_failed",
    "query_recording_failed",
    "query_logger_failed",
    "failure_log_full",
}


class Load:
    """Concurrent clients alternating ``/db`` and ``/plain``, and a scraper, recording
    ``(phase, path, status)`` for every answer (status 0: no answer at all). A request in
    flight while the phase changed is recorded in phase ``"changing"``."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.phase = "before"
        self.answers: list[tuple[str, str, int]] = []
        self._running = True

    def count(self, path: str, status: int | None = None, phase: str | None = None) -> int:
        return sum(
            1
            for answer in self.answers
            if answer[1] == path
            and (status is None or answer[2] == status)
            and (phase is None or answer[0] == phase)
        )

    async def run(self, clients: int) -> None:
        limits = httpx.Limits(max_connections=clients + 1)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10, limits=limits) as http:
            await asyncio.gather(*(self._client(http) for _ in range(clients)), self._scraper(http))

    def stop(self) -> None:
        self._running = False

    async def _client(self, http: httpx.AsyncClient) -> None:
        while self._running:
            for path in ("/db", "/plain"):
                await self._get(http, path)

    async def _scraper(self, http: httpx.AsyncClient) -> None:
        while self._running:
            await self._get(http, "/metrics")
            await asyncio.sleep(0.1)

    async def _get(self, http: httpx.AsyncClient, path: str) -> None:
        phase = self.phase
        try:
            status = (await http.get(path)).status_code
        except httpx.HTTPError:
            status = 0
        self.answers.append((phase if phase == self.phase else "changing", path, status))

    async def until(self, path: str, status: int, count: int, timeout: float = 20.0) -> None:
        """Wait until ``count`` answers of ``status`` on ``path`` in the current phase."""
        deadline = time.monotonic() + timeout
        while self.count(path, status, self.phase) < count:
            assert time.monotonic() < deadline, f"{path}: fewer than {count} {status} in time"
            await asyncio.sleep(0.05)


def db_statuses_after_first_success(load: Load) -> set[int]:
    answers = [status for phase, path, status in load.answers if phase == "up" and path == "/db"]
    return set(answers[answers.index(200) :])


@pytest.mark.uvicorn
@pytest.mark.postgres
@pytest.mark.slow
async def test_the_database_stopped_and_restarted_under_load(
    postgres_cluster: PostgresCluster,
) -> None:
    """PostgreSQL stops for a second under 16 concurrent clients, then comes back. Non-DB
    routes and /metrics answer 200 throughout, DB routes a clean 503 while it is down; every
    failure is counted once (acquire or query error), nothing is logged per request, the DB
    route recovers, and no connection is left in use."""
    env = {"FAULTS_DSN": postgres_cluster.dsn}
    with start_uvicorn(APP, args=["--no-access-log"], env=env) as server:
        load = Load(server.url)
        running = asyncio.create_task(load.run(clients=16))
        try:
            await load.until("/db", 200, 50)
            load.phase = "stopping"
            await asyncio.to_thread(postgres_cluster.stop)
            load.phase = "down"
            await load.until("/db", 503, 50)
            await load.until("/metrics", 200, 3)
            load.phase = "starting"
            await asyncio.to_thread(postgres_cluster.start)
            load.phase = "up"
            await load.until("/db", 200, 50)
        finally:
            load.stop()
            await running
        async with httpx.AsyncClient(timeout=10) as http:
            final = parse((await http.get(f"{server.url}/metrics")).text)
        logs = json_lines(server)
        server_errors = [log for log in logs if log.get("level") in ("error", "critical")]

    statuses = {(path, status) for _, path, status in load.answers}
    assert statuses <= {("/plain", 200), ("/metrics", 200), ("/db", 200), ("/db", 503)}, [
        (error["exc_type"], error["exc_value"])
        for log in server_errors
        for error in log["exception"]
    ]
    assert load.count("/db", 200, "down") == 0
    assert load.count("/plain", 200, "down") > 0
    assert load.count("/db", 503, "before") == 0
    assert db_statuses_after_first_success(load) == {200}

    # Every request the clients saw is in the histogram, under the status they saw.
    for path, status in statuses:
        if path != "/metrics":
            labels = {"http_route": path, "http_response_status_code": str(status)}
            assert total(final, "http_server_request_duration_seconds_count", **labels) == (
                load.count(path, status)
            ), (path, status)
    # Each 503 is one failed acquire or one failed query, counted by type.
    acquire_errors = total(final, "db_client_connection_acquire_errors_total", pool_name="default")
    query_errors = total(final, "db_client_operation_errors_total", pool_name="default")
    assert acquire_errors + query_errors == load.count("/db", 503)
    assert (
        value(
            final,
            "db_client_connection_acquire_errors_total",
            pool_name="default",
            error_type="ConnectionRefusedError",
        )
        or 0
    ) > 0
    # Nothing leaked: no connection in use, nobody waiting, the pool within its bounds.
    assert value(final, "db_client_connection_count", pool_name="default", state="used") == 0
    assert value(final, "db_client_connection_pending_requests", pool_name="default") == 0
    idle = value(final, "db_client_connection_count", pool_name="default", state="idle") or 0
    assert 0 < idle <= 8
    # The library logged no failure per request: at most one line per kind.
    kinds = Counter(
        (log["event"], log.get("where"), log.get("error_type"))
        for log in logs
        if log.get("event") in LIBRARY_FAILURES
    )
    assert all(count == 1 for count in kinds.values()), kinds
    assert not server_errors


@pytest.mark.postgres
async def test_a_query_whose_release_fails_is_counted_as_failed(
    postgres_dsn: str, registry: CollectorRegistry
) -> None:
    """asyncpg re-raises a failed connection reset from ``release`` (the server went away
    right after the query): the shortcut call fails for the caller, so it must count as a
    failed operation, not as a success with an error nobody counted."""
    failing_resets = 1

    async def reset(connection: Any) -> None:
        nonlocal failing_resets
        if failing_resets:
            failing_resets -= 1
            raise ConnectionResetError("the server went away during the reset")

    raw = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=1, reset=reset)
    pool = instrument_pool(raw, "resets", registry=registry)
    try:
        with pytest.raises(ConnectionResetError):
            await pool.fetchval("SELECT 1")
        assert await pool.fetchval("SELECT 2") == 2
    finally:
        await pool.close()

    labels = {"pool_name": "resets", "db_operation_name": "SELECT"}
    assert (
        registry.get_sample_value(
            "db_client_operation_errors_total", {**labels, "error_type": "ConnectionResetError"}
        )
        == 1
    )
    outcomes = {
        outcome: registry.get_sample_value(
            "db_client_operation_duration_seconds_count", {**labels, "outcome": outcome}
        )
        for outcome in ("ok", "error")
    }
    assert outcomes == {"ok": 1, "error": 1}
    assert registry.get_sample_value(
        "db_client_connection_count", {"pool_name": "resets", "state": "used"}
    ) in (0, None)
