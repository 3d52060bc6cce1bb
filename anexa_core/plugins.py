"""The one plugin manager, and lookup of what plugins register.

Built-in plugins are entry points of the ``anexa`` distribution itself and load through the same path
as third-party ones: every entry point of the group ``anexa``, built-ins first, then the others by
distribution name. Two environment variables choose what loads (comma-separated plugin or
distribution names):

- ``ANEXA_LOAD_PLUGINS``: only these third-party plugins (empty: built-ins only);
- ``ANEXA_DISABLE_PLUGINS``: not these, built-ins included — disabling a built-in lets a third-party
  plugin take its plugin name and the names it registered. ``DIST:NAME`` names one plugin of one
  distribution (``anexa:samplers``), where a plain name means every plugin so named.

Nothing here stops the tool for an unrelated reason: a plugin that fails to import, or whose entry-point
name is taken, is skipped with a warning and listed by ``anexa plugins`` with its error; two plugins
registering the same name are an error only when that name is used.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pluggy

from anexa_core import hookspecs, options
from anexa_core.errors import AnexaError, choose_one_of, closest, one_line
from anexa_core.kinds import KINDS

logger = logging.getLogger("anexa")

BUILTIN_DISTRIBUTION = "anexa"


@dataclass
class PluginRecord:
    """What happened to one entry point: ``loaded``, ``failed``, ``disabled`` or ``skipped`` (name taken)."""

    name: str
    distribution: str | None
    version: str | None
    status: str = "loaded"
    error: str | None = None
    traceback: str | None = None


@dataclass
class _State:
    manager: pluggy.PluginManager
    records: dict[str, PluginRecord] = field(default_factory=dict)
    failed: list[PluginRecord] = field(default_factory=list)
    hook_errors: dict[tuple[str, str], str] = field(default_factory=dict)  # (plugin, kind) -> what failed


_state: _State | None = None


def _names(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    return None if value is None else {name.strip() for name in value.split(",") if name.strip()}


def _load() -> _State:
    manager = pluggy.PluginManager("anexa")
    manager.add_hookspecs(hookspecs)
    state = _State(manager)
    allowed, disabled = _names("ANEXA_LOAD_PLUGINS"), _names("ANEXA_DISABLE_PLUGINS") or set()
    entry_points = list(importlib.metadata.entry_points(group="anexa"))

    def sort_key(entry_point):
        dist = entry_point.dist.name if entry_point.dist else ""
        return (dist != BUILTIN_DISTRIBUTION, dist.lower(), entry_point.name)

    for entry_point in sorted(entry_points, key=sort_key):
        dist = entry_point.dist
        record = PluginRecord(entry_point.name, dist.name if dist else None, dist.version if dist else None)
        builtin = record.distribution == BUILTIN_DISTRIBUTION
        if {record.name, record.distribution, f"{record.distribution}:{record.name}"} & disabled:
            record.status = "disabled"
            record.error = "ANEXA_DISABLE_PLUGINS or --disable-plugin names it"
        elif allowed is not None and not builtin and not allowed & {record.name, record.distribution}:
            continue  # not asked for: as if not installed
        elif record.name in state.records:
            taken = state.records[record.name]
            record.status = "skipped"
            record.error = (
                f"its plugin name {record.name!r} is taken by {taken.distribution} {taken.version}: rename the "
                f"entry point, or disable the other with ANEXA_DISABLE_PLUGINS={taken.distribution}:{record.name}"
            )
            logger.warning(
                "plugin %s from %s %s was not loaded: %s",
                record.name,
                record.distribution,
                record.version,
                record.error,
            )
        else:
            try:
                manager.register(entry_point.load(), name=record.name)
            except Exception as exc:
                record.status = "failed"
                record.error = " ".join(f"{type(exc).__name__}: {exc}".split())
                record.traceback = traceback.format_exc()
                logger.warning(
                    "plugin %s from %s %s failed to load and was skipped: %s (`anexa -v plugins` shows the traceback)",
                    record.name,
                    record.distribution,
                    record.version,
                    record.error,
                )
                logger.debug("%s", record.traceback)
        if record.status == "loaded":
            state.records[record.name] = record
        else:
            state.failed.append(record)
    _drop_unknown_hooks(state)
    _warn_unmatched(entry_points, allowed or set(), "ANEXA_LOAD_PLUGINS")
    _warn_unmatched(entry_points, disabled, "ANEXA_DISABLE_PLUGINS or --disable-plugin")
    return state


def _warn_unmatched(entry_points, names: set[str], source: str) -> None:
    """A name that matches no installed plugin is most likely a typo: say so rather than ignore it."""
    known = set()
    for entry_point in entry_points:
        dist = entry_point.dist.name if entry_point.dist else None
        known |= {entry_point.name, dist, f"{dist}:{entry_point.name}"}
    for name in sorted(names - known):
        logger.warning(
            "%s names %r, which matches no installed plugin or distribution (see `anexa plugins`)", source, name
        )


def _drop_unknown_hooks(state: _State) -> None:
    """A plugin with a misspelt hook (``register_sampler``) would never run: pluggy's ``check_pending``
    finds it. Such a plugin is unloaded and listed as failed, rather than stopping every command."""
    while True:
        try:
            state.manager.check_pending()
            return
        except pluggy.PluginValidationError as exc:
            name = state.manager.get_name(exc.plugin)
            state.manager.unregister(exc.plugin)
            name = name or repr(exc.plugin)
            record = state.records.pop(name, None) or PluginRecord(name, None, None)
            record.status, record.error = "failed", one_line(exc) + _hook_hint(str(exc))
            logger.warning(
                "plugin %s from %s %s was not loaded: %s", name, record.distribution, record.version, record.error
            )
            state.failed.append(record)


def _hook_hint(error: str) -> str:
    """``: did you mean register_samplers?`` for pluggy's "unknown hook 'register_sampler'" (else "")."""
    unknown = re.search(r"unknown hook '(\w+)'", error)
    if unknown is None:
        return ""
    hooks = [kind.hook for kind in KINDS.values()]
    close = closest(unknown[1], hooks)
    return f": did you mean {close}?" if close else f": the hooks are {', '.join(hooks)}"


