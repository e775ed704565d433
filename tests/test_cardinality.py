"""Hostile paths, methods and label values leave the number of series bounded."""

from __future__ import annotations

import random
import string

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from structlog.testing import capture_logs

from asgi_perfmon import PerfMonMiddleware
from asgi_perfmon._labels import OVERFLOW
from asgi_perfmon._routes import UNMATCHED
from asgi_perfmon.metrics import STANDARD_METHODS
from tests._helpers import client, recorded_requests, samples


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def series_count(registry: CollectorRegistry) -> int:
    return sum(len(family.samples) for family in registry.collect())


async def test_random_paths_and_methods_leave_series_bounded(registry: CollectorRegistry) -> None:
    """10,000 random paths and 50 random methods: routes are templates, methods bounded."""
    rng = random.Random(7)
    app = Starlette(routes=[Route("/items/{item_id}", ok)])
    middleware = PerfMonMiddleware(app, registry=registry)
    methods = ["".join(rng.choices(string.ascii_uppercase, k=6)) for _ in range(50)]
    async with client(middleware) as http:
        for n in range(10_000):
            kind = n % 3
            path = (
                f"/items/{rng.randrange(10**9)}"
                if kind == 0
                else f"/{''.join(rng.choices(string.ascii_letters + '%/._-', k=20))}"
            )
            method = methods[n % 50] if n % 7 == 0 else "GET"
            await http.request(method, path)

    recorded = recorded_requests(registry)
    routes = {route for _, route, _ in recorded}
    methods_seen = {method for method, _, _ in recorded}
    assert routes <= {"/items/{item_id}", UNMATCHED}
    assert methods_seen <= STANDARD_METHODS | {"_OTHER"}
    assert sum(recorded.values()) == 10_000
    assert series_count(registry) < 400
    assert len(middleware._routes._cache) <= 4096


async def test_label_cap_folds_into_overflow_and_warns_once(registry: CollectorRegistry) -> None:
    """Past ``max_label_values`` distinct routes, new values fold into ``__overflow__``."""
    routes = [Route(f"/r{n}", ok) for n in range(10)]
    middleware = PerfMonMiddleware(Starlette(routes=routes), registry=registry, max_label_values=3)
    with capture_logs() as logs:
        async with client(middleware) as http:
            for n in range(10):
                await http.get(f"/r{n}")

    recorded = recorded_requests(registry)
    assert {"/r0", "/r1", "/r2", OVERFLOW} == {route for _, route, _ in recorded}
    assert 7.0 == recorded[("GET", OVERFLOW, "200")]
    overflow = dict(
        (labels["metric"], value)
        for labels, value in samples(registry, "asgi_perfmon_label_overflow_total")
    )
    assert overflow["http_server_request_duration_seconds"] >= 7
    warnings = [entry for entry in logs if entry["event"] == "label_overflow"]
    assert len({entry["metric"] for entry in warnings}) == len(warnings)
    assert "http_server_request_duration_seconds" in {entry["metric"] for entry in warnings}


async def test_hostile_header_values_do_not_create_series(registry: CollectorRegistry) -> None:
    """Thousands of distinct request ids and hosts add no series."""
    middleware = PerfMonMiddleware(Starlette(routes=[Route("/", ok)]), registry=registry)
    async with client(middleware) as http:
        await http.get("/")
        before = series_count(registry)
        for n in range(2000):
            await http.get("/", headers={"X-Request-ID": f"id-{n}", "Host": f"h{n}.example"})

    assert before == series_count(registry)
