"""Timing, counting and request-id semantics of PerfMonMiddleware, with an injected clock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from asgi_perfmon import PerfMonMiddleware
from asgi_perfmon.context import current_request
from tests._helpers import FakeClock, client, recorded_requests, samples

Scope = dict[str, Any]


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    result = registry.get_sample_value(name, labels)
    return 0.0 if result is None else result


REQUEST_THEN_DISCONNECT = [
    {"type": "http.request", "body": b"", "more_body": False},
    {"type": "http.disconnect"},
]


def aborted(registry: CollectorRegistry, reason: str, route: str = "__unmatched__") -> float:
    labels = {"http_request_method": "GET", "http_route": route, "reason": reason}
    return value(registry, "http_server_aborted_requests_total", **labels)


def exceptions(registry: CollectorRegistry, error_type: str, route: str = "__unmatched__") -> float:
    labels = {"http_request_method": "GET", "http_route": route, "error_type": error_type}
    return value(registry, "http_server_exceptions_total", **labels)


def http_scope(
    path: str = "/", method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None
) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers or [],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }


async def drive(
    app: Any, scope: Scope, incoming: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Call ``app`` like a server would; return what it sent."""
    queue = list(incoming or [{"type": "http.request", "body": b"", "more_body": False}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


# --- timing -----------------------------------------------------------------------------------


async def test_duration_is_measured_with_the_clock(registry: CollectorRegistry) -> None:
    """The duration recorded is exactly the time the handler took, per the injected clock."""
    clock = FakeClock()

    async def handler(request: Request) -> Response:
        clock.now += 0.25
        return PlainTextResponse("ok")

    app = PerfMonMiddleware(
        Starlette(routes=[Route("/r", handler)]), registry=registry, clock=clock
    )
    async with client(app) as http:
        await http.get("/r")

    labels = {"http_request_method": "GET", "http_route": "/r", "http_response_status_code": "200"}
    assert 0.25 == registry.get_sample_value("http_server_request_duration_seconds_sum", labels)


async def test_background_task_time_is_not_request_latency(registry: CollectorRegistry) -> None:
    """A 5 s background task after a 0.01 s handler records 0.01 s; the request is done."""
    clock = FakeClock()
    active_during_task: list[float] = []

    def background() -> None:
        active_during_task.append(
            value(
                registry, "http_server_active_requests", http_request_method="GET", http_route="/bg"
            )
        )
        clock.now += 5.0

    async def handler(request: Request) -> Response:
        clock.now += 0.01
        return PlainTextResponse("ok", background=BackgroundTask(background))

    app = PerfMonMiddleware(
        Starlette(routes=[Route("/bg", handler)]), registry=registry, clock=clock
    )
    async with client(app) as http:
        await http.get("/bg")

    total = value(
        registry,
        "http_server_request_duration_seconds_sum",
        http_request_method="GET",
        http_route="/bg",
        http_response_status_code="200",
    )
    assert total == pytest.approx(0.01)
    assert [0.0] == active_during_task


async def test_streaming_is_measured_to_the_last_byte(registry: CollectorRegistry) -> None:
    """Duration ends at the final chunk; time to first byte at the first non-empty chunk."""
    clock = FakeClock()

    async def chunks() -> Any:
        clock.now += 0.1
        yield b"a" * 10
        clock.now += 0.2
        yield b"b" * 20
        clock.now += 0.3
        yield b"c" * 30

    async def handler(request: Request) -> Response:
        return StreamingResponse(chunks())

    app = PerfMonMiddleware(
        Starlette(routes=[Route("/s", handler)]), registry=registry, clock=clock
    )
    async with client(app) as http:
        response = await http.get("/s")

    assert len(response.content) == 60
    labels = {"http_request_method": "GET", "http_route": "/s"}
    assert value(
        registry,
        "http_server_request_duration_seconds_sum",
        **labels,
        http_response_status_code="200",
    ) == pytest.approx(0.6)
    assert value(registry, "http_server_time_to_first_byte_seconds_sum", **labels) == pytest.approx(
        0.1
    )
    assert value(registry, "http_server_response_body_size_bytes_sum", **labels) == 60


async def test_trailers_end_the_request(registry: CollectorRegistry) -> None:
    """With ``trailers`` announced, the request ends at the last trailers message."""
    clock = FakeClock()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"xyz", "more_body": False})
        clock.now += 0.4
        await send({"type": "http.response.trailers", "headers": [], "more_trailers": False})
        clock.now += 9.0

    await drive(PerfMonMiddleware(app, registry=registry, clock=clock), http_scope("/t"))

    assert value(
        registry,
        "http_server_request_duration_seconds_sum",
        http_request_method="GET",
        http_route="__unmatched__",
        http_response_status_code="200",
    ) == pytest.approx(0.4)


