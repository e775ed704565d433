"""A single-process scrape runs on the event loop in slices, with the same bytes as before.

The loop turns between slices (counted by a task that ticks each time the loop runs it, not
timed), and the body is what prometheus-client's encoders and ``gzip.compress`` give for the
same registry state.
"""

from __future__ import annotations

import asyncio
import gzip
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette

from asgi_perfmon import PerfMonMiddleware, _scrape, endpoint, metrics_app
from asgi_perfmon._loopmetrics import LoopFamily
from tests._helpers import client

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
TEXT = "text/plain"
COLLECTORS = 40
LABELLED_CHILDREN = 3000


def busy_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """The middleware's families with traffic, ``COLLECTORS`` small collectors of
    prometheus-client's own, and one labelled counter big enough to need many gzip steps."""
    middleware = PerfMonMiddleware(Starlette(), registry=registry, loop_monitor=False)
    for number in range(30):
        for status in (200, 404, 500):
            series = middleware._metrics.series("GET", f"/route{number}/{{id}}")
            series.record(status, 0.02 * number, 0.001, 10, 2000, {"request_id": f"r{number}"})
    for number in range(COLLECTORS):
        Gauge(f"small_gauge_{number}", "one of many small collectors", registry=registry).set(
            number
        )
    big = Counter("big_events", "many labelled children", ["key"], registry=registry)
    for number in range(LABELLED_CHILDREN):
        big.labels(f"key-{number:05d}").inc(number)
    return registry


class Ordered:
    """prometheus-client's view of ``collectors``, in this order."""

    def __init__(self, collectors: list[Collector]) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


def expected_exposition(registry: CollectorRegistry, accept: str) -> bytes:
    """prometheus-client's encoder over the registry, in the endpoint's documented order: the
    collectors as registered, the scrape-error counter, then the middleware's families."""
    collectors = list(_scrape.registered_collectors(registry))
    failures = _scrape.scrape_failures(registry).counter
    loop = [c for c in collectors if isinstance(c, LoopFamily)]
    others = [c for c in collectors if c is not failures and c not in loop]
    encoder, _ = choose_encoder(accept)
    return encoder(Ordered([*others, failures, *loop]))


class LoopTurns:
    """Counts how often the event loop runs a task of its own while something is awaited."""

    def __init__(self) -> None:
        self.turns = 0
        self._running = True

    async def __aenter__(self) -> LoopTurns:
        self._task = asyncio.ensure_future(self._tick())
        await asyncio.sleep(0)
        self.turns = 0
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._running = False
        await self._task

    async def _tick(self) -> None:
        while self._running:
            self.turns += 1
            await asyncio.sleep(0)


async def scrape(registry: CollectorRegistry, headers: dict[str, str]) -> tuple[int, Any]:
    """One scrape through the ASGI app; the loop turns counted while it ran, and the reply."""
    async with client(metrics_app(registry)) as http:
        request = http.build_request("GET", "/metrics", headers=headers)
        async with LoopTurns() as counted:
            response = await http.send(request, stream=True)
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
    return counted.turns, (response, raw)


@pytest.mark.parametrize("accept", [TEXT, OPENMETRICS])
async def test_the_body_is_prometheus_clients_exposition_byte_for_byte(
    registry: CollectorRegistry, accept: str
) -> None:
    """Uncompressed: exactly the bytes of prometheus-client's encoder for the same state."""
    busy_registry(registry)
    _, (response, raw) = await scrape(registry, {"Accept": accept, "Accept-Encoding": "identity"})

    assert "content-encoding" not in response.headers
    assert expected_exposition(registry, accept) == raw


@pytest.mark.parametrize("accept", [TEXT, OPENMETRICS])
async def test_the_gzip_body_is_gzip_compress_byte_for_byte(
    registry: CollectorRegistry, accept: str
) -> None:
    """Compressed a step at a time, the body is still what ``gzip.compress`` (level 6) gives
    for the whole exposition, header included (its time field read back from the body)."""
    busy_registry(registry)
    _, (response, raw) = await scrape(registry, {"Accept": accept, "Accept-Encoding": "gzip"})
    (mtime,) = struct.unpack("<I", raw[4:8])
    plain = expected_exposition(registry, accept)

    assert "gzip" == response.headers["content-encoding"]
    assert len(plain) > 10 * endpoint._GZIP_STEP
    assert gzip.compress(plain, compresslevel=6, mtime=mtime) == raw


async def test_the_loop_turns_between_collectors_and_between_gzip_steps(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every slice used up after one step, the loop runs after each collector's
    collect-and-encode (and each chunk of the middleware's families), and after each
    ``_GZIP_STEP`` bytes compressed."""
    monkeypatch.setattr(_scrape, "LOOP_SLICE_SECONDS", 0.0)
    busy_registry(registry)
    plain_turns, _ = await scrape(registry, {"Accept": TEXT, "Accept-Encoding": "identity"})
    gzip_turns, (_, raw) = await scrape(registry, {"Accept": TEXT, "Accept-Encoding": "gzip"})

    collectors = len(_scrape.registered_collectors(registry))
    assert collectors > COLLECTORS
    assert plain_turns >= collectors
    assert gzip_turns - plain_turns >= len(gzip.decompress(raw)) // endpoint._GZIP_STEP


async def test_the_loop_does_not_turn_within_a_slice(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With slices that never end, the loop does not run during the scrape at all: the turns
    counted above are the slices' doing."""
    monkeypatch.setattr(_scrape, "LOOP_SLICE_SECONDS", 60.0)
    busy_registry(registry)
    turns, _ = await scrape(registry, {"Accept": TEXT, "Accept-Encoding": "gzip"})

    assert 0 == turns


async def test_a_scrape_runs_no_thread_in_a_single_process(registry: CollectorRegistry) -> None:
    """Collectors run on the event loop's thread: no worker competes with it for the GIL."""
    threads: list[threading.Thread] = []

    class Probe:
        def collect(self) -> list[Metric]:
            threads.append(threading.current_thread())
            return []

    registry.register(Probe())
    async with client(metrics_app(registry)) as http:
        await http.get("/metrics")

    assert [threading.current_thread()] == threads


async def test_multiprocess_files_are_read_in_a_worker_thread(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Merging the processes' files is file I/O: in multiprocess mode it stays off the loop."""
    threads: list[threading.Thread] = []
    real_collect = _scrape.ProcessFiles.collect

    def recording_collect(self: _scrape.ProcessFiles) -> Any:
        threads.append(threading.current_thread())
        return real_collect(self)

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(_scrape.ProcessFiles, "collect", recording_collect)
    async with client(metrics_app(registry)) as http:
        response = await http.get("/metrics", headers={"Accept": OPENMETRICS})

    assert (200, "# EOF\n") == (response.status_code, response.text)
    assert len(threads) == 1
    assert threading.current_thread() is not threads[0]
