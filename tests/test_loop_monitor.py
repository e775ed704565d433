"""``LoopMonitor``: lag probe, stall watchdog, start/stop, asyncio and uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from asgi_perfmon.loop_monitor import LoopMonitor
from tests._uvicorn import start_uvicorn

THRESHOLD = 0.1
INTERVAL = 0.1


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeHandle:
    def __init__(self, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """Just what the monitor uses of a loop; callbacks run when the test says so."""

    def __init__(self) -> None:
        self.timers: list[FakeHandle] = []
        self.soon: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self.closed = False

    def call_later(
        self, delay: float, callback: Callable[..., None], *args: Any, context: Any = None
    ) -> FakeHandle:
        assert delay == INTERVAL
        handle = FakeHandle(callback, args)
        self.timers.append(handle)
        return handle

    def call_soon_threadsafe(self, callback: Callable[..., None], *args: Any) -> None:
        if self.closed:
            raise RuntimeError("Event loop is closed")
        self.soon.append((callback, args))

    def is_closed(self) -> bool:
        return self.closed

    def run_soon(self) -> None:
        soon, self.soon = self.soon, []
        for callback, args in soon:
            callback(*args)

    def live_timers(self) -> list[FakeHandle]:
        return [timer for timer in self.timers if not timer.cancelled]

    def fire(self) -> None:
        """Run the probe timer, as the loop would when it gets to it."""
        (timer,) = self.live_timers()
        self.timers.remove(timer)
        timer.callback(*timer.args)


def samples(registry: CollectorRegistry) -> tuple[Any, Any, Any]:
    """(lag observations, sum of lags, blocked count)."""
    return (
        registry.get_sample_value("asyncio_event_loop_lag_seconds_count"),
        registry.get_sample_value("asyncio_event_loop_lag_seconds_sum"),
        registry.get_sample_value("asyncio_event_loop_blocked_total"),
    )


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(name="fake_loop")
def _fake_loop() -> FakeLoop:
    return FakeLoop()


@pytest.fixture(name="monitor")
def _monitor(
    registry: CollectorRegistry, clock: FakeClock, fake_loop: FakeLoop
) -> Iterator[LoopMonitor]:
    """A monitor on the fake loop, without its thread: the test drives the watchdog."""
    monitor = LoopMonitor(
        registry=registry,
        interval=INTERVAL,
        blocked_threshold=THRESHOLD,
        watchdog=False,
        clock=clock,
    )
    monitor.start(cast(asyncio.AbstractEventLoop, fake_loop))
    yield monitor
    monitor.stop()


class TestProbe:
    def test_lag_is_how_late_the_probe_ran(
        self,
        monitor: LoopMonitor,
        fake_loop: FakeLoop,
        clock: FakeClock,
        registry: CollectorRegistry,
    ) -> None:
        """Lag is the time between the probe's due time and when it ran; it re-arms."""
        fake_loop.run_soon()  # started from outside the loop: begins on the loop
        clock.now = INTERVAL + 0.03
        with structlog.testing.capture_logs() as logs:
            fake_loop.fire()

        assert samples(registry) == (1.0, pytest.approx(0.03), 0.0)
        assert logs == []
        assert len(fake_loop.live_timers()) == 1

    def test_early_probe_counts_as_no_lag(
        self,
        monitor: LoopMonitor,
        fake_loop: FakeLoop,
        clock: FakeClock,
        registry: CollectorRegistry,
    ) -> None:
        """A timer that fires a little early (coarse loop clocks) observes zero, not less."""
        fake_loop.run_soon()
        clock.now = INTERVAL - 0.0005
        fake_loop.fire()

        assert samples(registry) == (1.0, 0.0, 0.0)

    def test_stall_ended_before_the_watchdog_looked(
        self,
        monitor: LoopMonitor,
        fake_loop: FakeLoop,
        clock: FakeClock,
        registry: CollectorRegistry,
    ) -> None:
        """A late probe the watchdog did not see is counted and logged, without a stack."""
        fake_loop.run_soon()
        clock.now = INTERVAL + 0.15
        with structlog.testing.capture_logs() as logs:
            fake_loop.fire()

        assert samples(registry) == (1.0, pytest.approx(0.15), 1.0)
        assert logs == [
            {
                "event": "event_loop_blocked",
                "log_level": "warning",
                "blocked_s": 0.15,
                "threshold_s": THRESHOLD,
                "stack": None,
            }
        ]

    def test_a_failing_probe_re_arms_and_reports_once(
        self, monitor: LoopMonitor, fake_loop: FakeLoop, clock: FakeClock
    ) -> None:
        """If observing fails, the probe keeps running and the failure is logged once."""

        class Broken:
            def observe(self, value: float) -> None:
                raise RuntimeError("broken histogram")

        monitor._lag = Broken()  # type: ignore[assignment]
        fake_loop.run_soon()
        with structlog.testing.capture_logs() as logs:
            for tick in range(1, 4):
                clock.now = tick * INTERVAL
                fake_loop.fire()

        assert len(fake_loop.live_timers()) == 1
        assert [(log["event"], log["where"]) for log in logs] == [
            ("instrumentation_failed", "loop_monitor.probe")
        ]


