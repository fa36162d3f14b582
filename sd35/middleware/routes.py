"""Which route a request is for, decided on the request line alone: its template, or the methods its path takes.

The route table is the one the server really answers: BentoML's own routes
(``/livez``, ``/readyz``, ``/healthz``, ``/metrics``, ...) and those of the
mounted FastAPI app, read from the Starlette app that serves the request
(``scope["app"]``), so a route added anywhere is known without a list kept by
hand. A path matches as Starlette matches it (its own path patterns), first
route first, as the router does.

The template (``/v1/images/files/{name}``) is what metrics and logs may show of
a path: the route table bounds it, and the capability names of url images
never appear. Paths of no route share one label, :data:`UNMATCHED`.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute, iter_route_contexts
from starlette.routing import BaseRoute, Mount, Route, compile_path
from starlette.types import Scope

UNMATCHED = "/{unmatched}"
# Where the match is kept in the scope: computed once, by the outermost middleware.
SCOPE_KEY = "sd35.route"


@dataclass(frozen=True)
class RouteMatch:
    """``template`` is set when a route takes this method and path; ``allow`` when only the method is wrong."""

    template: str | None
    allow: tuple[str, ...] = ()
    # A HEAD for a route that declares only GET (FastAPI's routes): answered as the GET, without its body.
    head_as_get: bool = False

    @property
    def label(self) -> str:
        """What metrics and logs show for the path: its template, or one label for every path of no route."""
        return self.template or UNMATCHED


@dataclass(frozen=True)
class _Entry:
    # The route's own pattern last, after those of the mounts it sits under (each must match, as the router checks).
    patterns: tuple[re.Pattern[str], ...]
    template: str
    # None: any method (a mounted app, static files).
    methods: frozenset[str] | None

    def matches(self, path: str) -> bool:
        return all(pattern.match(path) for pattern in self.patterns)


def _table(routes: Iterable[BaseRoute], prefix: str = "", mounts: tuple[re.Pattern[str], ...] = ()) -> Iterator[_Entry]:
    """Every route as one entry, mounted apps' routes and FastAPI's included routers flattened, in router order."""
    for context in iter_route_contexts(list(routes)):
        route, path = context.original_route, context.path or ""
        if isinstance(route, Mount):
            mount = prefix + path.rstrip("/")
            below = compile_path(mount + "/{path:path}")[0]
            if route.routes:  # an app with routes of its own (the FastAPI app BentoML mounts)
                yield from _table(route.routes, mount, (*mounts, below))
            else:  # static files: any path below
                yield _Entry((*mounts, below), mount + "/{path}", None)
        elif isinstance(route, Route | APIRoute):
            methods = context.methods
            yield _Entry(
                (*mounts, compile_path(prefix + path)[0]),
                prefix + (context.path_format or path),
                None if methods is None else frozenset(methods),
            )
        # Websocket and host routes: sd35 serves none.


_TABLES: weakref.WeakKeyDictionary[Any, tuple[_Entry, ...]] = weakref.WeakKeyDictionary()


def _match(entries: Iterable[_Entry], method: str, path: str) -> RouteMatch:
    allow: set[str] = set()
    for entry in entries:
        if entry.matches(path):
            if entry.methods is None or method in entry.methods:
                return RouteMatch(entry.template)
            # HTTP wants HEAD wherever GET is (Starlette's own routes have it; FastAPI's declare GET alone).
            if "GET" in entry.methods:
                if method == "HEAD":
                    return RouteMatch(entry.template, head_as_get=True)
                allow |= {"HEAD"}
            allow |= entry.methods
    return RouteMatch(None, tuple(sorted(allow)))


def route_of(scope: Scope) -> RouteMatch:
    """The route of an HTTP request (cached in the scope), from the Starlette app serving it."""
    cached = scope.get(SCOPE_KEY)
    if cached is not None:
        return cached
    app = scope.get("app")
    routes = getattr(app, "routes", None)
    if routes is None:
        # Outside an app with a route table (a bare middleware in a unit test) every path is a route.
        found = RouteMatch(scope.get("path", ""))
    else:
        if app not in _TABLES:
            _TABLES[app] = tuple(_table(routes))
        found = _match(_TABLES[app], scope["method"], scope["path"])
    scope[SCOPE_KEY] = found
    return found
