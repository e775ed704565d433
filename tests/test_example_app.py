"""The example app under a real uvicorn on a real PostgreSQL: each guideline, demonstrated.

The app's own metrics (``/metrics``) and JSON log are the evidence: a second read of a user
is a cache hit and an update invalidates it; the upstream aggregate takes the slowest call's
time, not the sum; the pool gauges and the acquire wait move under load; a request over 1 s
logs ``slow_request`` with its breakdown; the opt-in blocking endpoint is caught by the
event-loop watchdog; without ``DATABASE_URL`` the app brings (and removes) its own PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from example_app.summary import Samples, parse_samples
from tests._uvicorn import RunningServer, start_uvicorn

pytestmark = [pytest.mark.postgres, pytest.mark.uvicorn]

APP = "example_app.main:app"
UPSTREAM = "example_app.upstream:app"
START_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    with start_uvicorn(UPSTREAM, args=["--no-access-log"], ready_path="/health") as server:
        yield server


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("example-app") / "app.log"


@pytest.fixture(scope="module")
def app(postgres_dsn: str, upstream: RunningServer, log_file: Path) -> Iterator[RunningServer]:
    env = {
        "DATABASE_URL": postgres_dsn,
        "EXAMPLE_UPSTREAM_URL": upstream.url,
        "EXAMPLE_LOG_FILE": str(log_file),
        "EXAMPLE_ENABLE_BLOCKING": "1",
        "EXAMPLE_SLOW_REPORT_RATE": "0",  # only ?delay= makes a report slow: deterministic
    }
    with start_uvicorn(
        APP, args=["--no-access-log"], env=env, ready_path="/health", timeout=START_TIMEOUT_S
    ) as server:
        yield server


def metrics(server: RunningServer) -> Samples:
    return parse_samples(httpx.get(f"{server.url}/metrics").text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for found, v in samples.get(name, []) if labels.items() <= found.items())


def log_events(log_file: Path, event: str, timeout: float = 3.0, **fields: Any) -> list[Any]:
    """The JSON log lines of ``event`` with ``fields``, waiting a moment for them to appear."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log_file.read_text().splitlines() if log_file.exists() else []
        found = [
            record
            for record in map(json.loads, lines)
            if record.get("event") == event and fields.items() <= record.items()
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def new_user(server: RunningServer) -> dict[str, Any]:
    email = f"{uuid.uuid4().hex[:12]}@example.com"
    body = {"name": "Ada", "email": email, "password": "correct horse"}
    response = httpx.post(f"{server.url}/users", json=body)
    assert 201 == response.status_code, response.text
    user: dict[str, Any] = response.json()
    return user


def cache_counts(server: RunningServer, cache: str) -> tuple[float, float, float]:
    samples = metrics(server)
    return (
        value(samples, "cache_requests_total", cache_name=cache, result="hit"),
        value(samples, "cache_requests_total", cache_name=cache, result="miss"),
        value(samples, "cache_evictions_total", cache_name=cache, reason="invalidated"),
    )


def test_second_read_of_a_user_is_a_cache_hit(app: RunningServer) -> None:
    user = new_user(app)
    hits, misses, _ = cache_counts(app, "users")

    first = httpx.get(f"{app.url}/users/{user['id']}")
    second = httpx.get(f"{app.url}/users/{user['id']}")

    assert 200 == first.status_code == second.status_code
    assert first.json() == second.json() == user
    assert (hits + 1, misses + 1) == cache_counts(app, "users")[:2]


def test_update_and_delete_invalidate_the_cached_user(app: RunningServer) -> None:
    user = new_user(app)
    url = f"{app.url}/users/{user['id']}"
    httpx.get(url)  # cached now
    hits, misses, invalidated = cache_counts(app, "users")

    updated = httpx.put(url, json={"name": "Grace", "email": user["email"]})
    after_update = httpx.get(url)

    assert 200 == updated.status_code
    assert "Grace" == after_update.json()["name"]  # not the stale cached "Ada"
    assert (hits, misses + 1, invalidated + 1) == cache_counts(app, "users")

    assert 204 == httpx.delete(url).status_code
    assert 404 == httpx.get(url).status_code
    assert invalidated + 2 == cache_counts(app, "users")[2]


def test_configuration_is_served_from_lru_cache(app: RunningServer) -> None:
    hits = cache_counts(app, "settings")[0]

    assert 200 == httpx.get(f"{app.url}/config").status_code

    assert cache_counts(app, "settings")[0] > hits


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/users", {"name": "", "email": "not-an-email", "password": "short"}),
        ("POST", "/users", {"name": "Ada"}),
        ("GET", "/users?limit=0", None),
        ("GET", "/users?limit=101", None),
        ("GET", "/users/abc", None),
        ("GET", "/users/99999999999999999999", None),
        ("PUT", "/users/1", {"name": "x" * 101, "email": "a@b.c"}),
        ("GET", "/report?delay=-1", None),
        ("GET", "/overview?delay=9", None),
    ],
)
def test_invalid_input_is_answered_422(
    app: RunningServer, method: str, path: str, body: dict[str, Any] | None
) -> None:
    response = httpx.request(method, f"{app.url}{path}", json=body)

    assert 422 == response.status_code, response.text


