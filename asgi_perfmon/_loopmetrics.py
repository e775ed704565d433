"""Lock-free metric families for values recorded on the event loop thread.

prometheus-client guards every update with a lock and validates on every call: about ten
locked increments and thirty function calls per request for the middleware's four histograms
and one gauge. The middleware records only from the event loop thread, so plain integer and
float updates are exact there; these families keep them and build the exposition when
scraped. A scrape runs in a worker thread and may see a request half-recorded (its count but
not yet its sum); the next scrape is exact again.

Multiprocess mode needs prometheus-client's shared-memory values, so the middleware uses these
families only when ``PROMETHEUS_MULTIPROC_DIR`` is not set.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

_Bucket = tuple[str, float] | tuple[str, float, Exemplar]


class HistogramChild:
    """One labelled histogram: a count per bucket, the sum and the latest exemplar per bucket."""

    __slots__ = ("_bounds", "counts", "exemplars", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.exemplars: dict[int, Exemplar] | None = None

    def observe(self, value: float, exemplar: dict[str, str] | None = None) -> None:
        index = bisect_left(self._bounds, value)
        self.counts[index] += 1
        self.sum += value
        if exemplar is not None:
            if self.exemplars is None:
                self.exemplars = {}
            self.exemplars[index] = Exemplar(exemplar, value, time.time())


class ValueChild:
    """One labelled counter or gauge."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class LoopFamily:
    """A labelled family registered as a collector; ``labels()`` is called by ``BoundedLabels``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        kind: str,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float] = (),
    ) -> None:
        self._kind = kind
        self._name = name
        self._documentation = documentation
        self._labelnames = list(labelnames)
        self._bounds = tuple(b for b in buckets if not math.isinf(b))
        self._children: dict[tuple[str, ...], HistogramChild | ValueChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> HistogramChild | ValueChild:
        child = self._children.get(values)
        if child is None:
            child = HistogramChild(self._bounds) if self._kind == "histogram" else ValueChild()
            self._children[values] = child
        return child

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for labels, child in list(self._children.items()):
            if isinstance(child, HistogramChild):
                buckets, total = self._cumulative(child)
                family.add_metric(list(labels), buckets, total)  # type: ignore[attr-defined]
            else:
                family.add_metric(list(labels), child.value)  # type: ignore[attr-defined]
        yield family

    def _family(self) -> Metric:
        if self._kind == "histogram":
            return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        if self._kind == "counter":
            return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        return GaugeMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def _cumulative(
        self, child: HistogramChild
    ) -> tuple[list[tuple[str, float, Exemplar] | tuple[str, float]], float]:
        counts, total, exemplars = list(child.counts), child.sum, dict(child.exemplars or {})
        buckets: list[tuple[str, float, Exemplar] | tuple[str, float]] = []
        running = 0
        for index, bound in enumerate((*self._bounds, math.inf)):
            running += counts[index]
            exemplar = exemplars.get(index)
            le = floatToGoString(bound)  # type: ignore[no-untyped-call]
            buckets.append((le, running) if exemplar is None else (le, running, exemplar))
        return buckets, total
