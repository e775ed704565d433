"""Exact counts under load, scrapes during load, and worker restarts in multiprocess mode.

Everything runs against a real uvicorn serving ``tests/apps/load_app.py``. The client sends
request ``i`` as ``MIX[i % len(MIX)]`` and tallies what it actually received, route by route
and status by status; the metrics must agree with that tally exactly. While the load runs,
the test scrapes /metrics itself and, where the binary is installed, so does a real
Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from tests._uvicorn import RunningServer, free_port, start_uvicorn, stop_process
from tests.apps.load_app import MIX, POST_BODY, Kind

pytestmark = [pytest.mark.uvicorn, pytest.mark.slow]

APP = "tests.apps.load_app:app"
REQUESTS = 20_000
CONNECTIONS = 200
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
SCRAPE_PAUSE_S = 0.25  # between the test's own scrapes; each one costs the server ~20 ms

DURATION = "http_server_request_duration_seconds"
TIME_TO_FIRST_BYTE = "http_server_time_to_first_byte_seconds"
REQUEST_SIZE = "http_server_request_body_size_bytes"
RESPONSE_SIZE = "http_server_response_body_size_bytes"
ACTIVE = "http_server_active_requests"
PER_ROUTE_HISTOGRAMS = (TIME_TO_FIRST_BYTE, REQUEST_SIZE, RESPONSE_SIZE)

Labels = tuple[tuple[str, str], ...]
Sample = tuple[str, Labels]


@dataclass
class Tally:
    """What the client received: answers by (method, route, status), workers, failures."""

    answers: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    workers: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, other: Tally) -> None:
        self.answers += other.answers
        self.workers += other.workers
        self.failures += other.failures

    def by_status(self) -> Counter[int]:
        statuses: Counter[int] = Counter()
        for (_, _, status), count in self.answers.items():
            statuses[status] += count
        return statuses

    def by_route(self) -> Counter[tuple[str, str]]:
        routes: Counter[tuple[str, str]] = Counter()
        for (method, route, _), count in self.answers.items():
            routes[(method, route)] += count
        return routes

    def total(self) -> int:
        return sum(self.answers.values())


@dataclass(frozen=True)
class Scrape:
    """One /metrics answer, parsed by prometheus-client's parser for the format it asked for."""

    status: int
    encoding: str
    samples: dict[Sample, float]
    growing: dict[Sample, float]
    """The samples of counters and histograms: values that may only grow."""

    @classmethod
    def parse(cls, status: int, encoding: str, text: str, *, openmetrics: bool) -> Scrape:
        parse = parse_openmetrics if openmetrics else parse_text
        samples, growing = {}, {}
        for family in parse(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = sample.value
                if family.type in ("counter", "histogram") and not key[0].endswith("_created"):
                    growing[key] = sample.value
        return cls(status, encoding, samples, growing)


# --- the client ---------------------------------------------------------------------------


async def send_mix(base_url: str, count: int, connections: int, first: int = 0) -> Tally:
    """Send requests ``first`` .. ``first + count - 1`` of the mix over ``connections``
    keep-alive connections, each connection one request at a time."""
    tally = Tally()
    indices = iter(range(first, first + count))
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as session:

        async def connection() -> None:
            for index in indices:
                await send_one(session, MIX[index % len(MIX)], tally)

        started = time.perf_counter()
        await asyncio.gather(*(connection() for _ in range(connections)))
        tally.seconds = time.perf_counter() - started
    return tally


async def send_one(session: aiohttp.ClientSession, kind: Kind, tally: Tally) -> None:
    body = POST_BODY if kind.method == "POST" else None
    # uvicorn closes the connection after an app exception, without saying so in the
    # response; a request sent next on that connection would be reset (aiohttp retries only
    # idempotent ones), so the client does not keep it alive.
    headers = {"Connection": "close"} if kind.path == "/raise" else None
    try:
        async with session.request(kind.method, kind.path, data=body, headers=headers) as response:
            await response.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        tally.failures.append(f"{kind.method} {kind.path}: {error!r}")
        return
    tally.answers[(kind.method, kind.route, response.status)] += 1
    tally.workers[int(response.headers["x-worker-pid"])] += 1


def expected_answers(count: int, first: int = 0) -> Counter[tuple[str, str, int]]:
    """What the app is built to answer to requests ``first`` .. ``first + count - 1``."""
    return Counter(
        (kind.method, kind.route, kind.status)
        for kind in (MIX[index % len(MIX)] for index in range(first, first + count))
    )


async def scrape_until(base_url: str, done: asyncio.Event) -> list[Scrape]:
    """Scrape /metrics on its own connection until ``done``, alternating the text format and
    OpenMetrics (what Prometheus asks for) and accepting gzip, as Prometheus does."""
    texts: list[tuple[int, str, str, bool]] = []
    async with aiohttp.ClientSession(base_url) as session:
        while not done.is_set():
            openmetrics = len(texts) % 2 == 1
            headers = {"Accept": OPENMETRICS} if openmetrics else {}
            async with session.get("/metrics", headers=headers) as response:
                encoding = response.headers.get("Content-Encoding", "identity")
                texts.append((response.status, encoding, await response.text(), openmetrics))
            await asyncio.sleep(SCRAPE_PAUSE_S)
    # Parsed after the load, so that parsing does not slow the client down.
    return [
        Scrape.parse(status, encoding, text, openmetrics=om) for status, encoding, text, om in texts
    ]


async def load_while_scraping(base_url: str) -> tuple[Tally, list[Scrape]]:
    done = asyncio.Event()
    scraper = asyncio.create_task(scrape_until(base_url, done))
    try:
        tally = await send_mix(base_url, REQUESTS, CONNECTIONS)
    finally:
        done.set()
    return tally, await scraper


# --- reading the metrics --------------------------------------------------------------------


def scrape(base_url: str) -> dict[Sample, float]:
    """One scrape on a new connection (in multiprocess mode: answered by any worker)."""

    async def fetch() -> str:
        async with (
            aiohttp.ClientSession(base_url) as session,
            session.get("/metrics") as response,
        ):
            assert response.status == 200
            return await response.text()

    return Scrape.parse(200, "", asyncio.run(fetch()), openmetrics=False).samples


def counted(samples: dict[Sample, float]) -> Counter[tuple[str, str, int]]:
    """(method, route, status) -> requests in the duration histogram."""
    counts: Counter[tuple[str, str, int]] = Counter()
    for (name, labels), value in samples.items():
        if name == f"{DURATION}_count" and value:
            label = dict(labels)
            status = int(label["http_response_status_code"])
            counts[(label["http_request_method"], label["http_route"], status)] += int(value)
    return counts


def per_route(samples: dict[Sample, float], histogram: str) -> Counter[tuple[str, str]]:
    """(method, route) -> observations of a per-route histogram."""
    counts: Counter[tuple[str, str]] = Counter()
    for (name, labels), value in samples.items():
        if name == f"{histogram}_count" and value:
            label = dict(labels)
            counts[(label["http_request_method"], label["http_route"])] += int(value)
    return counts


def active_requests(samples: dict[Sample, float]) -> float:
    return sum(value for (name, _), value in samples.items() if name == ACTIVE)


def assert_metrics_match(samples: dict[Sample, float], tally: Tally) -> None:
    """The duration histogram holds every answer under its route and status; the other
    per-route histograms hold one observation per answer; nothing is in flight."""
    assert tally.answers == counted(samples)
    for histogram in PER_ROUTE_HISTOGRAMS:
        assert tally.by_route() == per_route(samples, histogram), histogram
    assert 0 == active_requests(samples)


def non_monotonic(earlier: dict[Sample, float], later: dict[Sample, float]) -> list[str]:
    """The counter and histogram samples of ``earlier`` that are missing or lower later."""
    return [
        f"{name}{dict(labels)}: {value} -> {later.get((name, labels))}"
        for (name, labels), value in earlier.items()
        if later.get((name, labels), -1.0) < value
    ]


def inconsistent_histograms(samples: dict[Sample, float]) -> list[str]:
    """Histogram series whose buckets decrease or whose count is not the +Inf bucket."""
    buckets: dict[tuple[str, Labels], list[tuple[float, float]]] = {}
    for (name, labels), value in samples.items():
        if name.endswith("_bucket"):
            label = dict(labels)
            bound = float(label.pop("le"))
            series = (name.removesuffix("_bucket"), tuple(sorted(label.items())))
            buckets.setdefault(series, []).append((bound, value))
    problems = []
    for (name, labels), values in buckets.items():
        counts = [count for _, count in sorted(values)]
        if counts != sorted(counts) or counts[-1] != samples.get((f"{name}_count", labels)):
            problems.append(f"{name}{dict(labels)}: {counts}")
    return problems


# --- a real Prometheus scraping during load -------------------------------------------------

PROMETHEUS = shutil.which("prometheus")
PROMETHEUS_SCRAPE_INTERVAL = "2s"  # a scrape waits its turn on a saturated server


@contextlib.contextmanager
def optional_prometheus(target: RunningServer, directory: Path) -> Iterator[httpx.Client | None]:
    """A Prometheus scraping ``target`` and its API client; None where it is not installed."""
    if PROMETHEUS is None:
        yield None
        return
    config = directory / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {
                    "scrape_interval": PROMETHEUS_SCRAPE_INTERVAL,
                    "scrape_timeout": PROMETHEUS_SCRAPE_INTERVAL,
                },
                "scrape_configs": [
                    {
                        "job_name": "load",
                        "static_configs": [{"targets": [target.url.removeprefix("http://")]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    log_path = directory / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        stop_process(process)


def query(prometheus: httpx.Client, expr: str) -> list[dict[str, Any]]:
    """The result of an instant query (an empty list while Prometheus is not ready)."""
    with contextlib.suppress(httpx.HTTPError):
        response = prometheus.post("/api/v1/query", data={"query": expr, "time": time.time()})
        if response.status_code == 200:
            return list(response.json()["data"]["result"])
    return []


def wait_for_query(prometheus: httpx.Client, expr: str, expected: str, timeout: float) -> None:
    """Until ``expr`` gives one series with the value ``expected``."""
    deadline = time.monotonic() + timeout
    while [result["value"][1] for result in query(prometheus, expr)] != [expected]:
        if time.monotonic() > deadline:
            raise AssertionError(f"{expr} is {query(prometheus, expr)}, not {expected}")
        time.sleep(0.2)


def totals_per_scrape(prometheus: httpx.Client, window: str) -> list[float]:
    """The requests counted at each of Prometheus's scrapes in ``window``, oldest first."""
    raw = query(prometheus, f"{DURATION}_count[{window}]")
    totals: defaultdict[float, float] = defaultdict(float)
    for series in raw:
        for timestamp, value in series["values"]:
            totals[timestamp] += float(value)
    return [totals[timestamp] for timestamp in sorted(totals)]


# --- single process, with our scraper and (if installed) a real Prometheus -------------------


@dataclass(frozen=True)
class Load:
    """The module's load run: what the client received, the scrapes, the metrics after."""

    tally: Tally
    scrapes: list[Scrape]
    after: dict[Sample, float]
    prometheus: httpx.Client | None


@pytest.fixture(scope="module")
def load(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Load]:
    """20,000 requests on 200 connections against a fresh server, scraped throughout by the
    test's scraper and, where it is installed, by a real Prometheus."""
    with (
        start_uvicorn(APP, args=["--no-access-log"]) as server,
        optional_prometheus(server, tmp_path_factory.mktemp("prometheus")) as prometheus,
    ):
        if prometheus is not None:
            wait_for_query(prometheus, "up", "1", timeout=30)
        tally, scrapes = asyncio.run(load_while_scraping(server.url))
        after = scrape(server.url)
        print(
            f"\n{tally.total()} answered in {tally.seconds:.1f} s on {CONNECTIONS} connections, "
            f"by status {dict(sorted(tally.by_status().items()))}; {len(scrapes)} scrapes"
        )
        yield Load(tally, scrapes, after, prometheus)


def test_every_request_under_load_is_counted_exactly_once(load: Load) -> None:
    """The duration histogram holds every answer the client received, under its route and
    status; the other per-route histograms one observation each; nothing stays in flight."""
    tally = load.tally

    assert [] == tally.failures
    assert expected_answers(REQUESTS) == tally.answers
    assert {200: 8000, 201: 4000, 404: 4000, 500: 4000} == tally.by_status()
    assert_metrics_match(load.after, tally)
    posts = (("http_request_method", "POST"), ("http_route", "/items"))
    received = load.after[(f"{REQUEST_SIZE}_sum", posts)]
    assert tally.by_route()[("POST", "/items")] * len(POST_BODY) == received


def test_scrapes_during_load_all_answer_parse_and_only_grow(load: Load) -> None:
    """Every scrape during the load is a 200 (gzip, text or OpenMetrics) that parses, with
    consistent histograms, counters that never go back, and in-flight requests in bounds."""
    scrapes = load.scrapes

    assert len(scrapes) >= 10
    assert {200} == {s.status for s in scrapes}
    assert {"gzip"} == {s.encoding for s in scrapes}
    growing = [s.growing for s in scrapes] + [load.after]
    for earlier, later in itertools.pairwise(growing):
        assert [] == non_monotonic(earlier, later)
    for s in scrapes:
        assert [] == inconsistent_histograms(s.samples)
        assert 0 <= active_requests(s.samples) <= CONNECTIONS
    # The scrapes saw the load in progress, not only its start and its end.
    totals = [sum(counted(samples).values()) for samples in growing]
    assert len([t for t in totals if 0 < t < REQUESTS]) >= 5


@pytest.mark.prometheus
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed")
def test_a_real_prometheus_scraping_during_load_never_fails_and_sees_no_reset(
    load: Load,
) -> None:
    """Prometheus scraped the server every two seconds through the load: every scrape up, no
    counter reset, totals growing scrape by scrape, and after the load every request."""
    prometheus = load.prometheus
    assert prometheus is not None
    wait_for_query(prometheus, f"sum({DURATION}_count)", str(REQUESTS), timeout=10)
    ups = [float(value) for _, value in query(prometheus, "up[5m]")[0]["values"]]
    resets = query(prometheus, f"sum(resets({DURATION}_count[5m]))")[0]["value"][1]
    slowest = query(prometheus, "max_over_time(scrape_duration_seconds[5m])")[0]["value"][1]
    totals = totals_per_scrape(prometheus, "5m")

    during_load = [t for t in totals if 0 < t < REQUESTS]
    print(
        f"\nPrometheus: {len(ups)} scrapes, {len(during_load)} during the load, "
        f"slowest {float(slowest):.3f} s"
    )
    assert {1.0} == set(ups)
    assert "0" == resets
    assert totals == sorted(totals)
    assert during_load


# --- multiprocess mode: two workers, then each one replaced ---------------------------------

PID = Kind("GET", "/pid", "/pid", 200)
WORKER_START_TIMEOUT_S = 30.0


class StaleActiveGauge(AssertionError):
    """The active-requests gauge still counts requests of a worker that is gone."""


@contextlib.contextmanager
def two_workers(tmp_path: Path) -> Iterator[RunningServer]:
    directory = tmp_path / "prometheus-multiproc"
    directory.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    with start_uvicorn(APP, args=["--workers", "2", "--no-access-log"], env=env) as running:
        yield running


async def fetch_pids(base_url: str, count: int) -> Tally:
    """``count`` requests to /pid, each on a new connection, so that any worker may answer."""
    tally = Tally()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(base_url, connector=connector) as session:
        await asyncio.gather(*(send_one(session, PID, tally) for _ in range(count)))
    return tally


def wait_until_gone(pid: int) -> None:
    """Until ``pid`` has exited and its parent, the uvicorn supervisor, has reaped it."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"worker {pid} is still there")


def wait_for_new_worker(base_url: str, known: set[int]) -> tuple[int, Tally]:
    """The pid of the first worker outside ``known`` to answer, and every answer until then."""
    polls = Tally()
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        polls.add(asyncio.run(fetch_pids(base_url, 10)))
        new = set(polls.workers) - known
        if new:
            return new.pop(), polls
        time.sleep(0.1)
    raise AssertionError(f"no worker other than {known} answered; answers: {polls.workers}")


def both_workers(base_url: str) -> set[int]:
    """The pids of the two workers, once each has answered."""
    first, _ = wait_for_new_worker(base_url, set())
    second, _ = wait_for_new_worker(base_url, {first})
    return {first, second}


def assert_every_scrape_matches(base_url: str, tally: Tally, scrapes: int = 6) -> None:
    """Scrapes on new connections, so both workers answer some: each one sees everything.

    A worker records a request just after handing its last byte to the server, so a scrape
    answered by the other worker may come a moment too early; the first must match within a
    few seconds, and every one after it exactly.
    """
    deadline = time.monotonic() + 5
    while counted(samples := scrape(base_url)) != tally.answers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_metrics_match(samples, tally)
    for _ in range(scrapes):
        assert_metrics_match(scrape(base_url), tally)


def test_multiprocess_totals_stay_exact_when_workers_die_and_are_replaced(
    tmp_path: Path,
) -> None:
    """Two workers; one stopped with SIGTERM, the other killed with SIGKILL, each replaced by
    uvicorn's supervisor: the totals still hold every answer any worker ever gave."""
    answered = Tally()
    with two_workers(tmp_path) as server:
        first = asyncio.run(send_mix(server.url, 3000, 50))
        answered.add(first)
        original = set(first.workers)
        assert 2 == len(original), first.workers

        seen, replacements = set(original), []
        for signum, victim in zip((signal.SIGTERM, signal.SIGKILL), sorted(original), strict=True):
            # Recorded before the signal: a SIGKILL between a worker's last byte and its
            # record (microseconds) would lose that one count, which is not what this tests.
            assert_every_scrape_matches(server.url, answered)
            os.kill(victim, signum)
            wait_until_gone(victim)
            replacement, polls = wait_for_new_worker(server.url, seen)
            seen.add(replacement)
            replacements.append(replacement)
            answered.add(polls)
            answered.add(asyncio.run(send_mix(server.url, 1000, 50, first=answered.total())))

        assert_every_scrape_matches(server.url, answered)
        log = server.log()

    statuses = dict(sorted(answered.by_status().items()))
    print(
        f"\nworkers {sorted(original)} -> {replacements}; {answered.total()} answered, "
        f"by worker {dict(answered.workers)}, by status {statuses}"
    )
    assert [] == answered.failures
    assert set(answered.workers) == original | set(replacements)
    assert 4 == len(set(answered.workers))
    for victim in original:
        assert f"Child process [{victim}] died" in log


def test_a_killed_workers_requests_in_flight_leave_the_active_gauge(tmp_path: Path) -> None:
    """A worker holding a request is killed; once it is replaced, nothing is in flight."""
    with two_workers(tmp_path) as server:
        original = both_workers(server.url)
        with httpx.stream("GET", f"{server.url}/hold", timeout=10) as held:
            lines = held.iter_lines()  # kept: closing the iterator would hang up
            holder = int(next(lines))
            assert 1 == active_requests(scrape(server.url))
            os.kill(holder, signal.SIGKILL)
        wait_until_gone(holder)
        wait_for_new_worker(server.url, original)
        in_flight = active_requests(scrape(server.url))

    if in_flight:
        raise StaleActiveGauge(f"{in_flight} request(s) in flight after worker {holder} died")
