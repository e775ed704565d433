"""Transparency: what the client and the app see is the same with PerfMonMiddleware as without.

Hypothesis generates application behaviours and client behaviours; each example runs the app
bare and wrapped, through a raw ASGI driver written here (httpx's ASGITransport buffers, so it
would hide chunking and ``more_body``). Every example also checks the middleware's bookkeeping:
one request in the duration histogram with the status the client saw (or the 499/500 rules),
the abort and exception counts those rules give, and no request left active.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_perfmon import PerfMonMiddleware
from tests._helpers import DURATION_COUNT, recorded_requests, samples
from tests._uvicorn import RunningServer, start_uvicorn

Message = dict[str, Any]
ASGIApp = Callable[[dict[str, Any], Any, Any], Any]

# derandomize: CI runs the same examples every time; no database: no state kept between runs.
TRANSPARENCY = settings(max_examples=250, deadline=None, derandomize=True, database=None)

REQUEST_ID = b"x-request-id"
SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")
GENERATED_REQUEST_ID = re.compile(rb"[0-9a-f]{32}")
STANDARD_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
HANG_LIMIT = 10.0
"""Seconds before a run that waits forever (a driver or strategy bug) fails instead of hanging."""


class ClientGone(OSError):
    """What a server following ASGI HTTP spec 2.4 raises from ``send`` once the client left."""


# --- The client and the server: a raw ASGI driver -------------------------------------------


@dataclass(frozen=True)
class Client:
    """One HTTP exchange as the server presents it to the app.

    The client leaves either once the app has read ``leaves_after_chunks`` request chunks or
    once the server has written ``leaves_after_sends`` messages. After that ``receive`` returns
    ``http.disconnect`` and ``send`` raises ``ClientGone`` (spec 2.4) or drops the message
    (what uvicorn 0.54 does).
    """

    method: str = "GET"
    path: str = "/things/1"
    request_id: bytes | None = None
    body: tuple[bytes, ...] = (b"",)
    leaves_after_chunks: int | None = None
    leaves_after_sends: int | None = None
    send_raises: bool = True
    spec_version: str = "2.4"
    pathsend: bool = True

    def scope(self) -> dict[str, Any]:
        headers = [(b"host", b"testserver")]
        if self.request_id is not None:
            headers.append((REQUEST_ID, self.request_id))
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": self.spec_version},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 40000),
            "server": ("testserver", 80),
            "extensions": {"http.response.pathsend": {}} if self.pathsend else {},
        }


def normalized(message: Message) -> Message:
    """A copy of ``message`` as the server reads it: header iterables become lists of pairs."""
    copy = dict(message)
    if "headers" in copy:
        copy["headers"] = [(bytes(name), bytes(value)) for name, value in copy["headers"]]
    return copy


def is_final(message: Message, trailers_expected: bool) -> bool:
    """Whether ``message`` completes the response (ASGI HTTP spec)."""
    kind = message["type"]
    if kind == "http.response.body":
        return not message.get("more_body", False) and not trailers_expected
    if kind == "http.response.trailers":
        return not message.get("more_trailers", False)
    return kind == "http.response.pathsend"


class Server:
    """The server side of one exchange: feeds ``receive``, records what reaches the client."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.delivered = 0
        self.reached_client: list[Message] = []
        self.trailers_expected = False
        self.complete = False
        self.wake = asyncio.Event()  # the response completed or the client left

    @property
    def client_gone(self) -> bool:
        client = self.client
        if client.leaves_after_chunks is not None and self.delivered >= client.leaves_after_chunks:
            return True
        sends = client.leaves_after_sends
        return sends is not None and len(self.reached_client) >= sends

    async def receive(self) -> Message:
        if self.client_gone:
            return {"type": "http.disconnect"}
        if self.delivered < len(self.client.body):
            self.delivered += 1
            more_body = self.delivered < len(self.client.body)
            chunk = self.client.body[self.delivered - 1]
            self._wake_if_done()
            return {"type": "http.request", "body": chunk, "more_body": more_body}
        await self.wake.wait()  # like uvicorn: nothing to say until the end or a disconnect
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.client_gone:
            if self.client.send_raises:
                raise ClientGone("the client has gone")
            return
        seen = normalized(message)
        self.reached_client.append(seen)
        if seen["type"] == "http.response.start":
            self.trailers_expected = seen.get("trailers", False)
        self.complete = self.complete or is_final(seen, self.trailers_expected)
        self._wake_if_done()

    def _wake_if_done(self) -> None:
        if self.complete or self.client_gone:
            self.wake.set()


