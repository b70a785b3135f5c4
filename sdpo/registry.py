"""Name -> object registries for the swappable boxes (losses, advantage estimators, environments, teachers, engines).

A registry rejects a duplicate name at import time and lists the valid names when asked for an unknown one, so a
typo in a config fails at start with the fix in the message. The registries are the one source of the names: the
config validates a choice against its registry (`sdpo.config.checks.check_choice`), so an entry registered from
outside the library is selectable without editing the config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of objects of one kind (`what` names that kind in error messages)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name")` above a function or class."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.what} {name!r} is registered twice ({self._entries[name]!r} and {obj!r})")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} {name!r}; valid names: {', '.join(sorted(self._entries))}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def in_order(self) -> list[str]:
        """The names in the order they were registered (the built-in ones first): what an error lists."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
