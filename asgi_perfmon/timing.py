"""``timed``: time an operation as a decorator (sync or async) or a context manager."""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, NamedTuple, TypeVar, overload

import structlog
from prometheus_client import CollectorRegistry

from asgi_perfmon._labels import BoundedFamilies, BoundedLabels
from asgi_perfmon._logging import FailureLog
from asgi_perfmon._registry import resolve_namespace, resolve_registry, shared_matching
from asgi_perfmon.context import _current, _operation
from asgi_perfmon.metrics import DEFAULT_BUCKETS, validate_buckets

__all__ = ["Timed", "timed"]

F = TypeVar("F", bound=Callable[..., Any])

OK = "ok"
ERROR = "error"

logger = structlog.get_logger("asgi_perfmon")
_failures = FailureLog()


class _Family(NamedTuple):
    buckets: tuple[float, ...]
    children: BoundedLabels[Any]


def _family(registry: CollectorRegistry, namespace: str, buckets: tuple[float, ...]) -> _Family:
    """``operation_duration_seconds{operation,outcome}`` in ``registry``, shared."""

    def build() -> _Family:
        children = BoundedFamilies(registry, namespace).histogram(
            "operation_duration_seconds",
            "Duration of operations timed with asgi_perfmon.timed, by outcome.",
            ["operation", "outcome"],
            buckets,
        )
        return _Family(buckets, children)

    return shared_matching(
        registry,
        ("operation_duration", namespace),
        build,
        matches=lambda family: family.buckets == buckets,
        conflict=(
            "This registry already holds operation_duration_seconds with other buckets; pass "
            "the same buckets to every timed(), or use a separate registry or namespace."
        ),
    )


class _Operation:
    """One named operation: its cached metric children and what to do when it ends.

    ``record`` is called from ``finally`` blocks, so it must never raise: a failure of the
    instrumentation is logged once and otherwise ignored.
    """

    __slots__ = ("_error", "_ok", "clock", "name", "slow_threshold")

    def __init__(
        self,
        name: str,
        family: _Family,
        slow_threshold: float | None,
        clock: Callable[[], float],
    ) -> None:
        self.name = name
        self.slow_threshold = slow_threshold
        self.clock = clock
        # Both series exist from the start, so an error rate can be computed before any error.
        self._ok = family.children.labels(name, OK)
        self._error = family.children.labels(name, ERROR)

    def record(self, start: float, outcome: str) -> None:
        """Observe the time since ``start`` and add it to the request's breakdown."""
        try:
            duration = max(self.clock() - start, 0.0)
            (self._ok if outcome == OK else self._error).observe(duration)
            request = _current.get()
            if request is not None:
                request.add_operation(self.name, duration)
            if self.slow_threshold is not None and duration >= self.slow_threshold:
                logger.warning(
                    "slow_operation",
                    operation=self.name,
                    duration_s=round(duration, 6),
                    threshold_s=self.slow_threshold,
                    outcome=outcome,
                )
        except Exception as error:
            _failures.record("timed", error)


class _Entry(NamedTuple):
    """One open ``with`` block of a :class:`Timed` object, linked to the block it is in."""

    owner: Timed
    operation: _Operation
    start: float
    token: Token[str | None] | None
    outer: _Entry | None


# The innermost open ``with timed(...)`` block of the current task or thread. Kept in a
# ContextVar so that one Timed object can be entered by many tasks at once, and nested.
_entries: ContextVar[_Entry | None] = ContextVar("asgi_perfmon_timed", default=None)


