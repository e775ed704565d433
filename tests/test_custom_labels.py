"""Custom request labels and extra exemplar labels: values, bounds, validation and faults."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from structlog.testing import capture_logs

from asgi_perfmon import PerfMonMiddleware
from asgi_perfmon._request_labels import LABEL_ERROR
from asgi_perfmon._types import Scope
from tests._helpers import FakeClock, client, samples

DURATION_COUNT = "http_server_request_duration_seconds_count"


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def tenant(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-tenant":
            return value.decode("latin-1")
    return None


def app_with(registry: CollectorRegistry, **options: Any) -> PerfMonMiddleware:
    routes = [Route("/items/{item_id}", ok)]
    return PerfMonMiddleware(Starlette(routes=routes), registry=registry, **options)


def counts_by(registry: CollectorRegistry, label: str) -> dict[str, float]:
    """Requests counted per value of ``label``, summed over the other labels."""
    counts: dict[str, float] = {}
    for labels, value in samples(registry, DURATION_COUNT):
        counts[labels[label]] = counts.get(labels[label], 0.0) + value
    return counts


async def test_static_and_computed_labels_are_on_every_request_metric(
    registry: CollectorRegistry,
) -> None:
    app = app_with(registry, labels={"service": "billing", "tenant": tenant})
    async with client(app) as http:
        await http.get("/items/1", headers={"X-Tenant": "acme"})
        await http.get("/items/2", headers={"X-Tenant": "acme"})
        await http.get("/items/3")

    assert {"acme": 2.0, "": 1.0} == counts_by(registry, "tenant")
    assert {"billing": 3.0} == counts_by(registry, "service")
    for name in (
        "http_server_active_requests",
        "http_server_time_to_first_byte_seconds_count",
        "http_server_request_body_size_bytes_count",
        "http_server_response_body_size_bytes_count",
    ):
        tenants = {labels["tenant"] for labels, _ in samples(registry, name)}
        assert {"acme", ""} == tenants, name


async def test_a_raising_label_callback_is_logged_once_and_never_breaks_the_app(
    registry: CollectorRegistry,
) -> None:
    def broken(scope: Scope) -> str:
        raise KeyError("no such header")

    app = app_with(registry, labels={"tenant": broken})
    with capture_logs() as logs:
        async with client(app) as http:
            statuses = [(await http.get(f"/items/{n}")).status_code for n in range(5)]

    assert [200] * 5 == statuses
    assert {LABEL_ERROR: 5.0} == counts_by(registry, "tenant")
    failures = [entry for entry in logs if entry["event"] == "instrumentation_failed"]
    assert 1 == len(failures)
    assert ("label_callback", "tenant", "KeyError") == (
        failures[0]["where"],
        failures[0]["label"],
        failures[0]["error_type"],
    )


async def test_a_label_callback_returning_a_non_string_counts_as_an_error(
    registry: CollectorRegistry,
) -> None:
    app = app_with(registry, labels={"shard": lambda scope: 7})
    with capture_logs() as logs:
        async with client(app) as http:
            response = await http.get("/items/1")

    assert 200 == response.status_code
    assert {LABEL_ERROR: 1.0} == counts_by(registry, "shard")
    assert ["TypeError"] == [e["error_type"] for e in logs if e["where"] == "label_callback"]


async def test_hostile_label_values_are_capped(registry: CollectorRegistry) -> None:
    """A label taken from a header cannot grow the series beyond max_label_values."""
    app = app_with(registry, labels={"tenant": tenant}, max_label_values=10)
    async with client(app) as http:
        for n in range(50):
            await http.get("/items/1", headers={"X-Tenant": f"t{n}"})

    counts = counts_by(registry, "tenant")
    assert 11 == len(counts)  # ten values, then __overflow__
    assert 40.0 == counts["__overflow__"]
    assert 50.0 == sum(counts.values())


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"http_route": "x"}, "clashes"),
        ({"le": "x"}, "clashes"),
        ({"bad-name": "x"}, "valid Prometheus label names"),
        ({"__private": "x"}, "valid Prometheus label names"),
        ({"tenant": 3}, "must be a str or a callable"),
        (["tenant"], "must be a mapping"),
    ],
)
def test_invalid_custom_labels_fail_at_construction(labels: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        app_with(CollectorRegistry(), labels=labels)


def test_other_custom_labels_on_the_same_registry_are_a_clear_error() -> None:
    registry = CollectorRegistry()
    app_with(registry, labels={"tenant": tenant})
    with pytest.raises(ValueError, match="other custom labels"):
        app_with(registry, labels={"region": "eu"})


def exemplars(registry: CollectorRegistry) -> list[dict[str, str]]:
    return [
        dict(sample.exemplar.labels)
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "http_server_request_duration_seconds_bucket" and sample.exemplar
    ]


async def test_exemplar_labels_are_added_to_the_request_id(registry: CollectorRegistry) -> None:
    app = app_with(registry, exemplar_labels=lambda scope: {"trace_id": "4bf92f3577b34da6"})
    async with client(app) as http:
        await http.get("/items/1", headers={"X-Request-ID": "req-1"})

    assert [{"trace_id": "4bf92f3577b34da6", "request_id": "req-1"}] == exemplars(registry)


async def test_the_request_id_is_left_out_when_it_does_not_fit(
    registry: CollectorRegistry,
) -> None:
    """OpenMetrics allows 128 characters of exemplar labels; the user's labels come first."""
    trace = "t" * 100
    app = app_with(registry, exemplar_labels=lambda scope: {"trace_id": trace})
    async with client(app) as http:
        await http.get("/items/1", headers={"X-Request-ID": "r" * 30})

    assert [{"trace_id": trace}] == exemplars(registry)


@pytest.mark.parametrize(
    "callback",
    [
        lambda scope: 1 / 0,
        lambda scope: {"trace_id": 42},
        lambda scope: {"bad name": "x"},
        lambda scope: {"trace_id": "x" * 200},
        lambda scope: "not a mapping",
    ],
)
async def test_a_failing_exemplar_callback_falls_back_to_the_request_id(
    registry: CollectorRegistry, callback: Any
) -> None:
    clock = FakeClock()

    async def slow(request: Request) -> Response:
        clock.now += 2.0  # slow requests always get an exemplar: the callback runs every time
        return PlainTextResponse("ok")

    app = PerfMonMiddleware(
        Starlette(routes=[Route("/s", slow)]),
        registry=registry,
        clock=clock,
        exemplar_labels=callback,
    )
    with capture_logs() as logs:
        async with client(app) as http:
            statuses = [
                (await http.get("/s", headers={"X-Request-ID": f"id-{n}"})).status_code
                for n in range(3)
            ]

    assert [200, 200, 200] == statuses
    assert [{"request_id": "id-2"}] == exemplars(registry)  # the latest in its bucket
    failures = [e for e in logs if e.get("where") == "exemplar_callback"]
    assert 1 == len(failures)


def test_a_non_callable_exemplar_option_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="exemplar_labels must be a callable"):
        app_with(CollectorRegistry(), exemplar_labels={"trace_id": "x"})
