"""``LoopMonitor``: event-loop lag histogram and a watchdog that names what blocks the loop."""

from __future__ import annotations

import asyncio
import contextvars
import math
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, NamedTuple

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

from asgi_perfmon._logging import FailureLog
from asgi_perfmon._registry import metric_name, resolve_namespace, resolve_registry, shared

__all__ = ["LAG_BUCKETS", "LoopMonitor"]

LAG_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
"""Buckets of ``asyncio_event_loop_lag_seconds``: an idle loop lags well under 1 ms."""

DEFAULT_INTERVAL = 0.1
DEFAULT_BLOCKED_THRESHOLD = 0.1
DEFAULT_MAX_STACK_FRAMES = 40
_JOIN_TIMEOUT = 2.0

logger = structlog.get_logger("asgi_perfmon")


class _LoopMetrics(NamedTuple):
    lag: Histogram
    blocked: Counter


def _loop_metrics(registry: CollectorRegistry, namespace: str) -> _LoopMetrics:
    """The event-loop metric families in ``registry``, shared by every monitor."""

    def build() -> _LoopMetrics:
        lag = Histogram(
            metric_name(namespace, "asyncio_event_loop_lag_seconds"),
            "How late a timer callback ran on the event loop: the time a ready callback waits.",
            registry=registry,
            buckets=LAG_BUCKETS,
        )
        blocked = Counter(
            metric_name(namespace, "asyncio_event_loop_blocked"),
            "Times the event loop did not turn for the blocked threshold or longer.",
            registry=registry,
        )
        return _LoopMetrics(lag, blocked)

    return shared(registry, ("event_loop", namespace), build)


class _Armed(NamedTuple):
    """The probe callback now scheduled: its number and when it is due (monitor clock)."""

    generation: int
    due: float


