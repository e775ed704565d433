"""``timed``: decorator and context manager, metrics, request breakdown, slow operations."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry

from asgi_perfmon import timing
from asgi_perfmon._logging import FailureLog
from asgi_perfmon.context import RequestContext, _current, current_operation
from asgi_perfmon.timing import Timed, timed


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock()


def count(registry: CollectorRegistry, operation: str, outcome: str = "ok") -> float | None:
    return registry.get_sample_value(
        "operation_duration_seconds_count", {"operation": operation, "outcome": outcome}
    )


def total(registry: CollectorRegistry, operation: str, outcome: str = "ok") -> float | None:
    return registry.get_sample_value(
        "operation_duration_seconds_sum", {"operation": operation, "outcome": outcome}
    )


@pytest.fixture
def in_request() -> Iterator[RequestContext]:
    """A request context, as the middleware would set it."""
    context = RequestContext(request_id="req-1")
    token = _current.set(context)
    yield context
    _current.reset(token)


class TestDecorator:
    def test_sync_function_records_its_duration(
        self, registry: CollectorRegistry, clock: FakeClock
    ) -> None:
        """A sync function's duration, read from the clock, lands in the ok series."""

        @timed("load", registry=registry, clock=clock)
        def load(x: int) -> int:
            clock.advance(0.25)
            return x * 2

        assert load(21) == 42
        assert count(registry, "load") == 1
        assert total(registry, "load") == pytest.approx(0.25)
        assert count(registry, "load", "error") == 0

    async def test_async_function_stays_a_coroutine_function(
        self, registry: CollectorRegistry, clock: FakeClock
    ) -> None:
        """The wrapper of an ``async def`` is itself a coroutine function and times the await."""

        @timed("fetch", registry=registry, clock=clock)
        async def fetch() -> str:
            await asyncio.sleep(0)
            clock.advance(0.5)
            return "done"

        assert inspect.iscoroutinefunction(fetch)
        assert await fetch() == "done"
        assert total(registry, "fetch") == pytest.approx(0.5)

    def test_exception_propagates_unchanged_and_counts_as_error(
        self, registry: CollectorRegistry, clock: FakeClock
    ) -> None:
        """The very exception object reaches the caller; the run counts as an error."""
        error = KeyError("missing")

        @timed("lookup", registry=registry, clock=clock)
        def lookup() -> None:
            clock.advance(0.1)
            raise error

        with pytest.raises(KeyError) as caught:
            lookup()

        assert caught.value is error
        assert count(registry, "lookup", "error") == 1
        assert total(registry, "lookup", "error") == pytest.approx(0.1)
        assert count(registry, "lookup") == 0

    async def test_async_exception_and_cancellation_count_as_errors(
        self, registry: CollectorRegistry
    ) -> None:
        """An awaited failure and a cancellation both count as ``error``."""

        @timed("boom", registry=registry)
        async def boom() -> None:
            raise ValueError("no")

        @timed("wait", registry=registry)
        async def wait() -> None:
            await asyncio.Event().wait()

        with pytest.raises(ValueError, match="no"):
            await boom()
        task = asyncio.create_task(wait())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        assert count(registry, "boom", "error") == 1
        assert count(registry, "wait", "error") == 1

    def test_name_defaults_to_the_qualified_name(self, registry: CollectorRegistry) -> None:
        """``@timed()`` names the operation after the function, methods included."""

        class Repo:
            @timed(registry=registry)
            def get(self) -> int:
                return 1

        assert Repo().get() == 1
        assert count(registry, Repo.get.__qualname__) == 1
        assert Repo.get.__qualname__.endswith("Repo.get")

    def test_bare_decorator_uses_the_default_registry(self) -> None:
        """``@timed`` without parentheses works and keeps the function's metadata."""

        def original(a: int, b: int = 2) -> int:
            """Adds."""
            return a + b

        decorated = timed(original)

        assert decorated(1) == 3
        assert decorated.__name__ == "original"
        assert decorated.__doc__ == "Adds."
        assert decorated.__wrapped__ is original  # type: ignore[attr-defined]
        assert inspect.signature(decorated) == inspect.signature(original)

    def test_one_unnamed_timed_names_each_function(self, registry: CollectorRegistry) -> None:
        """A ``timed()`` object reused on two functions keeps their names apart."""
        timer = timed(registry=registry)

        @timer
        def first() -> None:
            pass

        @timer
        def second() -> None:
            pass

        first()
        second()
        second()

        assert count(registry, first.__qualname__) == 1
        assert count(registry, second.__qualname__) == 2

    def test_generator_functions_are_refused(self, registry: CollectorRegistry) -> None:
        """Generators would be timed only while being created: refuse them clearly."""

        def numbers() -> Iterator[int]:
            yield 1

        async def stream() -> AsyncIterator[int]:
            yield 1

        with pytest.raises(TypeError, match=r"generator function .*numbers"):
            timed("n", registry=registry)(numbers)
        with pytest.raises(TypeError, match=r"generator function .*stream"):
            timed(registry=registry)(stream)

    def test_operation_is_current_while_running(self, registry: CollectorRegistry) -> None:
        """``current_operation()`` names the innermost operation, and is restored after."""
        seen: list[str | None] = []

        @timed("inner", registry=registry)
        def inner() -> None:
            seen.append(current_operation())

        @timed("outer", registry=registry)
        def outer() -> None:
            seen.append(current_operation())
            inner()
            seen.append(current_operation())

        outer()

        assert seen == ["outer", "inner", "outer"]
        assert current_operation() is None

    def test_operation_is_reset_after_an_exception(self, registry: CollectorRegistry) -> None:
        """A failing operation does not leave its name behind."""

        @timed("fails", registry=registry)
        def fails() -> None:
            raise RuntimeError

        with pytest.raises(RuntimeError):
            fails()

        assert current_operation() is None


