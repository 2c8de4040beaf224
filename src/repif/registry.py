"""A tiny name → class registry shared by solvers and samplers.

Subclasses register themselves by declaring a class attribute ``name``; abstract bases leave it
unset. Looking up an unknown name raises a :class:`ValueError` that lists the known ones.
"""

from __future__ import annotations

from typing import Generic, TypeVar

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
