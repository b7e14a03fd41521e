"""One registry of gradlab's in-process caches.

Every memo in the package is made here, so that one call empties them all (:func:`clear_caches`),
for a test that must start cold or a long session that wants its memory back. Two kinds exist:

- :func:`memo`, a :func:`functools.lru_cache` on a pure function;
- :class:`Bounded`, a dictionary that forgets its oldest entry once it holds ``maxsize``.

The on-disk derivation cache is another matter: it lives in ``gradlab._cache`` and is verified
on every read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Bounded", "clear_caches", "memo", "registered"]

F = TypeVar("F", bound=Callable[..., Any])
_REGISTRY: list[Any] = []


def memo(maxsize: int | None = 128) -> Callable[[F], F]:
    """``functools.lru_cache(maxsize)``, registered for :func:`clear_caches`.

    Args:
        maxsize: entries kept (least recently used first out); ``None`` keeps every entry.
    """

    def wrap(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        _REGISTRY.append(cached)
        return cached  # type: ignore[return-value]

    return wrap


class Bounded(dict):
    """A dictionary that drops its oldest entry when a new key would exceed ``maxsize`` (``None``:
    never), registered for :func:`clear_caches`."""

    def __init__(self, maxsize: int | None = None) -> None:
        super().__init__()
        self.maxsize = maxsize
        _REGISTRY.append(self)

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.maxsize is not None and key not in self and len(self) >= self.maxsize:
            del self[next(iter(self))]  # the oldest (dicts keep insertion order)
        super().__setitem__(key, value)

    def __hash__(self) -> int:  # type: ignore[override]  # dict is unhashable; a cache is registered by identity
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


def registered() -> tuple[Any, ...]:
    """Every cache made so far (the modules imported so far have made theirs)."""
    return tuple(_REGISTRY)


def clear_caches() -> None:
    """Empty every in-process cache of gradlab. Compiled programs are compiled again on next use."""
    for cache in _REGISTRY:
        if isinstance(cache, Bounded):
            cache.clear()
        else:
            cache.cache_clear()
