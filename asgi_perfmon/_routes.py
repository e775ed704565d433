"""Route templates for requests: the route that served the request, or a re-match of its path.

The template is the path with every router and mount prefix and no parameter values
(``/api/v1/users/{user_id}``). ``route.path`` of ``scope["route"]`` is not enough: FastAPI
>= 0.137 leaves the include prefixes out of it, and does not set ``scope["route"]`` for plain
routes or mounts. So the route objects are mapped to their full templates once, by walking the
routes as the router does; a request whose route object is in that map costs one dict lookup.
Anything else (no route set, a route object reachable under two prefixes, Starlette < 1.7) is
re-matched from the path it arrived with, through the public ``Route.matches()`` protocol,
which works on every Starlette and FastAPI version we support.
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
MAX_MOUNT_DEPTH = 16
"""Mounts nested deeper than this are re-matched rather than mapped."""
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

    @property
    def all(self) -> list[_Candidate]:
        return self._all

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
        self._served: dict[int, tuple[Sequence[Any], int, dict[int, tuple[Any, str]]]] = {}
        self._failures = FailureLog()
        self._host_routes = False  # whether the Host header can change the answer

    def served(self, routes: Sequence[Any] | None, scope: Scope) -> str | None:
        """The template of the route the router stored in ``scope["route"]``, if it is one of
        ``routes`` (nested ones included) under exactly one template; else None."""
        route = scope.get("route")
        if route is None or routes is None:
            return None
        known = self._served.get(id(routes))
        if known is None or known[0] is not routes or known[1] != len(routes):
            known = self._map_served(routes)
        entry = known[2].get(id(route))
        return entry[1] if entry is not None and entry[0] is route else None

    def _map_served(
        self, routes: Sequence[Any]
    ) -> tuple[Sequence[Any], int, dict[int, tuple[Any, str]]]:
        templates: dict[int, tuple[Any, str]] = {}
        ambiguous: set[int] = set()
        try:
            for route, template in self._leaf_templates(routes, "", depth=0):
                key = id(route)
                if key in templates and templates[key][1] != template:
                    ambiguous.add(key)
                templates[key] = (route, template)
        except Exception as error:  # a custom route whose attributes raise: re-match instead
            self._failures.record("route_map", error)
            templates.clear()
        for key in ambiguous:
            del templates[key]
        known = (routes, len(routes), templates)
        self._served[id(routes)] = known
        return known

    def _leaf_templates(
        self, routes: Sequence[Any], prefix: str, depth: int
    ) -> Iterable[tuple[Any, str]]:
        """(route object, template) for every route a router may store in ``scope["route"]``:
        plain routes, opaque mounts and, under FastAPI's flattening, the original routes."""
        for candidate in self._candidates(routes).all:
            route = candidate.route
            sub_routes = getattr(route, "routes", None)
            if sub_routes is not None and hasattr(route, "app"):
                if isinstance(_original(route), Host):
                    nested = prefix
                else:
                    nested = prefix + _mount_prefix(route)
                if not sub_routes:
                    yield route, nested + "/{path}"
                elif depth < MAX_MOUNT_DEPTH:
                    yield from self._leaf_templates(sub_routes, nested, depth + 1)
                continue
            template = prefix + _template(route)
            yield route, template
            if _original(route) is not route:
                yield _original(route), template

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