async def test_pathsend_counts_the_file_size(registry: CollectorRegistry, tmp_path: Path) -> None:
    """``http.response.pathsend`` completes the request and counts the file's bytes."""
    file = tmp_path / "f.bin"
    file.write_bytes(b"x" * 1234)

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": str(file)})

    await drive(PerfMonMiddleware(app, registry=registry), http_scope("/f"))

    assert (
        value(
            registry,
            "http_server_response_body_size_bytes_sum",
            http_request_method="GET",
            http_route="__unmatched__",
        )
        == 1234
    )


async def test_body_sizes_count_bytes_not_content_length(registry: CollectorRegistry) -> None:
    """Request bytes received in chunks and response bytes sent, whatever Content-Length says."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"999999")],
            }
        )
        await send({"type": "http.response.body", "body": b"1234567", "more_body": False})

    incoming = [
        {"type": "http.request", "body": b"a" * 100, "more_body": True},
        {"type": "http.request", "body": b"b" * 23, "more_body": False},
    ]
    await drive(PerfMonMiddleware(app, registry=registry), http_scope("/u", "POST"), incoming)

    labels = {"http_request_method": "POST", "http_route": "__unmatched__"}
    assert value(registry, "http_server_request_body_size_bytes_sum", **labels) == 123
    assert value(registry, "http_server_response_body_size_bytes_sum", **labels) == 7


# --- errors and aborts ------------------------------------------------------------------------


async def boom(request: Request) -> Response:
    raise ValueError("handler bug")


async def test_handler_exception_counts_once_and_propagates(registry: CollectorRegistry) -> None:
    """One 500 with ``error_type``; the exception still reaches the server."""
    app = Starlette(routes=[Route("/boom", boom)])
    app.add_middleware(PerfMonMiddleware, registry=registry)

    async with client(app) as http:
        with pytest.raises(ValueError, match="handler bug"):
            await http.get("/boom")

    assert {("GET", "/boom", "500"): 1.0} == recorded_requests(registry)
    assert 1.0 == exceptions(registry, "ValueError", route="/boom")
    assert [] == [s for s in samples(registry, "http_server_aborted_requests_total") if s[1]]


async def test_middleware_outside_the_error_middleware_counts_once(
    registry: CollectorRegistry,
) -> None:
    """Wrapping the whole app: the 500 sent by ServerErrorMiddleware and the re-raise count once."""
    app = PerfMonMiddleware(Starlette(routes=[Route("/boom", boom)]), registry=registry)

    async with client(app, raise_app_exceptions=False) as http:
        response = await http.get("/boom")

    assert response.status_code == 500
    assert {("GET", "/boom", "500"): 1.0} == recorded_requests(registry)
    assert 1.0 == exceptions(registry, "ValueError", route="/boom")


async def test_exception_after_response_started(registry: CollectorRegistry) -> None:
    """The status sent is recorded, with an abort ``error_mid_stream``; the exception propagates."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        await drive(PerfMonMiddleware(app, registry=registry), http_scope("/x"))

    assert {("GET", "__unmatched__", "200"): 1.0} == recorded_requests(registry)
    assert 1.0 == aborted(registry, "error_mid_stream")
    assert 1.0 == exceptions(registry, "RuntimeError", route="__unmatched__")


