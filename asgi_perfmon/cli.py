"""The ``asgi-perfmon`` command: ``asgi-perfmon slowlog FILE...`` summarises slow requests."""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any, cast

from asgi_perfmon.logconfig import escape_unsafe_characters, printable

try:
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - orjson comes with the [cli] extra
    from json import loads as _loads  # type: ignore[assignment]

__all__ = ["main"]

PROG = "asgi-perfmon"
SLOW_EVENT = "slow_request"
OUR_LOGGER = "asgi_perfmon"
_GZIP_MAGIC = b"\x1f\x8b"
_PROGRESS_EVERY_S = 0.2


class UsageError(Exception):
    """A problem with the command line or the input files; reported in one line, exit 2."""


# -- reading -----------------------------------------------------------------------------------


@dataclass
class Skipped:
    """What was read but not summarised, by reason."""

    not_json: int = 0
    other_events: int = 0
    invalid: int = 0
    filtered_out: int = 0


@dataclass
class Source:
    """One input: a path, or ``-`` for stdin."""

    name: str
    size: int | None  # bytes on disk, for progress; None for stdin


class Progress:
    """``bytes read / total`` on stderr, redrawn at most five times a second."""

    def __init__(self, total: int | None, stream: IO[str], enabled: bool) -> None:
        self._total = total
        self._stream = stream
        self._enabled = enabled
        self._last = 0.0
        self._shown = False

    def update(self, done: int, *, force: bool = False) -> None:
        """Redraw the indication if it is due (or ``force``)."""
        if not self._enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < _PROGRESS_EVERY_S:
            return
        self._last = now
        text = f"{_megabytes(done)}"
        if self._total:
            text += f" / {_megabytes(self._total)} ({min(100 * done / self._total, 100):.0f}%)"
        self._stream.write(f"\r{PROG} slowlog: read {text}\x1b[K")
        self._stream.flush()
        self._shown = True

    def finish(self, done: int) -> None:
        """Show the final count and end the line."""
        if self._enabled:
            self.update(done, force=True)
            self._stream.write("\n")
            self._stream.flush()


def _megabytes(count: int) -> str:
    return f"{count / 1_000_000:.1f} MB"


def _sources(paths: Sequence[str]) -> list[Source]:
    sources: list[Source] = []
    for path in paths:
        if path == "-":
            sources.append(Source("-", None))
            continue
        if not os.path.exists(path):
            msg = f"no such file: {printable(path)}"
            raise UsageError(msg)
        if os.path.isdir(path):
            msg = f"is a directory, not a log file: {printable(path)}"
            raise UsageError(msg)
        sources.append(Source(path, os.path.getsize(path)))
    if sum(source.name == "-" for source in sources) > 1:
        msg = "stdin ('-') can be read only once"
        raise UsageError(msg)
    return sources


def _open_binary(source: Source) -> tuple[IO[bytes], IO[bytes] | None]:
    """The decompressed stream of ``source``, and the file to close and to read progress
    from (``None`` for stdin, which is left open)."""
    if source.name == "-":
        stdin: Any = sys.stdin.buffer
        raw: IO[bytes] = stdin if hasattr(stdin, "peek") else io.BufferedReader(stdin)
        owned = None
    else:
        try:
            raw = owned = open(source.name, "rb")  # noqa: SIM115 - closed by _read_lines
        except OSError as error:
            msg = f"cannot read {printable(source.name)}: {error.strerror or error}"
            raise UsageError(msg) from None
    head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
    if head == _GZIP_MAGIC:
        return cast("IO[bytes]", gzip.GzipFile(fileobj=raw, mode="rb")), owned
    return raw, owned


def _read_lines(
    sources: Sequence[Source], progress: Progress, warn: Callable[[str], None]
) -> Iterator[bytes]:
    done = 0
    for source in sources:
        stream, owned = _open_binary(source)
        start = done
        try:
            for line in stream:
                yield line
                if owned is not None:
                    done = start + owned.tell()
                progress.update(done)
        except (OSError, EOFError) as error:  # e.g. a gzip file still being written
            warn(f"{printable(source.name)}: stopped reading early ({error})")
        finally:
            if owned is not None:
                stream.close()
                owned.close()
        if source.size is not None:
            done = start + source.size
    progress.finish(done)


def _parse(line: bytes) -> Any:
    """The JSON object on ``line``; a prefix before the first ``{`` (e.g. a
    container runtime's timestamp) is ignored. Raises ``ValueError`` if there is none."""
    start = line.find(b"{")
    if start < 0:
        msg = "no JSON object"
        raise ValueError(msg)
    return _loads(line[start:])


# -- filtering and aggregating -----------------------------------------------------------------