@dataclass
class AppSide:
    """What the app itself saw: what it received, the status it sent, what it raised."""

    received: list[Message] = field(default_factory=list)
    start_status: int | None = None
    completed: bool = False
    disconnected: bool = False
    raised: BaseException | None = None


class Recorder:
    """Pure ASGI wrapper just around the app, recording its side of the exchange.

    It reads only ``type``, ``status`` and the ``more_*`` flags of what the app sends, so it
    cannot change what the middleware gets (header iterables stay unconsumed).
    """

    def __init__(self, app: ASGIApp, side: AppSide) -> None:
        self.app = app
        self.side = side

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        side = self.side
        trailers_expected = False

        async def receive_recorded() -> Message:
            message = await receive()
            side.received.append(dict(message))
            if message["type"] == "http.disconnect" and not side.completed:
                side.disconnected = True
            return message

        async def send_recorded(message: Message) -> None:
            nonlocal trailers_expected
            kind, status = message["type"], message.get("status")
            try:
                await send(message)
            except OSError:
                side.disconnected = True
                raise
            if kind == "http.response.start" and side.start_status is None:
                side.start_status = status  # sent: the server took it
                trailers_expected = message.get("trailers", False)
            side.completed = side.completed or is_final(message, trailers_expected)

        try:
            await self.app(scope, receive_recorded, send_recorded)
        except BaseException as error:
            side.raised = error
            raise


@dataclass
class Run:
    """One exchange: what reached the client, what the app saw, what left the ASGI callable."""

    reached_client: list[Message]
    side: AppSide
    propagated: BaseException | None


async def serve(app: ASGIApp, side: AppSide, client: Client) -> Run:
    server = Server(client)
    task = asyncio.current_task()
    assert task is not None
    hung: list[bool] = []

    def give_up() -> None:
        hung.append(True)
        task.cancel()

    watchdog = asyncio.get_running_loop().call_later(HANG_LIMIT, give_up)
    propagated: BaseException | None = None
    try:
        await app(client.scope(), server.receive, server.send)
    except BaseException as error:  # a CancelledError the app raised itself included
        propagated = error
    finally:
        watchdog.cancel()
    assert not hung, f"the exchange never finished: {client}"
    return Run(server.reached_client, side, propagated)


def run_bare_and_monitored(
    build: Callable[[AppSide, CollectorRegistry | None], ASGIApp], client: Client
) -> tuple[Run, Run, CollectorRegistry]:
    """The same app and client, once without the middleware and once with a fresh one."""
    registry = CollectorRegistry()

    runs: list[Run] = []

    async def both() -> None:  # returns nothing: asyncio.run would repr megabytes of bodies
        for registry_or_none in (None, registry):
            side = AppSide()
            runs.append(await serve(build(side, registry_or_none), side, client))

    asyncio.run(both())
    bare, monitored_run = runs
    return bare, monitored_run, registry


def monitored(app: ASGIApp, registry: CollectorRegistry | None) -> ASGIApp:
    if registry is None:
        return app
    return PerfMonMiddleware(app, registry=registry, loop_monitor=False)


# --- What must hold ---------------------------------------------------------------------------


def assert_transparent(bare: Run, monitored_run: Run, client: Client) -> None:
    """The client got the same messages, the app the same ones, and the same exception left."""
    assert bare.side.received == monitored_run.side.received
    assert with_added_request_id(bare.reached_client, monitored_run, client) == (
        monitored_run.reached_client
    )
    assert type(bare.propagated) is type(monitored_run.propagated)
    assert repr(bare.propagated) == repr(monitored_run.propagated)
    # The app's own exception reaches the server as the very same object, re-raised.
    assert (bare.propagated is bare.side.raised) == (
        monitored_run.propagated is monitored_run.side.raised
    )


