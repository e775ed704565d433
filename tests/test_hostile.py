"""Hostile input: request ids, paths, methods and headers chosen by an attacker.

Every case must give the response the app gives without the middleware, a safe request id,
bounded series and memory, and log lines that cannot be forged.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import random
import re
import socket
import sys
import tracemalloc
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import orjson
import psutil
import pytest
import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as text_to_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from structlog.testing import capture_logs

from asgi_perfmon import PerfMonMiddleware
from asgi_perfmon._routes import DEFAULT_CACHE_SIZE, UNMATCHED
from asgi_perfmon._types import Receive, Scope, Send
from asgi_perfmon.cli import main as cli_main
from asgi_perfmon.context import current_request
from asgi_perfmon.logconfig import ROUTED_LOGGERS, configure_logging
from asgi_perfmon.metrics import OTHER_METHOD, STANDARD_METHODS
from asgi_perfmon.middleware import MAX_LOGGED_PATH
from tests._helpers import FakeClock, recorded_requests
from tests._uvicorn import start_uvicorn

SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
TEMPLATES = frozenset(
    {"/", "/items/{item_id}", "/files/{path}", "/static/{path}", "/users/{user_id}/"}
)
APP = "tests.apps.hostile_app:app"
LOG_ENV = "HOSTILE_LOG"  # where the app writes its JSON log
BIG = 64 * 1024
BIG_QUERY = b"q=%ff\x00&" * (BIG // 8)

# Pieces of hostile paths: NUL, what servers make of invalid UTF-8 (U+FFFD, or a lone
# surrogate with surrogateescape), traversal, empty segments, CR/LF, ANSI, JSON fragments,
# line separators, bidi overrides, percent signs and non-ASCII.
FRAGMENTS = (
    "\x00", "\ufffd", "\udcff", "..", "/..", "//", "\r\n", "\x1b[2J", '"}{"event":"x', "\u2028",
    "\x85", "%00", "%ff", "é", "\t", " ", "\u202e", "\\", "?", "#",
)  # fmt: skip
METHODS = (
    "GET", "GET", "GET", "GET", "GET", "POST", "HEAD", "DELETE", "get", "PoSt", "BREW",
    "G\x00T", "GET\r\n", "\uff27\uff25\uff34", "M" * 1000, "",
)  # fmt: skip
REQUEST_IDS = (
    b"a\r\nSet-Cookie: x=1", b"\xff\xfe", b"a\x00b", b"   ", b"a" * 129, b"a" * BIG,
    b"\x1b[31mred", b'"}{"event":"x"', b"ok\x85", "é".encode(),
)  # fmt: skip


# -- driving an ASGI app like a server ------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    """One request as a server would hand it to the app."""

    method: str = "GET"
    path: str = "/"
    query: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def scope(self) -> Scope:
        # The bytes on the wire: undecodable bytes come back from lone surrogates as %FF.
        raw_path = quote(self.path, safe="/:@!$&'()*+,;=-._~", errors="surrogateescape")
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": raw_path.encode("ascii"),
            "root_path": "",
            "query_string": self.query,
            "headers": list(self.headers),
            "client": ("127.0.0.1", 1234),
            "server": ("127.0.0.1", 80),
        }


@dataclass
class Answer:
    """What the app sent back, or the exception that came out of it."""

    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    error: str | None = None

    def request_ids(self) -> list[bytes]:
        return [value for name, value in self.headers if name == b"x-request-id"]

    def without_request_id(self) -> Answer:
        headers = [(name, value) for name, value in self.headers if name != b"x-request-id"]
        return Answer(self.status, headers, self.body, self.error)


async def serve(app: Any, request: Hostile) -> Answer:
    """Call ``app`` with ``request``; the client disconnects once the request body was read."""
    answer = Answer()
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            answer.body += message.get("body", b"")

    try:
        await app(request.scope(), receive, send)
    except Exception as error:
        answer.error = f"{type(error).__name__}: {error}"
    return answer


def target_app(served: list[tuple[str, str | None]] | None = None) -> Starlette:
    """Routes of every kind; each handler notes its template and the middleware's route
    in ``served``, if given."""

    def endpoint(template: str) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Response:
            context = current_request()
            if served is not None:
                served.append((template, context.route if context else None))
            return PlainTextResponse(f"{template} {len(request.url.path)} {request.method}")

        return handler

    async def opaque(scope: Scope, receive: Receive, send: Send) -> None:
        if served is not None:
            served.append(("/static/{path}", None))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(scope["path"])).encode()})

    return Starlette(
        routes=[
            Route("/", endpoint("/")),
            Route("/items/{item_id}", endpoint("/items/{item_id}"), methods=["GET", "POST"]),
            Route("/files/{path:path}", endpoint("/files/{path}")),
            Route("/users/{user_id}/", endpoint("/users/{user_id}/")),
            Mount("/static", app=opaque),
        ]
    )


def hostile_request(n: int, padding: str) -> Hostile:
    """The ``n``-th of a stream of distinct hostile requests (every path contains ``n``);
    ``padding`` lengthens the path."""
    fragment = FRAGMENTS[n % len(FRAGMENTS)]
    path = (
        f"/items/{n}{fragment}{padding}",
        f"/files/{fragment}/{padding}/{n}",
        f"/static/{n}{fragment}{padding}",
        f"/{fragment}{n}{padding}",
        f"//items//{n}{fragment}",
        f"/items/{n}{fragment}/",  # a trailing-slash redirect
        f"/users/{n}{fragment}",  # a redirect to the route with the trailing slash
        f"/users/{n}{fragment}/",
        "/" + fragment * (n % 5) + str(n),
    )[n % 9]
    headers = [
        (b"host", f"h{n}.example".encode()),
        (b"x-request-id", f"ok-{n}".encode() if n % 3 else REQUEST_IDS[n % len(REQUEST_IDS)]),
        (f"x-hostile-{n}".encode(), padding.encode("utf-8", "surrogateescape")[:40] + b"\xff"),
    ]
    if n % 50 == 0:
        headers += [(b"x-request-id", f"dup-{i}".encode()) for i in range(100)]
    query = BIG_QUERY + str(n).encode() if n % 100 == 0 else b"a=%00&b=" + str(n).encode()
    method = METHODS[n % len(METHODS)]
    if method == "BREW":
        method += str(n)  # distinct methods too
    return Hostile(method, path, query, tuple(headers))


def hostile_requests(count: int, *, start: int = 0, seed: int = 8) -> Iterator[Hostile]:
    """``count`` distinct hostile requests, with paths padded by 0 to 200 random characters."""
    rng = random.Random(seed)
    characters = "".join(rng.choices("abc%.-_~\x00é\ufffd", k=4096))
    for n in range(start, start + count):
        offset = rng.randrange(len(characters) - 200)
        yield hostile_request(n, characters[offset : offset + rng.randrange(201)])


def series_count(registry: CollectorRegistry) -> int:
    return sum(len(family.samples) for family in registry.collect())


def assert_safe_request_id(request: Hostile, answer: Answer) -> str:
    """Exactly one echoed id: the incoming one when it is safe, else a generated one."""
    (echoed,) = answer.request_ids()
    first = next((v for k, v in request.headers if k == b"x-request-id"), None)
    if first is not None and SAFE_ID.fullmatch(first.decode("latin-1")):
        assert first == echoed
    else:
        assert GENERATED_ID.fullmatch(echoed.decode("ascii")), (first, echoed)
    return echoed.decode("ascii")


# -- request ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "incoming",
    [
        *REQUEST_IDS,
        b"a\nb",
        b"a\rb",
        b"\x00",
        b" ",
        b"a" * 128 + b"\n",
        b"../../etc/passwd",
    ],
    ids=lambda value: repr(value[:20]),
)
async def test_hostile_request_id_is_replaced_in_header_logs_and_exemplars(
    registry: CollectorRegistry, incoming: bytes
) -> None:
    """The response, the slow-request log, the request context, structlog's context and the
    exemplar all carry the same generated id; the response is otherwise the app's own."""
    clock = FakeClock()
    app = target_app()
    seen: list[tuple[str | None, object]] = []
    slow_app = PerfMonMiddleware(
        _advancing(app, clock, 2.0, seen), registry=registry, clock=clock, loop_monitor=False
    )
    request = Hostile("GET", "/items/7", headers=((b"x-request-id", incoming),))

    bare = await serve(app, request)
    with capture_logs() as logs:
        answer = await serve(slow_app, request)

    request_id = assert_safe_request_id(request, answer)
    assert GENERATED_ID.fullmatch(request_id)
    assert bare == answer.without_request_id()
    assert [(request_id, request_id)] == seen
    (slow,) = [entry for entry in logs if entry["event"] == "slow_request"]
    assert request_id == slow["request_id"]
    assert {request_id} == exemplar_ids(registry)


