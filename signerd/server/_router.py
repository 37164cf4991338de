"""Method + path templates with ``{param}`` segments, matched segment by segment.

Each segment is percent-decoded on its own, so ``%2F`` never splits a
segment; a parameter matches one non-empty segment. A path that matches with
another method answers 405 with ``Allow``; no match at all answers 404.
Each route carries the ``Operation`` its requests are audited and refused
as; an open route (``Operation.HEALTH``) needs no grant and is not recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..authz._calls import Operation
from ._context import Handler
from ._request import Request

__all__ = ["Route", "Router"]

_PARAM = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    segments: tuple[str, ...]  # literal text, or "" where a parameter is
    params: tuple[str | None, ...]  # the parameter's name, or None for a literal
    handler: Handler
    operation: Operation  # what its requests are audited (and refused early) as
    open: bool  # no grant needed, not recorded: health, readiness, the OpenAPI document


class Router:
    def __init__(self) -> None:
        self._by_length: dict[int, list[Route]] = {}
        #: routes without parameters by (method, path as sent): a request whose target is
        #: exactly one of them (no query, no escapes) needs no parsing
        self._exact: dict[tuple[str, bytes], Route] = {}

    def add(
        self,
        method: str,
        path: str,
        handler: Handler,
        operation: Operation,
    ) -> Route:
        if not path.startswith("/"):
            raise ValueError(f"route path must start with '/': {path}")
        segments: list[str] = []
        params: list[str | None] = []
        for part in path.split("/")[1:]:
            found = _PARAM.fullmatch(part)
            if found:
                segments.append("")
                params.append(found.group(1))
            elif "{" in part or "}" in part:
                raise ValueError(f"route segment must be literal or one {{param}}: {path}")
            else:
                segments.append(part)
                params.append(None)
        open = operation is Operation.HEALTH
        route = Route(
            method.upper(), path, tuple(segments), tuple(params), handler, operation, open
        )
        for other in self._by_length.get(len(segments), []):
            if (other.method, other.segments, other.params) == (
                route.method,
                route.segments,
                route.params,
            ):
                raise ValueError(f"route registered twice: {method} {path}")
        self._by_length.setdefault(len(segments), []).append(route)
        if not any(params):
            self._exact[(route.method, path.encode())] = route
        return route

    def routes(self) -> list[Route]:
        return [r for rs in self._by_length.values() for r in rs]

    def resolve(self, request: Request) -> tuple[Route | None, tuple[str, ...]]:
        """The route and its parameters (set on the request), or None and the allowed methods."""
        exact = self._exact.get((request.method, request.raw_url))
        if exact is not None:
            request.match_info = {}
            request.route = exact
            return exact, ()
        segments = request.raw_segments()
        if segments is None:
            return None, ()
        allowed: list[str] = []
        for route in self._by_length.get(len(segments), ()):
            if not all(
                seg if name is not None else seg == lit
                for seg, lit, name in zip(segments, route.segments, route.params, strict=True)
            ):
                continue
            if route.method != request.method:
                if route.method not in allowed:
                    allowed.append(route.method)
                continue
            request.match_info = {
                name: seg for seg, name in zip(segments, route.params, strict=True) if name
            }
            request.route = route
            return route, ()
        return None, tuple(sorted(allowed))
