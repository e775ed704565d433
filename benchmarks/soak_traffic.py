"""The soak's traffic and its sampler, run in one event loop against the example app.

Traffic: ``concurrency`` workers, each sending the example app's realistic mix
(``example_app.loadgen.Traffic``: reads through the ``users`` cache, writes that invalidate
it, the upstream aggregate, the sometimes-slow report, ``/health``, ``/config``) and, for a
share of requests, hostile variety: a distinct random unmatched path every time (long ones,
``%00`` and invalid UTF-8 escapes too), random methods (standard, WebDAV-style and made-up
tokens), random query strings, and a random ``X-Request-ID`` on every request (valid ones,
which are echoed, and unsafe ones, which are replaced). Creates and deletes are balanced, so
the app's own data (the users table, the users cache) stays the same size and cannot pass
for a leak. A Prometheus-like scraper asks for ``/metrics`` (OpenMetrics, gzip) every 2 s
and the opt-in blocking endpoint runs every 20 s, so the loop watchdog fires.

Sampler: every ``interval_s``, the server process's RSS, threads and open files (psutil),
the series in ``/metrics`` (samples parsed with ``prometheus_client.parser``), the requests
done and the errors so far. Every label value is checked for anything the hostile traffic
sent: a series carrying request input would grow without bound.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import psutil
import yarl
from prometheus_client.parser import text_string_to_metric_families

from example_app import loadgen

HOSTILE_SHARE = 0.3
CONCURRENCY = 8
HOSTILE_MARK = "hostile"  # in every path, query and request id the hostile traffic invents
# The methods the middleware keeps as they are (OpenTelemetry's list, QUERY included).
STANDARD_METHODS = (
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "QUERY",
)
CLIENT_METHODS = tuple(m for m in STANDARD_METHODS if m != "CONNECT")  # a tunnel, not a request
# Methods any server passes to the app (h11 passes made-up tokens too): all must become _OTHER.
EXTENDED_METHODS = (
    "PROPFIND",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "SEARCH",
    "PURGE",
    "REPORT",
    "MKCALENDAR",
    "SUBSCRIBE",
    "NOTIFY",
    "LINK",
    "UNLINK",
)
BOUNDED_METHODS = frozenset({*STANDARD_METHODS, "_OTHER"})
MATCHED_PATHS = ("/users", "/users/1", "/config", "/health", "/report", "/overview")
SCRAPE_EVERY_S = 2.0
BLOCKING_EVERY_S = 20.0
SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class Tally:
    """What the load generator sent and got back: the realistic mix's ``loadgen.Stats``
    (hostile requests and scrapes are recorded there too) and the hostile share of it."""

    stats: loadgen.Stats = field(default_factory=loadgen.Stats)
    hostile: int = 0
    scrapes: int = 0

    @property
    def requests(self) -> int:
        return self.stats.requests

    @property
    def errors(self) -> int:
        """No answer, or a 5xx: what a healthy app under this traffic never gives."""
        statuses = self.stats.statuses
        return self.stats.failures + sum(n for code, n in statuses.items() if code >= 500)


class _RequestIds:
    """Gives every request of the realistic mix a fresh random ``X-Request-ID``.

    Stands in for the ``aiohttp.ClientSession`` that ``loadgen.Traffic`` talks to.
    """

    def __init__(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        self._session = session
        self._rng = rng

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {**kwargs.pop("headers", {}), "X-Request-ID": request_id(self._rng)}
        return self._session.request(method, path, headers=headers, **kwargs)


def request_id(rng: random.Random) -> str:
    """Mostly safe ids (echoed), some too long or with unsafe characters (replaced)."""
    token = f"{HOSTILE_MARK}-{rng.getrandbits(64):016x}"
    kind = rng.random()
    if kind < 0.7:
        return token
    if kind < 0.85:
        return token + "x" * rng.randint(120, 400)
    return token + rng.choice(("<script>", " ;drop", '"}{"a":1', "../..", "%0d%0aSet-Cookie:x"))


def hostile_path(rng: random.Random, number: int) -> str:
    """A path no route matches and no earlier request used (already percent-encoded)."""
    base = f"/{HOSTILE_MARK}-{number}-{rng.getrandbits(48):012x}"
    kind = rng.random()
    if kind < 0.6:
        return base
    if kind < 0.75:
        return base + "/" + "a" * rng.randint(1000, 4000)  # long
    if kind < 0.9:
        return base + rng.choice(("/%00/x", "/%ff%fe", "/%c3%28", "/..%2f..%2fetc"))
    return f"/users/{number}/{HOSTILE_MARK}/{rng.getrandbits(32):x}"  # under a real prefix


def hostile_method(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.5:
        return rng.choice(CLIENT_METHODS)
    if kind < 0.9:
        return rng.choice(EXTENDED_METHODS)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return "".join(
        rng.choice(letters) for _ in range(rng.randint(3, 12))
    )  # h11: to the app; httptools: 400


class HostileTraffic:
    """Requests whose raw parts (path, method, query, request id) are new every time."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, tally: Tally, rng: random.Random
    ) -> None:
        self._session = session
        self._base = base_url
        self._tally = tally
        self._rng = rng
        self._numbers = iter(range(1, 1 << 62))

    async def any_action(self) -> None:
        rng = self._rng
        number = next(self._numbers)
        kind = rng.random()
        if kind < 0.6:
            method, path = hostile_method(rng), hostile_path(rng, number)
        elif kind < 0.85:
            method, path = hostile_method(rng), rng.choice(MATCHED_PATHS)  # mostly 405
        else:
            method, path = "GET", f"/config?{HOSTILE_MARK}{number}={rng.getrandbits(40):x}"
        await self._send(method, path)

    async def _send(self, method: str, path: str) -> None:
        self._tally.hostile += 1
        url = yarl.URL(self._base + path, encoded=True)
        headers = {"X-Request-ID": request_id(self._rng)}
        try:
            async with self._session.request(method, url, headers=headers) as response:
                await response.read()
                self._tally.stats.statuses[response.status] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError):
            self._tally.stats.failures += 1


