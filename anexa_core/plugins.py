"""The one plugin manager, and lookup of what plugins register.

Built-in plugins are entry points of the ``anexa`` distribution itself, so they load through the
same path as third-party ones: ``load_setuptools_entrypoints("anexa")``. ``ANEXA_LOAD_PLUGINS``
(comma-separated distribution or entry-point names; empty means built-ins only) narrows what loads.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass
from typing import Any

import pluggy

from anexa_core import hookspecs
from anexa_core.errors import AnexaError

logger = logging.getLogger("anexa")

BUILTIN_DISTRIBUTION = "anexa"
KINDS = {
    "tokenizers": "register_tokenizers",
    "attention": "register_attention",
    "samplers": "register_samplers",
    "blocks": "register_blocks",
    "datasets": "register_datasets",
}

_manager: pluggy.PluginManager | None = None


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, created and loaded on first use."""
    global _manager
    if _manager is None:
        manager = pluggy.PluginManager("anexa")
        manager.add_hookspecs(hookspecs)
        _load_entry_points(manager)
        manager.check_pending()
        _manager = manager
    return _manager


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    allow = os.environ.get("ANEXA_LOAD_PLUGINS")
    allowed = None if allow is None else {n.strip() for n in allow.split(",") if n.strip()}
    for entry_point in importlib.metadata.entry_points(group="anexa"):
        dist = entry_point.dist
        dist_name = dist.name if dist else "?"
        builtin = dist_name == BUILTIN_DISTRIBUTION
        if allowed is not None and not builtin and not allowed & {dist_name, entry_point.name}:
            continue
        try:
            manager.load_setuptools_entrypoints("anexa", name=entry_point.name)
        except Exception as exc:
            if builtin:
                raise
            version = dist.version if dist else "?"
            logger.warning("plugin %s %s failed to load and was skipped: %s", dist_name, version, exc)


@dataclass(frozen=True)
class Registered:
    """One named implementation and the plugin that registered it."""

    name: str
    obj: Any
    plugin: str


def registered(kind: str) -> dict[str, Registered]:
    """Everything registered for ``kind`` (a key of :data:`KINDS`), by name."""
    manager = plugin_manager()
    found: dict[str, Registered] = {}
    for impl in getattr(manager.hook, KINDS[kind]).get_hookimpls():

        def register(name: str, obj: Any, _plugin: str = impl.plugin_name) -> None:
            if name in found:
                raise AnexaError(
                    f"{kind} name {name!r} is registered by both plugin {found[name].plugin!r} and "
                    f"plugin {_plugin!r}: uninstall one of them or set ANEXA_LOAD_PLUGINS"
                )
            found[name] = Registered(name, obj, _plugin)

        impl.function(register)
    return found


def get(kind: str, name: str) -> Any:
    """The implementation registered as ``name``; a clear error listing the choices otherwise."""
    available = registered(kind)
    if name not in available:
        choices = ", ".join(sorted(available)) or "none"
        raise AnexaError(f"unknown {kind} {name!r}: choose one of {choices} (see `anexa plugins`)")
    return available[name].obj


def describe_plugins() -> list[dict[str, Any]]:
    """One entry per plugin: its name, distribution, version and the names it registers per hook."""
    manager = plugin_manager()
    dists = {id(plugin): dist for plugin, dist in manager.list_plugin_distinfo()}
    per_plugin: dict[str, dict[str, list[str]]] = {}
    for kind in KINDS:
        for entry in registered(kind).values():
            per_plugin.setdefault(entry.plugin, {}).setdefault(kind, []).append(entry.name)
    described = []
    for name, plugin in sorted(manager.list_name_plugin(), key=lambda pair: pair[0]):
        dist = dists.get(id(plugin))
        described.append(
            {
                "name": name,
                "distribution": dist.project_name if dist else None,
                "version": dist.version if dist else None,
                "registers": per_plugin.get(name, {}),
            }
        )
    return described