class TestWatchdog:
    def test_reports_a_stall_once_with_the_loop_threads_stack(
        self,
        monitor: LoopMonitor,
        fake_loop: FakeLoop,
        clock: FakeClock,
        registry: CollectorRegistry,
    ) -> None:
        """At the threshold the watchdog counts the stall and logs where the loop thread is."""
        entered, release = threading.Event(), threading.Event()

        def loop_thread() -> None:
            fake_loop.run_soon()  # the monitor begins here: this is the loop thread
            entered.set()
            release.wait()  # the "blocking call"

        thread = threading.Thread(target=loop_thread)
        thread.start()
        try:
            assert entered.wait(5)
            clock.now = INTERVAL + THRESHOLD - 0.01
            assert monitor._watchdog_step() == pytest.approx(0.01)
            clock.now = INTERVAL + THRESHOLD
            with structlog.testing.capture_logs() as logs:
                monitor._watchdog_step()
                clock.now = INTERVAL + 3 * THRESHOLD
                monitor._watchdog_step()  # the same stall: not counted again
        finally:
            release.set()
            thread.join()

        assert samples(registry)[2] == 1.0
        (log,) = logs
        assert (log["event"], log["blocked_s"], log["threshold_s"]) == (
            "event_loop_blocked",
            THRESHOLD,
            THRESHOLD,
        )
        blocking_line = loop_thread.__code__.co_firstlineno + 3
        frames = log["stack"].splitlines()
        assert f"{__file__}:{blocking_line} in loop_thread: release.wait()  # the" in "\n".join(
            frames
        )
        assert " in wait: " in frames[-1]  # innermost last

    def test_the_probe_reports_how_long_the_stall_lasted(
        self,
        monitor: LoopMonitor,
        fake_loop: FakeLoop,
        clock: FakeClock,
        registry: CollectorRegistry,
    ) -> None:
        """When the loop turns again after a reported stall, ``event_loop_resumed`` follows."""
        fake_loop.run_soon()
        clock.now = INTERVAL + THRESHOLD
        monitor._watchdog_step()
        clock.now = INTERVAL + 0.3
        with structlog.testing.capture_logs() as logs:
            fake_loop.fire()

        assert samples(registry) == (1.0, pytest.approx(0.3), 1.0)
        assert logs == [{"event": "event_loop_resumed", "log_level": "warning", "blocked_s": 0.3}]

    def test_a_healthy_loop_is_never_reported(
        self,
        monitor: LoopMonitor,
        fake_loop: FakeLoop,
        clock: FakeClock,
        registry: CollectorRegistry,
    ) -> None:
        """Probes on time keep moving the deadline the watchdog checks."""
        fake_loop.run_soon()
        with structlog.testing.capture_logs() as logs:
            for tick in range(1, 20):
                clock.now = tick * INTERVAL + 0.002
                fake_loop.fire()
                clock.now += THRESHOLD - 0.01
                assert monitor._watchdog_step() > 0

        assert logs == []
        assert samples(registry)[2] == 0.0

    def test_nothing_to_check_before_the_start_or_after_stop(
        self,
        monitor: LoopMonitor,
        fake_loop: FakeLoop,
        clock: FakeClock,
        registry: CollectorRegistry,
    ) -> None:
        """The watchdog has nothing to report before the probe began or once stopped."""
        clock.now = 100.0
        assert monitor._watchdog_step() == THRESHOLD  # probe not begun on the loop yet
        fake_loop.run_soon()
        monitor.stop()
        assert monitor._watchdog_step() == THRESHOLD

        assert samples(registry)[2] == 0.0


