"""``configure_logging()``: an opt-in structlog setup for applications (JSON or console)."""

from __future__ import annotations

import json as stdlib_json
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import structlog
from structlog.processors import ExceptionRenderer
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

try:
    import orjson
except ImportError:  # pragma: no cover - orjson comes with the [cli] extra
    orjson = None  # type: ignore[assignment]

__all__ = ["configure_logging"]

FORMAT_ENV = "PERFMON_LOG_FORMAT"
ROUTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
"""Server loggers whose own handlers are removed, so their records reach the root handler."""

_FIRST_KEYS = ("event", "level", "timestamp", "logger")
_HANDLER_MARK = "_asgi_perfmon_handler"
_LEFTOVER_KEYS = ("color_message", "message", "asctime")
_MULTILINE_KEYS = ("exception", "stack")
_UNSAFE_CHARACTERS = re.compile(
    "[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
"""What JSON leaves unescaped but a reader must not see raw: DEL and the C1 controls (CSI
among them), the line and paragraph separators (``str.splitlines()`` splits on them, as on
NEL), the bidirectional overrides that reorder what a terminal shows, and lone surrogates,
which are not text at all (a server may pass undecodable bytes that way)."""


def configure_logging(
    *,
    json: bool | None = None,
    level: str | int = "INFO",
    stream: TextIO | None = None,
) -> None:
    """Send structlog and stdlib logging (uvicorn's too) through one pipeline to ``stream``.

    ``json=True`` writes one JSON object per line (via orjson when installed) with an ISO UTC
    ``timestamp``, ``level``, ``logger``, the structlog context variables (``request_id``) and
    exceptions as structured data without local variables. ``json=False`` writes readable
    console lines. ``json=None`` reads ``PERFMON_LOG_FORMAT`` (``json`` or ``console``), else
    picks console for a terminal and JSON otherwise. ``level`` filters both structlog and
    stdlib records; ``stream`` defaults to ``sys.stderr``.

    The library never calls this itself. Call it once at startup; calling it again replaces
    the previous setup instead of adding handlers.
    """
    stream = sys.stderr if stream is None else stream
    numeric_level = _level_number(level)
    as_json = _wants_json(json, stream)
    shared = _shared_processors()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _drop_leftovers],
        processors=_render_processors(as_json, stream),
    )
    _install_root_handler(formatter, stream, numeric_level)
    _route_server_loggers()


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _render_processors(as_json: bool, stream: TextIO) -> list[Processor]:
    strip_meta = structlog.stdlib.ProcessorFormatter.remove_processors_meta
    if not as_json:
        return [
            strip_meta,
            _printable_values,
            structlog.dev.ConsoleRenderer(colors=_is_tty(stream)),
        ]
    exceptions = ExceptionRenderer(ExceptionDictTransformer(show_locals=False, use_rich=False))
    return [
        strip_meta,
        exceptions,
        _key_order,
        structlog.processors.JSONRenderer(serializer=_dumps),
    ]


def _install_root_handler(
    formatter: logging.Formatter, stream: TextIO, level: int
) -> logging.Handler:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def _route_server_loggers(names: Sequence[str] = ROUTED_LOGGERS) -> None:
    for name in names:
        server_logger = logging.getLogger(name)
        if not server_logger.handlers and not server_logger.propagate:
            continue  # silenced on purpose, e.g. by ``uvicorn --no-access-log``
        for handler in list(server_logger.handlers):
            server_logger.removeHandler(handler)
        server_logger.propagate = True


def _wants_json(json: bool | None, stream: TextIO) -> bool:
    if json is not None:
        return json
    configured = os.environ.get(FORMAT_ENV, "").strip().lower()
    if configured in ("json", "console"):
        return configured == "json"
    if configured:
        msg = f"{FORMAT_ENV} must be 'json' or 'console', got {configured!r}."
        raise ValueError(msg)
    return not _is_tty(stream)


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _level_number(level: str | int) -> int:
    if isinstance(level, bool):
        msg = f"level must be a logging level name or number, got {level!r}."
        raise ValueError(msg)
    if isinstance(level, int):
        return level
    number = logging.getLevelName(str(level).upper())
    if not isinstance(number, int):
        msg = f"level must be a logging level name such as 'INFO' or 'WARNING', got {level!r}."
        raise ValueError(msg)
    return number


def _drop_leftovers(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Drop record attributes that only repeat ``event``: uvicorn's ANSI-coloured copy of its
    message (``color_message``), and what another handler's formatter already added."""
    for key in _LEFTOVER_KEYS:
        event_dict.pop(key, None)
    return event_dict


def _printable_values(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Escape the console line's text values: the renderer writes the message, and values
    without spaces or quotes, as they are, so request data could colour or split the line.
    Nested values are shown with ``repr``, which escapes; tracebacks stay multi-line."""
    for key, value in event_dict.items():
        if isinstance(value, str) and key not in _MULTILINE_KEYS and not value.isprintable():
            event_dict[key] = printable(value)
    return event_dict


def _key_order(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Put ``event``, ``level``, ``timestamp`` and ``logger`` first, for people reading."""
    ordered = {key: event_dict.pop(key) for key in _FIRST_KEYS if key in event_dict}
    ordered.update(event_dict)
    return ordered


def _dumps(obj: Any, **kwargs: Any) -> str:
    return escape_unsafe_characters(_serialize(obj, kwargs.get("default")))


def _serialize(obj: Any, default: Any) -> str:
    if orjson is not None:
        try:
            return orjson.dumps(obj, default=default, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # integers beyond 64 bits, lone surrogates: the stdlib handles those
            pass
    return stdlib_json.dumps(obj, default=default or repr, ensure_ascii=False)


def escape_unsafe_characters(text: str) -> str:
    """``text`` (serialized JSON) with the characters JSON allows raw but that could split or
    disguise a log line written as ``\\uXXXX`` escapes, and lone surrogates replaced by
    U+FFFD, so the line stays one line that any strict JSON parser reads."""
    if text.isascii() and "\x7f" not in text:  # the usual line, checked at C speed
        return text
    return _UNSAFE_CHARACTERS.sub(_escaped, text)


def printable(text: str) -> str:
    """``text`` with every non-printable character (controls such as ESC, CR and LF, line
    separators, bidirectional overrides) escaped as ``repr`` writes it, for plain-text output
    that request data must not be able to colour, move the cursor in or split."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _escaped(match: re.Match[str]) -> str:
    character = match.group()
    if "\ud800" <= character <= "\udfff":
        return "\ufffd"
    return f"\\u{ord(character):04x}"
