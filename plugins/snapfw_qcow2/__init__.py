"""The ``qcow2`` backend: internal snapshots, tags inside the disk's qcow2 file (qemu-img snapshot).

A tag lives in the file that was active when it was taken. It is never applied under overlays that a
snapshot still reads through (that would change what they read), and deleting it waits until no overlay
reads through its file. While the domain runs, a tag in the disk's active file is deleted by the
hypervisor (``LiveDeleteTag``: QEMU holds that file read-write, rule 1); tags in files of other branches
keep ``qemu-img snapshot -d``. Overlays that hold only the active state go with it: the revert discards that
state, the core removes them after the commit, and a failure before the commit restores what they read.

A revert of several disks keeps each file's current state as a tag of its own until every disk is
reverted, so that a failure on one puts them all back. A revert of one disk has nothing to keep in step:
it applies the tag after the commit, one ``qemu-img snapshot -a`` rather than three, and a failure or crash
there is finished by ``check --repair`` (the state it discards is the one the user asked to discard).
"""

from __future__ import annotations

import os

from snapfw.api import (
    LIVE_CREATE,
    LIVE_DELETE,
    OFFLINE_CREATE,
    OFFLINE_DELETE,
    OFFLINE_REVERT,
    ApplyTag,
    ApplyTagForward,
    CreateTag,
    DeleteTag,
    DiskBackend,
    LiveDeleteTag,
    Refused,
    hookimpl,
    internal_action,
)


class InternalBackend(DiskBackend):
    name = "qcow2"
    description = "internal snapshots inside the qcow2 file (qemu-img snapshot -c/-a/-d)"
    capabilities = frozenset({OFFLINE_CREATE, OFFLINE_REVERT, OFFLINE_DELETE, LIVE_CREATE, LIVE_DELETE})
    priority = 10
    cost = {"create": "metadata only", "revert": "metadata only", "delete": "metadata only",
            "space": "inside the disk file"}

    def usable(self, disk):
        return None if disk.format == "qcow2" else f"internal snapshots need a qcow2 file, {disk.path} is {disk.format}"

    def create(self, op, snapshot):
        g = op.graph
        if snapshot in {s["name"] for s in op.inspect(g.active, g.active_format).get("snapshots", [])}:
            raise Refused(f"{g.active} already holds an internal snapshot named {snapshot!r}")
        if op.domain.running:  # the running QEMU takes the tag (blockdev-snapshot-internal-sync)
            op.live.append(internal_action(op, snapshot))
        else:
            op.prepare.append(CreateTag(g.active, snapshot))
        return {"file": g.active, "tag": snapshot}

    def revert(self, op, snapshot, record):
        g = op.graph
        path = record["file"]
        overlays = g.needed_overlays(path) + (["of another domain"] if path in g.pinned else [])
        frozen = [n for n in g.referrers(path) if "tag" not in g.records[n]]
        if overlays or frozen:
            why = (f"overlays {', '.join(overlays)} read through it" if overlays
                   else f"it is the frozen image of snapshot(s) {', '.join(frozen)}")
            raise Refused(f"cannot revert disk {g.target} to internal snapshot {snapshot!r}: {path} has "
                          f"changed since ({why}); reverting under them would corrupt them. Delete those "
                          "later snapshots first")
        discarded = g.children(path)
        if discarded:
            op.notes.append(f"{', '.join(discarded)} read through {path} but hold only the state this revert "
                            "discards: removed once it is done")
        op.inspect(path, g.format(path))
        if op.alone:  # the state it discards is the user's to discard: once recorded, the revert goes on
            op.finish.append(ApplyTagForward(path, record["tag"]))
        else:  # each disk keeps its state until all are reverted, so that a failure puts every one back
            keep = f"snapfw-revert-{os.urandom(6).hex()}"
            op.prepare.append(ApplyTag(path, record["tag"], keep))
            op.finish.append(DeleteTag(path, keep))
        g.active, g.active_format = path, g.format(path)

    def delete(self, op, snapshot, record):
        g = op.graph
        path, tag = record["file"], record["tag"]
        if g.children(path) or path in g.pinned:
            g.garbage.add((path, tag))
            op.notes.append(f"internal snapshot {tag!r} stays inside {path} (hidden) until no overlay "
                            "reads through that file")
        elif path in op.domain.live_chains:  # a leaf of the running chain: the active file
            op.finish.append(LiveDeleteTag(op.domain.name, g.target, path, tag))
        else:
            op.finish.append(DeleteTag(path, tag))

    release = delete


@hookimpl
def snapfw_disk_backends():
    return [InternalBackend]
