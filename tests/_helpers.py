"""Small helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

DURATION_COUNT = "http_server_request_duration_seconds_count"


def samples(registry: CollectorRegistry, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called ``name`` in ``registry``, as (labels, value)."""
    return [
        (dict(sample.labels), sample.value)
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name
    ]


def recorded_requests(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    """(method, route, status) -> number of requests in the duration histogram."""
    return {
        (
            labels["http_request_method"],
            labels["http_route"],
            labels["http_response_status_code"],
        ): value
        for labels, value in samples(registry, DURATION_COUNT)
        if value
    }


def client(app: Any, **kwargs: Any) -> httpx.AsyncClient:
    """An httpx client calling ``app`` in-process (buffers bodies; no real server)."""
    transport_args = {
        k: kwargs.pop(k) for k in ("root_path", "raise_app_exceptions") if k in kwargs
    }
    transport = httpx.ASGITransport(app, **transport_args)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver", **kwargs)


class FakeClock:
    """A clock the test moves by hand: ``clock.now += 2.5``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advancing(self, seconds: float) -> Callable[[], None]:
        """A callable that moves the clock by ``seconds``."""

        def advance() -> None:
            self.now += seconds

        return advance