def test_users_are_listed_page_by_page(app: RunningServer) -> None:
    created = [new_user(app)["id"] for _ in range(3)]
    after, seen = created[0] - 1, []

    while True:
        page = httpx.get(f"{app.url}/users", params={"limit": 2, "after": after}).json()
        seen += [item["id"] for item in page["items"]]
        if page["next_after"] is None:
            break
        after = page["next_after"]

    assert created == [user_id for user_id in seen if user_id in created]
    assert sorted(set(seen)) == seen


def test_upstream_calls_run_concurrently(app: RunningServer) -> None:
    url = f"{app.url}/overview?delay=0.3&delay=0.3&delay=0.5"
    httpx.get(f"{app.url}/overview")  # warm the upstream connections

    start = time.perf_counter()
    response = httpx.get(url, timeout=10)
    elapsed = time.perf_counter() - start

    assert 200 == response.status_code
    assert {"weather", "news", "quotes"} == set(response.json())
    assert 0.5 <= elapsed < 0.9, (
        f"took {elapsed:.3f} s: the three calls (1.1 s) were not concurrent"
    )
    samples = metrics(app)
    for source in ("weather", "news", "quotes"):
        count = "operation_duration_seconds_count"
        assert value(samples, count, operation=f"upstream.{source}", outcome="ok") >= 1


async def test_pool_gauges_and_acquire_wait_move_under_load(app: RunningServer) -> None:
    before = metrics(app)
    assert 10.0 == value(before, "db_client_connection_max", pool_name="main")
    assert 2.0 == value(before, "db_client_connection_min", pool_name="main")
    wait_sum = value(before, "db_client_connection_wait_time_seconds_sum", pool_name="main")
    peak_used = peak_pending = 0.0

    limits = httpx.Limits(max_connections=40)
    async with httpx.AsyncClient(base_url=app.url, timeout=30, limits=limits) as client:
        # 20 reports, each holding a connection 0.4 s, on a pool of 10: half of them queue.
        sampling = asyncio.gather(*(client.get("/report?delay=0.4") for _ in range(20)))
        while not sampling.done():
            text = (await client.get("/metrics")).text
            samples = parse_samples(text)
            peak_used = max(peak_used, value(samples, "db_client_connection_count", state="used"))
            peak_pending = max(
                peak_pending, value(samples, "db_client_connection_pending_requests")
            )
            await asyncio.sleep(0.05)
        responses = await sampling

    assert all(200 == r.status_code for r in responses)
    assert 10.0 == peak_used
    assert peak_pending > 0
    after = metrics(app)
    assert value(after, "db_client_connection_wait_time_seconds_sum", pool_name="main") > (
        wait_sum + 0.1
    )
    assert 0.0 == value(after, "db_client_connection_count", pool_name="main", state="used")


