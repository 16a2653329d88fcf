"""A tiny name -> factory registry, one per family (rules, tasks, attacks, backends).

Why not entry points: the families are small and live in this repository; a dict keeps lookups
explicit and lets errors list every valid name. A family whose names the torch-free side must know
(tasks, rules, attacks) passes ``builtin``, the name -> description table of ``mtl_node.core.names``:
a built-in then registers by name alone and takes its description from there, so the description
is written once and the orchestrator sees the same list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from mtl_node.core.errors import UnknownNameError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    factory: T
    description: str


class Registry(Generic[T]):
    def __init__(self, family: str, builtin: Mapping[str, str] | None = None) -> None:
        self.family = family
        self.builtin = dict(builtin or {})
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str | None = None) -> Callable[[T], T]:
        """Register ``name``; a built-in's description comes from ``builtin`` when not given."""
        if description is None:
            if name not in self.builtin:
                raise ValueError(
                    f"{self.family} {name!r} has no description: pass one, "
                    "or add it to mtl_node/core/names.py"
                )
            description = self.builtin[name]

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