def with_added_request_id(bare: list[Message], monitored_run: Run, client: Client) -> list[Message]:
    """``bare`` plus the one header the middleware adds: the request id, unless the app set it.

    Only a start the app sent passes through the middleware; one from further out (Starlette's
    error middleware answering 500) does not.
    """
    expected = []
    for message in bare:
        headers = message.get("headers", [])
        passed_through = monitored_run.side.start_status is not None
        if (
            message["type"] == "http.response.start"
            and passed_through
            and REQUEST_ID not in {name.lower() for name, _ in headers}
        ):
            echoed = echoed_request_id(monitored_run.reached_client)
            assert_request_id_rule(echoed, client)
            message = {**message, "headers": [*headers, (REQUEST_ID, echoed)]}
        expected.append(message)
    return expected


def echoed_request_id(messages: list[Message]) -> bytes:
    start = next(m for m in messages if m["type"] == "http.response.start")
    values = [value for name, value in start["headers"] if name == REQUEST_ID]
    assert 1 == len(values), start["headers"]
    return values[0]


def assert_request_id_rule(echoed: bytes, client: Client) -> None:
    incoming = client.request_id
    if incoming is not None and SAFE_REQUEST_ID.fullmatch(incoming):
        assert incoming == echoed
    else:
        assert GENERATED_REQUEST_ID.fullmatch(echoed), echoed


def client_caused(side: AppSide) -> bool:
    """Cancelled, or the error that says the client left, once it was known to have left.

    That error is the server's ``OSError`` or Starlette's ``ClientDisconnect``; the middleware
    misses the latter (test_starlette_client_disconnect_is_not_an_app_error), so the
    strategies do not generate it where it would matter.
    """
    error = side.raised
    return isinstance(error, asyncio.CancelledError) or (
        side.disconnected and isinstance(error, (OSError, ClientDisconnect))
    )


def expected_status(side: AppSide) -> int:
    """The status sent, else 499 for a client that left and 500 for anything else."""
    if side.start_status is not None:
        return side.start_status
    left = client_caused(side) or (side.raised is None and side.disconnected)
    return 499 if left else 500


def expected_abort(side: AppSide) -> dict[str, float]:
    if side.completed:
        return {}
    if side.disconnected or client_caused(side):
        return {"client_disconnect": 1.0}
    if side.raised is not None and side.start_status is not None:
        return {"error_mid_stream": 1.0}
    return {}


def nonzero(registry: CollectorRegistry, name: str, label: str) -> dict[str, float]:
    return {labels[label]: value for labels, value in samples(registry, name) if value}


def assert_recorded_once(
    registry: CollectorRegistry, side: AppSide, client: Client, route: str
) -> None:
    """One request with the status the rules give, its abort if any, and nothing left active."""
    method = client.method if client.method in STANDARD_METHODS else "_OTHER"
    assert {(method, route, str(expected_status(side))): 1.0} == recorded_requests(registry)
    assert expected_abort(side) == nonzero(registry, "http_server_aborted_requests_total", "reason")
    active = samples(registry, "http_server_active_requests")
    assert active, "the active-requests series exists"
    assert 0.0 == sum(value for _, value in active)


def assert_exception_counted(registry: CollectorRegistry, side: AppSide) -> None:
    """An exception the app raised counts once by type, unless the client caused it."""
    error = side.raised
    expected = {} if error is None or client_caused(side) else {type(error).__name__: 1.0}
    assert expected == nonzero(registry, "http_server_exceptions_total", "error_type")


# --- Raw ASGI applications, generated ---------------------------------------------------------


class AppAbort(BaseException):
    """An error outside ``Exception`` (like ``KeyboardInterrupt``) the middleware must pass on."""


ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    RuntimeError,
    ConnectionRefusedError,  # an OSError of the app's own, e.g. its database is down
    asyncio.CancelledError,
    AppAbort,
)


@dataclass(frozen=True)
class Script:
    """A raw ASGI app: read ``reads`` messages, send ``messages[:stop_at]``, then maybe raise."""

    reads: int
    messages: tuple[Message, ...]
    stop_at: int | None = None
    error: tuple[type[BaseException], str] | None = None
    swallows_send_errors: bool = False
    header_container: Literal["list", "tuple", "pairs as lists", "iterator"] = "list"

    def fresh(self, message: Message) -> Message:
        """A new message each send, headers in the container this app uses."""
        copy = dict(message)
        if "headers" in copy:
            copy["headers"] = self._container(copy["headers"])
        return copy

    def _container(self, headers: Iterable[tuple[bytes, bytes]]) -> Any:
        if self.header_container == "tuple":
            return tuple(headers)
        if self.header_container == "pairs as lists":
            return [[name, value] for name, value in headers]
        if self.header_container == "iterator":  # any iterable is valid ASGI
            return iter(list(headers))
        return list(headers)


