"""The library's logger, and logging that can never break the request it reports on."""

from __future__ import annotations

import contextlib
from typing import Any

import structlog

logger = structlog.get_logger("asgi_perfmon")


def log_safely(level: str, event: str, **fields: Any) -> None:
    """Log through structlog; a broken processor or sink is ignored, not raised into the app."""
    with contextlib.suppress(Exception):
        getattr(logger, level)(event, **fields)


class FailureLog:
    """Logs each kind of instrumentation failure once, so a fault does not flood the logs.

    A kind is the event, the place, the error type and the extra fields (e.g. a pool name).
    """

    def __init__(self) -> None:
        self._seen: set[tuple[object, ...]] = set()

    def record(
        self,
        where: str,
        error: BaseException,
        *,
        event: str = "instrumentation_failed",
        **fields: str,
    ) -> None:
        key = (event, where, type(error).__name__, *fields.values())
        if key in self._seen:
            return
        self._seen.add(key)
        log_safely(
            "error",
            event,
            where=where,
            error_type=type(error).__name__,
            exc_info=error,
            **fields,
        )