async def test_duplicate_request_id_headers(registry: CollectorRegistry) -> None:
    """1,000 X-Request-ID headers: the first decides (kept if safe, else replaced); the
    response carries exactly one."""
    app = PerfMonMiddleware(target_app(), registry=registry, loop_monitor=False)
    safe_first = Hostile(
        path="/", headers=tuple((b"x-request-id", f"id-{i}".encode()) for i in range(1000))
    )
    hostile_first = Hostile(
        path="/", headers=((b"x-request-id", b"a\r\nb"), *safe_first.headers[1:])
    )

    kept = await serve(app, safe_first)
    replaced = await serve(app, hostile_first)

    assert [b"id-0"] == kept.request_ids()
    assert GENERATED_ID.fullmatch(assert_safe_request_id(hostile_first, replaced))


def _advancing(
    app: Any, clock: FakeClock, seconds: float, seen: list[tuple[str | None, object]]
) -> Any:
    """``app``, with the clock moved by ``seconds`` during every request; notes the request
    id the app sees (the request context's, and the one bound for structlog)."""

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        clock.now += seconds
        context = current_request()
        bound = structlog.contextvars.get_contextvars().get("request_id")
        seen.append((context.request_id if context else None, bound))
        await app(scope, receive, send)

    return slow


def exemplar_ids(registry: CollectorRegistry) -> set[str]:
    """The request ids of every exemplar, as Prometheus would read them (OpenMetrics)."""
    text = generate_latest(registry).decode()
    return {
        sample.exemplar.labels["request_id"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.exemplar is not None
    }


# -- paths, methods and headers: correct responses, bounded series -------------------------


async def test_hostile_requests_get_the_apps_own_response(registry: CollectorRegistry) -> None:
    """2,000 hostile requests and the extremes (64 kB path, method, header and query): each
    answer is the bare app's (status, headers, body or exception), the route label is the
    route that served it, and the series stay within the label rules."""
    rng = random.Random(8)
    requests = list(hostile_requests(2000))
    requests += [
        Hostile(path="/items/" + "a" * BIG),
        Hostile(path="/" + "\udcff" * BIG),
        Hostile(method="M" * BIG, path="/items/1"),
        Hostile(path="/files/x", query=rng.randbytes(BIG)),
        Hostile(path="/", headers=((b"x-big", b"\xff" * BIG), (b"host", b"\x00" * BIG))),
    ]
    served: list[tuple[str, str | None]] = []
    bare_app = target_app()
    middleware = PerfMonMiddleware(target_app(served), registry=registry, loop_monitor=False)

    for request in requests:
        bare = await serve(bare_app, request)
        answer = await serve(middleware, request)
        assert bare == answer.without_request_id(), request
        assert_safe_request_id(request, answer)

    assert TEMPLATES == {template for template, _ in served}
    assert len(served) > len(requests) // 5  # the routes were exercised, not just 404s
    assert all(route == template for template, route in served if route is not None)
    recorded = recorded_requests(registry)
    assert len(requests) == sum(recorded.values())
    assert {route for _, route, _ in recorded} <= TEMPLATES | {UNMATCHED}
    assert {method for method, _, _ in recorded} <= STANDARD_METHODS | {OTHER_METHOD}
    assert {status for _, _, status in recorded} <= {"200", "307", "404", "405", "500"}


@pytest.mark.slow
async def test_50000_distinct_hostile_requests_keep_series_and_memory_flat(
    registry: CollectorRegistry,
) -> None:
    """After a warm-up, 49,152 more distinct hostile requests add no series and no memory.

    The only state meant to vary is the route cache (bounded by its size, and by not caching
    long paths), so it is emptied before each measurement. Keeping one small object per
    request would add 49,152 allocated blocks and several MB (the paths alone average 150
    bytes): the tolerances, 1,000 blocks and 2 MB of RSS, are far below that and above the
    interpreter's own noise.
    """
    middleware = PerfMonMiddleware(target_app(), registry=registry, loop_monitor=False)
    statuses: set[int | None] = set()
    process = psutil.Process()

    async def send_requests(count: int, start: int) -> None:
        for request in hostile_requests(count, start=start):
            statuses.add((await serve(middleware, request)).status)

    warm_up = 2 * DEFAULT_CACHE_SIZE
    await send_requests(warm_up, start=0)
    series_after_warm_up = series_count(registry)
    middleware._routes._cache.clear()
    gc.collect()
    blocks, rss = sys.getallocatedblocks(), process.memory_info().rss

    await send_requests(12 * DEFAULT_CACHE_SIZE, start=warm_up)
    assert len(middleware._routes._cache) <= DEFAULT_CACHE_SIZE
    middleware._routes._cache.clear()
    gc.collect()
    grown_blocks = sys.getallocatedblocks() - blocks
    grown_rss = process.memory_info().rss - rss

    assert grown_blocks < 1_000
    assert grown_rss < 2_000_000, f"RSS grew by {grown_rss / 1e6:.1f} MB"
    assert series_after_warm_up == series_count(registry)
    assert statuses <= {200, 307, 404, 405, 500}
    recorded = recorded_requests(registry)
    assert 14 * DEFAULT_CACHE_SIZE == sum(recorded.values())
    assert {route for _, route, _ in recorded} <= TEMPLATES | {UNMATCHED}


def _clear_urlsplit_cache() -> None:
    cache_clear = getattr(urllib.parse.urlsplit, "cache_clear", None)  # Python >= 3.11
    if cache_clear is not None:
        cache_clear()


async def test_long_hostile_paths_and_methods_are_not_retained(
    registry: CollectorRegistry,
) -> None:
    """400 distinct 16 kB paths (a quarter of what uvicorn accepts) and as many 16 kB methods:
    what the middleware keeps afterwards must not scale with their length (12.8 MB)."""
    middleware = PerfMonMiddleware(target_app(), registry=registry, loop_monitor=False)
    for n in range(100):  # warm-up: series and route indexes exist
        await serve(middleware, Hostile(path=f"/items/{n}"))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(400):
            await serve(middleware, Hostile(path=f"/items/{n:05d}" + "a" * 16_000))
            await serve(middleware, Hostile(method=f"M{n:05d}" + "M" * 16_000, path="/"))
        _clear_urlsplit_cache()  # the app's request.url fills the stdlib's own cache
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert retained < 1_000_000, f"{retained / 1e6:.1f} MB retained"


# -- log lines cannot be forged ------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put structlog and stdlib logging back as they were after the test."""
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    saved = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
             for name in ROUTED_LOGGERS}  # fmt: skip
    yield
    structlog.reset_defaults()
    root.handlers[:] = saved_root[0]
    root.setLevel(saved_root[1])
    for name, (handlers, propagate) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate


FORGERIES = (
    '/a"}\n{"event":"slow_request","route":"/forged","duration_s":99}',
    "/a\r\nFAKE 2026-01-01 [warning] forged",
    "/\x1b[2J\x1b[31mred\x1b[0m\x07",
    "/\u2028forged\u2029line\x85nel\x0bvt\x0cff\x1c\x1d\x1e",
    "/\u202eevil\u2066x\u200f",
    "/\x00nul\x7fdel\x9bcsi",
    "/\udcff\udcfe invalid utf-8",
    "/" + "\n" * 1000,
)


def forging_app(clock: FakeClock) -> Any:
    """A slow app that also logs the hostile path itself, through structlog and stdlib."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        clock.now += 2.0
        structlog.get_logger("app").warning("app_saw", path=scope["path"])
        logging.getLogger("app.stdlib").warning("stdlib saw %s", scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def log_forgeries(registry: CollectorRegistry, *, as_json: bool) -> str:
    """The log written for one slow request per forgery, as its path, method and request id."""
    out = io.StringIO()
    configure_logging(json=as_json, stream=out)
    structlog.configure(cache_logger_on_first_use=False)
    clock = FakeClock()
    middleware = PerfMonMiddleware(
        forging_app(clock), registry=registry, clock=clock, loop_monitor=False
    )
    for forgery in FORGERIES:
        request_id = forgery.encode("utf-8", "surrogateescape")
        await serve(middleware, Hostile(forgery, forgery, headers=((b"x-request-id", request_id),)))
    return out.getvalue()


@pytest.mark.usefixtures("restore_logging")
async def test_json_log_lines_cannot_be_forged(registry: CollectorRegistry) -> None:
    """Paths, methods and request ids full of CR/LF, quotes, JSON, ANSI and line separators:
    exactly three lines per request (app, stdlib, slow_request), each one printable JSON
    object that strict parsers read, with the values intact."""
    text = await log_forgeries(registry, as_json=True)

    lines = text.split("\n")
    assert "" == lines.pop()
    assert 3 * len(FORGERIES) == len(lines) == len(text.splitlines())
    records = [orjson.loads(line) for line in lines]
    assert records == [json.loads(line) for line in lines]
    assert all(line.isprintable() for line in lines)
    slow = [record for record in records if record["event"] == "slow_request"]
    readable = [p.replace("\udcff", "\ufffd").replace("\udcfe", "\ufffd") for p in FORGERIES]
    assert [path[:MAX_LOGGED_PATH] for path in readable] == [record["path"] for record in slow]
    assert readable == [record["path"] for record in records if record["event"] == "app_saw"]
    assert {(OTHER_METHOD, UNMATCHED)} == {(record["method"], record["route"]) for record in slow}
    assert all(GENERATED_ID.fullmatch(record["request_id"]) for record in records)


@pytest.mark.usefixtures("restore_logging")
async def test_console_log_lines_cannot_be_forged(registry: CollectorRegistry) -> None:
    """The console format too: one printable line per event, messages included."""
    text = await log_forgeries(registry, as_json=False)

    lines = text.split("\n")
    assert "" == lines.pop()
    assert 3 * len(FORGERIES) == len(lines) == len(text.splitlines())
    assert all(line.isprintable() for line in lines)


@pytest.mark.usefixtures("restore_logging")
async def test_slowlog_output_cannot_be_forged(
    registry: CollectorRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``asgi-perfmon slowlog`` over the middleware's hostile lines plus records whose route,
    method and operation names carry controls: one printable row per route, and ``--json``
    one printable line that gives the values back."""
    text = await log_forgeries(registry, as_json=True)
    crafted = {
        "event": "slow_request",
        "logger": "asgi_perfmon",
        "method": "GET\x1b[2J",
        "route": "/x\r\nGET /forged        9    9.000s\u2028\u202e",
        "duration_s": 1.5,
        "operations": {"op\n\x1b[31mred\x9b": {"count": 1, "total_s": 1.0, "max_s": 1.0}},
    }
    log = tmp_path / "app.log"
    log.write_text(text + json.dumps(crafted) + "\n")

    assert 0 == cli_main(["slowlog", str(log)])
    table, _ = capsys.readouterr()
    assert 0 == cli_main(["slowlog", "--json", str(log)])
    as_json, _ = capsys.readouterr()

    rows = table.split("\n")
    assert "" == rows.pop()
    assert all(row.isprintable() for row in rows)
    assert len(table.splitlines()) == len(rows)
    assert rows[0].startswith(f"{len(FORGERIES) + 1} slow requests")
    names = [f"{OTHER_METHOD} {UNMATCHED}", repr(f"{crafted['method']} {crafted['route']}")[1:-1]]
    route_rows = [row for row in rows[3:] if not row.startswith(" ")]
    assert len(names) == len(route_rows)
    assert all(any(row.startswith(name + "  ") for row in route_rows) for name in names)
    assert "    operations: op\\n\\x1b[31mred\\x9b 1.000s (1x)" in rows
    (line,) = as_json.split("\n")[:-1]
    assert line.isprintable()
    routes = {route["route"]: route for route in json.loads(line)["routes"]}
    assert crafted["route"] in routes
    assert [crafted["method"]] == [routes[crafted["route"]]["method"]]


