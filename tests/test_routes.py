"""The route template matrix: every way an app can route, on FastAPI and on plain Starlette."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Host, Mount, Route, Router, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from asgi_perfmon import PerfMonMiddleware
from asgi_perfmon._routes import UNMATCHED
from tests._helpers import client, recorded_requests, samples


async def text(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def echo_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())
    await websocket.close()


def fastapi_app(static_dir: Path, **options: Any) -> FastAPI:
    app = FastAPI(**options)

    @app.get("/users/{user_id}")
    async def get_user(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    inner = APIRouter(prefix="/v1")

    @inner.get("/orders/{order_id}")
    async def get_order(order_id: int) -> dict[str, int]:
        return {"id": order_id}

    outer = APIRouter(prefix="/shop")
    outer.include_router(inner)
    app.include_router(outer, prefix="/api")

    plain = APIRouter()

    @plain.post("/items")
    async def create_item() -> dict[str, str]:
        return {"ok": "yes"}

    app.include_router(plain, prefix="/catalog")

    sub = FastAPI()
    sub_router = APIRouter(prefix="/items")

    @sub_router.get("/{item_id}")
    async def sub_item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    sub.include_router(sub_router)
    app.mount("/subapi", sub)
    app.mount("/star", Starlette(routes=[Route("/thing/{x}", text)]))
    app.mount("/static", StaticFiles(directory=static_dir))
    app.add_middleware(CORSMiddleware, allow_origins=["https://example.com"], allow_methods=["*"])
    return app


def starlette_app(static_dir: Path) -> Starlette:
    api = Router(
        routes=[
            Route("/orders/{order_id:int}", text),
            Mount("/deep", routes=[Route("/{leaf}", text)]),
        ]
    )
    return Starlette(
        routes=[
            Route("/users/{user_id:int}", text),
            Route("/slash/", text),
            Mount("/api", app=api),
            Mount("/sub", app=Starlette(routes=[Route("/thing/{x}", text)])),
            Mount("/static", StaticFiles(directory=static_dir)),
            Host("admin.example.com", app=Router(routes=[Route("/panel/{section}", text)])),
            WebSocketRoute("/ws/{room}", echo_socket),
        ],
        middleware=[
            Middleware(CORSMiddleware, allow_origins=["https://example.com"], allow_methods=["*"])
        ],
    )


@pytest.fixture
def static_dir(tmp_path: Path) -> Path:
    (tmp_path / "a.txt").write_text("static")
    return tmp_path


async def route_of(
    app: Any, registry: CollectorRegistry, method: str, path: str, **kw: Any
) -> tuple[str, str]:
    """Send one request; return (route label, status label) recorded for it."""
    transport_kw = {k: kw.pop(k) for k in ("root_path",) if k in kw}
    async with client(app, follow_redirects=False, **transport_kw) as http:
        response = await http.request(method, path, **kw)
    recorded = recorded_requests(registry)
    assert len(recorded) == 1, recorded
    ((_method, route, status),) = recorded
    assert status == str(response.status_code)
    return route, status


FASTAPI_CASES = [
    ("GET", "/users/42", "/users/{user_id}", "200"),
    ("GET", "/api/shop/v1/orders/7", "/api/shop/v1/orders/{order_id}", "200"),
    ("POST", "/catalog/items", "/catalog/items", "200"),
    ("GET", "/subapi/items/abc", "/subapi/items/{item_id}", "200"),
    ("GET", "/subapi/missing/x", UNMATCHED, "404"),
    ("GET", "/star/thing/1", "/star/thing/{x}", "200"),
    ("GET", "/static/a.txt", "/static/{path}", "200"),
    ("GET", "/static/nothing-here.txt", "/static/{path}", "404"),
    ("GET", "/nope/12345", UNMATCHED, "404"),
    ("PUT", "/users/42", "/users/{user_id}", "405"),
    ("HEAD", "/users/42", "/users/{user_id}", "405"),
    ("GET", "/users/42/", "/users/{user_id}", "307"),
    ("GET", "/docs", "/docs", "200"),
    ("GET", "/openapi.json", "/openapi.json", "200"),
]


@pytest.mark.parametrize(("method", "path", "template", "status"), FASTAPI_CASES)
async def test_fastapi_route_templates(
    static_dir: Path,
    registry: CollectorRegistry,
    method: str,
    path: str,
    template: str,
    status: str,
) -> None:
    """FastAPI: nested include_router prefixes, mounts, static files, 404/405/307, docs."""
    app = fastapi_app(static_dir)
    app.add_middleware(PerfMonMiddleware, registry=registry)

    assert (template, status) == await route_of(app, registry, method, path)


STARLETTE_CASES = [
    ("GET", "/users/42", {}, "/users/{user_id}", "200"),
    ("HEAD", "/users/42", {}, "/users/{user_id}", "200"),
    ("POST", "/users/42", {}, "/users/{user_id}", "405"),
    ("GET", "/slash", {}, "/slash/", "307"),
    ("GET", "/api/orders/9", {}, "/api/orders/{order_id}", "200"),
    ("GET", "/api/deep/leafy", {}, "/api/deep/{leaf}", "200"),
    ("GET", "/sub/thing/x", {}, "/sub/thing/{x}", "200"),
    ("GET", "/static/a.txt", {}, "/static/{path}", "200"),
    ("GET", "/panel/users", {"host": "admin.example.com"}, "/panel/{section}", "200"),
    ("GET", "/panel/users", {"host": "other.example.com"}, UNMATCHED, "404"),
    ("GET", "/users/not-a-number", {}, UNMATCHED, "404"),
]


@pytest.mark.parametrize(("method", "path", "headers", "template", "status"), STARLETTE_CASES)
async def test_starlette_route_templates(
    static_dir: Path,
    registry: CollectorRegistry,
    method: str,
    path: str,
    headers: dict[str, str],
    template: str,
    status: str,
) -> None:
    """Plain Starlette: converters dropped, Mount, Host, sub-apps, StaticFiles, HEAD, redirects."""
    app = starlette_app(static_dir)
    app.add_middleware(PerfMonMiddleware, registry=registry)

    assert (template, status) == await route_of(app, registry, method, path, headers=headers)


PREFLIGHT = {"origin": "https://example.com", "access-control-request-method": "GET"}


async def test_fastapi_cors_preflight_gets_the_route_template(
    static_dir: Path, registry: CollectorRegistry
) -> None:
    """A CORS preflight OPTIONS, answered by CORSMiddleware, is labelled with the template."""
    app = fastapi_app(static_dir)
    app.add_middleware(PerfMonMiddleware, registry=registry)

    assert ("/users/{user_id}", "200") == await route_of(
        app, registry, "OPTIONS", "/users/42", headers=PREFLIGHT
    )


async def test_starlette_cors_preflight_gets_the_route_template(
    static_dir: Path, registry: CollectorRegistry
) -> None:
    """The same on plain Starlette, where the CORS middleware was given to the constructor."""
    app = starlette_app(static_dir)
    app.add_middleware(PerfMonMiddleware, registry=registry)

    assert ("/api/orders/{order_id}", "200") == await route_of(
        app, registry, "OPTIONS", "/api/orders/3", headers=PREFLIGHT
    )


@pytest.mark.filterwarnings("ignore:The .root_path. parameter is deprecated")
async def test_fastapi_root_path_option(static_dir: Path, registry: CollectorRegistry) -> None:
    """``FastAPI(root_path=...)``: templates stay relative to the root path."""
    app = fastapi_app(static_dir, root_path="/proxy")
    app.add_middleware(PerfMonMiddleware, registry=registry)

    assert ("/api/shop/v1/orders/{order_id}", "200") == await route_of(
        app, registry, "GET", "/api/shop/v1/orders/1"
    )


async def test_server_root_path(static_dir: Path, registry: CollectorRegistry) -> None:
    """A server ``--root-path`` (path arrives prefixed): templates stay root-relative."""
    app = fastapi_app(static_dir)
    app.add_middleware(PerfMonMiddleware, registry=registry)

    assert ("/users/{user_id}", "200") == await route_of(
        app, registry, "GET", "/gateway/users/5", root_path="/gateway"
    )


def test_websocket_route_template(static_dir: Path, registry: CollectorRegistry) -> None:
    """Websocket connections are labelled with their route template."""
    app = starlette_app(static_dir)
    app.add_middleware(PerfMonMiddleware, registry=registry)

    with TestClient(app) as test_client, test_client.websocket_connect("/ws/lobby") as ws:
        ws.send_text("hi")
        assert ws.receive_text() == "hi"

    assert [({"http_route": "/ws/{room}"}, 1.0)] == samples(
        registry, "websocket_server_connection_duration_seconds_count"
    )


async def test_routes_the_router_names_are_not_matched_again(
    static_dir: Path, registry: CollectorRegistry
) -> None:
    """A request whose route the router stored in the scope costs a lookup, no re-match;
    static paths it did not name are re-matched once and then cached; parametrized and
    unmatched ones, which rarely repeat, are re-matched every time."""
    app = fastapi_app(static_dir)
    middleware = PerfMonMiddleware(app, registry=registry)
    matched: list[str] = []
    original = middleware._routes._resolve_uncached

    def counting(routes: Any, scope: dict[str, Any]) -> str:
        matched.append(scope["path"])
        return original(routes, scope)

    middleware._routes._resolve_uncached = counting  # type: ignore[method-assign]
    async with client(middleware) as http:
        for _ in range(5):
            await http.post("/catalog/items")
        await http.get("/catalog/items")  # a 405: the router names the partial match too
        for _ in range(3):
            await http.get("/users/1")
            await http.get("/api/shop/v1/orders/2")
            await http.get("/nowhere")
            await http.get("/docs")  # a plain route: FastAPI >= 0.137 does not name it

    assert ["/docs"] + ["/nowhere"] * 3 == sorted(matched)
    assert 1 == len(middleware._routes._cache)
    assert {
        ("POST", "/catalog/items", "200"),
        ("GET", "/catalog/items", "405"),
        ("GET", "/users/{user_id}", "200"),
        ("GET", "/api/shop/v1/orders/{order_id}", "200"),
        ("GET", UNMATCHED, "404"),
        ("GET", "/docs", "200"),
    } == set(recorded_requests(registry))


async def test_a_route_included_under_two_prefixes_gets_each_prefix(
    registry: CollectorRegistry,
) -> None:
    """The same route object under two templates is not looked up: it is re-matched."""
    app = FastAPI()
    shared = APIRouter()

    @shared.get("/orders/{order_id}")
    async def get_order(order_id: int) -> dict[str, int]:
        return {"id": order_id}

    app.include_router(shared, prefix="/v1")
    app.include_router(shared, prefix="/v2")
    app.add_middleware(PerfMonMiddleware, registry=registry)
    async with client(app) as http:
        assert 200 == (await http.get("/v1/orders/1")).status_code
        assert 200 == (await http.get("/v2/orders/2")).status_code

    assert {
        ("GET", "/v1/orders/{order_id}", "200"),
        ("GET", "/v2/orders/{order_id}", "200"),
    } == set(recorded_requests(registry))


async def test_route_that_raises_in_matches_never_breaks_the_request(
    registry: CollectorRegistry,
) -> None:
    """A custom route whose ``matches`` fails is labelled unmatched; the response is intact.

    A slash redirect is re-matched by the middleware (the router names no route for it), after
    the router's two calls: the third call raises."""

    calls: list[str] = []

    class Broken(Route):
        def matches(self, scope: Any) -> Any:
            calls.append(scope["path"])
            if len(calls) > 2:
                raise RuntimeError("custom route bug")
            return super().matches(scope)

    app = Starlette(routes=[Broken("/x", text)])
    app.add_middleware(PerfMonMiddleware, registry=registry)
    async with client(app, follow_redirects=False) as http:
        response = await http.get("/x/")

    assert response.status_code == 307
    assert ["/x/", "/x", "/x/"] == calls
    assert {("GET", UNMATCHED, "307"): 1.0} == recorded_requests(registry)


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/users/list", "/{kind}/list"),  # the earlier parametrized route wins, as in the router
        ("/users/7", "/users/{user_id}"),
        ("/route150/x", "/route150/{item}"),
        ("/nowhere/x", UNMATCHED),
    ],
)
async def test_route_order_is_kept_in_a_large_app(
    registry: CollectorRegistry, path: str, template: str
) -> None:
    """With 200 routes indexed by first segment, the first matching route still wins."""
    routes = [Route("/{kind}/list", text), Route("/users/list", text)]
    routes += [Route(f"/route{n}/{{item}}", text) for n in range(200)]
    routes += [Route("/users/{user_id}", text)]
    app = Starlette(routes=routes)
    app.add_middleware(PerfMonMiddleware, registry=registry)

    assert template == (await route_of(app, registry, "GET", path))[0]


@pytest.mark.parametrize(
    ("path", "template", "status"),
    [
        ("/child/items/3", "/items/{item_id}", "200"),
        ("/child/nothing", UNMATCHED, "404"),
    ],
)
async def test_middleware_on_a_mounted_sub_application(
    registry: CollectorRegistry, path: str, template: str, status: str
) -> None:
    """Added to a mounted app, the middleware labels by that app's routes, relative to its
    mount; the parent's ``Mount``, already in the scope when the sub-app's router finds
    nothing, is not mistaken for a route of the sub-app."""
    child = Starlette(routes=[Route("/items/{item_id}", text)])
    child.add_middleware(PerfMonMiddleware, registry=registry)
    parent = Starlette(routes=[Mount("/child", app=child), Route("/nothing", text)])

    assert (template, status) == await route_of(parent, registry, "GET", path)
