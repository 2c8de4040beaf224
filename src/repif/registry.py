"""A tiny name → class registry shared by solvers and samplers.

Subclasses register themselves by declaring a class attribute ``name``; abstract bases leave it
unset. Looking up an unknown name raises a :class:`ValueError` that lists the known ones, and
building one with an option its constructor does not take raises a :class:`TypeError` that
names the component and the options it does take (one check for solvers, samplers and
curvatures).
"""

from __future__ import annotations

import inspect
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a public name to a class; ``kind`` names the family in error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def add(self, name: str, cls: type[T]) -> None:
        if name in self._classes and self._classes[name] is not cls:
            raise ValueError(f"{self.kind} name {name!r} is already registered")
        self._classes[name] = cls

    def get(self, name: str) -> type[T]:
        if not isinstance(name, str) or name not in self._classes:
            raise ValueError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}"
            )
        return self._classes[name]

    def names(self) -> list[str]:
        return list(self._classes)

    def accepted_options(self, name: str) -> list[str]:
        """The keyword options the class registered as ``name`` takes."""
        params = inspect.signature(self.get(name).__init__).parameters
        return [p for p, spec in params.items() if p != "self"
                and spec.kind not in (spec.VAR_POSITIONAL, spec.VAR_KEYWORD)]

    def options_of(self, component: Any) -> tuple[str, dict[str, Any]]:
        """(name, options) of a built ``component``, read back from the attributes its
        constructor stored under the options' own names (or ``<option>_option`` where the plain
        name holds something derived at fit, as LiSSA's ``scale``), so that
        ``build(name, options)`` makes an equal one. A component of an unregistered class, or
        one whose options cannot be read back, is a TypeError naming what to pass instead."""
        name = getattr(type(component), "name", None)
        if not isinstance(name, str) or self._classes.get(name) is not type(component):
            raise TypeError(f"{type(component).__name__} is not a registered {self.kind}; "
                            f"pass one of {', '.join(self.names())} or an instance of one")
        def stored(o: str) -> str:
            return f"{o}_option" if hasattr(component, f"{o}_option") else o

        missing = [o for o in self.accepted_options(name) if not hasattr(component, stored(o))]
        if missing:
            raise TypeError(f"the {self.kind} {name!r} does not keep option(s) "
                            f"{', '.join(missing)} as attributes; pass {self.kind}={name!r} with "
                            "its options instead of an instance")
        return name, {o: getattr(component, stored(o)) for o in self.accepted_options(name)}

    def build(self, name: str, options: dict[str, Any] | None = None) -> Any:
        """An instance of ``name`` with ``options``; an option it does not take is a
        :class:`TypeError` naming the component and the options it takes."""
        options = dict(options or {})
        accepted = self.accepted_options(name)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(
                f"{self.kind} {name!r} does not take option(s) {', '.join(unknown)}; "
                f"it takes: {', '.join(accepted) or 'none'}"
            )
        return self.get(name)(**options)
