"""The library's logger, and logging that can never break the request it reports on."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import structlog

logger = structlog.get_logger("asgi_perfmon")

MAX_FAILURE_KINDS = 1000
"""Distinct failure kinds one :class:`FailureLog` remembers; later new kinds go unlogged."""
_MAX_KEY_FIELD = 200  # characters of each field kept in a kind's key


def log_safely(level: str, event: str, **fields: Any) -> None:
    """Log through structlog; a broken processor or sink is ignored, not raised into the app."""
    with contextlib.suppress(Exception):
        getattr(logger, level)(event, **fields)


class FailureLog:
    """Logs each kind of instrumentation failure once, so a fault does not flood the logs.

    A kind is the event, the place, the error type and the extra fields (e.g. a pool name).
    At most ``max_kinds`` kinds are remembered, so endless variety (e.g. error types made up
    at run time) cannot grow it: past that, one ``failure_log_full`` warning, then silence.
    """

    def __init__(self, max_kinds: int = MAX_FAILURE_KINDS) -> None:
        self._max_kinds = max_kinds
        self._seen: set[tuple[str, ...]] = set()
        self._full = False

    def record(
        self,
        where: str,
        error: BaseException,
        *,
        event: str = "instrumentation_failed",
        details: Mapping[str, object] | None = None,
        **fields: str,
    ) -> None:
        """Log ``error`` unless its kind was logged already. ``details`` are logged with it
        but are not part of the kind (e.g. the first file name of many)."""
        key = (event, where, type(error).__name__, *(v[:_MAX_KEY_FIELD] for v in fields.values()))
        if key in self._seen:
            return
        if len(self._seen) >= self._max_kinds:
            self._log_full_once()
            return
        self._seen.add(key)
        context = {**(details or {}), **fields}
        context.update(where=where, error_type=type(error).__name__, exc_info=error)
        log_safely("error", event, **context)

    def _log_full_once(self) -> None:
        if self._full:
            return
        self._full = True
        log_safely("warning", "failure_log_full", max_kinds=self._max_kinds)
