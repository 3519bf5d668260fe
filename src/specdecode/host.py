"""``HostState``: what one host keeps across its requests, so that nothing learned is global.

A host is whatever serves a stream of requests: a ``Scheduler`` (so a server), a benchmark
method, or the plain ``generate`` calls on one model (the state then lives on that model object).
Drafters and policies reach it through ``BuildContext.host`` and keep their cross-request stores
there under their own key (SuffixDecoding's global tree, Token Recycling's hot tables, loaded heads,
datastores, the adaptive policy's estimates, measured cost curves). Two hosts never see each
other's stores; a ``BuildContext`` made without one gets a private, empty one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
ATTRIBUTE = "_specdecode_host"  # where plain ``generate`` calls keep a model's host


class HostState:
    """Named stores, each created on first use by the code that needs it."""

    def __init__(self) -> None:
        self._stores: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: str, make: Callable[[], T]) -> T:
        """The store under ``key``, made by ``make()`` the first time."""
        with self._lock:
            if key not in self._stores:
                self._stores[key] = make()
            return self._stores[key]

    def peek(self, key: str) -> Any:
        """The store under ``key``, or None when none was made."""
        return self._stores.get(key)

    def __reduce__(self) -> tuple:
        """A copied or pickled host (e.g. of a copied model) starts empty: stores are not shared
        with, nor duplicated from, another host."""
        return (HostState, ())

    def clear(self) -> None:
        with self._lock:
            self._stores.clear()


def host_of(model: Any) -> HostState:
    """The host of plain library calls on ``model`` (one per model object, kept on it)."""
    host = getattr(model, ATTRIBUTE, None)
    if host is None:
        host = HostState()
        object.__setattr__(model, ATTRIBUTE, host)
    return host
