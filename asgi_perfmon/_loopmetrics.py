"""Lock-free metric families for values recorded on the event loop thread.

prometheus-client guards every update with a lock and validates on every call: about ten
locked increments and thirty function calls per request for the middleware's four histograms
and one gauge. The middleware records only from the event loop thread, so plain integer and
float updates are exact there; these families keep them and build the exposition when
scraped. In a single process the ``/metrics`` endpoint reads them on the event loop, so every
child is read whole; ``collect()`` from another thread (a plain prometheus-client exporter) may
see a request half-recorded (its count but not yet its sum), and the next scrape is exact.

Multiprocess mode needs prometheus-client's shared-memory values, so the middleware uses these
families only when ``PROMETHEUS_MULTIPROC_DIR`` is not set.

The ``/metrics`` endpoint renders these families itself with :meth:`LoopFamily.exposition`, on
the event loop a slice at a time: prometheus-client's encoders build a sample object per line,
about 30 µs per histogram child, which for ten thousand series held the GIL for a third of a
second. Rendered on the loop the values are also exact: no request is half-recorded.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

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
_EXACT_COUNT = 1_000_000
"""Below this, ``f"{n}.0"`` is how prometheus-client formats the integer count ``n``."""


class HistogramChild:
    """One labelled histogram: a count per bucket, the sum and the latest exemplar per bucket."""

    __slots__ = ("bounds", "counts", "exemplars", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        """The finite upper bounds; ``counts[bisect_left(bounds, value)]`` is value's bucket."""
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.exemplars: dict[int, Exemplar] | None = None

    def observe(self, value: float, exemplar: dict[str, str] | None = None) -> None:
        index = bisect_left(self.bounds, value)
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
    """A labelled family registered as a collector; ``labels()`` is called by ``BoundedLabels``.

    A gauge given ``count`` is computed when scraped instead: every child is set to how many
    times ``count()`` yields it, so the hot path never touches it.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        kind: str,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float] = (),
        count: Callable[[], Iterable[ValueChild]] | None = None,
    ) -> None:
        self._kind = kind
        self._count = count
        self._count_lock = threading.Lock()
        self._name = name
        self._documentation = documentation
        self._labelnames = list(labelnames)
        self._bounds = tuple(b for b in buckets if not math.isinf(b))
        self._children: dict[tuple[str, ...], HistogramChild | ValueChild] = {}
        self._label_texts: dict[tuple[str, ...], tuple[str, str, str]] = {}
        self._le_texts = [floatToGoString(b) for b in (*self._bounds, math.inf)]  # type: ignore[no-untyped-call]
        registry.register(self)

    def labels(self, *values: str) -> HistogramChild | ValueChild:
        child = self._children.get(values)
        if child is None:
            child = HistogramChild(self._bounds) if self._kind == "histogram" else ValueChild()
            self._children[values] = child
        return child

    def exposition(self, *, openmetrics: bool, chunk_size: int = 16) -> Iterator[str]:
        """This family as exposition text, ``chunk_size`` children per yielded string.

        The same samples as :meth:`collect` through prometheus-client's encoders: labels in
        name order, values formatted alike, exemplars in OpenMetrics only. Call it on the
        thread that records (the event loop) so no update interleaves with a child's lines.
        """
        self._recount()
        kind = self._kind
        sample = f"{self._name}_total" if kind == "counter" else self._name
        family = self._name if openmetrics else sample
        help_text = self._documentation.replace("\\", r"\\").replace("\n", r"\n")
        if openmetrics:
            help_text = help_text.replace('"', r"\"")
        lines = [f"# HELP {family} {help_text}\n# TYPE {family} {kind}\n"]
        children = list(self._children.items())
        for start in range(0, len(children), chunk_size):
            for labels, child in children[start : start + chunk_size]:
                texts = self._label_texts.get(labels)
                if texts is None:
                    texts = self._label_texts[labels] = self._render_labels(labels)
                if isinstance(child, HistogramChild):
                    self._histogram_lines(lines, texts, child, openmetrics)
                else:
                    braced = f"{{{texts[0]}}}" if texts[0] else ""
                    lines.append(f"{sample}{braced} {_number(child.value)}\n")
            yield "".join(lines)
            lines = []
        if lines:
            yield "".join(lines)

    def _render_labels(self, values: tuple[str, ...]) -> tuple[str, str, str]:
        """The label pairs in name order; and split around where ``le`` sorts, for buckets."""
        pairs = [
            f'{name}="{_escape(value)}"'
            for name, value in sorted(zip(self._labelnames, values, strict=True))
        ]
        before = sum(1 for name in self._labelnames if name < "le")
        return (
            ",".join(pairs),
            "".join(f"{pair}," for pair in pairs[:before]),
            "".join(f",{pair}" for pair in pairs[before:]),
        )

    def _histogram_lines(
        self,
        lines: list[str],
        texts: tuple[str, str, str],
        child: HistogramChild,
        openmetrics: bool,
    ) -> None:
        name = self._name
        labels, before_le, after_le = texts
        exemplars = child.exemplars if openmetrics else None
        counts = child.counts
        running = 0
        for index, le in enumerate(self._le_texts):
            running += counts[index]
            line = f'{name}_bucket{{{before_le}le="{le}"{after_le}}} {_number(running)}'
            if exemplars and index in exemplars:
                line += _exemplar_text(exemplars[index])
            lines.append(line + "\n")
        braced = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_count{braced} {_number(running)}\n")
        lines.append(f"{name}_sum{braced} {_number(child.sum)}\n")

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def _recount(self) -> None:
        if self._count is None:
            return
        with self._count_lock:  # two scrapes at once must not interleave their counts
            counted = list(self._count())
            for child in self._children.values():
                if isinstance(child, ValueChild):
                    child.value = 0.0
            for child in counted:
                child.value += 1.0

    def collect(self) -> Iterator[Metric]:
        self._recount()
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


def _number(value: Any) -> str:
    if type(value) is int and 0 <= value < _EXACT_COUNT:
        return f"{value}.0"
    return floatToGoString(value)  # type: ignore[no-untyped-call,no-any-return]


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _exemplar_text(exemplar: Exemplar) -> str:
    labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(exemplar.labels.items()))
    return f" # {{{labels}}} {_number(exemplar.value)} {exemplar.timestamp}"
