"""The app under test and the instrumentation variants compared against it.

Every variant is the same FastAPI app with one observability library added the way its
documentation recommends, labelled by route template, each with its own registry or meter
provider where the library allows it (starlette-exporter only knows the global registry, so
the sections that render or count its metrics run it in a process of its own).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from asgi_perfmon._types import Receive, Scope, Send

BARE = "bare"
PERFMON = "asgi-perfmon"
NOOP = "noop-asgi"
UNINSTRUMENTED = (BARE, NOOP)
"""Variants without metrics: no /metrics section, no series to count."""
VARIANT_ENV = "PERFMON_BENCH_VARIANT"
ROUTES_ENV = "PERFMON_BENCH_ROUTES"
METHODS = ("GET", "POST", "PUT", "DELETE")
STATUSES = (200, 201, 400, 404, 500)
STREAM_CHUNKS = 4
STREAM_CHUNK = b"x" * 256


class Order(BaseModel):
    """The JSON body of ``POST /orders``."""

    sku: str
    quantity: int
    note: str | None = None


class Instrumented:
    """One variant's app, with what the benchmark needs to read its metrics back."""

    def __init__(self, app: Any, render: Callable[[], bytes] | None) -> None:
        self.app = app
        self.render = render
        """Render the variant's exposition (Prometheus text), or None when it has none."""

    def series(self) -> int:
        """Sample lines in the exposition: what Prometheus would store as series."""
        if self.render is None:
            return 0
        lines = self.render().decode().splitlines()
        return sum(1 for line in lines if line and not line.startswith("#"))


@dataclass(frozen=True)
class Variant:
    """An instrumentation library (or none) and how to add it to the app."""

    name: str
    description: str
    requires: tuple[str, ...]
    route_template: bool
    """Labels requests by route template: counts for the 'cheapest peer' comparison."""
    build: Callable[[FastAPI], Instrumented]

    def available(self) -> bool:
        """Whether the packages this variant needs are installed."""
        return all(importlib.util.find_spec(module) is not None for module in self.requires)


class NoOpMiddleware:
    """A pure-ASGI layer that does nothing: the floor of any middleware."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def base_app(extra_routes: int = 0) -> FastAPI:
    """The small FastAPI app every variant instruments.

    ``GET /items/{item_id}`` (a parametrized JSON route), ``POST /orders`` (a JSON body
    validated by pydantic), ``GET /stream`` (a streaming response of 4 chunks) and, for the
    ``/metrics`` section, ``extra_routes`` routes ``/r{i}/{key}`` answering GET, POST, PUT and
    DELETE with the status asked for in ``?status=``.
    """
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/items/{item_id}")
    async def get_item(item_id: int) -> dict[str, Any]:
        return {"item_id": item_id, "name": "widget", "price": 12.5, "tags": ["a", "b"]}

    @app.post("/orders", status_code=201)
    async def create_order(order: Order) -> dict[str, Any]:
        return {"id": 1, "sku": order.sku, "quantity": order.quantity, "status": "created"}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(STREAM_CHUNKS):
                yield STREAM_CHUNK

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    async def status_endpoint(request: Request) -> Response:
        return Response(b"", status_code=int(request.query_params.get("status", "200")))

    for index in range(extra_routes):
        app.add_route(f"/r{index}/{{key}}", status_endpoint, methods=list(METHODS))
    return app


def _bare(app: FastAPI) -> Instrumented:
    return Instrumented(app, None)


def _noop(app: FastAPI) -> Instrumented:
    app.add_middleware(NoOpMiddleware)
    return Instrumented(app, None)


def _perfmon(app: FastAPI) -> Instrumented:
    from asgi_perfmon import PerfMonMiddleware, metrics_app

    registry = CollectorRegistry()
    app.add_middleware(PerfMonMiddleware, registry=registry)
    app.add_route("/metrics", metrics_app(registry))  # type: ignore[arg-type]  # an ASGI app
    return Instrumented(app, lambda: generate_latest(registry))


def _instrumentator(app: FastAPI) -> Instrumented:
    from prometheus_fastapi_instrumentator import Instrumentator

    registry = CollectorRegistry()
    Instrumentator(registry=registry).instrument(app).expose(app)
    return Instrumented(app, lambda: generate_latest(registry))


def _starlette_exporter(group_paths: bool) -> Callable[[FastAPI], Instrumented]:
    def build(app: FastAPI) -> Instrumented:
        from starlette_exporter import PrometheusMiddleware, handle_metrics

        prefix = "starlette" if group_paths else "starlette_raw"
        app.add_middleware(PrometheusMiddleware, group_paths=group_paths, prefix=prefix)
        app.add_route("/metrics", handle_metrics)
        return Instrumented(app, lambda: _render_prefixed(prefix))

    return build


def _render_prefixed(prefix: str) -> bytes:
    """starlette-exporter's families only (it registers into the global registry)."""
    names = [name for name in REGISTRY._names_to_collectors if name.startswith(prefix + "_")]
    return generate_latest(REGISTRY.restricted_registry(names))


def _opentelemetry(app: FastAPI) -> Instrumented:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.metrics import MeterProvider

    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    app.add_middleware(OpenTelemetryMiddleware, meter_provider=provider)

    def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    # The exporter's documented endpoint is prometheus-client's HTTP server, which renders
    # in its own thread; a sync route renders in Starlette's thread pool, the same way.
    app.add_route("/metrics", lambda request: metrics())
    return Instrumented(app, lambda: generate_latest(registry))


OTEL_REQUIRES = (
    "opentelemetry.instrumentation.asgi",
    "opentelemetry.sdk",
    "opentelemetry.exporter.prometheus",
)

VARIANTS: tuple[Variant, ...] = (
    Variant(BARE, "FastAPI app, no middleware", (), False, _bare),
    Variant(NOOP, "one pure-ASGI layer that does nothing", (), False, _noop),
    Variant(PERFMON, "PerfMonMiddleware(), all defaults", (), True, _perfmon),
    Variant(
        "prometheus-fastapi-instrumentator",
        "Instrumentator().instrument(app)",
        ("prometheus_fastapi_instrumentator",),
        True,
        _instrumentator,
    ),
    Variant(
        "starlette-exporter",
        "PrometheusMiddleware(group_paths=True)",
        ("starlette_exporter",),
        True,
        _starlette_exporter(group_paths=True),
    ),
    Variant(
        "starlette-exporter (raw paths)",
        "PrometheusMiddleware(group_paths=False): raw-path labels, unbounded",
        ("starlette_exporter",),
        False,
        _starlette_exporter(group_paths=False),
    ),
    Variant(
        "opentelemetry-asgi",
        "OpenTelemetryMiddleware + MeterProvider(PrometheusMetricReader)",
        OTEL_REQUIRES,
        True,
        _opentelemetry,
    ),
)
BY_NAME = {variant.name: variant for variant in VARIANTS}


def build(name: str, extra_routes: int = 0) -> Instrumented:
    """The app of variant ``name``."""
    return BY_NAME[name].build(base_app(extra_routes))


def available_variants(names: tuple[str, ...] | None = None) -> tuple[list[str], list[str]]:
    """(installed, missing) variant names, in table order."""
    chosen = [v for v in VARIANTS if names is None or v.name in names]
    return [v.name for v in chosen if v.available()], [v.name for v in chosen if not v.available()]


def uvicorn_app() -> Any:
    """The ``--factory`` uvicorn runs: the variant named in ``PERFMON_BENCH_VARIANT``."""
    return build(os.environ[VARIANT_ENV], int(os.environ.get(ROUTES_ENV, "0"))).app
