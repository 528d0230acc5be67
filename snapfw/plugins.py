"""The plugin manager: built-in plugins by module name, then the ``snapfw`` entry-point group."""

from __future__ import annotations

import functools
import importlib
import os
import warnings

from .errors import PluginError

BUILTIN = ("snapfw_images", "snapfw_qcow2", "snapfw_external")
ENTRY_POINT_GROUP = "snapfw"
DISABLE_ENV = "SNAPFW_DISABLE_PLUGINS"


@functools.cache
def get_plugin_manager():
    import pluggy

    from . import hookspecs

    pm = pluggy.PluginManager("snapfw")
    pm.add_hookspecs(hookspecs)
    disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    for name in BUILTIN:
        if name not in disabled:
            pm.register(importlib.import_module(name), name)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in disabled or pm.has_plugin(ep.name):
            continue
        try:
            pm.register(ep.load(), ep.name)
        except Exception as e:  # a broken third-party plugin must not take snapfw down
            warnings.warn(f"snapfw plugin {ep.name!r} ({ep.value}) skipped: {type(e).__name__}: {e}",
                          stacklevel=2)
    return pm


def _collect(hook_name: str, key: str) -> dict[str, tuple[type, str]]:
    pm = get_plugin_manager()
    found: dict[str, tuple[type, str]] = {}
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        for cls in impl.function() or ():
            name = getattr(cls, key)
            if name in found:
                raise PluginError(f"plugins {found[name][1]!r} and {impl.plugin_name!r} both provide "
                                  f"{key} {name!r}; disable one with {DISABLE_ENV}")
            found[name] = (cls, impl.plugin_name)
    return found


@functools.cache
def disk_backends() -> dict[str, tuple[type, str]]:
    """Backend name -> (class, plugin name)."""
    return _collect("snapfw_disk_backends", "name")


@functools.cache
def hypervisor_drivers() -> dict[str, tuple[type, str]]:
    """URI scheme -> (class, plugin name)."""
    return _collect("snapfw_hypervisor_drivers", "scheme")


def hook():
    return get_plugin_manager().hook
