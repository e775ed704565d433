"""``configure_logging()``: JSON and console output, stdlib routing, levels, idempotence."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.contextvars import bound_contextvars

from asgi_perfmon import logconfig
from asgi_perfmon.logconfig import ROUTED_LOGGERS, configure_logging

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Put structlog and stdlib logging back as they were."""
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    saved = {
        name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
        for name in ROUTED_LOGGERS
    }
    yield
    structlog.reset_defaults()
    root.handlers[:] = saved_root[0]
    root.setLevel(saved_root[1])
    for name, (handlers, propagate) in saved.items():
        server_logger = logging.getLogger(name)
        server_logger.handlers[:] = handlers
        server_logger.propagate = propagate


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_have_the_documented_shape() -> None:
    """A library event comes out as one JSON object with event, level, ISO UTC time, logger."""
    out = io.StringIO()
    configure_logging(json=True, stream=out)

    structlog.get_logger("asgi_perfmon").warning(
        "slow_request", route="/users/{user_id}", duration_s=1.234567, operations={}
    )

    (line,) = lines(out)
    assert list(line)[:4] == ["event", "level", "timestamp", "logger"]
    assert ISO_UTC.match(line.pop("timestamp"))
    assert line == {
        "event": "slow_request",
        "level": "warning",
        "logger": "asgi_perfmon",
        "route": "/users/{user_id}",
        "duration_s": 1.234567,
        "operations": {},
    }


def test_context_variables_are_merged() -> None:
    """Values bound with structlog's contextvars (the request id) appear on every line."""
    out = io.StringIO()
    configure_logging(json=True, stream=out)

    with bound_contextvars(request_id="abc123"):
        structlog.get_logger("app").info("hello")
        logging.getLogger("app.stdlib").info("from %s", "stdlib")

    assert [(line["event"], line["request_id"]) for line in lines(out)] == [
        ("hello", "abc123"),
        ("from stdlib", "abc123"),
    ]


def test_uvicorn_loggers_are_routed_through_the_pipeline() -> None:
    """uvicorn's own handlers are removed, so its access log is JSON with the request id."""
    stray = io.StringIO()
    access = logging.getLogger("uvicorn.access")
    access.addHandler(logging.StreamHandler(stray))
    access.propagate = False
    out = io.StringIO()
    configure_logging(json=True, stream=out)

    with bound_contextvars(request_id="r-1"):
        access.info(
            '%s - "%s %s HTTP/%s" %d',
            "127.0.0.1:5000",
            "GET",
            "/users/42",
            "1.1",
            200,
            extra={"color_message": "\x1b[1mcoloured\x1b[0m"},
        )

    (line,) = lines(out)
    assert line["event"] == '127.0.0.1:5000 - "GET /users/42 HTTP/1.1" 200'
    assert (line["logger"], line["level"], line["request_id"]) == ("uvicorn.access", "info", "r-1")
    assert "color_message" not in line
    assert stray.getvalue() == ""
    assert all(logging.getLogger(name).handlers == [] for name in ROUTED_LOGGERS)


def test_attributes_set_by_other_formatters_are_not_repeated() -> None:
    """When another handler formatted the record first, its ``message`` is not copied in."""
    formatted_first = logging.StreamHandler(io.StringIO())
    formatted_first.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger().addHandler(formatted_first)
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    logging.getLogger().handlers.sort(key=lambda h: h is not formatted_first)

    logging.getLogger("httpx").info("HTTP Request: %s", "GET /")

    (line,) = lines(out)
    assert line["event"] == "HTTP Request: GET /"
    assert {"message", "asctime"}.isdisjoint(line)


def test_level_filters_both_structlog_and_stdlib() -> None:
    """Records under the level are dropped on both paths."""
    out = io.StringIO()
    configure_logging(json=True, level="warning", stream=out)

    structlog.get_logger("a").info("dropped")
    logging.getLogger("b").info("dropped too")
    structlog.get_logger("a").warning("kept")
    logging.getLogger("b").error("kept too")

    assert [line["event"] for line in lines(out)] == ["kept", "kept too"]


def test_exceptions_are_structured_without_locals() -> None:
    """Tracebacks become data (type, value, frames) and never carry local variables."""
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    password = "hunter2"  # a local that must not leak

    try:
        raise ValueError(f"bad value {len(password)}")
    except ValueError:
        structlog.get_logger("a").exception("failed")
        logging.getLogger("b").exception("stdlib failed")

    for line in lines(out):
        (exception,) = line["exception"]
        assert (exception["exc_type"], exception["exc_value"]) == ("ValueError", "bad value 7")
        assert exception["frames"][-1]["name"] == "test_exceptions_are_structured_without_locals"
        assert all("locals" not in frame for frame in exception["frames"])
    assert "hunter2" not in out.getvalue()