def test_slowlog_errors_escape_file_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file or directory name made to colour the terminal (e.g. picked up by a glob) is
    escaped in the one-line error."""
    hostile = tmp_path / "logs\x1b[2J\rforged"
    hostile.mkdir()

    assert 2 == cli_main(["slowlog", str(hostile)])
    assert 2 == cli_main(["slowlog", str(tmp_path / "missing\x1b[31m")])
    _, errors = capsys.readouterr()

    lines = errors.split("\n")
    assert "" == lines.pop()
    assert 2 == len(lines)
    assert all(line.isprintable() and "\\x1b" in line for line in lines)


# -- raw bytes under a real uvicorn --------------------------------------------------------


@dataclass(frozen=True)
class RawAnswer:
    """A response read off the socket: status (0 if none came) and lower-case headers."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def request_ids(self) -> list[bytes]:
        return [value for name, value in self.headers if name == b"x-request-id"]


def raw_exchange(url: str, head: bytes) -> RawAnswer:
    """Send ``head`` (a request without body) on a new connection; read the response."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    received = b""
    with socket.create_connection((host, port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the server may close before reading it all
            sock.sendall(head)
            sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    if not received:
        return RawAnswer(0, [])
    status_line, *lines = received.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    headers = [tuple(line.split(b": ", 1)) for line in lines]
    return RawAnswer(int(status_line.split()[1]), [(k.lower(), v) for k, v in headers])


def request_head(target: bytes, *headers: bytes, method: bytes = b"GET") -> bytes:
    return b"\r\n".join([method + b" " + target + b" HTTP/1.1", b"Host: x", *headers,
                         b"Connection: close", b"", b""])  # fmt: skip


# What uvicorn (h11) hands to the app, and what it rejects itself with a 400 (recorded with
# uvicorn 0.54 / h11 0.16): h11 refuses bytes outside visible ASCII in the request target,
# NUL, CR or LF inside a header value, and methods that are not tokens; a request head is
# refused once more than 16 kB of it is waiting incomplete, so 64 kB arrives whole (one
# read) only most of the time, and 128 kB never.
RAW_CASES: dict[str, tuple[bytes, set[int]]] = {
    "raw 0xff in path": (request_head(b"/items/\xff"), {400}),
    "raw NUL in path": (request_head(b"/items/a\x00b"), {400}),
    "CR in X-Request-ID": (request_head(b"/ok", b"X-Request-ID: a\rb"), {400}),
    "NUL in X-Request-ID": (request_head(b"/ok", b"X-Request-ID: a\x00b"), {400}),
    "non-token method": (request_head(b"/items/1", method=b"G(T"), {400}),
    "128 kB path": (request_head(b"/items/" + b"a" * 2 * BIG), {400}),
    "percent-encoded invalid UTF-8": (request_head(b"/items/%ff%fe%c3"), {200}),
    "percent-encoded NUL": (request_head(b"/items/a%00b"), {200}),
    "percent-encoded CR/LF": (request_head(b"/items/a%0d%0aSet-Cookie:%20x=1"), {200}),
    "percent-encoded separators": (request_head(b"/items/%E2%80%A8%C2%85%1b[2J"), {200}),
    "64 kB path": (request_head(b"/items/" + b"a" * BIG), {200, 400}),
    "15 kB path": (request_head(b"/items/" + b"a" * 15_000), {200}),
    "64 kB X-Request-ID": (request_head(b"/ok", b"X-Request-ID: " + b"a" * BIG), {200, 400}),
    "invalid UTF-8 X-Request-ID": (
        request_head(b"/ok", b"X-Request-ID: \xff\xfe\x1b[31m\x7f"),
        {200},
    ),
    "only spaces X-Request-ID": (request_head(b"/ok", b"X-Request-ID:    "), {200}),
    "500 X-Request-IDs": (
        request_head(b"/ok", *(b"X-Request-ID: id-%d" % n for n in range(500))),
        {200},
    ),
    "lowercase method": (request_head(b"/items/1", method=b"get"), {405}),
    "10 kB method": (request_head(b"/items/1", method=b"A" * 10_000), {405}),
    "dot segments": (request_head(b"/items/../../etc/passwd"), {404}),
    "empty segments": (request_head(b"//items//1"), {404}),
    "absolute form": (request_head(b"http://evil/items/1"), {404}),
    "asterisk form": (request_head(b"*", method=b"OPTIONS"), {404}),
    "12 kB query": (request_head(b"/items/1?" + b"q=%ff&" * 2000), {200}),
}


def scrape(url: str) -> list[Any]:
    """Every sample of the server's /metrics, parsed as Prometheus does."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return [sample for family in text_to_families(text) for sample in family.samples]