def script_app(script: Script) -> ASGIApp:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        for _ in range(script.reads):
            await receive()
        try:
            for message in script.messages[: script.stop_at]:
                await send(script.fresh(message))
        except OSError:
            if script.swallows_send_errors:  # allowed by the spec: clean up, return
                return
            raise
        if script.error is not None:
            kind, text = script.error
            raise kind(text)

    return app


header_names = st.sampled_from(
    [b"content-type", b"Content-Type", b"set-cookie", b"cache-control", b"X-Custom", b"etag",
     b"vary", b"content-length", b"location"]
)  # fmt: skip
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(
    str.encode
)
statuses = st.one_of(st.sampled_from([200, 204, 206, 304, 404, 500]), st.integers(200, 599))
small_bytes = st.binary(max_size=64)
large_bytes = st.integers(64 * 1024, 1024 * 1024).map(lambda size: b"\xab" * size)
body_chunks = st.lists(st.one_of(small_bytes, small_bytes, large_bytes), max_size=5)


@st.composite
def response_headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """Duplicates and mixed case included; an app-set request id sometimes (lower case)."""
    headers = draw(st.lists(st.tuples(header_names, header_values), max_size=6))
    if draw(st.booleans()):
        position = draw(st.integers(0, len(headers)))
        headers.insert(position, (REQUEST_ID, draw(header_values)))
    return headers


@st.composite
def body_messages(draw: st.DrawFn) -> list[Message]:
    """Chunks with ``more_body`` true, then a last message in one of its valid spellings."""
    chunks = draw(body_chunks)
    messages: list[Message] = [
        {"type": "http.response.body", "body": chunk, "more_body": True} for chunk in chunks
    ]
    last = draw(st.sampled_from(["empty", "no keys", "last chunk"]) if chunks else st.just("empty"))
    if last == "last chunk":
        messages[-1] = {"type": "http.response.body", "body": chunks[-1], "more_body": False}
    elif last == "no keys":
        messages.append({"type": "http.response.body"})
    else:
        messages.append({"type": "http.response.body", "body": b"", "more_body": False})
    return messages


@st.composite
def responses(draw: st.DrawFn) -> tuple[Message, ...]:
    """A whole response: a body, a body with trailers, or a pathsend."""
    kind = draw(st.sampled_from(["body", "body", "trailers", "pathsend"]))
    start: Message = {"type": "http.response.start", "status": draw(statuses)}
    if draw(st.booleans()):
        start["headers"] = draw(response_headers())
    if kind == "pathsend":
        return (start, {"type": "http.response.pathsend", "path": __file__})
    messages = draw(body_messages())
    if kind == "trailers":
        start["trailers"] = True
        messages[-1] = {**messages[-1], "more_body": False}
        for more in [*[True] * draw(st.integers(0, 2)), False]:
            trailer = {"type": "http.response.trailers", "headers": draw(response_headers())}
            messages.append({**trailer, "more_trailers": more})
    return (start, *messages)


request_ids = st.one_of(
    st.none(),
    st.from_regex(rb"[A-Za-z0-9._-]{1,40}", fullmatch=True),  # kept and echoed
    st.sampled_from([b"bad id", b"x" * 200, b"\xff", b"a\r\nb"]),  # replaced
)


