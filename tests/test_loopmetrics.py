"""The lock-free families render exactly what prometheus-client's would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from asgi_perfmon._loopmetrics import LoopFamily


def test_histogram_exposition_matches_prometheus_client() -> None:
    """Same buckets, same observations: the same text, apart from ``_created``."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    buckets = (0.1, 0.5, 1.0)
    family = LoopFamily(ours, "histogram", "latency_seconds", "Latency.", ["route"], buckets)
    reference = Histogram("latency_seconds", "Latency.", ["route"], registry=theirs,
                          buckets=buckets)  # fmt: skip
    for value in (0.05, 0.1, 0.3, 0.7, 2.0, 2.0):
        family.labels("/a").observe(value)
        reference.labels("/a").observe(value)

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [line for line in text.splitlines() if "_created" not in line]

    assert lines(theirs) == lines(ours)


def test_counter_and_gauge_exposition() -> None:
    """Counters get ``_total``; gauges go up and down."""
    registry = CollectorRegistry()
    LoopFamily(registry, "counter", "jobs", "Jobs.", ["kind"]).labels("a").inc(3)
    gauge = LoopFamily(registry, "gauge", "in_flight", "In flight.", ["kind"]).labels("a")
    gauge.inc()
    gauge.inc()
    gauge.dec()

    assert 3.0 == registry.get_sample_value("jobs_total", {"kind": "a"})
    assert 1.0 == registry.get_sample_value("in_flight", {"kind": "a"})


def test_duplicate_names_are_refused_like_prometheus_client() -> None:
    """Registering a second family of the same name in one registry fails loudly."""
    registry = CollectorRegistry()
    LoopFamily(registry, "gauge", "dup", "Dup.", [])

    with pytest.raises(ValueError, match="Duplicated timeseries"):
        LoopFamily(registry, "gauge", "dup", "Dup.", [])