def test_calling_twice_replaces_the_handler() -> None:
    """A second call does not add a second handler, and the latest settings win."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging(json=True, stream=first)
    configure_logging(json=True, stream=second)

    logging.getLogger("x").warning("once")

    ours = [h for h in logging.getLogger().handlers if getattr(h, "_asgi_perfmon_handler", False)]
    assert len(ours) == 1
    assert first.getvalue() == ""
    assert [line["event"] for line in lines(second)] == ["once"]


def test_other_root_handlers_are_left_alone() -> None:
    """Handlers the application installed itself stay."""
    theirs = logging.StreamHandler(io.StringIO())
    logging.getLogger().addHandler(theirs)

    configure_logging(json=True, stream=io.StringIO())

    assert theirs in logging.getLogger().handlers


def test_console_mode_is_readable_text() -> None:
    """``json=False`` renders key=value text, not JSON, stack included."""
    out = io.StringIO()
    configure_logging(json=False, stream=out)

    structlog.get_logger("asgi_perfmon").warning(
        "event_loop_blocked", blocked_s=0.1, stack="app.py:3 in handler: time.sleep(1)"
    )

    text = out.getvalue()
    assert "event_loop_blocked" in text
    assert "blocked_s=0.1" in text
    assert "app.py:3 in handler" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


@pytest.mark.parametrize(
    ("env", "stream", "expect_json"),
    [
        (None, io.StringIO(), True),
        (None, TTY(), False),
        ("json", TTY(), True),
        ("console", io.StringIO(), False),
        ("CONSOLE", io.StringIO(), False),
    ],
)
def test_format_is_chosen_from_the_environment_and_the_stream(
    monkeypatch: pytest.MonkeyPatch, env: str | None, stream: io.StringIO, expect_json: bool
) -> None:
    """Without ``json=``: ``PERFMON_LOG_FORMAT``, else console on a terminal, else JSON."""
    if env is None:
        monkeypatch.delenv("PERFMON_LOG_FORMAT", raising=False)
    else:
        monkeypatch.setenv("PERFMON_LOG_FORMAT", env)
    configure_logging(stream=stream)

    structlog.get_logger("a").info("probe")

    first = stream.getvalue().splitlines()[0]
    assert first.startswith("{") is expect_json


def test_explicit_argument_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``json=True`` wins over ``PERFMON_LOG_FORMAT=console``."""
    monkeypatch.setenv("PERFMON_LOG_FORMAT", "console")
    out = io.StringIO()
    configure_logging(json=True, stream=out)

    structlog.get_logger("a").info("probe")

    assert lines(out)[0]["event"] == "probe"


def test_without_orjson_the_stdlib_serialises(monkeypatch: pytest.MonkeyPatch) -> None:
    """orjson is optional: the same JSON comes out of the stdlib ``json`` module."""
    monkeypatch.setattr(logconfig, "orjson", None)
    out = io.StringIO()
    configure_logging(json=True, stream=out)

    structlog.get_logger("a").info("plain", numbers=[1, 2], nested={"k": "v"})

    line = lines(out)[0]
    assert (line["event"], line["numbers"], line["nested"]) == ("plain", [1, 2], {"k": "v"})


def test_values_json_cannot_hold_are_rendered_not_raised() -> None:
    """Odd values (objects, huge integers, non-string keys) never break a log call."""
    out = io.StringIO()
    configure_logging(json=True, stream=out)

    class Thing:
        def __repr__(self) -> str:
            return "<Thing>"

    structlog.get_logger("a").info("odd", thing=Thing(), big=2**70, keyed={1: "one"})

    line = lines(out)[0]
    assert (line["thing"], line["big"], line["keyed"]) == ("<Thing>", 2**70, {"1": "one"})


@pytest.mark.parametrize(
    ("kwargs", "env", "message"),
    [
        ({"level": "LOUD"}, None, "level must be a logging level name"),
        ({"level": True}, None, "level must be a logging level"),
        ({}, "yaml", "PERFMON_LOG_FORMAT must be 'json' or 'console'"),
    ],
)
def test_invalid_settings(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], env: str | None, message: str
) -> None:
    """Bad settings raise ``ValueError`` with a sentence, before anything is changed."""
    if env is not None:
        monkeypatch.setenv("PERFMON_LOG_FORMAT", env)
    before = list(logging.getLogger().handlers)

    with pytest.raises(ValueError, match=message):
        configure_logging(stream=io.StringIO(), **kwargs)

    assert logging.getLogger().handlers == before


def test_an_access_log_silenced_by_the_server_stays_silent() -> None:
    """``uvicorn --no-access-log`` leaves the access logger without handlers, not propagating."""
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.propagate = False
    out = io.StringIO()
    configure_logging(json=True, stream=out)

    access.info("GET /users/42 200")

    assert [] == lines(out)
