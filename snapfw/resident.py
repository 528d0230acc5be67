"""The resident interpreter's program (snapfw.tools.resident): import what the commands use, then serve."""

from __future__ import annotations

import importlib

from . import cli, clone, commands, lifecycle, plugins, usage  # noqa: F401 - imported to be forked with
from .tools import resident

# what commands import only when they need it, imported here once for every worker
LAZY = ("yaml", "libvirt", "libvirt_qemu", "hashlib", "shlex", "tempfile", "concurrent.futures", "rich.console",
        "rich.progress", "rich.table", "pluggy", *plugins.BUILTIN)


def preload() -> None:
    """What every worker takes over from the resident interpreter, done once before the first fork."""
    for name in LAZY:
        try:
            importlib.import_module(name)
        except ImportError:  # not installed here (libvirt-python on a machine without libvirt): imported by
            pass             # no command either
    plugins.with_builtins(frozenset())  # as get_plugin_manager asks for it when none is disabled


def serve(address: bytes) -> None:
    preload()
    resident.serve(address, cli.run)