def balanced_mix(traffic: loadgen.Traffic) -> list[tuple[Callable[[], Awaitable[None]], int]]:
    """The load generator's actions, with as many deletes as creates: the data stays the same."""
    return [
        (traffic.get_user, 40),
        (traffic.get_missing_user, 2),
        (traffic.list_users, 8),
        (traffic.create_user, 2),
        (traffic.create_invalid_user, 1),
        (traffic.update_user, 3),
        (traffic.delete_user, 2),
        (traffic.overview, 15),
        (traffic.report, 8),
        (traffic.health, 3),
        (traffic.config, 2),
    ]


@dataclass
class Series:
    """One parse of ``/metrics``: every sample's key, and the label values from the input."""

    keys: set[SeriesKey]
    from_input: list[str]
    server_requests: float


def parse_series(text: str) -> Series:
    keys: set[SeriesKey] = set()
    from_input: list[str] = []
    server_requests = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            keys.add((sample.name, tuple(sorted(sample.labels.items()))))
            from_input += [
                f"{sample.name}{{{k}={v!r}}}" for k, v in sample.labels.items() if _from_input(k, v)
            ]
            if sample.name == "http_server_request_duration_seconds_count":
                server_requests += sample.value
    return Series(keys, from_input, server_requests)


def _from_input(label: str, value: str) -> bool:
    if HOSTILE_MARK in value.lower():
        return True
    return label == "http_request_method" and value not in BOUNDED_METHODS


