"""``asgi-perfmon slowlog``: reading, skipping, filtering, summarising, errors."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_perfmon.cli import main
from asgi_perfmon.context import current_request
from asgi_perfmon.logconfig import configure_logging
from asgi_perfmon.middleware import PerfMonMiddleware
from asgi_perfmon.timing import timed


def slow_line(
    route: str = "/users/{user_id}",
    duration: float = 1.5,
    *,
    method: str = "GET",
    timestamp: str = "2026-11-24T02:03:04.123456Z",
    **extra: Any,
) -> str:
    """One ``slow_request`` line in the format ``configure_logging(json=True)`` writes."""
    record: dict[str, Any] = {
        "event": "slow_request",
        "level": "warning",
        "timestamp": timestamp,
        "logger": "asgi_perfmon",
        "request_id": "r",
        "method": method,
        "route": route,
        "path": "/users/42",
        "status": 200,
        "duration_s": duration,
        "threshold_s": 1.0,
        "ttfb_s": 0.01,
    }
    record.update(extra)
    return json.dumps(record)


def breakdown(load_user: float, render: float, repeated: int = 0) -> dict[str, Any]:
    statements = [{"statement": "SELECT * FROM orders WHERE user_id = $1", "count": repeated}]
    return {
        "operations": {
            "load_user": {"count": 2, "total_s": load_user, "max_s": load_user / 2},
            "render": {"count": 1, "total_s": render, "max_s": render},
        },
        "db": {
            "queries": 3,
            "errors": 0,
            "total_s": 0.2,
            "acquire_wait_s": 0.0,
            "repeated_statements": statements if repeated else [],
        },
        "cache": {"hits": 1, "misses": 1},
    }


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = run([*argv, "--json"], capsys)
    assert (code, err) == (0, "")
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.fixture
def mixed_log(tmp_path: Path) -> Path:
    """Two routes, plus lines that are not ours or not JSON at all."""
    return write(
        tmp_path / "app.log",
        [
            *(slow_line(duration=d, **breakdown(0.8, 0.1, repeated=3)) for d in (1.0, 2.0, 3.0)),
            slow_line("/orders", 1.2, method="POST"),
            "not json at all",
            '{"event": "request_finished", "logger": "asgi_perfmon"}',
            '{"event": "slow_request", "logger": "someone_else", "duration_s": 9}',
            '{"event": "slow_request", "logger": "asgi_perfmon", "duration_s": "fast"}',
            "[1, 2, 3]",
            "",
            '{"truncated": ',
        ],
    )


class TestSummary:
    def test_json_summary_per_route(
        self, mixed_log: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Per route: count, p50/p95/max, top operations and repeated statements."""
        result = run_json(["slowlog", str(mixed_log)], capsys)

        assert result["slow_requests"] == 4
        assert result["skipped"] == {
            "not_json": 3,
            "other_events": 2,
            "invalid": 1,
            "filtered_out": 0,
        }
        users, orders = result["routes"]
        assert (users["method"], users["route"], users["count"]) == ("GET", "/users/{user_id}", 3)
        assert (users["p50_s"], users["p95_s"], users["max_s"], users["total_s"]) == (
            2.0,
            3.0,
            3.0,
            6.0,
        )
        assert users["operations"] == [
            {"name": "load_user", "count": 6, "total_s": pytest.approx(2.4), "max_s": 0.4},
            {"name": "render", "count": 3, "total_s": pytest.approx(0.3), "max_s": 0.1},
        ]
        assert users["repeated_statements"] == [
            {
                "statement": "SELECT * FROM orders WHERE user_id = $1",
                "requests": 3,
                "max_count": 3,
            }
        ]
        assert (users["db_queries"], users["db_total_s"]) == (9, pytest.approx(0.6))
        assert (orders["method"], orders["route"], orders["count"]) == ("POST", "/orders", 1)
        assert (orders["operations"], orders["repeated_statements"]) == ([], [])

    def test_percentiles_are_nearest_rank(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """p50 and p95 of 1..100 are 50 and 95; the slowest route by total time comes first."""
        log = write(
            tmp_path / "p.log",
            [slow_line("/a", float(n)) for n in range(1, 101)] + [slow_line("/b", 500.0)],
        )

        routes = run_json(["slowlog", str(log)], capsys)["routes"]

        assert [(r["route"], r["p50_s"], r["p95_s"], r["max_s"]) for r in routes] == [
            ("/a", 50.0, 95.0, 100.0),
            ("/b", 500.0, 500.0, 500.0),
        ]

    def test_table_output(self, mixed_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The default output is a readable table, one row per route plus its details."""
        code, out, err = run(["slowlog", str(mixed_log)], capsys)

        assert (code, err) == (0, "")
        lines = out.splitlines()
        assert lines[0] == (
            "4 slow requests in 1 file (10 lines; skipped: 3 not JSON, 2 other events, "
            "1 invalid, 0 filtered out)"
        )
        assert lines[2].split() == ["route", "count", "p50", "p95", "max"]
        assert lines[3].split() == ["GET", "/users/{user_id}", "3", "2.000s", "3.000s", "3.000s"]
        assert lines[4] == "    operations: load_user 2.400s (6x), render 0.300s (3x)"
        assert lines[5] == (
            "    repeated:   'SELECT * FROM orders WHERE user_id = $1' up to 3x per request, "
            "in 3 requests"
        )
        assert lines[6].split() == ["POST", "/orders", "1", "1.200s", "1.200s", "1.200s"]

    def test_missing_breakdown_fields_are_fine(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Lines with only a duration, or odd breakdown shapes, still count."""
        log = write(
            tmp_path / "sparse.log",
            [
                '{"event": "slow_request", "duration_s": 2}',
                slow_line(operations=None, db="n/a", cache=[]),
                slow_line(operations={"x": "y", "ok": {"count": True, "total_s": "1"}}),
                slow_line(db={"repeated_statements": [{"count": 2}, "SELECT"]}),
            ],
        )

        result = run_json(["slowlog", str(log)], capsys)

        assert result["slow_requests"] == 4
        users, sparse = sorted(result["routes"], key=lambda r: r["route"])
        assert (sparse["method"], sparse["route"], sparse["count"]) == ("", "?", 1)
        assert users["operations"] == [{"name": "ok", "count": 0, "total_s": 0.0, "max_s": 0.0}]
        assert users["repeated_statements"] == []

    def test_empty_input(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """No slow requests: a header saying so, exit 0."""
        log = write(tmp_path / "empty.log", [])

        code, out, _ = run(["slowlog", str(log)], capsys)

        assert code == 0
        assert out.startswith("0 slow requests in 1 file (0 lines;")

    def test_prefix_before_the_json_is_ignored(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Container runtimes prefix lines (``2026-... stdout F {...}``): the JSON still counts."""
        log = write(tmp_path / "k8s.log", ["2026-11-24T02:03:04Z stdout F " + slow_line()])

        assert run_json(["slowlog", str(log)], capsys)["slow_requests"] == 1


class TestInputs:
    def test_gzip_and_plain_files_together(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``.gz`` files are decompressed (detected by content), and files add up."""
        plain = write(tmp_path / "a.log", [slow_line(duration=1.0)])
        packed = tmp_path / "b.log.1.gz"
        packed.write_bytes(gzip.compress((slow_line(duration=3.0) + "\nnot json\n").encode()))

        result = run_json(["slowlog", str(plain), str(packed)], capsys)

        assert result["slow_requests"] == 2
        assert result["skipped"]["not_json"] == 1
        assert result["routes"][0]["max_s"] == 3.0

    def test_truncated_gzip_is_read_up_to_the_damage(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A gzip file cut short (still being written) yields its lines and a warning."""
        data = gzip.compress("".join(slow_line() + "\n" for _ in range(2000)).encode())
        packed = tmp_path / "cut.gz"
        packed.write_bytes(data[: len(data) // 2])

        code, out, err = run(["slowlog", "--json", str(packed)], capsys)

        assert code == 0
        assert 0 < json.loads(out)["slow_requests"] < 2000
        assert err.startswith(f"asgi-perfmon slowlog: warning: {packed}: stopped reading early")

    def test_stdin(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``-`` reads standard input, gzip or not."""
        data = gzip.compress((slow_line() + "\n" + slow_line() + "\n").encode())
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))

        assert run_json(["slowlog", "-"], capsys)["slow_requests"] == 2

    def test_missing_file_is_a_one_line_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A missing file: exit 2 and one clear line, before reading anything."""
        present = write(tmp_path / "a.log", [slow_line()])
        missing = tmp_path / "nope.log"

        code, out, err = run(["slowlog", str(present), str(missing)], capsys)

        assert (code, out) == (2, "")
        assert err == f"asgi-perfmon slowlog: error: no such file: {missing}\n"

    def test_directory_and_double_stdin_are_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Other unusable inputs are one-line errors too."""
        assert run(["slowlog", str(tmp_path)], capsys)[0] == 2
        code, _, err = run(["slowlog", "-", "-"], capsys)

        assert code == 2
        assert "stdin ('-') can be read only once" in err

    def test_progress_on_request(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """``--progress`` shows bytes read on stderr; stdout stays clean."""
        log = write(tmp_path / "big.log", [slow_line() for _ in range(500)])

        code, out, err = run(["slowlog", "--progress", "--json", str(log)], capsys)

        assert code == 0
        assert json.loads(out)["slow_requests"] == 500
        size_mb = f"{log.stat().st_size / 1_000_000:.1f} MB"
        assert f"read {size_mb} / {size_mb} (100%)" in err
        assert err.endswith("\n")

    def test_no_progress_when_stderr_is_not_a_terminal(
        self, mixed_log: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """By default the indication appears only on a terminal."""
        _, _, err = run(["slowlog", str(mixed_log)], capsys)

        assert err == ""


class TestFilters:
    @pytest.fixture
    def log(self, tmp_path: Path) -> Path:
        return write(
            tmp_path / "f.log",
            [
                slow_line("/users/{user_id}", 1.0, timestamp="2026-11-24T01:00:00.000000Z"),
                slow_line("/users/{user_id}", 5.0, timestamp="2026-11-24T03:00:00.000000Z"),
                slow_line("/orders", 2.0, timestamp="2026-11-24T04:00:00.000000Z"),
                slow_line("/health", 2.0, timestamp="not a time"),
            ],
        )

    @pytest.mark.parametrize(
        ("options", "expected"),
        [
            (["--route", "/orders"], {"/orders": 1}),
            (["--route", "/users/*", "--route", "/health"], {"/users/{user_id}": 2, "/health": 1}),
            (["--min-duration", "2"], {"/users/{user_id}": 1, "/orders": 1, "/health": 1}),
            (["--since", "2026-11-24T02:00:00Z"], {"/users/{user_id}": 1, "/orders": 1}),
            (["--since", "2026-11-24T03:30:00+01:00"], {"/users/{user_id}": 1, "/orders": 1}),
            (["--since", "2026-11-24T03:30"], {"/orders": 1}),
            (["--since", "2026-11-25"], {}),
            (
                ["--route", "/users/*", "--min-duration", "2", "--since", "2026-11-24"],
                {"/users/{user_id}": 1},
            ),
        ],
    )
    def test_filters(
        self,
        log: Path,
        capsys: pytest.CaptureFixture[str],
        options: list[str],
        expected: dict[str, int],
    ) -> None:
        """``--route`` (globs, repeatable), ``--since`` (ISO, naive = UTC), ``--min-duration``."""
        result = run_json(["slowlog", str(log), *options], capsys)

        assert {r["route"]: r["count"] for r in result["routes"]} == expected
        assert result["skipped"]["filtered_out"] == 4 - sum(expected.values())

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            (["--since", "yesterday"], "--since must be an ISO 8601 date or time"),
            (["--min-duration", "-1"], "--min-duration must be a number of seconds >= 0"),
            (["--top", "0"], "--top must be at least 1"),
        ],
    )
    def test_bad_values(
        self, log: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
    ) -> None:
        """Bad option values are one-line errors with exit code 2."""
        code, out, err = run(["slowlog", str(log), *options], capsys)

        assert (code, out) == (2, "")
        assert err.startswith(f"asgi-perfmon slowlog: error: {message}")
        assert err.count("\n") == 1


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a subcommand: usage on stderr, exit 2."""
    code, out, err = run([], capsys)

    assert (code, out) == (2, "")
    assert "slowlog" in err


def test_console_script_runs(tmp_path: Path) -> None:
    """The installed ``asgi-perfmon`` entry point works end to end."""
    log = write(tmp_path / "app.log", [slow_line()])
    script = Path(sys.executable).with_name("asgi-perfmon")

    done = subprocess.run(
        [str(script), "slowlog", "--json", str(log)], capture_output=True, text=True, check=False
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["slow_requests"] == 1


# -- on logs written by the middleware itself --------------------------------------------------


@pytest.fixture
def json_log_file(tmp_path: Path) -> Iterator[Path]:
    """``configure_logging(json=True)`` into a file; logging put back afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    path = tmp_path / "app.log"
    with path.open("w") as stream:
        configure_logging(json=True, stream=stream)
        # The library's module-level loggers must not stay bound to this test's pipeline.
        structlog.configure(cache_logger_on_first_use=False)
        yield path
    structlog.reset_defaults()
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_summary_of_logs_written_by_the_middleware(
    json_log_file: Path,
    tmp_path: Path,
    registry: CollectorRegistry,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The middleware's own ``slow_request`` lines, plain and gzip, with a malformed line."""
    clock = FakeClock()
    load_user = timed("load_user", registry=registry, clock=clock)

    async def user(request: Request) -> Response:
        for _ in range(2):
            async with load_user:
                clock.now += 0.4 + int(request.path_params["user_id"]) / 100
        context = current_request()
        assert context is not None
        for _ in range(3):
            context.add_query("SELECT * FROM orders WHERE user_id = $1", 0.01)
        return PlainTextResponse("user")

    async def fast(request: Request) -> Response:
        clock.now += 0.01
        return PlainTextResponse("fast")

    app = PerfMonMiddleware(
        Starlette(routes=[Route("/users/{user_id}", user), Route("/fast", fast)]),
        registry=registry,
        slow_request_threshold=1.0,
        loop_monitor=False,
        clock=clock,
    )

    async def serve() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for user_id in (10, 20, 30, 1):  # 2 x load_user: 1.0, 1.2, 1.4 and 0.82 s
                assert (await client.get(f"/users/{user_id}")).status_code == 200
            assert (await client.get("/fast")).status_code == 200

    asyncio.run(serve())

    with json_log_file.open("a") as log:
        log.write("{not json\n")
    packed = tmp_path / "app.log.1.gz"
    packed.write_bytes(gzip.compress(json_log_file.read_bytes()))

    result = run_json(["slowlog", str(json_log_file), str(packed)], capsys)

    assert result["skipped"]["not_json"] == 2
    (users,) = result["routes"]
    assert (users["method"], users["route"], users["count"]) == ("GET", "/users/{user_id}", 6)
    assert (users["p50_s"], users["max_s"]) == (pytest.approx(1.2), pytest.approx(1.4))
    (operation,) = users["operations"]
    assert (operation["name"], operation["count"]) == ("load_user", 12)
    assert operation["total_s"] == pytest.approx(2 * (1.0 + 1.2 + 1.4))
    assert users["repeated_statements"] == [
        {"statement": "SELECT * FROM orders WHERE user_id = $1", "requests": 6, "max_count": 3}
    ]
    assert (users["db_queries"], users["db_total_s"]) == (18, pytest.approx(0.18))
