"""Section 1: per-request cost in process, every variant driven directly (no network).

The variants take turns in every round (the order rotates from round to round), each timing
``repeats`` batches of requests with ``perf_counter_ns``, the variants' batches interleaved.
The result per round is the fastest batch's mean per request: on a shared machine a batch is
only ever slowed down by other work, never sped up, and that slowdown grows every variant's
cost in proportion, so the fastest of a few adjacent batches is the closest to the cost
itself (the estimator ``timeit`` recommends). Reported: the median over rounds, and the
overhead as the median of the paired differences to the bare app in the same round. Every
batch is kept in the JSON (``raw_batches``), so other estimators can be computed from it.

Garbage collection is off inside each timed batch and a young-generation collection runs
between batches, outside the timing, so a collection triggered by one variant's garbage is
not charged to another. Every app runs its lifespan first, so asgi-perfmon's event-loop
monitor (a default feature) is running during the measurement.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asgi_perfmon._types import Scope
from benchmarks import variants
from benchmarks.driver import Lifespan, call, http_scope, json_request
from benchmarks.stats import summarize

ID_SPACE = 1_000_000
"""Ids cycle over this many values, so per-path caches miss as they would in production."""


@dataclass(frozen=True)
class Scenario:
    """One kind of request, a fresh path per request where the route takes a parameter."""

    name: str
    expected_status: int
    make: Callable[[int], tuple[Scope, bytes]]


def _item(number: int) -> tuple[Scope, bytes]:
    return http_scope("GET", f"/items/{number % ID_SPACE}"), b""


def _order(number: int) -> tuple[Scope, bytes]:
    return json_request("POST", "/orders", {"sku": f"SKU-{number % 997}", "quantity": 3})


def _missing(number: int) -> tuple[Scope, bytes]:
    return http_scope("GET", f"/no/such/page/{number % ID_SPACE}"), b""


def _stream(number: int) -> tuple[Scope, bytes]:
    return http_scope("GET", "/stream"), b""


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("GET /items/{item_id}", 200, _item),
    Scenario("POST /orders (JSON body)", 201, _order),
    Scenario("GET 404 (unmatched)", 404, _missing),
    Scenario("GET /stream (streaming)", 200, _stream),
)
PARAMETRIZED = SCENARIOS[0].name


@dataclass(frozen=True)
class Settings:
    """How much to measure."""

    rounds: int
    batch: int
    warmup: int
    repeats: int


FULL = Settings(rounds=41, batch=200, warmup=500, repeats=3)
SMOKE = Settings(rounds=3, batch=20, warmup=20, repeats=2)


async def _time_batch(app: Any, requests: list[tuple[Scope, bytes]], expected: int) -> float:
    """Mean µs per request over ``requests``, GC off while timing."""
    gc.collect(1)
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for scope, body in requests:
            status = await call(app, scope, body)
        elapsed = time.perf_counter_ns() - start
    finally:
        gc.enable()
    if status != expected:
        msg = f"expected status {expected}, got {status}"
        raise RuntimeError(msg)
    return elapsed / len(requests) / 1000


async def _warm_up(
    apps: dict[str, variants.Instrumented], settings: Settings, counter: list[int]
) -> dict[str, Any]:
    """Warm every variant on every scenario; check they answer and record; return checks."""
    checks: dict[str, Any] = {}
    for name, instrumented in apps.items():
        for scenario in SCENARIOS:
            for _ in range(settings.warmup):
                counter[0] += 1
                scope, body = scenario.make(counter[0])
                status = await call(instrumented.app, scope, body)
                if status != scenario.expected_status:
                    msg = f"{name}: {scenario.name} answered {status}"
                    raise RuntimeError(msg)
        exposition = b"" if instrumented.render is None else instrumented.render()
        checks[name] = {
            "series_after_warmup": instrumented.series(),
            "labels_route_template": b"/items/{item_id}" in exposition,
        }
    return checks


async def _measure(names: list[str], settings: Settings) -> dict[str, Any]:
    apps = {name: variants.build(name) for name in names}
    lifespans = [Lifespan(instrumented.app) for instrumented in apps.values()]
    for lifespan in lifespans:
        await lifespan.start()
    counter = [0]
    try:
        checks = await _warm_up(apps, settings, counter)
        samples: dict[str, dict[str, list[float]]] = {
            scenario.name: {name: [] for name in names} for scenario in SCENARIOS
        }
        batches: dict[str, dict[str, list[list[float]]]] = {
            scenario.name: {name: [] for name in names} for scenario in SCENARIOS
        }
        for round_number in range(settings.rounds):
            shift = round_number % len(names)
            order = names[shift:] + names[:shift]
            for scenario in SCENARIOS:
                timed: dict[str, list[float]] = {name: [] for name in names}
                for _ in range(settings.repeats):
                    for name in order:
                        requests = []
                        for _ in range(settings.batch):
                            counter[0] += 1
                            requests.append(scenario.make(counter[0]))
                        timed[name].append(
                            await _time_batch(apps[name].app, requests, scenario.expected_status)
                        )
                for name in names:
                    samples[scenario.name][name].append(min(timed[name]))
                    batches[scenario.name][name].append(timed[name])
    finally:
        for lifespan in lifespans:
            await lifespan.stop()
    return {
        "unit": "µs per request",
        "settings": settings.__dict__,
        "checks": checks,
        "scenarios": {
            scenario: summarize(rounds, variants.BARE) for scenario, rounds in samples.items()
        },
        "every_batch_overhead": {
            scenario: _every_batch_overhead(rounds, variants.BARE)
            for scenario, rounds in batches.items()
        },
        "raw": samples,
        "raw_batches": batches,
    }


def _every_batch_overhead(batches: dict[str, list[list[float]]], baseline: str) -> dict[str, float]:
    """The overhead if every batch counted, not the fastest per round: the median of the
    differences between each batch and the bare app's batch of the same round and repeat."""
    overhead = {}
    for name, rounds in batches.items():
        differences = [
            value - base
            for values, base_values in zip(rounds, batches[baseline], strict=True)
            for value, base in zip(values, base_values, strict=True)
        ]
        overhead[name] = round(statistics.median(differences), 2)
    return overhead


def run(names: list[str], *, smoke: bool) -> dict[str, Any]:
    """Measure ``names`` (which must include the bare app) in one interleaved run."""
    settings = SMOKE if smoke else FULL
    return asyncio.run(_measure(names, settings))