class TestContextManager:
    def test_with_block_records(self, registry: CollectorRegistry, clock: FakeClock) -> None:
        """``with timed("name"):`` measures the block."""
        with timed("block", registry=registry, clock=clock):
            assert current_operation() == "block"
            clock.advance(0.3)

        assert total(registry, "block") == pytest.approx(0.3)
        assert current_operation() is None

    async def test_async_with_block_records_errors(
        self, registry: CollectorRegistry, clock: FakeClock
    ) -> None:
        """``async with`` measures the block; an exception inside propagates as an error."""

        async def failing_block() -> None:
            async with timed("ablock", registry=registry, clock=clock):
                clock.advance(0.2)
                raise LookupError

        with pytest.raises(LookupError):
            await failing_block()

        assert count(registry, "ablock", "error") == 1
        assert total(registry, "ablock", "error") == pytest.approx(0.2)

    def test_nesting_the_same_object(self, registry: CollectorRegistry, clock: FakeClock) -> None:
        """Each entry of one object has its own start time."""
        timer = timed("nested", registry=registry, clock=clock)
        with timer:
            clock.advance(1.0)
            with timer:
                clock.advance(2.0)
            clock.advance(4.0)

        assert count(registry, "nested") == 2
        assert total(registry, "nested") == pytest.approx(2.0 + 7.0)

    def test_blocks_closed_out_of_order(
        self, registry: CollectorRegistry, clock: FakeClock
    ) -> None:
        """Blocks closed out of order (possible with generators) are still measured right."""
        first = timed("first", registry=registry, clock=clock)
        second = timed("second", registry=registry, clock=clock)
        first.__enter__()
        clock.advance(1.0)
        second.__enter__()
        clock.advance(2.0)
        first.__exit__(None, None, None)
        assert current_operation() == "second"
        clock.advance(4.0)
        second.__exit__(None, None, None)

        assert total(registry, "first") == pytest.approx(3.0)
        assert total(registry, "second") == pytest.approx(6.0)
        assert current_operation() is None

    def test_exit_without_enter_is_ignored(self, registry: CollectorRegistry) -> None:
        """Exiting in a context that never entered records nothing and raises nothing."""
        timer = timed("stray", registry=registry)
        timer.__exit__(None, None, None)

        assert count(registry, "stray") == 0

    def test_a_name_is_required(self, registry: CollectorRegistry) -> None:
        """Without a name there is nothing to label the block with."""
        with pytest.raises(TypeError, match="needs a name"), timed(registry=registry):
            pass

    async def test_one_object_entered_by_concurrent_tasks(
        self, registry: CollectorRegistry, clock: FakeClock
    ) -> None:
        """Many tasks inside one object at once each get their own duration."""
        timer = timed("shared", registry=registry, clock=clock)
        contexts = [RequestContext(request_id=str(i)) for i in range(50)]

        async def work(i: int) -> None:
            _current.set(contexts[i])
            clock.now = float(i)
            async with timer:
                await asyncio.sleep(0)  # every task enters before any leaves
                await asyncio.sleep(0)
                clock.now = 1000.0 + 2 * i
            assert current_operation() is None

        await asyncio.gather(*(work(i) for i in range(50)))

        assert count(registry, "shared") == 50
        assert total(registry, "shared") == pytest.approx(sum(1000.0 + i for i in range(50)))
        for i, context in enumerate(contexts):
            assert context.operations["shared"].as_dict() == {
                "count": 1,
                "total_s": 1000.0 + i,
                "max_s": 1000.0 + i,
            }