async def test_disconnect_before_any_response_is_499(registry: CollectorRegistry) -> None:
    """A client gone before the app answered: status 499, aborted ``client_disconnect``."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    incoming = REQUEST_THEN_DISCONNECT
    await drive(PerfMonMiddleware(app, registry=registry), http_scope("/slow"), incoming)

    assert {("GET", "__unmatched__", "499"): 1.0} == recorded_requests(registry)
    assert 1.0 == aborted(registry, "client_disconnect")


async def test_disconnect_mid_stream(registry: CollectorRegistry) -> None:
    """Streaming cut by the client: the status sent, aborted ``client_disconnect``, no exception."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"chunk", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass

    incoming = REQUEST_THEN_DISCONNECT
    await drive(PerfMonMiddleware(app, registry=registry), http_scope("/stream"), incoming)

    assert {("GET", "__unmatched__", "200"): 1.0} == recorded_requests(registry)
    assert 1.0 == aborted(registry, "client_disconnect")
    assert [] == [s for s in samples(registry, "http_server_exceptions_total") if s[1]]


async def test_disconnect_after_the_response_is_not_an_abort(registry: CollectorRegistry) -> None:
    """Servers deliver ``http.disconnect`` after a complete response too: not an abort."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        await receive()
        await receive()

    incoming = REQUEST_THEN_DISCONNECT
    await drive(PerfMonMiddleware(app, registry=registry), http_scope("/done"), incoming)

    assert {("GET", "__unmatched__", "204"): 1.0} == recorded_requests(registry)
    assert [] == [s for s in samples(registry, "http_server_aborted_requests_total") if s[1]]


async def test_cancelled_request_is_a_client_disconnect(registry: CollectorRegistry) -> None:
    """A server cancelling the request task counts an abort, not an exception, and re-raises."""
    started = asyncio.Event()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        started.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(drive(PerfMonMiddleware(app, registry=registry), http_scope("/c")))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert {("GET", "__unmatched__", "499"): 1.0} == recorded_requests(registry)
    assert [] == [s for s in samples(registry, "http_server_exceptions_total") if s[1]]
    assert 0.0 == value(
        registry,
        "http_server_active_requests",
        http_request_method="GET",
        http_route="__unmatched__",
    )


# --- labels -----------------------------------------------------------------------------------


async def test_unknown_methods_become_other(registry: CollectorRegistry) -> None:
    """A method outside the standard set is recorded as ``_OTHER``."""
    app = Starlette(routes=[Route("/m", boom)])
    app.add_middleware(PerfMonMiddleware, registry=registry)
    async with client(app) as http:
        await http.request("BREW", "/m")

    assert {("_OTHER", "/m", "405"): 1.0} == recorded_requests(registry)


async def test_excluded_paths_are_not_recorded(registry: CollectorRegistry) -> None:
    """``/metrics`` by default, and any path given in ``exclude_paths``."""
    app = Starlette(routes=[Route("/metrics", boom), Route("/health", boom), Route("/r", boom)])
    middleware = PerfMonMiddleware(app, registry=registry, exclude_paths=["/health", "/metrics"])
    async with client(middleware, raise_app_exceptions=False) as http:
        for path in ("/metrics", "/health", "/r"):
            await http.get(path)

    assert {("GET", "/r", "500"): 1.0} == recorded_requests(registry)


# --- request ids and logs ---------------------------------------------------------------------


def echo_request_id_app() -> Starlette:
    async def handler(request: Request) -> Response:
        context = current_request()
        return JSONResponse(
            {
                "structlog": structlog.contextvars.get_contextvars().get("request_id"),
                "context": context.request_id if context else None,
            }
        )

    return Starlette(routes=[Route("/id", handler)])


async def test_safe_request_id_is_kept_and_echoed(registry: CollectorRegistry) -> None:
    """A safe incoming ``X-Request-ID`` is bound for logs and echoed in the response."""
    app = PerfMonMiddleware(echo_request_id_app(), registry=registry)
    async with client(app) as http:
        response = await http.get("/id", headers={"X-Request-ID": "abc-123.DEF_4"})

    assert response.headers["x-request-id"] == "abc-123.DEF_4"
    assert {"structlog": "abc-123.DEF_4", "context": "abc-123.DEF_4"} == response.json()


@pytest.mark.parametrize(
    "hostile",
    [b"evil\r\nSet-Cookie: x=1", b"a" * 10_000, "ünïcödé".encode(), b"", b"has space", b"a/b"],
)
async def test_hostile_request_id_is_replaced(registry: CollectorRegistry, hostile: bytes) -> None:
    """CR/LF, 10 kB, non-ASCII, empty or unsafe ids are replaced by a generated one."""
    app = PerfMonMiddleware(echo_request_id_app(), registry=registry)
    sent = await drive(app, http_scope("/id", headers=[(b"x-request-id", hostile)]))

    echoed = dict(sent[0]["headers"])[b"x-request-id"]
    assert echoed != hostile
    assert len(echoed) == 32
    assert all(chr(c) in "0123456789abcdef" for c in echoed)


async def test_app_supplied_request_id_header_is_not_duplicated(
    registry: CollectorRegistry,
) -> None:
    """If the app already answers with X-Request-ID, the middleware does not add a second one."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"x-request-id", b"from-app")],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    sent = await drive(PerfMonMiddleware(app, registry=registry), http_scope("/"))

    assert [(b"x-request-id", b"from-app")] == sent[0]["headers"]