class LoopMonitor:
    """Measure event-loop lag and report what blocks the loop.

    A timer callback re-arms itself every ``interval`` seconds on the loop and observes how
    late it ran into ``asyncio_event_loop_lag_seconds``. A daemon watchdog thread wakes when
    that callback has been overdue for ``blocked_threshold`` seconds: the loop has not turned
    for at least that long. It then counts ``asyncio_event_loop_blocked_total`` (once per
    stall) and logs ``event_loop_blocked`` with the loop thread's stack at that moment, which
    names the blocking call (a ``time.sleep`` or ``requests.get`` inside ``async def``). When
    the loop turns again, ``event_loop_resumed`` logs how long the stall lasted.

    Use ``start()``/``stop()`` (cheap and idempotent, e.g. in a lifespan handler) or
    ``async with LoopMonitor():``. Works with asyncio and uvloop. Failures inside the monitor
    are logged once and never raised into the application.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str | None = None,
        interval: float = DEFAULT_INTERVAL,
        blocked_threshold: float = DEFAULT_BLOCKED_THRESHOLD,
        watchdog: bool = True,
        max_stack_frames: int = DEFAULT_MAX_STACK_FRAMES,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._interval = _positive("interval", interval)
        self._threshold = _positive("blocked_threshold", blocked_threshold)
        if isinstance(max_stack_frames, bool) or not isinstance(max_stack_frames, int):
            msg = f"max_stack_frames must be a positive integer, got {max_stack_frames!r}."
            raise ValueError(msg)
        if max_stack_frames < 1:
            msg = f"max_stack_frames must be a positive integer, got {max_stack_frames!r}."
            raise ValueError(msg)
        self._max_frames = max_stack_frames
        self._use_watchdog = watchdog
        self._clock = time.monotonic if clock is None else clock
        metrics = _loop_metrics(resolve_registry(registry), resolve_namespace(namespace))
        self._lag = metrics.lag
        self._blocked = metrics.blocked
        # State shared with the watchdog thread. ``_armed`` is replaced as a whole (one atomic
        # store); ``_claimed`` and the counter are updated under ``_lock``.
        self._armed: _Armed | None = None
        self._claimed = -1
        self._lock = threading.Lock()
        # The loop side: the loop being monitored, and the probe's timer on it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._handle_loop: asyncio.AbstractEventLoop | None = None
        self._generation = 0
        # The probe runs in an empty context, not in the one start() was called from (a
        # lifespan or a request): its logs must not carry that context's request_id.
        self._context = contextvars.Context()
        self._watchdog: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._failures = FailureLog()

    @property
    def running(self) -> bool:
        """Whether ``start()`` was called and ``stop()`` not since."""
        return self._loop is not None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start monitoring ``loop`` (default: the running loop); no-op if already running.

        Call it on the loop's thread, or pass the loop from any thread.
        """
        if loop is None:
            loop = asyncio.get_running_loop()  # RuntimeError outside a loop: a usage error
        if self._loop is loop:
            return
        if self._loop is not None:
            self.stop()
        self._loop = loop
        self._run_on_loop(loop, self._begin)
        if self._use_watchdog:
            self._stop_event = threading.Event()
            self._watchdog = threading.Thread(
                target=self._watch,
                args=(self._stop_event,),
                name="asgi-perfmon-loop-watchdog",
                daemon=True,
            )
            self._watchdog.start()

    def stop(self) -> None:
        """Stop monitoring and join the watchdog thread; safe to call twice or unstarted."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        self._armed = None
        self._stop_event.set()
        if not loop.is_closed():
            self._run_on_loop(loop, self._end)
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None and watchdog is not threading.current_thread():
            watchdog.join(_JOIN_TIMEOUT)

    async def __aenter__(self) -> LoopMonitor:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the loop side: everything below runs on the loop thread ------------------------------

    def _run_on_loop(
        self,
        loop: asyncio.AbstractEventLoop,
        callback: Callable[[asyncio.AbstractEventLoop], None],
    ) -> None:
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            callback(loop)
            return
        try:
            loop.call_soon_threadsafe(callback, loop)
        except RuntimeError:  # the loop was closed meanwhile: nothing left to schedule or cancel
            return

    def _begin(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:
            return  # stopped (or moved to another loop) before this ran
        self._loop_thread = threading.get_ident()
        self._end(self._handle_loop or loop)
        self._arm(loop, self._clock())

    def _end(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._handle is not None and self._handle_loop is loop:
            self._handle.cancel()
            self._handle = self._handle_loop = None

    def _arm(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        if self._loop is not loop:
            return
        self._generation += 1
        self._armed = _Armed(self._generation, now + self._interval)
        self._handle = loop.call_later(self._interval, self._tick, loop, context=self._context)
        self._handle_loop = loop

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """The probe: observe how late it ran, then re-arm. Never raises into the loop."""
        now = self._clock()
        try:
            armed = self._armed
            if armed is not None:
                self._observe(armed, max(now - armed.due, 0.0))
        except Exception as error:
            self._failures.record("loop_monitor.probe", error)
        finally:
            self._arm(loop, now)

    def _observe(self, armed: _Armed, lag: float) -> None:
        self._lag.observe(lag)
        if lag < self._threshold:
            return
        with self._lock:
            seen_by_watchdog = self._claimed == armed.generation
            if not seen_by_watchdog:
                self._claimed = armed.generation
                self._blocked.inc()
        if seen_by_watchdog:
            logger.warning("event_loop_resumed", blocked_s=round(lag, 6))
        else:  # the stall ended before the watchdog looked: no stack to show
            logger.warning(
                "event_loop_blocked",
                blocked_s=round(lag, 6),
                threshold_s=self._threshold,
                stack=None,
            )

    # -- the watchdog side: runs on its own thread ----------------------------------------------

    def _watch(self, stop: threading.Event) -> None:
        wait = self._threshold
        while not stop.wait(wait):
            try:
                wait = self._watchdog_step()
            except Exception as error:
                self._failures.record("loop_monitor.watchdog", error)
                wait = self._threshold

    def _watchdog_step(self) -> float:
        """Check the loop once; return how long to sleep before the next check.

        The watchdog sleeps until the probe callback would be ``blocked_threshold`` overdue,
        so a healthy loop costs one wake-up per probe interval, and a stall is seen as soon
        as it reaches the threshold.
        """
        armed = self._armed
        if armed is None:
            return self._threshold
        overdue = self._clock() - armed.due
        if overdue < self._threshold:
            return max(self._threshold - overdue, 0.001)
        if self._claimed != armed.generation:
            self._report_stall(armed, overdue)
        return self._threshold  # until the loop turns again, look again a threshold later

    def _report_stall(self, armed: _Armed, overdue: float) -> None:
        stack = self._loop_stack()
        with self._lock:
            # The probe may have run while the stack was taken; then it has counted the stall.
            if self._armed != armed or self._claimed == armed.generation:
                return
            self._claimed = armed.generation
            self._blocked.inc()
        logger.warning(
            "event_loop_blocked",
            blocked_s=round(overdue, 6),
            threshold_s=self._threshold,
            stack=stack,
        )

    def _loop_stack(self) -> str | None:
        """Where the loop thread is now, one ``file:line in function: code`` line per frame,
        innermost last. A string, as structlog expects of ``stack`` (console rendering)."""
        thread = self._loop_thread
        frame = None if thread is None else sys._current_frames().get(thread)
        if frame is None:
            return None
        return "\n".join(_format_stack(frame, self._max_frames))


def _format_stack(frame: FrameType, limit: int) -> list[str]:
    entries: list[str] = []
    for summary in traceback.extract_stack(frame, limit=limit):
        code = f": {summary.line}" if summary.line else ""
        entries.append(f"{summary.filename}:{summary.lineno} in {summary.name}{code}")
    return entries


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{name} must be a positive number of seconds, got {value!r}."
        raise ValueError(msg)
    if not math.isfinite(value) or value <= 0:
        msg = f"{name} must be a positive number of seconds, got {value!r}."
        raise ValueError(msg)
    return float(value)