def test_a_request_over_one_second_logs_slow_request_with_its_breakdown(
    app: RunningServer, log_file: Path
) -> None:
    request_id = uuid.uuid4().hex
    slow_before = value(metrics(app), "http_server_slow_requests_total", http_route="/report")

    response = httpx.get(
        f"{app.url}/report?delay=1.1", headers={"X-Request-ID": request_id}, timeout=10
    )

    assert 200 == response.status_code
    (line,) = log_events(log_file, "slow_request", request_id=request_id)
    assert ("GET", "/report", "/report", 200) == (
        line["method"],
        line["route"],
        line["path"],
        line["status"],
    )
    assert line["duration_s"] >= 1.1
    assert 1.0 == line["threshold_s"]
    assert {"report.build", "upstream.quotes"} <= set(line["operations"])
    assert line["operations"]["report.build"]["total_s"] >= 1.1
    assert line["db"]["queries"] >= 2  # statistics and recent users
    assert line["db"]["total_s"] >= 1.1  # the heavy query is where the time went
    assert "acquire_wait_s" in line["db"]
    assert {"hits", "misses"} <= set(line["cache"])
    (operation,) = log_events(log_file, "slow_operation", request_id=request_id)
    assert "report.build" == operation["operation"]
    after = value(metrics(app), "http_server_slow_requests_total", http_route="/report")
    assert slow_before + 1 == after


def test_fast_requests_log_nothing_slow(app: RunningServer, log_file: Path) -> None:
    request_id = uuid.uuid4().hex

    httpx.get(f"{app.url}/report?delay=0", headers={"X-Request-ID": request_id})

    assert [] == log_events(log_file, "slow_request", timeout=0.3, request_id=request_id)


def test_request_count_and_average_time_are_in_the_metrics(app: RunningServer) -> None:
    for _ in range(3):
        httpx.get(f"{app.url}/health")

    samples = metrics(app)
    labels = {"http_request_method": "GET", "http_route": "/health"}
    count = value(samples, "http_server_request_duration_seconds_count", **labels)
    total = value(samples, "http_server_request_duration_seconds_sum", **labels)

    assert count >= 3
    assert 0 < total / count < 1.0


def test_the_watchdog_catches_the_opt_in_blocking_endpoint(
    app: RunningServer, log_file: Path
) -> None:
    blocked = value(metrics(app), "asyncio_event_loop_blocked_total")

    response = httpx.get(f"{app.url}/blocking?seconds=0.4", timeout=10)

    assert 200 == response.status_code
    stacks = [e["stack"] or "" for e in log_events(log_file, "event_loop_blocked")]
    assert any("example_app/main.py" in s and " in blocking" in s for s in stacks), stacks
    assert value(metrics(app), "asyncio_event_loop_blocked_total") > blocked


def test_without_database_url_the_app_brings_its_own_postgres(
    upstream: RunningServer, tmp_path: Path
) -> None:
    log = tmp_path / "app.log"
    env = {"DATABASE_URL": "", "EXAMPLE_UPSTREAM_URL": upstream.url, "EXAMPLE_LOG_FILE": str(log)}

    with start_uvicorn(APP, env=env, ready_path="/health", timeout=START_TIMEOUT_S) as server:
        user = new_user(server)
        assert user == httpx.get(f"{server.url}/users/{user['id']}").json()
        assert 404 == httpx.get(f"{server.url}/blocking").status_code  # off unless enabled
        (started,) = log_events(log, "embedded_postgres_started")
        assert Path(started["directory"]).is_dir()

    assert log_events(log, "embedded_postgres_removed", directory=started["directory"])
    assert not Path(started["directory"]).exists()