def label_values(samples: list[Any], label: str) -> set[str]:
    return {sample.labels[label] for sample in samples if label in sample.labels}


@pytest.mark.uvicorn
@pytest.mark.slow
def test_raw_hostile_bytes_under_uvicorn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Raw hostile requests over a socket: uvicorn rejects some itself; the rest get the
    app's answer and one safe request id; 1,000 distinct hostile paths later the server
    still answers, /metrics parses with the same number of series, every log line is one
    printable JSON object, and ``slowlog`` reads them all."""
    log = tmp_path / "app.log"
    with start_uvicorn(APP, env={LOG_ENV: str(log)}) as server:
        answers = {name: raw_exchange(server.url, head) for name, (head, _) in RAW_CASES.items()}
        series_before = scrape(server.url)
        distinct = [
            raw_exchange(server.url, request_head(b"/items/%d%%ff%%00%%0a" % n + b"%1b" * (n % 50)))
            for n in range(1000)
        ]
        series_after = scrape(server.url)
        still_ok = raw_exchange(server.url, request_head(b"/ok"))

    for name, (_, statuses) in RAW_CASES.items():
        assert answers[name].status in statuses, name
    reached_app = [a for a in [*answers.values(), *distinct, still_ok] if a.status != 400]
    assert all(len(a.request_ids()) == 1 for a in reached_app)
    assert all(SAFE_ID.fullmatch(a.request_ids()[0].decode()) for a in reached_app)
    assert [b"id-0"] == answers["500 X-Request-IDs"].request_ids()
    assert all(name != b"set-cookie" for a in reached_app for name, _ in a.headers)
    assert {200} == {a.status for a in distinct}
    assert 200 == still_ok.status
    assert len(series_before) == len(series_after)
    assert label_values(series_after, "http_route") <= {"/ok", "/items/{item_id}", UNMATCHED}
    assert label_values(series_after, "http_request_method") <= STANDARD_METHODS | {OTHER_METHOD}

    lines = log.read_text(encoding="utf-8").split("\n")
    assert "" == lines.pop()
    assert len(lines) == len("\n".join(lines).splitlines())
    records = [orjson.loads(line) for line in lines]
    assert all(line.isprintable() for line in lines)
    slow = [record for record in records if record["event"] == "slow_request"]
    assert len(reached_app) == len(slow)
    assert 0 == cli_main(["slowlog", str(log)])
    table, _ = capsys.readouterr()
    assert table.startswith(f"{len(slow)} slow requests")
    assert all(row.isprintable() for row in table.split("\n"))