async def test_concurrent_requests_never_see_each_others_id(registry: CollectorRegistry) -> None:
    """200 concurrent requests: each handler sees its own id, and the ids are all different."""
    app = PerfMonMiddleware(echo_request_id_app(), registry=registry)

    async with client(app) as http:
        responses = await asyncio.gather(
            *(http.get("/id", headers={"X-Request-ID": f"req-{n}"}) for n in range(200))
        )

    assert [f"req-{n}" for n in range(200)] == [r.json()["structlog"] for r in responses]
    assert [f"req-{n}" for n in range(200)] == [r.json()["context"] for r in responses]


async def test_request_id_binding_is_reset_and_outer_keys_survive(
    registry: CollectorRegistry,
) -> None:
    """After the request, ``request_id`` is unbound; keys bound further out are untouched."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service="billing")
    app = PerfMonMiddleware(echo_request_id_app(), registry=registry)

    await drive(app, http_scope("/id"))

    assert {"service": "billing"} == structlog.contextvars.get_contextvars()
    structlog.contextvars.clear_contextvars()


async def test_slow_request_is_logged_with_the_spec_fields(registry: CollectorRegistry) -> None:
    """At the threshold, one ``slow_request`` warning with the SPEC's fields and the counter."""
    clock = FakeClock()

    async def handler(request: Request) -> Response:
        context = current_request()
        assert context is not None
        context.add_operation("load_user", 0.6)
        context.add_query("SELECT 1", 0.1)
        context.add_query("SELECT 1", 0.1)
        context.add_cache_result(hit=False)
        clock.now += 1.0
        return PlainTextResponse("slow")

    app = PerfMonMiddleware(
        Starlette(routes=[Route("/users/{uid}", handler)]), registry=registry, clock=clock
    )
    with capture_logs() as logs:
        async with client(app) as http:
            response = await http.get("/users/7?secret=1", headers={"X-Request-ID": "r1"})

    slow = [entry for entry in logs if entry["event"] == "slow_request"]
    assert [
        {
            "event": "slow_request",
            "log_level": "warning",
            "request_id": "r1",
            "method": "GET",
            "route": "/users/{uid}",
            "path": "/users/7",
            "status": 200,
            "duration_s": 1.0,
            "threshold_s": 1.0,
            "ttfb_s": 1.0,
            "operations": {"load_user": {"count": 1, "total_s": 0.6, "max_s": 0.6}},
            "db": {
                "queries": 2,
                "errors": 0,
                "total_s": 0.2,
                "acquire_wait_s": 0.0,
                "repeated_statements": [{"statement": "SELECT 1", "count": 2}],
            },
            "cache": {"hits": 0, "misses": 1},
        }
    ] == slow
    assert response.text == "slow"
    assert 1.0 == value(
        registry,
        "http_server_slow_requests_total",
        http_request_method="GET",
        http_route="/users/{uid}",
    )