class TestLifecycle:
    def test_start_stop_are_idempotent(
        self, registry: CollectorRegistry, fake_loop: FakeLoop
    ) -> None:
        """Starting twice is one start; stopping twice, or unstarted, is harmless."""
        monitor = LoopMonitor(registry=registry, watchdog=False)
        monitor.stop()
        loop = cast(asyncio.AbstractEventLoop, fake_loop)
        monitor.start(loop)
        monitor.start(loop)
        fake_loop.run_soon()

        running_after_start = monitor.running
        assert len(fake_loop.live_timers()) == 1
        monitor.stop()
        fake_loop.run_soon()
        monitor.stop()
        assert running_after_start
        assert not monitor.running
        assert fake_loop.live_timers() == []

    def test_stop_after_the_loop_closed(
        self, registry: CollectorRegistry, fake_loop: FakeLoop
    ) -> None:
        """A loop closed before ``stop()`` is not touched."""
        monitor = LoopMonitor(registry=registry, watchdog=False)
        monitor.start(cast(asyncio.AbstractEventLoop, fake_loop))
        fake_loop.run_soon()
        fake_loop.closed = True

        monitor.stop()

        assert not monitor.running

    def test_start_outside_a_loop_needs_the_loop(self, registry: CollectorRegistry) -> None:
        """Without a running loop, ``start()`` must be given one."""
        with pytest.raises(RuntimeError, match="no running event loop"):
            LoopMonitor(registry=registry).start()

    def test_monitors_share_the_registry(self, registry: CollectorRegistry) -> None:
        """Several monitors can be built on one registry (e.g. one per app in tests)."""
        LoopMonitor(registry=registry)
        LoopMonitor(registry=registry)
        LoopMonitor(registry=registry, namespace="other")

        assert registry.get_sample_value("other_asyncio_event_loop_blocked_total") == 0.0

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"interval": 0}, "interval must be a positive number"),
            ({"interval": float("inf")}, "interval must be a positive number"),
            ({"blocked_threshold": -1}, "blocked_threshold must be a positive number"),
            ({"blocked_threshold": "0.1"}, "blocked_threshold must be a positive number"),
            ({"max_stack_frames": 0}, "max_stack_frames must be a positive integer"),
            ({"namespace": "no spaces"}, "letters, digits"),
        ],
    )
    def test_invalid_configuration(
        self, registry: CollectorRegistry, kwargs: dict[str, Any], message: str
    ) -> None:
        """Bad options raise ``ValueError`` at construction."""
        with pytest.raises(ValueError, match=message):
            LoopMonitor(registry=registry, **kwargs)


def blocking_call() -> None:
    time.sleep(0.3)


BLOCKING_LINE = blocking_call.__code__.co_firstlineno + 1


async def _block_the_loop(registry: CollectorRegistry) -> tuple[LoopMonitor, threading.Thread]:
    monitor = LoopMonitor(registry=registry, interval=0.02, blocked_threshold=THRESHOLD)
    async with monitor:
        watchdog = monitor._watchdog
        assert watchdog is not None
        assert watchdog.is_alive()
        await asyncio.sleep(0.05)
        blocking_call()
        await asyncio.sleep(0.05)
    return monitor, watchdog


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_real_loop_stall_is_named_in_the_log(loop_kind: str, registry: CollectorRegistry) -> None:
    """On a real loop, a ``time.sleep`` in a coroutine is found, counted once and named."""
    runner: Callable[[Any], Any] = asyncio.run
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        runner = uvloop.run
    with structlog.testing.capture_logs() as logs:
        monitor, watchdog = runner(_block_the_loop(registry))

    assert not watchdog.is_alive()
    assert not monitor.running
    lag_count, _, blocked = samples(registry)
    assert blocked == 1.0
    assert lag_count is not None
    assert lag_count >= 3
    assert registry.get_sample_value(
        "asyncio_event_loop_lag_seconds_bucket", {"le": "0.1"}
    ) == pytest.approx(lag_count - 1)
    blocked_logs = [log for log in logs if log["event"] == "event_loop_blocked"]
    resumed_logs = [log for log in logs if log["event"] == "event_loop_resumed"]
    assert len(blocked_logs) == 1
    innermost = blocked_logs[0]["stack"].splitlines()[-1]
    assert f"{__file__}:{BLOCKING_LINE} in blocking_call: time.sleep(0.3)" == innermost
    assert len(resumed_logs) == 1
    assert 0.2 <= resumed_logs[0]["blocked_s"] <= 0.35