@dataclass
class Soak:
    """Everything the run collected."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    series_at: dict[str, set[SeriesKey]] = field(default_factory=dict)
    from_input: set[str] = field(default_factory=set)
    tally: Tally = field(default_factory=Tally)


async def run(
    base_url: str,
    server_pid: int,
    *,
    seconds: float,
    warmup_s: float,
    interval_s: float,
    concurrency: int = CONCURRENCY,
    seed: int = 8,
) -> Soak:
    """Drive the traffic for ``seconds`` while sampling the server every ``interval_s``."""
    soak = Soak()
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with (
        aiohttp.ClientSession(base_url=base_url, timeout=timeout, connector=connector) as app,
        aiohttp.ClientSession(timeout=timeout) as raw,
    ):
        with_ids = cast(aiohttp.ClientSession, _RequestIds(app, rng))
        traffic = loadgen.Traffic(with_ids, soak.tally.stats, rng)
        await loadgen.seed(traffic)
        hostile = HostileTraffic(raw, base_url, soak.tally, rng)
        actions, weights = zip(*balanced_mix(traffic), strict=True)
        started = time.monotonic()
        deadline = started + seconds
        process = psutil.Process(server_pid)

        async def worker(worker_rng: random.Random) -> None:
            while time.monotonic() < deadline:
                if worker_rng.random() < HOSTILE_SHARE:
                    await hostile.any_action()
                else:
                    await worker_rng.choices(actions, weights)[0]()
                await asyncio.sleep(worker_rng.uniform(0, loadgen.MAX_THINK_S))

        tasks = [worker(random.Random(rng.random())) for _ in range(concurrency)]
        # Half a period late: a scrape never renders while a sample reads the RSS.
        scrape = _every(SCRAPE_EVERY_S, deadline, lambda: _scrape(raw, base_url, soak), 0.5)
        tasks += [scrape, _every(BLOCKING_EVERY_S, deadline, traffic.blocking, 0.25)]
        tasks.append(_sample(raw, base_url, process, soak, started, deadline, interval_s, warmup_s))
        await asyncio.gather(*tasks)
    return soak


async def _every(
    every_s: float, deadline: float, action: Callable[[], Awaitable[None]], phase: float
) -> None:
    """``action`` every ``every_s``, starting ``phase`` of a period late."""
    next_at = time.monotonic() + every_s * phase
    while next_at < deadline:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await action()
        next_at += every_s


async def _scrape(session: aiohttp.ClientSession, base_url: str, soak: Soak) -> None:
    """What Prometheus asks for: OpenMetrics, gzip (aiohttp decompresses)."""
    headers = {"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"}
    try:
        async with session.get(f"{base_url}/metrics", headers=headers) as response:
            await response.read()
            soak.tally.scrapes += response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        soak.tally.stats.failures += 1


async def _sample(
    session: aiohttp.ClientSession,
    base_url: str,
    process: psutil.Process,
    soak: Soak,
    started: float,
    deadline: float,
    interval_s: float,
    warmup_s: float,
) -> None:
    """A sample now, then every ``interval_s`` until the deadline, and one at the deadline."""
    next_at = started
    while True:
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        elapsed = time.monotonic() - started
        await _take_sample(session, base_url, process, soak, elapsed)
        if elapsed >= warmup_s:
            soak.series_at.setdefault("after_warmup", soak.series_at["last"])
        if time.monotonic() >= deadline:
            return
        next_at = min(next_at + interval_s, deadline)


async def _take_sample(
    session: aiohttp.ClientSession,
    base_url: str,
    process: psutil.Process,
    soak: Soak,
    elapsed: float,
) -> None:
    memory = process.memory_info()  # first: the sample's own scrape is not in it
    async with session.get(f"{base_url}/metrics") as response:
        text = await response.text()
    series = parse_series(text)
    soak.series_at["last"] = series.keys
    soak.from_input.update(series.from_input)
    tally = soak.tally
    soak.samples.append(
        {
            "t_s": round(elapsed, 2),
            "rss_bytes": memory.rss,
            "series": len(series.keys),
            "requests": tally.requests,
            "hostile_requests": tally.hostile,
            "server_requests": int(series.server_requests),
            "errors": tally.errors,
            "threads": process.num_threads(),
            "open_files": process.num_fds(),
        }
    )