class Timed:
    """An operation timer; build it with :func:`timed`.

    As a decorator it wraps sync and async functions (``inspect.iscoroutinefunction`` stays
    true). As a context manager it works with ``with`` and ``async with``; one object may be
    entered by many tasks at once and nested, since every entry keeps its own start time.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        slow_threshold: float | None = None,
        registry: CollectorRegistry | None = None,
        namespace: str | None = None,
        buckets: Sequence[float] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            msg = f"The operation name must be a non-empty string, got {name!r}."
            raise ValueError(msg)
        self._slow_threshold = _validate_threshold(slow_threshold)
        self._clock = clock
        self._family = _family(
            resolve_registry(registry),
            resolve_namespace(namespace),
            DEFAULT_BUCKETS if buckets is None else validate_buckets(buckets),
        )
        self._operation = None if name is None else self._bind(name)

    @property
    def name(self) -> str | None:
        """The operation name given at declaration, if any."""
        return None if self._operation is None else self._operation.name

    def _bind(self, name: str) -> _Operation:
        return _Operation(name, self._family, self._slow_threshold, self._clock)

    def __call__(self, func: F) -> F:
        """Decorate ``func``; the operation is named after it unless a name was given."""
        if not callable(func):
            msg = f"timed() decorates functions; {func!r} is not callable."  # type: ignore[unreachable]
            raise TypeError(msg)
        if inspect.isasyncgenfunction(func) or inspect.isgeneratorfunction(func):
            msg = (
                f"timed() cannot decorate the generator function {_describe(func)}: calling "
                "it only creates the generator. Use `with timed(...)` inside its body instead."
            )
            raise TypeError(msg)
        operation = self._operation or self._bind(_default_name(func))
        if inspect.iscoroutinefunction(func):
            return _wrap_async(func, operation)
        return _wrap_sync(func, operation)

    def __enter__(self) -> None:
        operation = self._operation
        if operation is None:
            msg = 'timed() needs a name when used as a context manager: `with timed("name"):`.'
            raise TypeError(msg)
        token = _operation.set(operation.name)
        _entries.set(_Entry(self, operation, operation.clock(), token, _entries.get()))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry = self._pop_entry()
        if entry is None:
            return
        if entry.token is not None:
            _reset_operation(entry.token)
        entry.operation.record(entry.start, OK if exc_type is None else ERROR)

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def _pop_entry(self) -> _Entry | None:
        """Remove this object's innermost open entry (normally the innermost of all).

        The entry comes back with the ``current_operation`` token to reset, or with ``None``
        when blocks inside it are still open: the operation running is then unchanged.
        """
        entry = _entries.get()
        if entry is not None and entry.owner is self:
            _entries.set(entry.outer)
            return entry
        # Blocks closed out of order (e.g. across generators): unlink ours, keep the others.
        inner: list[_Entry] = []
        while entry is not None and entry.owner is not self:
            inner.append(entry)
            entry = entry.outer
        if entry is None:
            return None  # entered in another context: nothing to measure here
        outer = entry.outer
        # The block just inside ours takes our token: closing it restores what ran before ours.
        token = entry.token
        for kept in reversed(inner):
            outer = kept._replace(outer=outer, token=token)
            token = kept.token
        _entries.set(outer)
        return entry._replace(token=None)


def _default_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__qualname__", None)
    if not isinstance(name, str) or not name:
        msg = f"timed() cannot name {func!r} after a function; pass a name: timed('name')."
        raise TypeError(msg)
    return name


def _describe(func: Callable[..., Any]) -> str:
    return str(getattr(func, "__qualname__", None) or repr(func))


def _reset_operation(token: Token[str | None]) -> None:
    try:
        _operation.reset(token)
    except ValueError:
        return  # a token from another context (entered there, exited here): leave it alone


def _wrap_sync(func: F, operation: _Operation) -> F:
    clock = operation.clock
    record = operation.record

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _operation.set(operation.name)
        outcome = ERROR
        start = clock()
        try:
            result = func(*args, **kwargs)
            outcome = OK
            return result
        finally:
            _operation.reset(token)
            record(start, outcome)

    return wrapper  # type: ignore[return-value]


def _wrap_async(func: F, operation: _Operation) -> F:
    clock = operation.clock
    record = operation.record

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = _operation.set(operation.name)
        outcome = ERROR
        start = clock()
        try:
            result = await func(*args, **kwargs)
            outcome = OK
            return result
        finally:
            _operation.reset(token)
            record(start, outcome)

    return wrapper  # type: ignore[return-value]


def _validate_threshold(value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        msg = f"slow_threshold must be a number of seconds, got {value!r}."
        raise ValueError(msg)
    if value < 0:
        msg = f"slow_threshold must not be negative, got {value!r}."
        raise ValueError(msg)
    return float(value)


@overload
def timed(name: F, /) -> F: ...


@overload
def timed(
    name: str | None = None,
    *,
    slow_threshold: float | None = None,
    registry: CollectorRegistry | None = None,
    namespace: str | None = None,
    buckets: Sequence[float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Timed: ...


def timed(
    name: str | Callable[..., Any] | None = None,
    *,
    slow_threshold: float | None = None,
    registry: CollectorRegistry | None = None,
    namespace: str | None = None,
    buckets: Sequence[float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Any:
    """Time an operation into ``operation_duration_seconds{operation, outcome}``.

    Use it as ``@timed``, ``@timed()``, ``@timed("name")``, ``with timed("name"):`` or
    ``async with timed("name"):``. The operation name is fixed here (default: the decorated
    function's ``__qualname__``), so the label stays bounded. An exception propagates
    unchanged and counts as ``outcome="error"`` (cancellation too). While the operation runs,
    :func:`asgi_perfmon.context.current_operation` returns its name; when it ends, its duration
    is added to the breakdown of the request in flight, if any, and a ``slow_operation``
    warning is logged when it took ``slow_threshold`` seconds or more.
    """
    if callable(name):
        return Timed(
            slow_threshold=slow_threshold,
            registry=registry,
            namespace=namespace,
            buckets=buckets,
            clock=clock,
        )(name)
    return Timed(
        name,
        slow_threshold=slow_threshold,
        registry=registry,
        namespace=namespace,
        buckets=buckets,
        clock=clock,
    )
