"""Plugins: modules that register drafters or policies, imported so that every entry point sees
them (the library, ``specdecode generate``, ``bench``, ``serve``, the server's allow-list).

A plugin is any importable module whose import calls ``specdecode.register(...)`` (or
``register_policy``). Name it in ``SPECDECODE_PLUGINS`` (comma-separated module names), read when
``specdecode`` is imported, or with ``specdecode --plugin MODULE ...`` on the command line; or
call ``load_plugins(["MODULE"])`` from code. Nothing else needs editing.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable

from specdecode.types import SpecDecodeError

ENV = "SPECDECODE_PLUGINS"


def plugin_names(text: str | None) -> list[str]:
    return [n.strip() for n in (text or "").split(",") if n.strip()]


def load_plugins(names: Iterable[str] | None = None) -> list[str]:
    """Import each plugin module (default: those named in ``SPECDECODE_PLUGINS``); returns their
    names. A module that cannot be imported raises ``SpecDecodeError`` naming it."""
    names = plugin_names(os.environ.get(ENV)) if names is None else list(names)
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise SpecDecodeError(f"plugin {name!r} cannot be imported: {err}") from err
    return names
