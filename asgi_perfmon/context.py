"""The per-request context: request id and the breakdown of what ran inside the request.

The middleware creates one :class:`RequestContext` per HTTP request and stores it in a
``ContextVar``. Tasks started inside the request (``asyncio.gather``, ``create_task``) copy the
context and so share the same object; concurrent requests each have their own. Everything runs
on the event loop thread, so the plain ``+=`` updates below need no lock.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

MAX_TRACKED_STATEMENTS = 200
"""Distinct SQL statements remembered per request for the repeated-statement report."""
MAX_REPORTED_STATEMENTS = 5
STATEMENT_PREVIEW_CHARS = 200


@dataclass
class OperationTotals:
    """How often an operation ran inside one request, and for how long."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds
        if seconds > self.max_s:
            self.max_s = seconds

    def as_dict(self) -> dict[str, float | int]:
        return {
            "count": self.count,
            "total_s": round(self.total_s, 6),
            "max_s": round(self.max_s, 6),
        }


class RequestContext:
    """What the middleware knows about the request in flight, and what ran inside it.

    ``route`` is the route template; the middleware works it out when it is first read, so a
    request that never asks pays nothing for it until the response is recorded. The counters
    start at their class defaults and the two dicts are made on first use: most requests run
    no query and no timed operation, and every request builds one of these.
    """

    db_queries = 0
    db_errors = 0
    db_total_s = 0.0
    db_acquire_wait_s = 0.0
    cache_hits = 0
    cache_misses = 0
    _operations: dict[str, OperationTotals] | None = None
    _statements: dict[str, int] | None = None

    def __init__(self, request_id: str, method: str = "", route: str = "", path: str = "") -> None:
        self.request_id = request_id
        self.method = method
        self._route: str | None = route or None
        self.path = path

    def __repr__(self) -> str:
        return (
            f"RequestContext(request_id={self.request_id!r}, method={self.method!r}, "
            f"route={self._route!r}, path={self.path!r})"
        )

    @property
    def route(self) -> str:
        """The route template of the request (``__unmatched__`` when no route matched)."""
        if self._route is None:
            self._route = self._find_route()
        return self._route

    @route.setter
    def route(self, value: str) -> None:
        self._route = value

    def _find_route(self) -> str:
        """Overridden by the middleware's per-request object; a bare context has no route."""
        return ""

    @property
    def operations(self) -> dict[str, OperationTotals]:
        """Each ``timed`` operation that ran inside the request, by name."""
        if self._operations is None:
            self._operations = {}
        return self._operations

    @property
    def statements(self) -> dict[str, int]:
        """How often each SQL statement ran inside the request (up to 200 statements)."""
        if self._statements is None:
            self._statements = {}
        return self._statements

    def add_operation(self, name: str, seconds: float) -> None:
        """Record one run of the operation ``name`` (from ``timed``)."""
        totals = self.operations.get(name)
        if totals is None:
            totals = self.operations[name] = OperationTotals()
        totals.add(seconds)

    def add_query(self, statement: str, seconds: float, *, failed: bool = False) -> None:
        """Record one database query; repeated statements are N+1 suspects."""
        self.db_queries += 1
        self.db_total_s += seconds
        if failed:
            self.db_errors += 1
        statements = self.statements
        count = statements.get(statement)
        if count is not None:
            statements[statement] = count + 1
        elif len(statements) < MAX_TRACKED_STATEMENTS:
            statements[statement] = 1

    def add_acquire_wait(self, seconds: float) -> None:
        """Record time spent waiting for a pooled database connection."""
        self.db_acquire_wait_s += seconds

    def add_cache_result(self, *, hit: bool) -> None:
        """Record one cache lookup."""
        if hit:
            self.cache_hits += 1
        else:
            self.cache_misses += 1

    def repeated_statements(self) -> list[dict[str, Any]]:
        """The statements run more than once, most repeated first."""
        repeated = [(n, s) for s, n in self.statements.items() if n > 1]
        repeated.sort(key=lambda item: item[0], reverse=True)
        return [
            {"statement": statement[:STATEMENT_PREVIEW_CHARS], "count": count}
            for count, statement in repeated[:MAX_REPORTED_STATEMENTS]
        ]

    def breakdown(self) -> dict[str, Any]:
        """The ``operations``, ``db`` and ``cache`` fields of the ``slow_request`` log."""
        return {
            "operations": {name: t.as_dict() for name, t in self.operations.items()},
            "db": {
                "queries": self.db_queries,
                "errors": self.db_errors,
                "total_s": round(self.db_total_s, 6),
                "acquire_wait_s": round(self.db_acquire_wait_s, 6),
                "repeated_statements": self.repeated_statements(),
            },
            "cache": {"hits": self.cache_hits, "misses": self.cache_misses},
        }


_current: ContextVar[RequestContext | None] = ContextVar("asgi_perfmon_request", default=None)


def current_request() -> RequestContext | None:
    """The context of the HTTP request being served, or ``None`` outside a request."""
    return _current.get()


_operation: ContextVar[str | None] = ContextVar("asgi_perfmon_operation", default=None)


def current_operation() -> str | None:
    """The name of the innermost ``timed`` operation running, or ``None``."""
    return _operation.get()
