"""Behaviour only a real server shows: streaming, disconnects, background tasks, workers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests._uvicorn import start_uvicorn

pytestmark = pytest.mark.uvicorn

APP = "tests.apps.core_app:app"


def scrape(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The server's /metrics as {(sample name, sorted labels): value}."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(base_url: str, name: str, **labels: str) -> float:
    return scrape(base_url).get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    with start_uvicorn(APP) as running:
        yield running


def test_streaming_duration_runs_to_the_last_byte(server: Any) -> None:
    """Three chunks 0.1 s apart: duration covers all of them, first byte comes after one."""
    with httpx.stream("GET", f"{server.url}/stream", timeout=10) as response:
        body = b"".join(response.iter_bytes())

    assert body.count(b"chunk") == 3
    route = {"http_request_method": "GET", "http_route": "/stream"}
    duration = metric(
        server.url,
        "http_server_request_duration_seconds_sum",
        **route,
        http_response_status_code="200",
    )
    first_byte = metric(server.url, "http_server_time_to_first_byte_seconds_sum", **route)
    assert duration >= 0.3
    assert 0.1 <= first_byte < 0.3
    assert metric(server.url, "http_server_response_body_size_bytes_sum", **route) == len(body)


def test_background_task_is_not_in_the_duration(server: Any) -> None:
    """A response followed by a 0.5 s background task records well under 0.5 s."""
    started = time.monotonic()
    response = httpx.get(f"{server.url}/background", timeout=10)
    elapsed = time.monotonic() - started

    assert response.text == "queued"
    assert elapsed < 0.5
    duration = metric(
        server.url,
        "http_server_request_duration_seconds_sum",
        http_request_method="GET",
        http_route="/background",
        http_response_status_code="200",
    )
    assert 0 < duration < 0.5


def test_client_disconnect_mid_stream_is_an_abort(server: Any) -> None:
    """A client that reads part of an endless stream and hangs up counts as aborted."""
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
        sock.sendall(b"GET /endless HTTP/1.1\r\nHost: test\r\n\r\n")
        received = b""
        while len(received) < 4096:
            received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200")

    labels = {"http_request_method": "GET", "http_route": "/endless", "reason": "client_disconnect"}
    wait_for(lambda: metric(server.url, "http_server_aborted_requests_total", **labels) == 1.0)
    assert 0.0 == metric(
        server.url, "http_server_active_requests", http_request_method="GET", http_route="/endless"
    )


def test_exception_is_counted_once_and_reaches_the_server(server: Any) -> None:
    """A raising handler: the client gets 500, one count with the type, uvicorn logs it."""
    response = httpx.get(f"{server.url}/boom", timeout=10)

    assert response.status_code == 500
    assert 1.0 == metric(
        server.url,
        "http_server_request_duration_seconds_count",
        http_request_method="GET",
        http_route="/boom",
        http_response_status_code="500",
    )
    assert 1.0 == metric(
        server.url,
        "http_server_exceptions_total",
        http_request_method="GET",
        http_route="/boom",
        error_type="LookupError",
    )
    wait_for(lambda: "LookupError: handler failed" in Path(server.log_path).read_text())


def test_chunked_upload_size_is_counted_from_the_bytes(server: Any) -> None:
    """A chunked request body without Content-Length is measured by what arrived."""

    def body() -> Iterator[bytes]:
        for _ in range(100):
            yield b"u" * 1024

    response = httpx.post(f"{server.url}/upload", content=body(), timeout=10)

    assert response.json() == {"received": 102_400}
    assert 102_400 == metric(
        server.url,
        "http_server_request_body_size_bytes_sum",
        http_request_method="POST",
        http_route="/upload",
    )


def test_request_id_is_echoed_by_the_real_server(server: Any) -> None:
    """The header goes out through uvicorn too."""
    response = httpx.get(f"{server.url}/pid", headers={"X-Request-ID": "via-uvicorn"}, timeout=10)

    assert response.headers["x-request-id"] == "via-uvicorn"


@pytest.mark.slow
def test_multiprocess_totals_are_exact_across_two_workers(tmp_path: Path) -> None:
    """Under ``uvicorn --workers 2`` every scrape reports the requests of both workers."""
    directory = tmp_path / "prometheus-multiproc"
    directory.mkdir()
    with start_uvicorn(
        APP, args=["--workers", "2"], env={"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    ) as running:
        pids = asyncio.run(fetch_pids(running.url, 200))
        totals = {
            metric(
                running.url,
                "http_server_request_duration_seconds_count",
                http_request_method="GET",
                http_route="/pid",
                http_response_status_code="200",
            )
            for _ in range(10)
        }

    assert len(set(pids)) == 2
    assert {200.0} == totals


async def fetch_pids(base_url: str, count: int) -> list[int]:
    """``count`` requests, each on a new connection, so both workers get some."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=10) as http:
        semaphore = asyncio.Semaphore(20)

        async def one() -> int:
            async with semaphore:
                return int((await http.get(f"{base_url}/pid")).json()["pid"])

        return list(await asyncio.gather(*(one() for _ in range(count))))