def _loaded() -> _State:
    global _state
    if _state is None:
        _state = _load()
    return _state


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager, created and loaded on first use. Tests register objects on it."""
    return _loaded().manager


@dataclass(frozen=True)
class Registered:
    """One named factory and the plugin (and distribution) that registered it."""

    name: str
    obj: Any
    plugin: str
    distribution: str | None = None
    version: str | None = None

    def owner(self) -> str:
        """``anexa-sliding 0.1.0 (plugin sliding)`` — how errors name a provider."""
        if self.distribution:
            return f"{self.distribution} {self.version} (plugin {self.plugin})"
        return f"plugin {self.plugin}"


def _all_registered(kind: str) -> dict[str, list[Registered]]:
    if kind not in KINDS:
        raise AnexaError(f"no plugin kind {kind!r}: {choose_one_of(kind, KINDS)}")
    state = _loaded()
    found: dict[str, list[Registered]] = {}
    for impl in getattr(state.manager.hook, KINDS[kind].hook).get_hookimpls():
        record = state.records.get(impl.plugin_name)
        added: dict[str, list[Registered]] = {}

        def register(
            name: str,
            factory: Any,
            _plugin: str = impl.plugin_name,
            _record=record,
            _added: dict[str, list[Registered]] = added,
        ) -> None:
            entry = Registered(name, factory, _plugin, _record and _record.distribution, _record and _record.version)
            _added.setdefault(name, []).append(entry)

        try:
            impl.function(register)
        except Exception as exc:  # a broken plugin costs its own names, not the command
            if (impl.plugin_name, kind) not in state.hook_errors:
                state.hook_errors[impl.plugin_name, kind] = f"{KINDS[kind].hook} raised {type(exc).__name__}: {exc}"
                owner = f"{record.distribution} {record.version}" if record else "no distribution"
                logger.warning(
                    "plugin %s (%s) failed in %s and registers nothing: %s: %s",
                    impl.plugin_name,
                    owner,
                    KINDS[kind].hook,
                    type(exc).__name__,
                    exc,
                )
            continue
        for name, entries in added.items():
            found.setdefault(name, []).extend(entries)
    return found


def registered(kind: str) -> dict[str, Registered]:
    """Everything registered for ``kind`` (a key of :data:`anexa_core.kinds.KINDS`) by name; a clashing name maps to its
    first provider here, and :func:`get` refuses to use it."""
    return {name: entries[0] for name, entries in sorted(_all_registered(kind).items())}


def conflicts() -> list[dict[str, Any]]:
    """Every name registered by more than one plugin, over all kinds."""
    found = []
    for kind in KINDS:
        for name, entries in sorted(_all_registered(kind).items()):
            if len(entries) > 1:
                found.append({"kind": kind, "name": name, "providers": [entry.owner() for entry in entries]})
    return found


def _clash_message(kind: str, name: str, entries: list[Registered]) -> str:
    owners = " and ".join(entry.owner() for entry in entries)
    plugin = entries[-1].plugin
    return (
        f"{KINDS[kind].singular} {name!r} is registered by {owners}: disable one, e.g. "
        f"ANEXA_DISABLE_PLUGINS={plugin} (or `anexa --disable-plugin {plugin} …`)"
    )


def lookup(kind: str, name: str, needed_by: Mapping[str, Any] | None = None) -> Registered:
    """The registration of ``name``; a one-line error listing the choices, naming a clash, or — when a
    checkpoint records who provided it (``needed_by`` = its plugin entry) — what to install."""
    entries = _all_registered(kind).get(name)
    if entries and len(entries) > 1:
        raise AnexaError(_clash_message(kind, name, entries))
    if entries:
        return entries[0]
    label = KINDS[kind].singular
    needed_by = needed_by or {}
    dist = needed_by.get("distribution")
    if dist:
        version = needed_by.get("version") or ""
        needs = f"this model needs {label} {name!r} from {dist} {version}".rstrip()
        failed = [r for r in _loaded().failed if r.distribution == dist]
        if failed:
            raise AnexaError(f"{needs}, which is installed but {failed[0].status}: {failed[0].error}")
        if _installed(dist):
            raise AnexaError(f"{needs}, which is installed but not loaded: add it to ANEXA_LOAD_PLUGINS or unset it")
        raise AnexaError(f"{needs}: pip install {dist}")
    raise AnexaError(
        f"unknown {label} {name!r}: {choose_one_of(name, sorted(_all_registered(kind)))} (see `anexa plugins`)"
    )


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def get(kind: str, name: str) -> Any:
    """The factory registered as ``name`` (see :func:`lookup` for the errors)."""
    return lookup(kind, name).obj


def create(
    kind: str, name: str, given: Mapping[str, Any] | None = None, needed_by: Mapping[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """Build the ``kind`` plugin ``name`` with ``given`` options: ``(object, every option's value)``."""
    entry = lookup(kind, name, needed_by)
    return options.create(f"{KINDS[kind].singular} {name}", entry.obj, given or {})


def provenance(kind: str, name: str, resolved_options: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint records for a plugin it used: name, options, distribution and version."""
    entry = lookup(kind, name)
    return {
        "name": name,
        "options": dict(resolved_options),
        "distribution": entry.distribution,
        "version": entry.version,
    }


def _option_list(factory: Callable[..., Any]) -> list[dict[str, Any]]:
    try:
        return [option.as_dict() for option in options.describe(factory)]
    except AnexaError as exc:
        return [{"error": str(exc)}]


def describe_plugins() -> list[dict[str, Any]]:
    """One entry per plugin, loaded or not: name, distribution, version, status, error, what it registers
    per kind, and each registered name's options."""
    state = _loaded()
    per_plugin: dict[str, dict[str, list[str]]] = {}
    per_option: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for kind in KINDS:
        for name, entries in sorted(_all_registered(kind).items()):
            for entry in entries:
                per_plugin.setdefault(entry.plugin, {}).setdefault(kind, []).append(name)
                per_option.setdefault(entry.plugin, {}).setdefault(kind, {})[name] = _option_list(entry.obj)
    described = []
    for plugin_name, _plugin in sorted(state.manager.list_name_plugin(), key=lambda pair: pair[0]):
        record = state.records.get(plugin_name) or PluginRecord(plugin_name, None, None)
        raised = [error for (name, _), error in sorted(state.hook_errors.items()) if name == plugin_name]
        if raised:  # loaded, but a hook raised: what it registers there is lost, so it is not healthy
            record = replace(record, status="failed", error="; ".join(raised))
        described.append(_described(record, per_plugin.get(plugin_name, {}), per_option.get(plugin_name, {})))
    for record in state.failed:
        described.append(_described(record, {}, {}))
    return described


def _described(record: PluginRecord, registers: dict, option_lists: dict) -> dict[str, Any]:
    return {
        "name": record.name,
        "distribution": record.distribution,
        "version": record.version,
        "status": record.status,
        "error": record.error,
        "traceback": record.traceback,
        "registers": registers,
        "options": option_lists,
    }