@st.composite
def clients(draw: st.DrawFn, *, leaves_mid_body: bool = True) -> Client:
    """A client that stays, leaves while or after sending its body, or after some replies.

    A spec-2.4 server may refuse even the response start (the client left first: a 499).
    """
    body = tuple(draw(st.lists(st.one_of(small_bytes, large_bytes), min_size=1, max_size=4)))
    send_raises = draw(st.booleans())
    leaves = draw(st.sampled_from(["stays", "after replies", "after replies", "with its body"]))
    leaves_after_chunks = leaves_after_sends = None
    if leaves == "after replies":
        leaves_after_sends = draw(st.integers(0, 3))
    elif leaves == "with its body" and not send_raises:
        leaves_after_chunks = draw(st.integers(0 if leaves_mid_body else len(body), len(body)))
    return Client(
        method=draw(st.sampled_from([*sorted(STANDARD_METHODS), "PROPFIND"])),
        request_id=draw(request_ids),
        body=body,
        leaves_after_chunks=leaves_after_chunks,
        leaves_after_sends=leaves_after_sends,
        send_raises=send_raises,
        spec_version=draw(st.sampled_from(["2.3", "2.4"])),
        pathsend=draw(st.booleans()),
    )


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[Script, Client]:
    client = draw(clients())
    # Reading past the body only returns when the client has left; otherwise it would wait
    # for the end of a response the app has not sent yet.
    readable = len(client.body) + (2 if client.leaves_after_chunks is not None else 0)
    messages = draw(responses())
    stop_at = draw(st.one_of(st.none(), st.integers(0, len(messages) - 1)))
    error = draw(st.one_of(st.none(), st.tuples(st.sampled_from(ERRORS), st.just("app failed"))))
    script = Script(
        reads=draw(st.integers(0, readable)),
        messages=messages,
        stop_at=stop_at,
        error=error,
        swallows_send_errors=draw(st.booleans()),
        header_container=draw(st.sampled_from(["list", "tuple", "pairs as lists", "iterator"])),
    )
    return script, client


def note_outcome(side: AppSide) -> None:
    """Label the example for ``--hypothesis-show-statistics``: which rule it exercised."""
    event(f"status sent: {side.start_status is not None}")
    event(f"completed: {side.completed}, client left: {side.disconnected}")
    event(f"raised: {type(side.raised).__name__ if side.raised else None}")


SIMPLE_RESPONSE: tuple[Message, ...] = (
    {"type": "http.response.start", "status": 200,
     "headers": [(b"content-type", b"text/plain"), (b"set-cookie", b"a=1")]},
    {"type": "http.response.body", "body": b"hello", "more_body": False},
)  # fmt: skip


GONE_BEFORE_THE_REPLY = Client(leaves_after_chunks=1, send_raises=False)
HELLO_IN_CHUNKS: tuple[Message, ...] = (
    SIMPLE_RESPONSE[0],
    {"type": "http.response.body", "body": b"hel", "more_body": True},
    {"type": "http.response.body", "body": b"lo", "more_body": False},
)


@TRANSPARENCY
@given(exchanges())
@example((Script(reads=2, messages=SIMPLE_RESPONSE, stop_at=0), GONE_BEFORE_THE_REPLY)).via(
    "client gone, app returns without a response: 499"
)
@example(
    (Script(reads=2, messages=SIMPLE_RESPONSE, stop_at=0, error=(ConnectionResetError, "db")),
     GONE_BEFORE_THE_REPLY)
).via("client gone, then an OSError: 499, not an app exception")  # fmt: skip
@example((Script(reads=1, messages=SIMPLE_RESPONSE, stop_at=0), Client())).via(
    "app returns without a response: the server's 500"
)
@example(
    (Script(reads=1, messages=({"type": "http.response.start", "status": 200,
     "headers": [(b"content-length", b"5")]}, {"type": "http.response.body"})),
     Client(method="HEAD"))
).via("HEAD: headers only")  # fmt: skip
@example(
    (Script(reads=1, messages=({"type": "http.response.start", "status": 304},
     {"type": "http.response.body", "body": b""})), Client())
).via("304 without a body")  # fmt: skip
@example(
    (Script(reads=1, messages=HELLO_IN_CHUNKS, stop_at=2, error=(RuntimeError, "x")), Client())
).via("error mid-stream")
@example((Script(reads=1, messages=HELLO_IN_CHUNKS, error=(RuntimeError, "x")), Client())).via(
    "error after the response completed"
)
@example(
    (Script(reads=1, messages=HELLO_IN_CHUNKS, swallows_send_errors=True),
     Client(leaves_after_sends=2, send_raises=True))
).via("send raises mid-stream, the app returns quietly")  # fmt: skip
def test_raw_asgi_apps_are_served_unchanged(exchange: tuple[Script, Client]) -> None:
    """Any raw ASGI behaviour: same messages both ways, same exception, one request recorded."""
    script, client = exchange

    def build(side: AppSide, registry: CollectorRegistry | None) -> ASGIApp:
        return monitored(Recorder(script_app(script), side), registry)

    bare, monitored_run, registry = run_bare_and_monitored(build, client)

    assert_transparent(bare, monitored_run, client)
    assert monitored_run.propagated is monitored_run.side.raised
    assert_recorded_once(registry, monitored_run.side, client, "__unmatched__")
    assert_exception_counted(registry, monitored_run.side)
    note_outcome(monitored_run.side)


