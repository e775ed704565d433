"""What one scrape of ``/metrics`` collects, and how it survives what goes wrong.

- Each collector is collected and encoded on its own, so one that raises (or returns what the
  encoder rejects) is left out of that scrape while every other metric is served. The
  failure counts ``asgi_perfmon_scrape_errors_total{collector}`` and is logged once per
  collector and error type.
- In a single process everything runs on the event loop, in slices of about a millisecond
  (:class:`LoopSlices`): the middleware's lock-free families (``_loopmetrics``) by
  :func:`loop_exposition`, then the other collectors one at a time
  (:meth:`Scrape.pieces`), then gzip. No worker thread competes with the loop for the GIL:
  one holds it for up to the interpreter's switch interval (5 ms) after the loop asks, and
  encoding and joining a megabyte of text are single calls it cannot be interrupted in.
  A single collector that is slow by itself (a user's collector taking 20 ms) still holds
  the loop for as long as it takes: the loop turns between collectors, not inside one.
- In multiprocess mode an unreadable file in ``PROMETHEUS_MULTIPROC_DIR`` (one left empty by a
  crashed worker) is skipped the same way, as collector ``MultiProcessCollector``; the live
  gauges of a dead worker are removed (``mark_process_dead``), so a killed worker's in-flight
  requests do not stay in the active-requests gauge.
"""

from __future__ import annotations

import glob
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from asgi_perfmon._labels import DEFAULT_MAX_LABEL_VALUES, BoundedLabels, overflow_counter
from asgi_perfmon._logging import FailureLog
from asgi_perfmon._loopmetrics import LoopFamily
from asgi_perfmon._registry import metric_name, resolve_namespace, shared

MULTIPROCESS_FILES = "MultiProcessCollector"
OPENMETRICS_EOF = b"# EOF\n"
LOOP_SLICE_SECONDS = 0.001
"""How long the loop-side rendering runs before it lets the event loop run again."""

_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]*_(\d+)\.db")

Encoder = Callable[[Collector], bytes]


class LoopSlices:
    """Work on the event loop a slice at a time.

    ``await slices.pause()`` between two steps gives the loop back once the current slice
    has run for ``LOOP_SLICE_SECONDS``, so other requests wait at most about one slice plus
    one step.
    """

    def __init__(self) -> None:
        self._deadline = time.perf_counter() + LOOP_SLICE_SECONDS

    async def pause(self) -> None:
        """Let the loop run if this slice is used up."""
        if time.perf_counter() >= self._deadline:
            await anyio.lowlevel.checkpoint()
            self._deadline = time.perf_counter() + LOOP_SLICE_SECONDS


async def loop_exposition(
    registry: CollectorRegistry,
    failures: ScrapeFailures,
    slices: LoopSlices,
    *,
    openmetrics: bool,
) -> list[bytes]:
    """The exposition of ``registry``'s lock-free families, rendered on the event loop.

    The loop is the thread that records them, so every child is read whole; between slices
    the loop serves requests. The text comes in small encoded pieces, never joined here: one
    join of a megabyte holds the loop for a millisecond. A family whose rendering fails is
    left out whole, like a collector that raises.
    """
    pieces: list[bytes] = []
    for family in loop_families(registry):
        rendered: list[bytes] = []
        try:
            for chunk in family.exposition(openmetrics=openmetrics):
                rendered.append(chunk.encode())
                await slices.pause()
        except Exception as error:
            failures.record(type(family).__name__, error)
            continue
        pieces.extend(rendered)
    return pieces


def loop_families(registry: CollectorRegistry) -> list[LoopFamily]:
    """The lock-free families registered in ``registry``."""
    return [c for c in registered_collectors(registry) if isinstance(c, LoopFamily)]


def registered_collectors(registry: CollectorRegistry) -> dict[Collector, list[str]]:
    """Every collector of ``registry`` with the names it describes.

    prometheus-client has no public way to list a registry's collectors, and its own
    ``collect()`` stops at the first one that raises.
    """
    with registry._lock:
        return dict(registry._collector_to_names)


class ScrapeFailures:
    """``asgi_perfmon_scrape_errors_total{collector}`` of one registry, and its log.

    ``collector`` is the collector's class name: bounded by the code, not by input.
    """

    def __init__(self, registry: CollectorRegistry, namespace: str) -> None:
        name = metric_name(namespace, "asgi_perfmon_scrape_errors")
        self.counter = Counter(
            name,
            "Collectors left out of a scrape because they raised (or returned what could not "
            "be encoded), and unreadable multiprocess files skipped.",
            ["collector"],
            registry=registry,
        )
        self._children: BoundedLabels[Any] = BoundedLabels(
            self.counter,
            name=f"{name}_total",
            label_count=1,
            max_values=DEFAULT_MAX_LABEL_VALUES,
            overflow=overflow_counter(registry, namespace),
        )
        self._log = FailureLog()

    def record(self, collector: str, error: Exception, **details: str) -> None:
        """Count one failure of ``collector`` and log the first of each error type."""
        self._children.labels(collector).inc()
        self._log.record(
            "scrape", error, event="collector_failed", collector=collector, details=details
        )


def scrape_failures(registry: CollectorRegistry) -> ScrapeFailures:
    """The :class:`ScrapeFailures` of ``registry``, shared by every endpoint serving it."""
    namespace = resolve_namespace(None)
    return shared(
        registry, ("scrape_errors", namespace), lambda: ScrapeFailures(registry, namespace)
    )


@dataclass(frozen=True)
class _Group:
    """What one collector returned in this scrape."""

    collector: str
    metrics: list[Metric]