class TestRequestBreakdown:
    def test_operations_add_up_in_the_request(
        self, registry: CollectorRegistry, clock: FakeClock, in_request: RequestContext
    ) -> None:
        """Every run inside the request adds to its count, total and maximum."""
        timer = timed("load_user", registry=registry, clock=clock)
        for seconds in (0.3, 0.5):
            with timer:
                clock.advance(seconds)

        assert in_request.breakdown()["operations"] == {
            "load_user": {"count": 2, "total_s": 0.8, "max_s": 0.5}
        }

    def test_outside_a_request_only_metrics(self, registry: CollectorRegistry) -> None:
        """With no request in flight, the metric is still recorded."""

        @timed("background", registry=registry)
        def background() -> None:
            pass

        background()

        assert count(registry, "background") == 1

    async def test_concurrent_requests_get_exactly_their_own_operations(
        self, registry: CollectorRegistry
    ) -> None:
        """200 concurrent requests, interleaved, each see only what ran inside them."""
        task_time: ContextVar[float] = ContextVar("task_time", default=0.0)

        def clock() -> float:  # every task has its own time line
            return task_time.get()

        @timed("query", registry=registry, clock=clock)
        async def query(seconds: float) -> None:
            await asyncio.sleep(0)
            task_time.set(task_time.get() + seconds)

        render = timed("render", registry=registry, clock=clock)

        async def request(i: int) -> RequestContext:
            context = RequestContext(request_id=f"r{i}")
            _current.set(context)  # each task runs in its own copy of the context
            for run in range(i % 4):
                await query(i + run)
            async with render:
                await asyncio.sleep(0)
                task_time.set(task_time.get() + 0.5)
            return context

        contexts = await asyncio.gather(*(request(i) for i in range(200)))

        for i, context in enumerate(contexts):
            runs = [float(i + run) for run in range(i % 4)]
            expected = {"render": {"count": 1, "total_s": 0.5, "max_s": 0.5}}
            if runs:
                expected["query"] = {"count": len(runs), "total_s": sum(runs), "max_s": runs[-1]}
            assert context.breakdown()["operations"] == expected, i
        assert count(registry, "query") == sum(i % 4 for i in range(200))
        assert count(registry, "render") == 200


class TestSlowOperation:
    def test_slow_run_is_logged(self, registry: CollectorRegistry, clock: FakeClock) -> None:
        """A run at or over the threshold logs ``slow_operation`` with its fields."""
        timer = timed("report", slow_threshold=0.5, registry=registry, clock=clock)
        with structlog.testing.capture_logs() as logs:
            with timer:
                clock.advance(0.5)
            with timer:
                clock.advance(0.49)

        assert logs == [
            {
                "event": "slow_operation",
                "log_level": "warning",
                "operation": "report",
                "duration_s": 0.5,
                "threshold_s": 0.5,
                "outcome": "ok",
            }
        ]

    def test_slow_failure_logs_its_outcome(
        self, registry: CollectorRegistry, clock: FakeClock
    ) -> None:
        """A slow failing run is logged with ``outcome="error"``."""

        @timed("export", slow_threshold=1, registry=registry, clock=clock)
        def export() -> None:
            clock.advance(2)
            raise OSError("disk full")

        with structlog.testing.capture_logs() as logs, pytest.raises(OSError, match="disk full"):
            export()

        assert [(log["event"], log["outcome"], log["duration_s"]) for log in logs] == [
            ("slow_operation", "error", 2.0)
        ]

    def test_no_threshold_no_log(self, registry: CollectorRegistry, clock: FakeClock) -> None:
        """Without a threshold nothing is logged, however long it took."""
        with structlog.testing.capture_logs() as logs, timed("x", registry=registry, clock=clock):
            clock.advance(100)

        assert logs == []


