"""A tiny name -> factory registry, one per family (rules, tasks, attacks, backends).

Why not entry points: the families are small and live in this repository; a dict keeps lookups
explicit and lets errors list every valid name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from mtl_node.errors import UnknownNameError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    factory: T
    description: str


class Registry(Generic[T]):
    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str = "") -> Callable[[T], T]:
        def add(factory: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.family} {name!r} registered twice")
            self._entries[name] = Entry(name, factory, description)
            return factory

        return add

    def get(self, name: str, field: str | None = None) -> T:
        try:
            return self._entries[name].factory
        except KeyError:
            raise UnknownNameError(self.family, name, self._entries, field) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))