@dataclass
class Filters:
    """The ``--route``, ``--since`` and ``--min-duration`` options."""

    routes: Sequence[str] = ()
    since: datetime | None = None
    min_duration: float | None = None

    def accept(self, record: dict[str, Any], duration: float) -> bool:
        """Whether ``record`` passes every filter given."""
        if self.min_duration is not None and duration < self.min_duration:
            return False
        if self.routes:
            route = record.get("route")
            if not isinstance(route, str):
                return False
            if not any(fnmatch.fnmatchcase(route, pattern) for pattern in self.routes):
                return False
        if self.since is not None:
            when = _timestamp(record.get("timestamp"))
            if when is None or when < self.since:
                return False
        return True


@dataclass
class OperationStats:
    """One operation's time across the slow requests of a route."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0


@dataclass
class StatementStats:
    """A statement repeated inside requests (an N+1 suspect)."""

    requests: int = 0
    max_count: int = 0


@dataclass
class RouteStats:
    """Everything summarised for one method and route."""

    method: str
    route: str
    durations: list[float] = field(default_factory=list)
    operations: dict[str, OperationStats] = field(default_factory=dict)
    statements: dict[str, StatementStats] = field(default_factory=dict)
    db_queries: int = 0
    db_total_s: float = 0.0

    def add(self, record: dict[str, Any], duration: float) -> None:
        """Add one ``slow_request`` record; missing breakdown fields are fine."""
        self.durations.append(duration)
        self._add_operations(record.get("operations"))
        self._add_db(record.get("db"))

    def _add_operations(self, operations: Any) -> None:
        if not isinstance(operations, dict):
            return
        for name, values in operations.items():
            if not isinstance(values, dict):
                continue
            stats = self.operations.setdefault(str(name), OperationStats())
            stats.count += _int(values.get("count"))
            stats.total_s += _number(values.get("total_s"))
            stats.max_s = max(stats.max_s, _number(values.get("max_s")))

    def _add_db(self, db: Any) -> None:
        if not isinstance(db, dict):
            return
        self.db_queries += _int(db.get("queries"))
        self.db_total_s += _number(db.get("total_s"))
        repeated = db.get("repeated_statements")
        if not isinstance(repeated, list):
            return
        for item in repeated:
            if isinstance(item, dict) and isinstance(item.get("statement"), str):
                stats = self.statements.setdefault(item["statement"], StatementStats())
                stats.requests += 1
                stats.max_count = max(stats.max_count, _int(item.get("count")))

    def summary(self, top: int) -> dict[str, Any]:
        """The JSON form of this route's statistics."""
        ordered = sorted(self.durations)
        operations = sorted(self.operations.items(), key=lambda item: -item[1].total_s)[:top]
        statements = sorted(
            self.statements.items(), key=lambda item: (-item[1].requests, -item[1].max_count)
        )[:top]
        return {
            "method": self.method,
            "route": self.route,
            "count": len(ordered),
            "p50_s": _percentile(ordered, 0.50),
            "p95_s": _percentile(ordered, 0.95),
            "max_s": ordered[-1],
            "total_s": round(sum(ordered), 6),
            "db_queries": self.db_queries,
            "db_total_s": round(self.db_total_s, 6),
            "operations": [
                {"name": name, "count": s.count, "total_s": round(s.total_s, 6), "max_s": s.max_s}
                for name, s in operations
            ],
            "repeated_statements": [
                {"statement": text, "requests": s.requests, "max_count": s.max_count}
                for text, s in statements
            ],
        }


@dataclass
class Summary:
    """The result of reading every input."""

    lines: int = 0
    skipped: Skipped = field(default_factory=Skipped)
    routes: dict[tuple[str, str], RouteStats] = field(default_factory=dict)

    def add_line(self, line: bytes, filters: Filters) -> None:
        """Classify one input line and aggregate it if it is a slow request we keep."""
        if not line.strip():
            return
        self.lines += 1
        try:
            record = _parse(line)
        except ValueError:
            self.skipped.not_json += 1
            return
        if not _is_ours(record):
            self.skipped.other_events += 1
            return
        duration = record.get("duration_s")
        if not _is_duration(duration):
            self.skipped.invalid += 1
            return
        if not filters.accept(record, duration):
            self.skipped.filtered_out += 1
            return
        method = record.get("method")
        route = record.get("route")
        key = (method if isinstance(method, str) else "", route if isinstance(route, str) else "?")
        stats = self.routes.get(key)
        if stats is None:
            stats = self.routes[key] = RouteStats(*key)
        stats.add(record, float(duration))

    def as_json(self, top: int) -> dict[str, Any]:
        """Everything, for ``--json``: the routes by total time, slowest first."""
        routes = sorted(self.routes.values(), key=lambda r: -sum(r.durations))
        return {
            "slow_requests": sum(len(r.durations) for r in routes),
            "lines": self.lines,
            "skipped": {
                "not_json": self.skipped.not_json,
                "other_events": self.skipped.other_events,
                "invalid": self.skipped.invalid,
                "filtered_out": self.skipped.filtered_out,
            },
            "routes": [r.summary(top) for r in routes],
        }


def _is_ours(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and record.get("event") == SLOW_EVENT
        and record.get("logger", OUR_LOGGER) == OUR_LOGGER
    )