# --- Starlette applications, generated ---------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A Starlette endpoint: maybe read the body, maybe fail, else respond, maybe a task after."""

    reads_body: bool
    fails: bool
    response: Literal["plain", "streaming", "file"]
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    chunks: tuple[bytes, ...]
    background: Literal["none", "runs", "raises"]

    async def respond(self, request: Request) -> Response:
        if self.reads_body:
            await request.body()
        if self.fails:
            raise LookupError("handler failed")
        response = self._response()
        response.raw_headers.extend(self.headers)  # duplicates, and an app-set request id
        return response

    def _response(self) -> Response:
        task = {"none": None, "runs": BackgroundTask(asyncio.sleep, 0),
                "raises": BackgroundTask(fail_in_background)}[self.background]  # fmt: skip
        if self.response == "file":
            return FileResponse(__file__, status_code=self.status, background=task)
        if self.response == "streaming":
            return StreamingResponse(stream(self.chunks), self.status, background=task)
        return Response(b"".join(self.chunks), self.status, background=task)


async def stream(chunks: tuple[bytes, ...]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def fail_in_background() -> None:
    raise RuntimeError("background task failed")


endpoints = st.builds(
    Endpoint,
    reads_body=st.booleans(),
    fails=st.sampled_from([False, False, False, True]),
    response=st.sampled_from(["plain", "streaming", "file"]),
    status=statuses,
    headers=response_headers().map(
        lambda headers: tuple((name.lower(), value) for name, value in headers)
    ),
    chunks=body_chunks.map(tuple),
    background=st.sampled_from(["none", "runs", "raises"]),
)


def starlette_app(endpoint: Endpoint, side: AppSide, registry: CollectorRegistry | None) -> ASGIApp:
    """The documented set-up: ``add_middleware(PerfMonMiddleware)`` inside the error middleware."""
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"]
    app = Starlette(routes=[Route("/things/{thing_id}", endpoint.respond, methods=methods)])
    app.add_middleware(Recorder, side=side)
    if registry is not None:
        app.add_middleware(PerfMonMiddleware, registry=registry, loop_monitor=False)
    return app


@TRANSPARENCY
@given(endpoints, clients(leaves_mid_body=False))
@example(
    Endpoint(
        reads_body=True,
        fails=False,
        response="streaming",
        status=200,
        headers=(),
        chunks=(b"a", b"b"),
        background="runs",
    ),
    Client(leaves_after_chunks=1, send_raises=False, spec_version="2.3"),
).via("client gone after its body: every reply dropped, as uvicorn does")
def test_starlette_apps_are_served_unchanged(endpoint: Endpoint, client: Client) -> None:
    """Starlette responses, streaming, files (pathsend), HEAD, background tasks, failures.

    The client never leaves in the middle of its request body here: Starlette then raises
    ``ClientDisconnect``, which the middleware counts as a 500 (test_starlette_upload_cut_by_
    the_client_is_499, a finding). The exception counter is checked on raw apps only, for the
    same reason (a streaming response turns the server's ``OSError`` into ``ClientDisconnect``).
    """
    bare, monitored_run, registry = run_bare_and_monitored(
        lambda side, registry: starlette_app(endpoint, side, registry), client
    )

    assert_transparent(bare, monitored_run, client)
    assert_recorded_once(registry, monitored_run.side, client, "/things/{thing_id}")
    note_outcome(monitored_run.side)


# --- Findings: cases where the middleware changes what the client gets --------------------------


def raw_app_run(script: Script, client: Client) -> tuple[Run, Run, CollectorRegistry]:
    return run_bare_and_monitored(
        lambda side, registry: monitored(Recorder(script_app(script), side), registry), client
    )


def test_headers_given_as_an_iterator_reach_the_client() -> None:
    """ASGI headers may be any iterable; a generator must reach the server whole."""
    script = Script(reads=1, messages=SIMPLE_RESPONSE, header_container="iterator")
    client = Client()

    bare, monitored_run, _ = raw_app_run(script, client)

    assert_transparent(bare, monitored_run, client)


def test_a_start_message_the_app_reuses_gets_each_requests_own_id() -> None:
    """An app may send one prebuilt start message (a module constant) for every request."""
    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"a/b")]}
    body = {"type": "http.response.body", "body": b"ok"}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send(start)
        await send(body)

    middleware = PerfMonMiddleware(app, registry=CollectorRegistry(), loop_monitor=False)

    async def two_requests() -> list[bytes]:
        echoed = []
        for request_id in (b"first", b"second"):
            client = Client(request_id=request_id)
            run = await serve(middleware, AppSide(), client)
            echoed.append(echoed_request_id(run.reached_client))
        return echoed

    assert [b"first", b"second"] == asyncio.run(two_requests())
    assert [(b"content-type", b"a/b")] == start["headers"]


