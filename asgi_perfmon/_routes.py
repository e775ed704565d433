"""Route templates for requests, resolved from the incoming scope by re-matching the routes.

The template is the path with every router and mount prefix and no parameter values
(``/api/v1/users/{user_id}``). Reading ``scope["route"]`` after the call is not enough: FastAPI
>= 0.137 leaves the include prefixes out of ``route.path`` and does not set it for plain routes
or mounts. Re-matching a snapshot of the scope with the public ``Route.matches()`` protocol works
on every Starlette and FastAPI version we support.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.routing import BaseRoute, Host, Match, Route, WebSocketRoute

from asgi_perfmon._logging import FailureLog
from asgi_perfmon._types import Scope

UNMATCHED = "__unmatched__"
"""The ``http_route`` of a request that matches no route (404)."""

DEFAULT_CACHE_SIZE = 4096
MAX_CACHED_PATH_CHARS = 512
"""Longer paths (and methods) are resolved but not cached: a full cache of hostile 64 kB paths
would hold a quarter of a gigabyte. Real routes are far shorter."""


def route_path(scope: Scope) -> str:
    """The request path relative to ``root_path``, as the router sees it."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path) and path != root_path:
        return path[len(root_path) :]
    return path


def _fastapi_attribute(name: str) -> Any:
    """``fastapi.routing.<name>`` if FastAPI is loaded (an app using it imported it), else None.

    FastAPI >= 0.137.2 keeps included routers unflattened; ``iter_route_contexts`` flattens
    them with their full prefixes.
    """
    return getattr(sys.modules.get("fastapi.routing"), name, None)


def _leaf_scope_type(route: Any) -> str | None:
    """``"http"`` or ``"websocket"`` for the plain route classes we can match by regex alone.

    Subclasses may override ``matches()``, so only the exact classes qualify; anything else
    (mounts, hosts, custom routes) is asked through ``matches()``.
    """
    kind = type(_original(route))
    if kind is Route or kind is _fastapi_attribute("APIRoute"):
        return "http"
    if kind is WebSocketRoute or kind is _fastapi_attribute("APIWebSocketRoute"):
        return "websocket"
    return None


@dataclass(frozen=True)
class _Candidate:
    """A route prepared for matching: plain routes carry what a regex match needs."""

    route: Any
    scope_type: str | None
    regex: Any = None
    methods: frozenset[str] | None = None
    template: str = ""

    @classmethod
    def of(cls, route: Any) -> _Candidate:
        scope_type = _leaf_scope_type(route)
        regex = getattr(route, "path_regex", None) if scope_type else None
        if regex is None:
            return cls(route, None)
        methods = getattr(route, "methods", None)
        return cls(
            route, scope_type, regex, frozenset(methods) if methods else None, _template(route)
        )

    @property
    def first_segment(self) -> str | None:
        """The literal first path segment every match must start with, or None: a parameter
        there, or not a plain route (mounts, hosts and custom routes are always tried)."""
        if self.scope_type is None or not self.template.startswith("/"):
            return None
        segment = self.template[1:].split("/", 1)[0]
        return None if "{" in segment else segment


class _Index:
    """Candidates bucketed by their literal first path segment, so a large app is not
    matched route by route. Every other candidate is in every bucket, and each bucket keeps
    the routes' order, so the first match is the router's."""

    def __init__(self, candidates: list[_Candidate]) -> None:
        self._all = candidates
        self._others = [c for c in candidates if c.first_segment is None]
        buckets: dict[str, list[_Candidate]] = {}
        for candidate in candidates:
            segment = candidate.first_segment
            if segment is not None:
                buckets.setdefault(segment, []).append(candidate)
        order = {id(candidate): index for index, candidate in enumerate(candidates)}
        self._buckets = {
            segment: sorted(bucket + self._others, key=lambda c: order[id(c)])
            for segment, bucket in buckets.items()
        }

    def for_path(self, path: str) -> list[_Candidate]:
        if not path.startswith("/"):
            return self._all
        return self._buckets.get(path[1:].split("/", 1)[0], self._others)


def _original(route: Any) -> Any:
    return getattr(route, "original_route", route)


def _template(route: Any) -> str:
    return getattr(route, "path_format", None) or getattr(route, "path", None) or ""


def _mount_prefix(route: Any) -> str:
    template = _template(route)
    return template[: -len("/{path}")] if template.endswith("/{path}") else template