async def test_fast_request_is_not_logged(registry: CollectorRegistry) -> None:
    """Just under the threshold: no log line, no slow count."""
    clock = FakeClock()

    async def handler(request: Request) -> Response:
        clock.now += 0.999
        return PlainTextResponse("ok")

    app = PerfMonMiddleware(
        Starlette(routes=[Route("/q", handler)]), registry=registry, clock=clock
    )
    with capture_logs() as logs:
        async with client(app) as http:
            await http.get("/q")

    assert [] == logs
    assert 0.0 == value(
        registry, "http_server_slow_requests_total", http_request_method="GET", http_route="/q"
    )


# --- transparency and robustness --------------------------------------------------------------


async def test_response_is_unchanged_apart_from_the_request_id(registry: CollectorRegistry) -> None:
    """Status, headers and body through the middleware equal those without it."""

    async def handler(request: Request) -> Response:
        return Response(
            b"\x00binary\xff", status_code=418, headers={"X-Custom": "1", "Set-Cookie": "a=b"}
        )

    bare = Starlette(routes=[Route("/t", handler)])
    wrapped = PerfMonMiddleware(Starlette(routes=[Route("/t", handler)]), registry=registry)
    async with client(bare) as plain_http, client(wrapped) as http:
        expected, actual = await plain_http.get("/t"), await http.get("/t")

    actual_headers = [(k, v) for k, v in actual.headers.multi_items() if k != "x-request-id"]
    assert (expected.status_code, expected.headers.multi_items(), expected.content) == (
        actual.status_code,
        actual_headers,
        actual.content,
    )


async def test_lifespan_passes_through_untouched(registry: CollectorRegistry) -> None:
    """Lifespan messages reach the app and the server exactly as sent."""
    seen: list[Any] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        seen.append(await receive())
        await send({"type": "lifespan.startup.complete"})

    sent = await drive(
        PerfMonMiddleware(app, registry=registry),
        {"type": "lifespan"},
        [{"type": "lifespan.startup"}],
    )

    assert ["lifespan", {"type": "lifespan.startup"}] == seen
    assert [{"type": "lifespan.startup.complete"}] == sent


