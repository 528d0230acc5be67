"""snapfw_btrfs: snapshots of raw disk images that live in their own btrfs subvolume.

An example third-party backend: it uses only snapfw's public API. A disk qualifies when its image is
raw and its folder is a btrfs subvolume below the top level (new subvolumes go next to it).
Create takes a read-only snapshot of that subvolume; revert makes a writable snapshot of a read-only one
and points the domain at the image inside it, so every branch stays, as with external snapshots; delete
removes the read-only snapshot: btrfs shares extents, nothing needs merging. Everything else in the
subvolume is snapshotted and reverted with the image.

The core removes image files nothing references with a plain unlink, which would leave an empty (or,
for a read-only snapshot, an undeletable) subvolume behind. So this backend takes the files it retires
out of the graph itself and deletes their subvolumes in finish steps: the core never sees them as
garbage. A subvolume snapfw did not make (the disk's original one) is only forgotten, never deleted.
One backend per disk: mixing other backends' snapshots into a btrfs disk is not supported.

Live create: the snapshot of a running domain's disk is the same subvolume snapshot, a host step the
hypervisor knows nothing of, so it goes to ``op.window``: snapfw pauses the guest (QEMU drains and flushes
the image first), runs the hypervisor's transaction for the other disks and this step, and resumes it.
btrfs writes the file's dirty pages before it snapshots the subvolume. Revert and delete stay offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from snapfw.api import (
    LIVE_CREATE,
    OFFLINE_CREATE,
    OFFLINE_DELETE,
    OFFLINE_REVERT,
    DiskBackend,
    ImageFile,
    SnapfwError,
    Step,
    hookimpl,
    run,
)

SUBVOLUME_ROOT_INODE = 256  # what stat() says for the top directory of every btrfs subvolume
TOP_LEVEL_ID = 5  # the subvolume a btrfs filesystem starts with


def _root_id(path: str) -> int:
    """The id of the subvolume ``path`` is in; a ToolError if it is not on btrfs."""
    return int(run(["btrfs", "inspect-internal", "rootid", path]))


def _delete(path: str):
    if os.path.lexists(path):
        run(DeleteSubvolume(path).argv())


def _uuids(path: str) -> tuple[str, str]:
    """(UUID, Parent UUID) of the subvolume at ``path``, from ``btrfs subvolume show``."""
    fields = dict(ln.strip().split(":", 1) for ln in run(["btrfs", "subvolume", "show", path]).splitlines()[1:]
                  if ":" in ln)
    return fields["UUID"].strip(), fields["Parent UUID"].strip()


@dataclass
class SnapshotSubvolume(Step):
    """A snapshot of subvolume ``source`` at ``path``: read-only for a snapshot, writable for a revert."""

    source: str
    path: str
    readonly: bool

    def do(self, ctx):
        if os.path.lexists(self.path):  # btrfs would put the snapshot inside it instead
            raise FileExistsError(f"{self.path} already exists")
        run(self.argv())

    def undo(self, ctx):
        """Delete ``path`` only if it is a snapshot of ``source``: what appeared there otherwise between
        planning and ``do`` (which then refused) is not snapfw's to delete."""
        if not os.path.lexists(self.path):
            return
        try:
            ours = _uuids(self.path)[1] == _uuids(self.source)[0]
        except SnapfwError:
            return
        if ours:
            _delete(self.path)

    def describe(self):
        return f"{'read-only ' if self.readonly else ''}snapshot of subvolume {self.source} as {self.path}"

    def argv(self):
        return ["btrfs", "subvolume", "snapshot", *(["-r"] if self.readonly else []), self.source, self.path]


@dataclass
class DeleteSubvolume(Step):
    """Delete a subvolume snapfw made, committing the deletion so a crash cannot bring it back."""

    path: str

    def do(self, ctx):
        _delete(self.path)

    def describe(self):
        return f"delete subvolume {self.path}"

    def argv(self):
        return ["btrfs", "subvolume", "delete", "--commit-after", self.path]


class BtrfsBackend(DiskBackend):
    name = "btrfs"
    description = "raw images in btrfs subvolumes: read-only subvolume snapshots (btrfs subvolume snapshot -r)"
    capabilities = frozenset({OFFLINE_CREATE, OFFLINE_REVERT, OFFLINE_DELETE, LIVE_CREATE})
    priority = 15  # before external (20): raw disks in subvolumes get btrfs unless told otherwise
    cost = {"create": "metadata only", "revert": "metadata only", "delete": "metadata only",
            "space": "extents written since, per branch"}

    def usable(self, disk):
        if disk.format != "raw":
            return f"btrfs snapshots need a raw image, {disk.path} is {disk.format}"
        folder = os.path.dirname(disk.path)
        try:
            if os.stat(folder).st_ino != SUBVOLUME_ROOT_INODE:
                return f"{folder} is not a btrfs subvolume"
            if _root_id(folder) == TOP_LEVEL_ID:
                return f"{folder} is the top level of a btrfs filesystem; give the image a subvolume of its own"
            _root_id(os.path.dirname(folder))  # new subvolumes go there, on the same filesystem
        except (OSError, SnapfwError) as e:
            return f"{folder} is not a btrfs subvolume inside a btrfs filesystem ({e})"
        return None

    def _snapshot(self, op, source_file, label, readonly, steps=None) -> str:
        """Plan a snapshot of the subvolume holding ``source_file`` (appended to ``steps``, default
        ``op.prepare``); the path of the file in the snapshot."""
        g = op.graph
        source = os.path.dirname(source_file)
        path = op.new_image_path(label, suffix="", folder=os.path.dirname(os.path.dirname(g.active)))
        (op.prepare if steps is None else steps).append(SnapshotSubvolume(source, path, readonly))
        file = os.path.join(path, os.path.basename(source_file))
        g.files[file] = ImageFile(file, g.target, "raw", None, owned=True)
        return file

    def _retire(self, op, path, snapshot=None):
        """``path`` is going out of use (``snapshot``'s record goes too): drop it and its subvolume."""
        g = op.graph
        if path == g.active or g.children(path) or [n for n in g.referrers(path) if n != snapshot]:
            return
        if not g.files[path].owned:
            op.notes.append(f"{os.path.dirname(path)} is no longer used; snapfw did not make it, so it stays")
            return  # the core forgets it
        del g.files[path]
        op.finish.append(DeleteSubvolume(os.path.dirname(path)))

    def create(self, op, snapshot):
        return {"file": self._snapshot(op, op.graph.active, snapshot, readonly=True, steps=op.window)}

    def revert(self, op, snapshot, record):
        g = op.graph
        op.inspect(record["file"], "raw")
        old = g.active
        g.active, g.active_format = self._snapshot(op, record["file"], snapshot, readonly=False), "raw"
        self._retire(op, old)

    def delete(self, op, snapshot, record):
        self._retire(op, record["file"], snapshot)

    release = delete


@hookimpl
def snapfw_disk_backends():
    return [BtrfsBackend]