class TestRobustness:
    def test_a_failing_logger_never_breaks_the_function(
        self, registry: CollectorRegistry, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """If logging fails, the result still comes back and the failure is reported once."""

        class Broken:
            def warning(self, *args: Any, **kwargs: Any) -> None:
                raise RuntimeError("log sink down")

        monkeypatch.setattr(timing, "logger", Broken())
        monkeypatch.setattr(timing, "_failures", FailureLog())

        @timed("fragile", slow_threshold=0.1, registry=registry, clock=clock)
        def fragile() -> str:
            clock.advance(1)
            return "result"

        with structlog.testing.capture_logs() as logs:
            assert fragile() == "result"
            assert fragile() == "result"

        assert count(registry, "fragile") == 2
        assert [(log["event"], log["where"], log["error_type"]) for log in logs] == [
            ("instrumentation_failed", "timed", "RuntimeError")
        ]

    def test_a_failing_clock_does_not_replace_the_user_exception(
        self, registry: CollectorRegistry
    ) -> None:
        """A measurement failure at the end never masks what the function raised."""
        readings = iter([1.0])

        def clock() -> float:
            return next(readings)  # the second reading raises StopIteration

        @timed("masked", registry=registry, clock=clock)
        def masked() -> None:
            raise ValueError("the real error")

        with pytest.raises(ValueError, match="the real error"):
            masked()

    def test_shared_registry(self, registry: CollectorRegistry) -> None:
        """Many ``timed`` objects share one family in a registry."""
        first = timed("a", registry=registry)
        second = timed("b", registry=registry)
        with first, second:
            pass

        assert count(registry, "a") == 1
        assert count(registry, "b") == 1

    def test_namespace_prefixes_the_metric(self, registry: CollectorRegistry) -> None:
        """``namespace`` prefixes the metric name."""
        with timed("a", registry=registry, namespace="shop"):
            pass

        assert (
            registry.get_sample_value(
                "shop_operation_duration_seconds_count", {"operation": "a", "outcome": "ok"}
            )
            == 1
        )

    def test_other_buckets_in_the_same_registry_are_refused(
        self, registry: CollectorRegistry
    ) -> None:
        """The family exists once per registry, so its buckets cannot differ."""
        timed("a", registry=registry, buckets=[0.1, 1])
        timed("b", registry=registry, buckets=[0.1, 1.0])

        with pytest.raises(ValueError, match="other buckets"):
            timed("c", registry=registry, buckets=[0.5])

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"name": ""}, "non-empty string"),
            ({"name": "x", "slow_threshold": -1}, "must not be negative"),
            ({"name": "x", "slow_threshold": float("nan")}, "number of seconds"),
            ({"name": "x", "slow_threshold": True}, "number of seconds"),
            ({"name": "x", "buckets": [1, 0.5]}, "strictly increasing"),
            ({"name": "x", "namespace": "bad-name"}, "letters, digits"),
        ],
    )
    def test_invalid_configuration(
        self, registry: CollectorRegistry, kwargs: dict[str, Any], message: str
    ) -> None:
        """Bad options raise ``ValueError`` at declaration."""
        with pytest.raises(ValueError, match=message):
            Timed(registry=registry, **kwargs)

    def test_non_callables_are_refused(self, registry: CollectorRegistry) -> None:
        """Decorating something that is not callable is a clear ``TypeError``."""
        with pytest.raises(TypeError, match="not callable"):
            timed("x", registry=registry)(42)  # type: ignore[type-var]

    def test_callables_without_a_name_need_one(self, registry: CollectorRegistry) -> None:
        """A partial or a callable object has no qualified name to default to."""

        def add(a: int, b: int) -> int:
            return a + b

        with pytest.raises(TypeError, match=r"pass a name: timed\('name'\)"):
            timed(registry=registry)(functools.partial(add, 1))

    def test_partial_of_a_coroutine_function(self, registry: CollectorRegistry) -> None:
        """A ``functools.partial`` of an ``async def`` is wrapped as async."""

        async def add(a: int, b: int) -> int:
            return a + b

        wrapped = timed("add", registry=registry)(functools.partial(add, 1))

        assert inspect.iscoroutinefunction(wrapped)
        assert asyncio.run(wrapped(2)) == 3