async def test_failure_inside_the_instrumentation_is_logged_once_and_swallowed(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken metric does not turn into a 500: the app answers, one error is logged."""
    app = PerfMonMiddleware(
        Starlette(routes=[Route("/r", echo_request_id_app().routes[0].endpoint)]), registry=registry
    )

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("collector bug")

    monkeypatch.setattr(app._metrics, "series", broken)
    with capture_logs() as logs:
        async with client(app) as http:
            statuses = [(await http.get("/r")).status_code for _ in range(3)]

    assert [200, 200, 200] == statuses
    assert ["instrumentation_failed"] == [entry["event"] for entry in logs]


async def test_websocket_messages_and_connections(registry: CollectorRegistry) -> None:
    """Active connections go up and down; messages are counted by direction."""
    active_inside: list[float] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        active_inside.append(
            value(registry, "websocket_server_active_connections", http_route="__unmatched__")
        )
        await receive()
        await send({"type": "websocket.send", "text": "1"})
        await send({"type": "websocket.send", "text": "2"})
        await send({"type": "websocket.close"})

    scope = {
        "type": "websocket",
        "path": "/ws",
        "root_path": "",
        "headers": [],
        "query_string": b"",
    }
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "hi"}]
    await drive(PerfMonMiddleware(app, registry=registry), scope, incoming)

    assert [1.0] == active_inside
    assert 0.0 == value(registry, "websocket_server_active_connections", http_route="__unmatched__")
    assert 1.0 == value(
        registry,
        "websocket_server_messages_total",
        http_route="__unmatched__",
        direction="received",
    )
    assert 2.0 == value(
        registry, "websocket_server_messages_total", http_route="__unmatched__", direction="sent"
    )


async def test_active_requests_returns_to_zero(registry: CollectorRegistry) -> None:
    """After a mix of successes and failures nothing is left in flight."""
    app = Starlette(
        routes=[Route("/ok", echo_request_id_app().routes[0].endpoint), Route("/boom", boom)]
    )
    app.add_middleware(PerfMonMiddleware, registry=registry)
    async with client(app, raise_app_exceptions=False) as http:
        await asyncio.gather(*(http.get("/ok" if n % 3 else "/boom") for n in range(30)))

    assert [] == [s for s in samples(registry, "http_server_active_requests") if s[1]]


async def test_active_requests_are_counted_when_scraped_before_and_after_routing(
    registry: CollectorRegistry,
) -> None:
    """The in-flight gauge is worked out at scrape time: a request still held up before the
    router ran is counted under the route its path matches, one after routing under the route
    that serves it, each once however often it is scraped, and none once they are done."""
    before_routing = asyncio.Event()
    release = asyncio.Event()
    in_handler = asyncio.Event()

    async def slow_handler(request: Any) -> PlainTextResponse:
        in_handler.set()
        await release.wait()
        return PlainTextResponse("ok")

    class HeldUpBeforeRouting:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
            if scope["path"] == "/items/held":
                before_routing.set()
                await release.wait()
            await self.app(scope, receive, send)

    app = Starlette(
        routes=[Route("/items/{item_id}", slow_handler)],
        middleware=[Middleware(HeldUpBeforeRouting)],
    )
    app.add_middleware(PerfMonMiddleware, registry=registry)

    async with client(app) as http:
        requests = [
            asyncio.create_task(http.get("/items/held")),
            asyncio.create_task(http.get("/items/7")),
        ]
        await before_routing.wait()
        await in_handler.wait()
        scraped = [
            value(
                registry,
                "http_server_active_requests",
                http_request_method="GET",
                http_route="/items/{item_id}",
            )
            for _ in range(3)
        ]
        release.set()
        assert [200, 200] == [(await request).status_code for request in requests]

    assert [2.0, 2.0, 2.0] == scraped
    assert 0.0 == value(
        registry,
        "http_server_active_requests",
        http_request_method="GET",
        http_route="/items/{item_id}",
    )


async def test_info_metric(registry: CollectorRegistry) -> None:
    """``asgi_perfmon_info{version}`` is 1."""
    from asgi_perfmon import __version__

    PerfMonMiddleware(echo_request_id_app(), registry=registry)

    assert 1.0 == value(registry, "asgi_perfmon_info", version=__version__)


def test_two_apps_can_share_one_registry(registry: CollectorRegistry) -> None:
    """Building the middleware twice on one registry does not raise 'Duplicated timeseries'."""
    PerfMonMiddleware(echo_request_id_app(), registry=registry)
    PerfMonMiddleware(echo_request_id_app(), registry=registry)


async def test_httpx_client_sees_the_request_id_header(registry: CollectorRegistry) -> None:
    """A generated id is returned to the client."""
    app = PerfMonMiddleware(echo_request_id_app(), registry=registry)
    async with client(app) as http:
        response: httpx.Response = await http.get("/id")

    assert response.headers["x-request-id"] == response.json()["context"]


def exemplar_ids(registry: CollectorRegistry) -> set[str]:
    return {
        sample.exemplar.labels["request_id"]
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "http_server_request_duration_seconds_bucket" and sample.exemplar
    }


async def test_exemplars_are_rate_limited_but_slow_requests_always_get_one(
    registry: CollectorRegistry,
) -> None:
    """One exemplar per second per route keeps the cost low; a slow request always carries one."""
    clock = FakeClock()
    delays = iter([0.01, 0.01, 2.0, 0.01])

    async def handler(request: Request) -> Response:
        clock.now += next(delays)
        return PlainTextResponse("ok")

    app = PerfMonMiddleware(
        Starlette(routes=[Route("/e", handler)]), registry=registry, clock=clock
    )
    async with client(app) as http:
        for request_id in ("first", "second", "slow", "after-slow"):
            await http.get("/e", headers={"X-Request-ID": request_id})

    assert {"first", "slow"} == exemplar_ids(registry)


async def test_a_raising_log_sink_does_not_break_the_request(registry: CollectorRegistry) -> None:
    """A broken structlog processor: the slow request still answers and is still counted."""
    clock = FakeClock()

    def broken_processor(logger: Any, method: str, event: Any) -> Any:
        raise OSError("log disk full")

    async def handler(request: Request) -> Response:
        clock.now += 3.0
        return PlainTextResponse("ok")

    app = PerfMonMiddleware(
        Starlette(routes=[Route("/s", handler)]), registry=registry, clock=clock
    )
    structlog.configure(processors=[broken_processor])
    try:
        async with client(app) as http:
            responses = [await http.get("/s") for _ in range(2)]
    finally:
        structlog.reset_defaults()

    assert [200, 200] == [r.status_code for r in responses]
    assert 2.0 == value(
        registry, "http_server_slow_requests_total", http_request_method="GET", http_route="/s"
    )


async def test_loop_monitor_runs_from_startup_to_shutdown(registry: CollectorRegistry) -> None:
    """The event-loop monitor starts with lifespan start-up and stops at shutdown."""
    from asgi_perfmon.loop_monitor import LoopMonitor

    monitor = LoopMonitor(registry=registry)
    running: list[bool] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        running.append(monitor.running)
        await send({"type": "lifespan.startup.complete"})
        await receive()
        running.append(monitor.running)
        await send({"type": "lifespan.shutdown.complete"})

    middleware = PerfMonMiddleware(app, registry=registry, loop_monitor=monitor)
    await drive(
        middleware,
        {"type": "lifespan"},
        [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )

    assert [True, False] == running
    assert not monitor.running


def test_loop_monitor_option_is_validated(registry: CollectorRegistry) -> None:
    """Anything but True, False or a LoopMonitor is refused."""
    with pytest.raises(ValueError, match="loop_monitor must be True, False or a LoopMonitor"):
        PerfMonMiddleware(echo_request_id_app(), registry=registry, loop_monitor="yes")  # type: ignore[arg-type]


async def test_a_long_request_id_is_kept_but_not_made_an_exemplar(
    registry: CollectorRegistry,
) -> None:
    """OpenMetrics caps exemplar labels at 128 characters: a 120-character id is echoed and
    logged, recorded without an exemplar, and nothing else is lost."""
    long_id = "r" * 120
    app = PerfMonMiddleware(echo_request_id_app(), registry=registry)
    async with client(app) as http:
        response = await http.get("/id", headers={"X-Request-ID": long_id})

    assert response.headers["x-request-id"] == long_id
    assert {("GET", "/id", "200"): 1.0} == recorded_requests(registry)
    assert set() == exemplar_ids(registry)
    assert 0.0 == value(
        registry, "http_server_active_requests", http_request_method="GET", http_route="/id"
    )