def test_an_app_set_request_id_in_mixed_case_is_not_duplicated() -> None:
    start = {"type": "http.response.start", "status": 200,
             "headers": [(b"X-Request-ID", b"from-the-app")]}  # fmt: skip
    script = Script(reads=1, messages=(start, SIMPLE_RESPONSE[1]))

    bare, monitored_run, _ = raw_app_run(script, Client())

    assert bare.reached_client == monitored_run.reached_client


def test_a_start_the_server_refused_is_499() -> None:
    """The client left before the app answered; a spec-2.4 server raises on the first send."""
    client = Client(leaves_after_sends=0, send_raises=True)
    script = Script(reads=1, messages=SIMPLE_RESPONSE)

    bare, monitored_run, registry = raw_app_run(script, client)

    assert_transparent(bare, monitored_run, client)  # holds: the finding is the bookkeeping
    assert_recorded_once(registry, monitored_run.side, client, "__unmatched__")


@pytest.mark.parametrize(
    ("endpoint", "client", "status"),
    [
        pytest.param(
            Endpoint(reads_body=True, fails=False, response="plain", status=200, headers=(),
                     chunks=(b"ok",), background="none"),
            Client(method="POST", body=(b"part", b"rest"), leaves_after_chunks=1,
                   send_raises=False),
            "499",
            id="upload cut by the client",
        ),
        pytest.param(
            Endpoint(reads_body=False, fails=False, response="streaming", status=200,
                     headers=(), chunks=(b"a", b"b", b"c"), background="none"),
            Client(leaves_after_sends=2, send_raises=True, spec_version="2.4"),
            "200",
            id="stream cut by the client",
        ),
    ],
)  # fmt: skip
def test_starlette_client_disconnect_is_not_an_app_error(
    endpoint: Endpoint, client: Client, status: str
) -> None:
    bare, monitored_run, registry = run_bare_and_monitored(
        lambda side, registry: starlette_app(endpoint, side, registry), client
    )

    assert_transparent(bare, monitored_run, client)
    assert {(client.method, "/things/{thing_id}", status): 1.0} == recorded_requests(registry)
    assert {} == nonzero(registry, "http_server_exceptions_total", "error_type")
    assert {"client_disconnect": 1.0} == nonzero(
        registry, "http_server_aborted_requests_total", "reason"
    )


# --- A real server: the same bytes on the wire ---------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One request to tests/apps/transparency_app.py and the status the middleware records."""

    method: str
    path: str
    status: str
    request_id: bytes | None = None
    chunked_body: tuple[bytes, ...] | None = None
    adds_request_id: bool = True  # False: the app set one, or the server answered by itself

    def request(self) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1".encode(), b"host: 127.0.0.1"]
        if self.request_id is not None:
            lines.append(b"x-request-id: " + self.request_id)
        if self.chunked_body is not None:
            lines.append(b"transfer-encoding: chunked")
        head = b"\r\n".join([*lines, b"connection: close", b"", b""])
        if self.chunked_body is None:
            return head
        chunks = [b"%x\r\n%s\r\n" % (len(c), c) for c in self.chunked_body if c]
        return head + b"".join(chunks) + b"0\r\n\r\n"


