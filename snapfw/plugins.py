"""The plugin manager: built-in plugins by module name, then the ``snapfw`` entry-point group."""

from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings

from . import connection
from .errors import PluginError

BUILTIN = ("snapfw_images", "snapfw_qcow2", "snapfw_external", "snapfw_qmp", "snapfw_libvirt", "snapfw_lvm")
ENTRY_POINT_GROUP = "snapfw"
DISABLE_ENV = "SNAPFW_DISABLE_PLUGINS"
# scans kept in one cache file, one per key: the working directories `python -m snapfw` runs in (it puts
# them first on sys.path), which would otherwise evict each other
CACHED_SCANS = 8

_versions: dict[str, str] = {}  # plugin name -> version of the distribution that installed it


@functools.cache
def get_plugin_manager():
    disabled = frozenset(n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip())
    pm = with_builtins(disabled)
    for name, value, version in entry_points():
        if name in disabled or pm.has_plugin(name):
            continue
        try:
            pm.register(_load(value), name)
        except Exception as e:  # a broken third-party plugin must not take snapfw down
            warnings.warn(f"snapfw plugin {name!r} ({value}) skipped: {type(e).__name__}: {e}", stacklevel=2)
            continue
        if version is not None:
            _versions[name] = version
    return pm


@functools.cache
def with_builtins(disabled: frozenset):
    """A plugin manager holding the hook specifications and the built-in plugins but ``disabled``: the
    same for every command, so the resident interpreter makes it before it forks a worker per command."""
    import pluggy

    from . import __version__, hookspecs

    pm = pluggy.PluginManager("snapfw")
    pm.add_hookspecs(hookspecs)
    for name in BUILTIN:
        if name not in disabled:
            pm.register(importlib.import_module(name), name)
            _versions[name] = __version__
    return pm


def entry_points() -> list[tuple[str, str, str | None]]:
    """(name, ``module:attr``, distribution version) of each ``snapfw`` entry point, in importlib.metadata's
    order. Scanning every installed distribution costs more than all of snapfw's own start-up, so what it
    found is cached, keyed by the installed distributions (:func:`_installed`); any change scans again.
    Before that key is even made (it lists every folder of the path), the cache's quick check of it
    (:func:`_unchanged`) answers for an unchanged path."""
    cache = _cache_name()
    cached = connection.read_cache(cache)
    scans = cached.get("scans") if isinstance(cached, dict) else None
    scans = [s for s in scans if isinstance(s, dict) and isinstance(s.get("entry_points"), list)] \
        if isinstance(scans, list) else []
    for scan in scans:
        if _unchanged(scan.get("quick")):
            return [tuple(ep) for ep in scan["entry_points"]]
    key, quick = _installed()
    same = next((s for s in scans if s.get("key") == key), None)
    if same is not None:  # the distributions are as they were: only the quick check is renewed
        found = [tuple(ep) for ep in same["entry_points"]]
    else:
        from importlib.metadata import entry_points as scan_group

        found = [(ep.name, ep.value, ep.dist.version if ep.dist is not None else None)
                 for ep in scan_group(group=ENTRY_POINT_GROUP)]
    connection.write_cache(cache, {"scans": [{"key": key, "quick": quick, "entry_points": found},
                                             *(s for s in scans if s is not same)][:CACHED_SCANS]})
    return found


def _cache_name() -> str:
    """The entry-point cache's file in connection.cache_home(), one per interpreter and path (but the
    working directory): snapfw run from two venvs (or PYTHONPATHs) at once would otherwise replace each
    other's scans and scan every time."""
    import zlib

    where = "\0".join([sys.executable, *sys.path[1:]]).encode("utf-8", "surrogateescape")
    return f"entry-points-{zlib.crc32(where):08x}.json"