class RouteResolver:
    """Resolves route templates, remembering up to ``cache_size`` answers for paths without
    parameters (the same few static paths come back on every request)."""

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._cache_size = cache_size
        self._cache: dict[tuple[Any, ...], str] = {}
        self._flattened: dict[int, tuple[Sequence[Any], int, _Index]] = {}
        self._failures = FailureLog()
        self._host_routes = False  # whether the Host header can change the answer

    def resolve(self, routes: Sequence[Any] | None, scope: Scope) -> str:
        """The template for ``scope`` (taken before the app ran), or ``UNMATCHED``."""
        if routes is None:
            return UNMATCHED
        if self._host_routes:
            key = _cache_key(scope)
        else:
            key = (scope["type"], scope.get("method"), scope["path"], scope.get("root_path", ""))
        template = self._cache.get(key)
        if template is None:
            template = self._resolve_uncached(routes, scope)
            if "{" in template or template == UNMATCHED:
                # A parametrized path rarely repeats (new ids all the time) and an unmatched
                # one may be anything: caching them costs more than it saves.
                return template
            if len(scope["path"]) + len(key[1] or "") + len(key[-1]) > MAX_CACHED_PATH_CHARS:
                return template
            if len(self._cache) >= self._cache_size:
                self._cache.clear()  # cheaper than LRU bookkeeping; refills from hot paths
            self._cache[key] = template
        return template

    def _resolve_uncached(self, routes: Sequence[Any], scope: Scope) -> str:
        try:
            template, match = self._match(routes, scope, "")
            if match is Match.NONE and scope["type"] == "http":
                template = self._slash_redirect_target(routes, scope)
        except Exception as error:  # a custom route whose matches() raises
            self._failures.record("route_resolution", error)
            return UNMATCHED
        return template or UNMATCHED

    def _slash_redirect_target(self, routes: Sequence[Any], scope: Scope) -> str | None:
        path = scope["path"]
        if route_path(scope) == "/":
            return None
        toggled = path[:-1] if path.endswith("/") else path + "/"
        template, _ = self._match(routes, {**scope, "path": toggled}, "")
        return template

    def _match(self, routes: Sequence[Any], scope: Scope, prefix: str) -> tuple[str | None, Match]:
        """The first route matching ``scope``; ``route.matches()`` only reads the scope."""
        partial: str | None = None
        path = _router_path(scope)
        for candidate in self._candidates(routes).for_path(path):
            if candidate.scope_type is not None:
                if candidate.scope_type != scope["type"] or not candidate.regex.match(path):
                    continue
                if candidate.methods is None or scope["method"] in candidate.methods:
                    return prefix + candidate.template, Match.FULL
                partial = partial or prefix + candidate.template
                continue
            route = candidate.route
            match, child_scope = route.matches(scope)
            if match is Match.NONE:
                continue
            sub_routes = getattr(route, "routes", None)
            if sub_routes is not None and hasattr(route, "app"):
                return self._match_mounted(route, sub_routes, {**scope, **child_scope}, prefix)
            if match is Match.FULL:
                return prefix + _template(route), match
            partial = partial or prefix + _template(route)
        if partial is not None:
            return partial, Match.PARTIAL
        return None, Match.NONE

    def _match_mounted(
        self, route: Any, sub_routes: Sequence[Any], scope: Scope, prefix: str
    ) -> tuple[str | None, Match]:
        if isinstance(_original(route), Host):
            return self._match(sub_routes, scope, prefix)
        mount_prefix = prefix + _mount_prefix(route)
        if not sub_routes:  # StaticFiles, WSGI or any opaque ASGI app
            return mount_prefix + "/{path}", Match.FULL
        return self._match(sub_routes, scope, mount_prefix)

    def _candidates(self, routes: Sequence[Any]) -> _Index:
        """``routes`` with FastAPI's included routers flattened, cached per routes list."""
        cached = self._flattened.get(id(routes))
        if cached is not None and cached[0] is routes and cached[1] == len(routes):
            return cached[2]
        flat = [_Candidate.of(route) for route in _flatten(routes)]
        if any(isinstance(_original(candidate.route), Host) for candidate in flat):
            self._host_routes = True
        index = _Index(flat)
        self._flattened[id(routes)] = (routes, len(routes), index)
        return index


def _flatten(routes: Sequence[BaseRoute]) -> Iterable[Any]:
    iter_route_contexts = _fastapi_attribute("iter_route_contexts")
    if iter_route_contexts is None:
        return routes
    return iter_route_contexts(routes)  # type: ignore[no-any-return]


try:  # the router's own notion of the path, which changed across Starlette versions
    from starlette._utils import get_route_path as _router_path
except ImportError:  # pragma: no cover - a Starlette without it
    _router_path = route_path


def _cache_key(scope: Scope) -> tuple[Any, ...]:
    """The cache key when ``Host`` routes make the answer depend on the Host header."""
    host = b""
    for name, value in scope.get("headers", ()):
        if name == b"host":
            host = value
            break
    return (scope["type"], scope.get("method"), scope["path"], scope.get("root_path", ""), host)
