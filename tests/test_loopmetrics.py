"""The lock-free families render exactly what prometheus-client's would."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from asgi_perfmon._loopmetrics import HistogramChild, LoopFamily
from asgi_perfmon.metrics import (
    DEFAULT_BUCKETS,
    SIZE_BUCKETS,
    LoopRouteSeries,
    http_metrics,
)


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


label_names = st.lists(
    st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True).filter(lambda n: n != "le"),
    max_size=4,
    unique=True,
)
label_values = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
observations = st.lists(
    st.floats(min_value=0, max_value=1e4, allow_nan=False) | st.sampled_from([0.1, 0.5, 1.0]),
    max_size=8,
)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(["histogram", "counter", "gauge"]),
    names=label_names,
    data=st.data(),
    openmetrics=st.booleans(),
)
def test_own_exposition_is_byte_for_byte_prometheus_clients(
    kind: str, names: list[str], data: st.DataObject, openmetrics: bool
) -> None:
    """What the endpoint renders on the loop equals prometheus-client's encoders' output."""
    registry = CollectorRegistry()
    family = LoopFamily(registry, kind, "fam", 'Doc with "quotes" \\ and\nnewline.', names,
                        (0.1, 0.5, 1.0, 2.5))  # fmt: skip
    for _ in range(data.draw(st.integers(0, 4))):
        values = tuple(data.draw(label_values) for _ in names)
        child = family.labels(*values)
        if isinstance(child, HistogramChild):
            for value in data.draw(observations):
                exemplar = data.draw(st.none() | st.fixed_dictionaries({"trace": label_values}))
                child.observe(value, exemplar)
            child.counts[-1] += data.draw(st.sampled_from([0, 999_999, 1_000_000, 12_345_678]))
        else:
            child.inc(data.draw(st.floats(-1e9, 1e9, allow_nan=False) | st.integers(0, 10**7)))

    ours = "".join(family.exposition(openmetrics=openmetrics, chunk_size=2))
    if openmetrics:
        assert openmetrics_latest(registry).decode() == ours + "# EOF\n"
    else:
        assert generate_latest(registry).decode() == ours


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.005, 0.0051, 0.3, 10.0, 12.5]),
            st.sampled_from([0.0, 0.005, 1.0, 99.0]),
            st.sampled_from([0, 63, 64, 65, 4**12, 4**12 + 1]),
            st.sampled_from([0, 64, 1024, 10**9]),
        ),
        max_size=20,
    )
)
def test_route_series_records_like_observe(
    requests: list[tuple[float, float, int, int]],
) -> None:
    """The single-process series updates its histograms in place: the same buckets and sums
    as ``observe``, bucket edges included (``le`` is inclusive)."""
    metrics = http_metrics(
        CollectorRegistry(), namespace="", buckets=DEFAULT_BUCKETS, max_label_values=10,
        version="test",
    )  # fmt: skip
    series = metrics.series("GET", "/items/{item_id}")
    assert isinstance(series, LoopRouteSeries)
    reference = {
        "duration": HistogramChild(DEFAULT_BUCKETS),
        "ttfb": HistogramChild(DEFAULT_BUCKETS),
        "received": HistogramChild(SIZE_BUCKETS),
        "sent": HistogramChild(SIZE_BUCKETS),
    }
    for duration, ttfb, received, sent in requests:
        series.record(200, duration, ttfb, received, sent, None)
        for name, value in zip(reference, (duration, ttfb, received, sent), strict=True):
            reference[name].observe(value)
    recorded = {
        "duration": series.duration(200),
        "ttfb": series.time_to_first_byte,
        "received": series.request_size,
        "sent": series.response_size,
    }
    for name, child in recorded.items():
        assert (child.counts, child.sum) == (reference[name].counts, reference[name].sum), name