async def test_start_and_stop_from_other_threads(registry: CollectorRegistry) -> None:
    """Given the loop, ``start()`` and ``stop()`` work from any thread."""
    loop = asyncio.get_running_loop()
    monitor = LoopMonitor(registry=registry, interval=0.01, watchdog=False)
    await asyncio.to_thread(monitor.start, loop)
    await asyncio.sleep(0.1)
    await asyncio.to_thread(monitor.stop)
    await asyncio.sleep(0)  # the stop reaches the loop
    probes = samples(registry)[0]
    await asyncio.sleep(0.05)

    assert probes is not None
    assert probes >= 2
    assert samples(registry)[0] == probes  # no probe after stop


def test_restart_on_a_new_loop(registry: CollectorRegistry) -> None:
    """One monitor can be started again on another loop (e.g. a lifespan per test client)."""
    monitor = LoopMonitor(registry=registry, interval=0.01, watchdog=False)

    async def run() -> None:
        monitor.start()
        await asyncio.sleep(0.05)

    asyncio.run(run())  # the first loop closes without stop()
    first = samples(registry)[0]
    asyncio.run(run())
    monitor.stop()

    assert first is not None
    assert first >= 1
    assert (samples(registry)[0] or 0) > first


# -- under a real uvicorn ----------------------------------------------------------------------

BLOCKING_APP = Path(__file__).parent / "apps" / "blocking_app.py"


def _source_line(path: Path, text: str) -> int:
    (number,) = [n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    return number


def _json_lines(log: str) -> list[dict[str, Any]]:
    records = []
    for line in log.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def _lag_over(text: str, bound: str) -> float:
    """Lag observations above the bucket bound ``bound``, from a /metrics page."""
    values = {
        (sample.name, sample.labels.get("le")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return (
        values[("asyncio_event_loop_lag_seconds_count", None)]
        - values[("asyncio_event_loop_lag_seconds_bucket", bound)]
    )


def _run_blocking_app(mode: str, loop: str) -> tuple[list[dict[str, Any]], str]:
    """Serve one request to the blocking app; its JSON log records and its last /metrics."""
    env = {"BLOCKING_APP_MODE": mode}
    with start_uvicorn("tests.apps.blocking_app:app", env=env, args=["--loop", loop]) as server:
        response = httpx.get(f"{server.url}/work", headers={"x-request-id": "req-42"}, timeout=10)
        assert response.text == "done"
        metrics_text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return _json_lines(server.log()), metrics_text


@pytest.mark.uvicorn
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_uvicorn_blocking_endpoint_is_named(loop: str) -> None:
    """``time.sleep`` in an ``async def`` endpoint: logged with its file, line and function."""
    records, metrics_text = _run_blocking_app("block", loop)

    line = _source_line(BLOCKING_APP, "time.sleep(0.3)  # noqa")
    blocked = [r for r in records if r["event"] == "event_loop_blocked"]
    assert len(blocked) == 1, blocked
    innermost = blocked[0]["stack"].splitlines()[-1]
    assert innermost.startswith(f"{BLOCKING_APP}:{line} in work: time.sleep(0.3)")
    assert blocked[0]["blocked_s"] >= THRESHOLD
    (resumed,) = [r for r in records if r["event"] == "event_loop_resumed"]
    assert 0.2 <= resumed["blocked_s"] <= 0.6
    assert "request_id" not in resumed  # the probe does not run in the request's context
    assert _lag_over(metrics_text, "0.1") >= 1
    assert "asyncio_event_loop_blocked_total 1.0" in metrics_text
    access = [r for r in records if r.get("logger") == "uvicorn.access"]
    assert [r["request_id"] for r in access if "/work" in r["event"]] == ["req-42"]


@pytest.mark.uvicorn
def test_uvicorn_same_app_without_the_blocking_call_logs_nothing() -> None:
    """Awaiting instead of blocking: no stall logged, no lag over the threshold."""
    records, metrics_text = _run_blocking_app("await", "asyncio")

    assert [r for r in records if r["event"].startswith("event_loop_")] == []
    assert _lag_over(metrics_text, "0.1") == 0
    assert "asyncio_event_loop_blocked_total 0.0" in metrics_text
    assert any(r.get("logger") == "uvicorn.error" for r in records)  # uvicorn's logs are JSON