def _installed() -> tuple[list, list]:
    """Where importlib.metadata finds distributions, and what pip changes when it installs, upgrades or
    removes one: each ``sys.path`` entry, the ``*.dist-info``/``*.egg-info`` names in it (with versions),
    and the stat of each one's ``entry_points.txt`` and ``METADATA``. Also its quick check, for
    :func:`_unchanged`: the stat of each entry (a distribution installed, upgraded or removed adds or
    removes a name in its folder), then of each distribution's ``entry_points.txt`` (setuptools' egg_info
    rewrites it in place)."""
    key, folders, files = [], [], []
    for entry in sys.path:
        folder = entry or os.getcwd()
        folders.append([folder, _stamp(folder)])
        try:
            with os.scandir(folder) as found:
                names = sorted(e.name for e in found if e.name.endswith((".dist-info", ".egg-info")))
        except OSError:  # a zip file, or nothing
            key.append(folders[-1])
            continue
        dists = [[n, _stamp(os.path.join(folder, n, "entry_points.txt")), _stamp(os.path.join(folder, n, "METADATA"))]
                 for n in names]
        key.append([folder, dists])
        files += [[os.path.join(folder, n, "entry_points.txt"), stamp] for n, stamp, _ in dists]
    return key, [folders, files]


def _unchanged(quick) -> bool:
    """Whether a scan's quick check holds: it covers this ``sys.path``, folder by folder, and every path
    in it has the stat it had."""
    try:
        folders, files = quick
        return ([p for p, _ in folders] == [entry or os.getcwd() for entry in sys.path]
                and all(_stamp(p) == stamp for p, stamp in folders + files))
    except (TypeError, ValueError):  # not a pair of lists of pairs: a cache another version wrote
        return False


def _stamp(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _load(value: str):
    """What entry point ``module:attr`` names (the module itself without ``:attr``), as EntryPoint.load."""
    module, _, attr = value.split("[")[0].partition(":")  # "[extras]" name what pip installs, nothing here
    obj = importlib.import_module(module.strip())
    for part in filter(None, attr.strip().split(".")):
        obj = getattr(obj, part)
    return obj


def reset():
    """Forget the loaded plugins, so the next use loads them again (for tests that add or block plugins)."""
    for cached in (with_builtins, get_plugin_manager, disk_backends, hypervisor_drivers, memory_backends):
        cached.cache_clear()
    _versions.clear()


def version(plugin: str) -> str | None:
    """The version of the distribution that installed ``plugin``; None for one registered by hand."""
    get_plugin_manager()
    return _versions.get(plugin)


def loaded() -> list[tuple[str, list[str]]]:
    """(plugin name, the snapfw hooks it implements) for every registered plugin, by name."""
    pm = get_plugin_manager()
    return sorted((name, sorted(c.name for c in pm.get_hookcallers(plugin) or ()))
                  for name, plugin in pm.list_name_plugin())


def _collect(hook_name: str, base: type, key: str, what: str) -> dict[str, tuple[type, str]]:
    pm = get_plugin_manager()
    found: dict[str, tuple[type, str]] = {}
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        for cls in impl.function() or ():
            name = getattr(cls, key, None) if isinstance(cls, type) and issubclass(cls, base) else None
            if not isinstance(name, str):
                raise PluginError(f"plugin {impl.plugin_name!r} returned {cls!r} from {hook_name}: expected a "
                                  f"{base.__name__} subclass with a {key}; disable it with {DISABLE_ENV}")
            if name in found:
                raise PluginError(f"plugins {found[name][1]!r} and {impl.plugin_name!r} both provide "
                                  f"{what} {name!r}; disable one with {DISABLE_ENV}")
            found[name] = (cls, impl.plugin_name)
    return found


@functools.cache
def disk_backends() -> dict[str, tuple[type, str]]:
    """Backend name -> (class, plugin name)."""
    from .backend import DiskBackend

    return _collect("snapfw_disk_backends", DiskBackend, "name", "disk backend")


@functools.cache
def hypervisor_drivers() -> dict[str, tuple[type, str]]:
    """URI scheme -> (class, plugin name)."""
    from .backend import HypervisorDriver

    return _collect("snapfw_hypervisor_drivers", HypervisorDriver, "scheme", "hypervisor driver")


@functools.cache
def memory_backends() -> dict[str, tuple[type, str]]:
    """Memory backend name -> (class, plugin name)."""
    from .backend import MemoryBackend

    return _collect("snapfw_memory_backends", MemoryBackend, "name", "memory backend")


def hook():
    return get_plugin_manager().hook
