"""Bounded label values: a per-metric cap that folds new values into ``__overflow__``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from asgi_perfmon._logging import log_safely
from asgi_perfmon._loopmetrics import LoopFamily, ValueChild
from asgi_perfmon._registry import metric_name, shared

OVERFLOW = "__overflow__"
DEFAULT_MAX_LABEL_VALUES = 1000

ChildT = TypeVar("ChildT")


def overflow_counter(registry: CollectorRegistry, namespace: str) -> Counter:
    """``asgi_perfmon_label_overflow_total{metric}`` for ``registry``."""
    name = metric_name(namespace, "asgi_perfmon_label_overflow")

    def build() -> Counter:
        return Counter(
            name,
            "Label lookups whose value was folded into __overflow__ because the metric "
            "reached its cap of distinct values.",
            ["metric"],
            registry=registry,
        )

    return shared(registry, ("overflow", namespace), build)


class LabelValues:
    """Stands in for a metric, so ``BoundedLabels`` can bound names that are read at scrape time.

    ``BoundedLabels(LabelValues(), ...).labels("x")`` returns ``("x",)``, or the overflow value.
    """

    def labels(self, *values: str) -> tuple[str, ...]:
        return values


def validate_max_label_values(value: int) -> int:
    """Raise ``ValueError`` unless ``value`` is a usable label cap."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"max_label_values must be a positive integer, got {value!r}."
        raise ValueError(msg)
    return value


class BoundedLabels(Generic[ChildT]):
    """Cached children of a labelled metric, with at most ``max_values`` values per label.

    The hot path is one dict lookup. Values beyond the cap are never cached, so hostile input
    cannot grow this object: it folds into ``__overflow__``, counts
    ``asgi_perfmon_label_overflow_total`` and logs one ``label_overflow`` warning per metric.
    """

    def __init__(
        self,
        metric: Any,
        *,
        name: str,
        label_count: int,
        max_values: int,
        overflow: Counter,
    ) -> None:
        self._metric = metric
        self._name = name
        self._max_values = max_values
        self._seen: list[set[str]] = [set() for _ in range(label_count)]
        self._children: dict[tuple[str, ...], ChildT] = {}
        self._overflow = overflow.labels(name)
        self._warned = False
        self._lock = threading.Lock()

    def labels(self, *values: str) -> ChildT:
        """The child for ``values``, folding values beyond the cap."""
        child = self._children.get(values)
        if child is None:
            child = self._new_child(values)
        return child

    def _new_child(self, values: tuple[str, ...]) -> ChildT:
        with self._lock:
            bounded = tuple(self._bound(i, value) for i, value in enumerate(values))
            child = self._children.get(bounded)
            if child is None:
                child = self._metric.labels(*bounded)
                self._children[bounded] = child
        if bounded != values:
            self._overflow.inc()
            self._warn_once(values)
        return child

    def _bound(self, index: int, value: str) -> str:
        seen = self._seen[index]
        if value in seen:
            return value
        if len(seen) < self._max_values:
            seen.add(value)
            return value
        return OVERFLOW

    def _warn_once(self, values: tuple[str, ...]) -> None:
        if self._warned:
            return
        self._warned = True
        log_safely(
            "warning",
            "label_overflow",
            metric=self._name,
            max_label_values=self._max_values,
            example=[value[:64] for value in values],
        )


class BoundedFamilies:
    """Creates labelled metric families in one registry and namespace, each label-capped."""

    def __init__(
        self,
        registry: CollectorRegistry,
        namespace: str,
        max_label_values: int = DEFAULT_MAX_LABEL_VALUES,
        *,
        loop_local: bool = False,
    ) -> None:
        """``loop_local``: lock-free families for values recorded only on the event loop
        thread (see ``_loopmetrics``); prometheus-client's metrics otherwise."""
        self._registry = registry
        self._namespace = namespace
        self._max_label_values = max_label_values
        self._loop_local = loop_local
        self._overflow = overflow_counter(registry, namespace)

    def histogram(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> BoundedLabels[Any]:
        full = metric_name(self._namespace, name)
        metric: Any
        if self._loop_local:
            metric = LoopFamily(self._registry, "histogram", full, documentation, labels, buckets)
        else:
            metric = Histogram(
                full, documentation, labels, registry=self._registry, buckets=buckets
            )
        return self._bounded(metric, full, len(labels))

    def gauge(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str],
        count: Callable[[], Iterable[ValueChild]] | None = None,
    ) -> BoundedLabels[Any]:
        """A gauge summed over the live processes in multiprocess mode; with ``count``, one
        computed when scraped in loop-local mode (see ``LoopFamily``)."""
        full = metric_name(self._namespace, name)
        metric: Any
        if self._loop_local:
            metric = LoopFamily(self._registry, "gauge", full, documentation, labels, count=count)
        else:
            metric = Gauge(
                full, documentation, labels, registry=self._registry, multiprocess_mode="livesum"
            )
        return self._bounded(metric, full, len(labels))

    def counter(self, name: str, documentation: str, labels: Sequence[str]) -> BoundedLabels[Any]:
        """A counter; ``name`` without the ``_total`` that the exposition appends."""
        full = metric_name(self._namespace, name)
        metric: Any
        if self._loop_local:
            metric = LoopFamily(self._registry, "counter", full, documentation, labels)
        else:
            metric = Counter(full, documentation, labels, registry=self._registry)
        return self._bounded(metric, f"{full}_total", len(labels))

    def values(self, name: str, label_count: int = 1) -> BoundedLabels[tuple[str, ...]]:
        """Capped label values for a family that is built at scrape time (see ``LabelValues``)."""
        return self._bounded(LabelValues(), metric_name(self._namespace, name), label_count)

    def _bounded(self, metric: Any, name: str, label_count: int) -> BoundedLabels[Any]:
        return BoundedLabels(
            metric,
            name=name,
            label_count=label_count,
            max_values=self._max_label_values,
            overflow=self._overflow,
        )