def _is_duration(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _number(value: Any) -> float:
    return float(value) if _is_duration(value) else 0.0


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty sequence."""
    rank = max(math.ceil(fraction * len(ordered)), 1)
    return ordered[rank - 1]


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return _parse_time(value)
    except ValueError:
        return None


def _parse_time(text: str) -> datetime:
    """An ISO 8601 date or timestamp; ``Z`` and naive values mean UTC."""
    text = text.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    when = datetime.fromisoformat(text)
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


# -- output -----------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


def _render_table(result: dict[str, Any], sources: Sequence[Source]) -> str:
    skipped = result["skipped"]
    header = (
        f"{result['slow_requests']} slow requests in {len(sources)} "
        f"file{'s' if len(sources) != 1 else ''} ({result['lines']} lines; skipped: "
        f"{skipped['not_json']} not JSON, {skipped['other_events']} other events, "
        f"{skipped['invalid']} invalid, {skipped['filtered_out']} filtered out)"
    )
    if not result["routes"]:
        return header + "\n"
    names = [printable(f"{r['method']} {r['route']}".strip()) for r in result["routes"]]
    width = max(len("route"), *(len(name) for name in names))
    lines = [header, "", f"{'route':<{width}}  {'count':>7}  {'p50':>8}  {'p95':>8}  {'max':>8}"]
    for name, route in zip(names, result["routes"], strict=True):
        lines.append(
            f"{name:<{width}}  {route['count']:>7}  {_seconds(route['p50_s']):>8}  "
            f"{_seconds(route['p95_s']):>8}  {_seconds(route['max_s']):>8}"
        )
        if route["operations"]:
            ops = ", ".join(
                f"{printable(op['name'])} {_seconds(op['total_s'])} ({op['count']}x)"
                for op in route["operations"]
            )
            lines.append(f"    operations: {ops}")
        for statement in route["repeated_statements"]:
            lines.append(
                f"    repeated:   {_shorten(statement['statement'], 80)!r} up to "
                f"{statement['max_count']}x per request, in {statement['requests']} requests"
            )
    return "\n".join(lines) + "\n"


def _shorten(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# -- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="asgi-perfmon tools.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    slowlog = commands.add_parser(
        "slowlog",
        help="summarise slow_request lines of JSON logs, per route",
        description=(
            "Read JSON-lines logs (plain or gzip, '-' for stdin) and summarise the "
            "slow_request events per route: count, p50/p95/max duration, the operations "
            "that took the most time and the repeated SQL statements (N+1 suspects)."
        ),
    )
    slowlog.add_argument("files", nargs="+", metavar="FILE", help="log file, .gz, or '-'")
    slowlog.add_argument(
        "--route", action="append", default=[], help="only this route template (glob; repeatable)"
    )
    slowlog.add_argument("--since", help="only lines at or after this ISO 8601 time (UTC if naive)")
    slowlog.add_argument(
        "--min-duration", type=float, metavar="SECONDS", help="only requests at least this slow"
    )
    slowlog.add_argument("--top", type=int, default=3, help="operations and statements shown")
    slowlog.add_argument("--json", action="store_true", help="print one JSON document")
    slowlog.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show bytes read on stderr (default: when stderr is a terminal)",
    )
    return parser


def _filters(args: argparse.Namespace) -> Filters:
    since = None
    if args.since is not None:
        try:
            since = _parse_time(args.since)
        except ValueError:
            msg = f"--since must be an ISO 8601 date or time, got {args.since!r}"
            raise UsageError(msg) from None
    if args.min_duration is not None and not args.min_duration >= 0:
        msg = f"--min-duration must be a number of seconds >= 0, got {args.min_duration}"
        raise UsageError(msg)
    if args.top < 1:
        msg = f"--top must be at least 1, got {args.top}"
        raise UsageError(msg)
    return Filters(routes=args.route, since=since, min_duration=args.min_duration)


def _slowlog(args: argparse.Namespace) -> int:
    filters = _filters(args)
    sources = _sources(args.files)
    show_progress = sys.stderr.isatty() if args.progress is None else args.progress
    total = sum(source.size or 0 for source in sources) or None
    progress = Progress(total, sys.stderr, show_progress)
    summary = Summary()
    for line in _read_lines(sources, progress, _warn):
        summary.add_line(line, filters)
    result = summary.as_json(args.top)
    if args.json:
        sys.stdout.write(escape_unsafe_characters(json.dumps(result, ensure_ascii=False)) + "\n")
    else:
        sys.stdout.write(_render_table(result, sources))
    return 0


def _warn(message: str) -> None:
    sys.stderr.write(f"{PROG} slowlog: warning: {message}\n")


def main(argv: Iterable[str] | None = None) -> int:
    """Run the ``asgi-perfmon`` command line; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.command != "slowlog":
        parser.print_help(sys.stderr)
        return 2
    try:
        return _slowlog(args)
    except UsageError as error:
        sys.stderr.write(f"{PROG} slowlog: error: {error}\n")
        return 2
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130
