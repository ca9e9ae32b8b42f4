"""Routes: weighted arms (``{"prod": 90, "canary": 10}``), sticky by a request key, with overrides.

An arm is a ref (usually a tag). A request with a key always lands on the
same arm while the route's weights are unchanged: the key is hashed with the
route name to a point in [0, 1) and the arms split that interval in their
declared order. A request without a key gets a random arm by weight; a
request may name an arm of the route to override the draw.

Example:
    >>> r = Router(); _ = r.set("tts", {"prod": 90, "canary": 10})
    >>> a = r.pick("tts", key="user-7").arm
    >>> all(r.pick("tts", key="user-7").arm == a for _ in range(5)), r.pick("tts", arm="canary").arm
    (True, 'canary')
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import InvalidName, InvalidRequest, RouteNotFound

__all__ = ["Pick", "Route", "Router"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_ARMS = 64


@dataclass(frozen=True)
class Route:
    """A named set of weighted arms (refs), in declared order."""

    name: str
    arms: tuple[tuple[str, float], ...]

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.arms)


@dataclass(frozen=True)
class Pick:
    """The arm a request went to and why (``sticky`` key, ``random`` draw or ``override``)."""

    route: str
    arm: str
    how: str


def check_route_name(name: str) -> str:
    """Route names: letters, digits, ``._-``; up to 128 characters, starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidName("route", str(name), "use letters, digits, '.', '_' and '-' (at most 128)")
    return name


def _point(route: str, key: str) -> float:
    digest = hashlib.sha256(f"{route}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class Router:
    """The routes of one server; thread-safe, replaced whole on every change (readers never see half a route)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}

    def set(self, name: str, arms: Mapping[str, float]) -> Route:
        """Create or replace route ``name``.

        The weights are checked as a whole: each is a number (``int`` or
        ``float``; not a bool or a numeric string), finite and non-negative, and
        their sum is positive and finite (``{"a": 1e308, "b": 1e308}`` is
        refused: its shares cannot be computed). InvalidRequest otherwise.

        Example:
            >>> Router().set("ab", {"a": 1, "b": 3}).weights
            {'a': 1.0, 'b': 3.0}
        """
        check_route_name(name)
        if not isinstance(arms, Mapping) or not arms:
            raise InvalidRequest('a route needs at least one arm, e.g. {"prod": 90, "canary": 10}', "arms")
        if len(arms) > MAX_ARMS:
            raise InvalidRequest(f"a route has at most {MAX_ARMS} arms", "arms")
        clean: list[tuple[str, float]] = []
        for ref, weight in arms.items():
            if not isinstance(ref, str) or not ref or len(ref) > 256:
                raise InvalidRequest(f"arm {ref!r} is not a ref", "arms")
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise InvalidRequest(f"weight of arm {ref!r} must be a number, not {weight!r}", "arms")
            try:
                value = float(weight)
            except OverflowError:  # an int beyond float range
                raise InvalidRequest(f"weight of arm {ref!r} is too large", "arms") from None
            if not math.isfinite(value) or value < 0:
                raise InvalidRequest(f"weight of arm {ref!r} must be finite and >= 0", "arms")
            clean.append((ref, value))
        total = sum(w for _, w in clean)  # inf when it overflows (math.fsum would raise)
        if not math.isfinite(total):
            raise InvalidRequest(
                "the weights' sum overflows; weights are relative shares: scale them down (e.g. 90 and 10)",
                "arms",
            )
        if total <= 0:
            raise InvalidRequest("at least one arm needs a positive weight", "arms")
        route = Route(name=name, arms=tuple(clean))
        with self._lock:
            self._routes[name] = route
        return route

    def get(self, name: str) -> Route:
        """Route ``name``; RouteNotFound if there is none."""
        with self._lock:
            route = self._routes.get(name)
            if route is None:
                raise RouteNotFound(name, sorted(self._routes))
            return route

    def delete(self, name: str) -> Route:
        """Remove route ``name`` and return it; RouteNotFound if there is none."""
        with self._lock:
            route = self._routes.pop(name, None)
            if route is None:
                raise RouteNotFound(name, sorted(self._routes))
            return route

    def routes(self) -> list[Route]:
        """Every route, by name."""
        with self._lock:
            return [self._routes[n] for n in sorted(self._routes)]

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._routes

    def pick(self, name: str, *, key: str | None = None, arm: str | None = None) -> Pick:
        """The arm of route ``name`` for one request: ``arm`` if given (it must be one), else by ``key`` or at random.

        Example:
            >>> r = Router(); _ = r.set("ab", {"a": 0, "b": 1})
            >>> r.pick("ab", key="anyone").arm
            'b'
        """
        route = self.get(name)
        if arm is not None:
            if arm not in route.weights:
                raise InvalidRequest(
                    f"arm {arm!r} is not an arm of route {name!r} ({', '.join(route.weights)})", "arm"
                )
            return Pick(route=name, arm=arm, how="override")
        point = _point(name, key) if key is not None else random.random()
        total = sum(w for _, w in route.arms)
        acc = 0.0
        chosen = route.arms[-1][0]
        for ref, weight in route.arms:
            acc += weight / total
            if weight > 0 and point < acc:
                chosen = ref
                break
        else:
            chosen = next(ref for ref, w in reversed(route.arms) if w > 0)
        return Pick(route=name, arm=chosen, how="sticky" if key is not None else "random")
