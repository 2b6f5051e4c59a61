"""Name -> object registries; an unknown name raises an error that lists the known ones."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A table of named entries (classes, factories, specs).

    :param kind: what the entries are, used in error messages ("number format", "solver", ...).
    :param names: a set to add every registered name to: how a module that must not import the
        entries (the recipe schema) learns the names registered after it was written.
    """

    def __init__(self, kind: str, names: set[str] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._names = names if names is not None else set()

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering an entry under ``name``; a second entry with the same name is an error."""

        def add(entry: T) -> T:
            self.add(name, entry)
            return entry

        return add

    def add(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = entry
        self._names.add(name)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'; known: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
