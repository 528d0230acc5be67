"""The public plugin API: everything a plugin (built-in, contrib or third-party) may import, in one place.

Plugins import from here only (``from snapfw.api import DiskBackend, hookimpl``), never from the modules
behind it: those are the core's own and change with it. An import-linter contract in pyproject.toml
holds the plugins to this, and tests/test_architecture.py keeps ``__all__``, this module and PLUGINS.md
in step. Nothing in the core imports this module, so ``snapfw list`` never pays for it.
"""

from . import yamlfiles
from .backend import (
    CAPABILITIES,
    LIVE_CREATE,
    LIVE_DELETE,
    LIVE_REVERT,
    MEMORY_KINDS,
    MEMORY_LIVE,
    MEMORY_PAUSED,
    MIRROR,
    OFFLINE_CREATE,
    OFFLINE_DELETE,
    OFFLINE_REVERT,
    DiskBackend,
    DiskGraph,
    DiskOp,
    HypervisorDriver,
    MemoryBackend,
)
from .connection import fsync_dir, uri_path
from .errors import (
    BadInput,
    CatalogError,
    FileError,
    ImageInUse,
    Inconsistent,
    LockTimeout,
    NotSupported,
    PluginError,
    Refused,
    SnapfwError,
    ToolError,
    UnknownDomain,
    UnknownSnapshot,
)
from .hookspecs import hookimpl
from .live import (
    EXTERNAL,
    INTERNAL,
    LiveCommit,
    LiveDeleteTag,
    LiveSnapshot,
    LiveStream,
    describe_action,
    external_action,
    internal_action,
)
from .model import FORMATS, Disk, DiskRecord, Domain, ImageFile, MemoryRecord, Snapshot, Tree
from .names import check_name, fit_file_name
from .plan import Plan, Step
from .steps import (ApplyTag, ApplyTagForward, Commit, CreateOverlay, CreateTag, DeleteTag, Rebase, RemoveFile,
                    remove_overlay)
from .tools import lvm, qemuimg
from .tools.host import Host
from .tools.qga import GuestAgent
from .tools.qmp import QMP, QMPError
from .tools.run import run

__all__ = [
    "ApplyTag",
    "ApplyTagForward",
    "BadInput",
    "CAPABILITIES",
    "CatalogError",
    "check_name",
    "Commit",
    "CreateOverlay",
    "CreateTag",
    "DeleteTag",
    "describe_action",
    "Disk",
    "DiskBackend",
    "DiskGraph",
    "DiskOp",
    "DiskRecord",
    "Domain",
    "EXTERNAL",
    "external_action",
    "FileError",
    "fit_file_name",
    "FORMATS",
    "fsync_dir",
    "GuestAgent",
    "hookimpl",
    "Host",
    "HypervisorDriver",
    "ImageFile",
    "ImageInUse",
    "Inconsistent",
    "INTERNAL",
    "internal_action",
    "LIVE_CREATE",
    "LIVE_DELETE",
    "LIVE_REVERT",
    "LiveCommit",
    "LiveDeleteTag",
    "LiveSnapshot",
    "LiveStream",
    "LockTimeout",
    "lvm",
    "MEMORY_KINDS",
    "MEMORY_LIVE",
    "MEMORY_PAUSED",
    "MemoryBackend",
    "MemoryRecord",
    "MIRROR",
    "NotSupported",
    "OFFLINE_CREATE",
    "OFFLINE_DELETE",
    "OFFLINE_REVERT",
    "Plan",
    "PluginError",
    "qemuimg",
    "QMP",
    "QMPError",
    "Rebase",
    "Refused",
    "remove_overlay",
    "RemoveFile",
    "run",
    "SnapfwError",
    "Snapshot",
    "Step",
    "ToolError",
    "Tree",
    "UnknownDomain",
    "UnknownSnapshot",
    "uri_path",
    "yamlfiles",
]