PROBES = [
    Probe("GET", "/text", "200"),
    Probe("HEAD", "/text", "200"),
    Probe("GET", "/text", "200", request_id=b"transparency-check"),
    Probe("GET", "/text", "200", request_id=b"not a safe id"),
    Probe("GET", "/headers", "201"),
    Probe("GET", "/no-content", "204"),
    Probe("GET", "/not-modified", "304"),
    Probe("GET", "/stream", "200"),
    Probe("GET", "/large", "200"),
    Probe("HEAD", "/large", "200"),
    Probe("GET", "/app-id", "200", adds_request_id=False),
    Probe("POST", "/echo", "200", chunked_body=(b"first,", b"x" * 70_000, b"last")),
    Probe("GET", "/boom", "500", adds_request_id=False),  # uvicorn's own 500
    Probe("GET", "/boom-mid", "200"),
    Probe("GET", "/after", "200"),
    Probe("GET", "/background", "200"),
    Probe("GET", "/file", "200"),
    Probe("HEAD", "/file", "200"),
    Probe("DELETE", "/missing", "404"),
]


def raw_exchange(server: RunningServer, probe: Probe) -> bytes:
    """Everything the server wrote on a fresh connection, up to its close."""
    host, port = server.url.removeprefix("http://").split(":")
    received = []
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(probe.request())
        while data := connection.recv(1 << 16):
            received.append(data)
    return b"".join(received)


DATE_LINE = re.compile(rb"\r\ndate: [^\r]*")
REQUEST_ID_LINE = re.compile(rb"\r\nx-request-id: ([^\r]*)", re.IGNORECASE)


def without_added_request_id(raw: bytes, probe: Probe) -> bytes:
    ids = REQUEST_ID_LINE.findall(raw)
    if not probe.adds_request_id:
        return raw
    assert 1 == len(ids), raw[:500]
    client = Client(request_id=probe.request_id)
    assert_request_id_rule(ids[0], client)
    return REQUEST_ID_LINE.sub(b"", raw, count=1)


@pytest.fixture(scope="module")
def bare_and_monitored_servers() -> Iterator[tuple[RunningServer, RunningServer]]:
    args = ["--lifespan", "off", "--no-access-log"]
    with (
        start_uvicorn("tests.apps.transparency_app:bare", args=args) as bare,
        start_uvicorn("tests.apps.transparency_app:monitored", args=args) as monitored_server,
    ):
        yield bare, monitored_server


def recorded_by_server(server: RunningServer) -> dict[str, Counter[tuple[str, str]]]:
    """From the server's /metrics: requests by (method, status), aborts and active requests."""
    recorded: dict[str, Counter[tuple[str, str]]] = {
        "requests": Counter(), "aborted": Counter(), "active": Counter()
    }  # fmt: skip
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, int(sample.value)
            if sample.name == DURATION_COUNT:
                key = (labels["http_request_method"], labels["http_response_status_code"])
                recorded["requests"][key] += value
            elif sample.name == "http_server_aborted_requests_total" and value:
                recorded["aborted"][(labels["http_request_method"], labels["reason"])] += value
            elif sample.name == "http_server_active_requests" and value:
                recorded["active"][(labels["http_request_method"], "")] += value
    return recorded


@pytest.mark.uvicorn
def test_real_server_sends_the_same_bytes(
    bare_and_monitored_servers: tuple[RunningServer, RunningServer],
) -> None:
    """Under uvicorn, every response is byte-for-byte the bare one, bar date and request id."""
    bare, monitored_server = bare_and_monitored_servers

    for probe in PROBES:
        expected = DATE_LINE.sub(b"", raw_exchange(bare, probe), count=1)
        actual = DATE_LINE.sub(b"", raw_exchange(monitored_server, probe), count=1)

        assert expected == without_added_request_id(actual, probe), probe

    recorded = recorded_by_server(monitored_server)
    assert Counter((p.method, p.status) for p in PROBES) == recorded["requests"]
    assert Counter({("GET", "error_mid_stream"): 1}) == recorded["aborted"]
    assert Counter() == recorded["active"]