class _Collected:
    """A registry-like view of already collected groups, which the encoders read."""

    def __init__(self, groups: Iterable[_Group]) -> None:
        self._groups = list(groups)

    def collect(self) -> Iterator[Metric]:
        for group in self._groups:
            yield from group.metrics


class Scrape:
    """One scrape: every collector on its own, so that a broken one is left out alone.

    ``names`` restricts the output to those sample names, like prometheus-client's
    ``restricted_registry``; collectors that describe their names are only run if one of
    them is wanted.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        failures: ScrapeFailures,
        names: set[str] | None = None,
        *,
        without_loop_families: bool = False,
    ) -> None:
        """``without_loop_families``: leave out the lock-free families, which the caller
        rendered on the event loop with :func:`loop_exposition`."""
        self._registry = registry
        self._failures = failures
        self._names = names
        self._without_loop_families = without_loop_families

    def pieces(self, encoder: Encoder) -> Iterator[bytes]:
        """The exposition, one collector per piece, collected and encoded only when the next
        piece is asked for (so the caller may let the loop run in between).

        Target info comes first and the scrape-error counter last, so it counts this scrape's
        failures. OpenMetrics' closing ``# EOF`` is left out: the caller ends the body.
        """
        for group in self._groups():
            piece = self._encoded(encoder, group)
            if piece:
                yield piece

    def _groups(self) -> Iterator[_Group]:
        target_info = self._target_info()
        if target_info is not None:
            yield target_info
        for collector in self._collectors():
            yield from self._collect(collector)
        yield from self._own_groups()

    def _own_groups(self) -> list[_Group]:
        """The scrape-error counter, collected last so it includes this scrape's failures."""
        if multiprocess():
            return []  # it is in this process's files, merged with the others
        return list(self._collect(self._failures.counter))

    def _collectors(self) -> list[Collector]:
        if multiprocess():
            return [ProcessFiles(os.environ["PROMETHEUS_MULTIPROC_DIR"], self._failures)]
        collectors = registered_collectors(self._registry)
        collectors.pop(self._failures.counter, None)
        return [
            collector
            for collector, names in collectors.items()
            if self._wanted(names)
            and not (self._without_loop_families and isinstance(collector, LoopFamily))
        ]

    def _wanted(self, names: Sequence[str]) -> bool:
        """Whether to run a collector that describes ``names`` (none: unknown until run)."""
        return self._names is None or not names or not self._names.isdisjoint(names)

    def _collect(self, collector: Collector) -> Iterator[_Group]:
        name = type(collector).__name__
        try:
            metrics = list(collector.collect())
        except Exception as error:
            self._failures.record(name, error)
            return
        yield _Group(name, [m for m in map(self._restricted, metrics) if m is not None])

    def _encoded(self, encoder: Encoder, group: _Group) -> bytes:
        """``group`` encoded, without ``# EOF``; empty if the encoder rejects it."""
        try:
            encoded = encoder(_Collected([group]))
        except Exception as error:
            self._failures.record(group.collector, error)
            return b""
        # Each call of the OpenMetrics encoder ends its output so; the text format never does.
        return encoded.removesuffix(OPENMETRICS_EOF)

    def _restricted(self, metric: Metric) -> Metric | None:
        """``metric`` with only the wanted samples, or ``None`` if none is wanted."""
        if self._names is None:
            return metric
        samples = [sample for sample in metric.samples if sample.name in self._names]
        if not samples:
            return None
        restricted = Metric(metric.name, metric.documentation, metric.type, metric.unit)
        restricted.samples = samples
        return restricted

    def _target_info(self) -> _Group | None:
        labels = None if multiprocess() else self._registry.get_target_info()
        if not labels:
            return None
        metric = Metric("target", "Target metadata", "info")
        metric.add_sample("target_info", labels, 1)
        restricted = self._restricted(metric)
        return None if restricted is None else _Group("target_info", [restricted])


class ProcessFiles:
    """The multiprocess collector, skipping the files it cannot read instead of failing."""

    def __init__(self, path: str, failures: ScrapeFailures) -> None:
        self._path = path
        self._failures = failures

    def collect(self) -> Iterable[Metric]:
        self._remove_dead_live_gauges()
        files = glob.glob(os.path.join(self._path, "*.db"))
        try:
            return MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call,no-any-return]
        except Exception:
            readable = [path for path in files if self._readable(path)]
            return MultiProcessCollector.merge(readable)  # type: ignore[no-untyped-call,no-any-return]

    def _remove_dead_live_gauges(self) -> None:
        """Drop the ``livesum``/``liveall``/... gauge files of workers that are gone.

        Gunicorn users call ``mark_process_dead`` from ``child_exit``; uvicorn has no such
        hook, so each scrape checks the pids itself (all workers share one pid namespace).
        """
        for path in glob.glob(os.path.join(self._path, "gauge_live*_*.db")):
            match = _LIVE_GAUGE_FILE.fullmatch(os.path.basename(path))
            if match is not None and not _alive(int(match.group(1))):
                try:
                    mark_process_dead(int(match.group(1)), self._path)  # type: ignore[no-untyped-call]
                except OSError as error:
                    self._failures.record(MULTIPROCESS_FILES, error, file=os.path.basename(path))

    def _readable(self, path: str) -> bool:
        try:
            MultiProcessCollector.merge([path])  # type: ignore[no-untyped-call]
        except FileNotFoundError:
            return False  # removed since the listing (a dead process's live gauges)
        except Exception as error:
            self._failures.record(MULTIPROCESS_FILES, error, file=os.path.basename(path))
            return False
        return True


def multiprocess() -> bool:
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True
