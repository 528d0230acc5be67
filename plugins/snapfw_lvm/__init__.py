"""The ``lvm`` disk backend: LVM2 snapshots of raw disks that are logical volumes (``/dev/VG/LV``).

Every lvm2 command runs on the connection's host (``op.host`` while planning, ``ctx.host`` in steps:
this machine, or a guest or dom0 through its guest agent, ``SNAPFW_HOST``), reading state only from
``--reportformat json`` reports. A thin origin gets thin snapshots (no size); any other LV gets classic
copy-on-write snapshots of ``SNAPFW_LVM_SIZE`` (``20%`` of the origin by default, or bytes with a K/M/G
suffix). Each snapshot is its own LV, named by :func:`lv_name`, tagged ``snapfw`` (an undo removes only
LVs carrying the tag). The disk keeps running on its origin LV: nothing ever changes the domain's
definition.

- revert, thin: a fresh thin snapshot OF the recorded snapshot, swapped in under the origin's name (two
  renames; the old origin is removed after the commit). The recorded snapshot is never touched.
- revert, classic: LVM cannot snapshot a classic snapshot, so the recorded snapshot is merged into the
  origin (``lvconvert --merge``, copying the chunks that changed since), then retaken at once under the
  same name from the merged origin, which reads exactly as it did. Both run after the commit: a crash
  between them is finished by ``snapfw check --repair`` (do not start the domain before it).
  A snapshot LVM marked invalid (its copy-on-write space overflowed) cannot be reverted to.
- delete: ``lvremove`` of the snapshot LV; the origin and the other snapshots are untouched (every LVM
  snapshot is a whole view of the origin, so nothing merges).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from snapfw.api import (
    OFFLINE_CREATE,
    OFFLINE_DELETE,
    OFFLINE_REVERT,
    BadInput,
    DiskBackend,
    ImageFile,
    Refused,
    Step,
    hookimpl,
    lvm,
)

SIZE_ENV = "SNAPFW_LVM_SIZE"
DEFAULT_SIZE = "20%"
THIN_POOL_LIMIT = 90.0  # percent of a thin pool's data or metadata space a new snapshot may find in use
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def lv_name(origin: str, snapshot: str, suffix: str = "") -> str:
    """The LV holding ``snapshot`` of ``origin``: ``ORIGIN.NAME``. Characters LVM does not allow (and ``_``,
    which starts its reserved suffixes) become ``-``; a name changed or cut that way ends in ``.`` and 8
    hex digits of its sha256, so distinct snapshot names never share an LV."""
    slug = re.sub(r"[^A-Za-z0-9+.-]", "-", snapshot)
    room = lvm.MAX_NAME - len(origin) - 1 - len(suffix)
    if slug != snapshot or len(slug) > room:
        import hashlib  # here: every command loads this plugin, few need a digest

        digest = hashlib.sha256(snapshot.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        slug = slug[:room - 9] + "." + digest
    return f"{origin}.{slug}{suffix}"


def _size(policy: str, origin_bytes: int, extent: int) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%|[KMGT]?)i?B?\s*", policy, re.I)
    if not m:
        raise BadInput(f"{SIZE_ENV}={policy!r}: expected a percentage of the origin (20%) or a size (512M)")
    number, unit = float(m.group(1)), m.group(2).upper()
    wanted = origin_bytes * number / 100 if unit == "%" else number * _UNITS[unit]
    return max(1, math.ceil(wanted / extent)) * extent


def _owned(host, vg: str, name: str, origin: str | None = None) -> dict | None:
    """LV ``vg/name`` if snapfw made it (tagged) and, when given, it is a snapshot of ``origin``."""
    info = lvm.lv(host, vg, name)
    if info is None or lvm.OWNER_TAG not in info["lv_tags"].split(","):
        return None
    if origin is not None and info["origin"] != origin:
        return None
    return info


def _invalid(info: dict) -> bool:
    return info["lv_attr"][4:5] == "I" or info.get("lv_snapshot_invalid") not in ("", "unknown", None)


@dataclass
class CreateSnapshotLV(Step):
    """Snapshot LV ``name`` of ``origin``: classic of ``size`` bytes, thin without (``active``: activated
    now, for one that becomes a disk). Running it again once it exists does nothing, so it also serves as
    a forward step (retaking a merged classic snapshot)."""

    vg: str
    origin: str
    name: str
    size: int | None = None
    active: bool = False

    def do(self, ctx):
        if _owned(ctx.host, self.vg, self.name, self.origin) is None:
            lvm.lvm(ctx.host, self.argv())

    def undo(self, ctx):
        if _owned(ctx.host, self.vg, self.name, self.origin) is not None:
            lvm.lvm(ctx.host, lvm.remove_argv(self.vg, self.name))

    def describe(self):
        kind = "thin snapshot" if self.size is None else f"snapshot ({self.size} bytes of copy-on-write space)"
        return f"create {kind} {self.vg}/{self.name} of {self.vg}/{self.origin}"

    def argv(self):
        return lvm.create_snapshot_argv(self.vg, self.origin, self.name, self.size, self.active)


@dataclass
class RenameLV(Step):
    """``vg/old`` becomes ``vg/new``; done and undone by looking at which of the two names exists."""

    vg: str
    old: str
    new: str

    def _names(self, ctx) -> set[str]:
        return {r["lv_name"] for r in lvm.lvs(ctx.host, self.vg)}

    def do(self, ctx):
        names = self._names(ctx)
        if self.old in names and self.new not in names:
            lvm.lvm(ctx.host, self.argv())

    def undo(self, ctx):
        names = self._names(ctx)
        if self.new in names and self.old not in names:
            lvm.lvm(ctx.host, ["lvrename", "-q", self.vg, self.new, self.old])

    def describe(self):
        return f"rename {self.vg}/{self.old} to {self.new}"

    def argv(self):
        return ["lvrename", "-q", self.vg, self.old, self.new]


@dataclass
class MergeSnapshotLV(Step):
    """Merge snapshot ``vg/name`` into its origin (the LV then goes away); gone already: done."""

    vg: str
    name: str
    origin: str

    def do(self, ctx):
        if lvm.lv(ctx.host, self.vg, self.name) is not None:
            lvm.lvm(ctx.host, self.argv())

    def describe(self):
        return f"merge snapshot {self.vg}/{self.name} into {self.vg}/{self.origin}"

    def argv(self):
        return lvm.merge_argv(self.vg, self.name)


@dataclass
class RemoveLV(Step):
    vg: str
    name: str

    def do(self, ctx):
        if lvm.lv(ctx.host, self.vg, self.name) is not None:
            lvm.lvm(ctx.host, self.argv())

    def describe(self):
        return f"remove logical volume {self.vg}/{self.name}"

    def argv(self):
        return lvm.remove_argv(self.vg, self.name)


class LvmBackend(DiskBackend):
    name = "lvm"
    description = "raw disks on LVM logical volumes: thin or classic (copy-on-write) LVM snapshots"
    capabilities = frozenset({OFFLINE_CREATE, OFFLINE_REVERT, OFFLINE_DELETE})
    priority = 30
    cost = {"create": "metadata only", "revert": "thin: metadata only; classic: the chunks changed since",
            "delete": "metadata only", "space": f"classic: {DEFAULT_SIZE} of the origin by default; thin: blocks "
            "written since, in the pool"}
    local_files = False

    def usable(self, disk):
        if disk.format != "raw" or not disk.path.startswith("/dev/"):
            return f"LVM snapshots need a raw logical volume /dev/VG/LV, {disk.path} is {disk.format}"
        return None

    def _origin(self, host, disk) -> dict:
        rows = lvm.lvs(host, disk.path)
        if not rows:
            raise BadInput(f"disk {disk.target}: {disk.path} is not a logical volume on {host.spec}")
        return rows[0]

    def check_disk(self, host, disk):
        self._origin(host, disk)

    def problems(self, host, target, records):
        out = []
        for snapshot, r in sorted(records.items()):
            info = lvm.lv(host, r["vg"], r["lv"])
            if info is None:
                out.append(f"snapshot {snapshot}'s logical volume {r['vg']}/{r['lv']} is missing on {host.spec}")
            elif _invalid(info):
                out.append(f"snapshot {snapshot} ({r['vg']}/{r['lv']}) is invalid: its copy-on-write space "
                           "overflowed; it cannot be reverted to, only deleted")
        return out

    def create(self, op, snapshot):
        host = op.host
        origin = self._origin(host, op.disk)
        vg_name, name = origin["vg_name"], lv_name(origin["lv_name"], snapshot)
        if lvm.lv(host, vg_name, name) is not None:
            raise Refused(f"disk {op.disk.target}: logical volume {vg_name}/{name} already exists")
        if origin["segtype"] == "thin":
            size = None
            pool = lvm.lv(host, vg_name, origin["pool_lv"])
            for what in ("data", "metadata"):
                used = float(pool[f"{what}_percent"] or 0)
                if used >= THIN_POOL_LIMIT:
                    raise Refused(f"disk {op.disk.target}: thin pool {vg_name}/{pool['lv_name']} has {used:g}% of "
                                  f"its {what} space in use (snapfw stops at {THIN_POOL_LIMIT:g}%); extend it first")
        else:
            group = lvm.vg(host, vg_name)
            extent = int(group["vg_extent_size"])
            size = _size(os.environ.get(SIZE_ENV, DEFAULT_SIZE), int(origin["lv_size"]), extent)
            free = int(group["vg_free_count"]) * extent
            if size > free:
                raise Refused(f"disk {op.disk.target}: a snapshot of {vg_name}/{origin['lv_name']} needs {size} "
                              f"bytes of copy-on-write space, volume group {vg_name} has {free} free "
                              f"(set {SIZE_ENV} or free extents)")
        op.prepare.append(CreateSnapshotLV(vg_name, origin["lv_name"], name, size))
        path = f"/dev/{vg_name}/{name}"
        op.graph.files[path] = ImageFile(path, op.disk.target, "raw", None, owned=True)
        return {"file": path, "vg": vg_name, "lv": name, "origin": origin["lv_name"],
                "kind": "classic" if size else "thin", **({"size": size} if size else {})}

    def revert(self, op, snapshot, record):
        vg_name, name, origin = record["vg"], record["lv"], record["origin"]
        info = lvm.lv(op.host, vg_name, name)
        if info is None:
            raise Refused(f"disk {op.disk.target}: snapshot {snapshot}'s logical volume {vg_name}/{name} is missing")
        if _invalid(info):
            raise Refused(f"disk {op.disk.target}: snapshot {snapshot} ({vg_name}/{name}) is invalid: its "
                          "copy-on-write space overflowed, so it no longer holds the disk as it was")
        if record["kind"] == "thin":
            fresh, old = lv_name(origin, snapshot, ".new"), lv_name(origin, snapshot, ".old")
            op.prepare += [CreateSnapshotLV(vg_name, name, fresh, active=True), RenameLV(vg_name, origin, old),
                           RenameLV(vg_name, fresh, origin)]
            op.finish.append(RemoveLV(vg_name, old))
        else:
            op.finish += [MergeSnapshotLV(vg_name, name, origin),
                          CreateSnapshotLV(vg_name, origin, name, record["size"])]

    def delete(self, op, snapshot, record):
        del op.graph.files[record["file"]]
        op.finish.append(RemoveLV(record["vg"], record["lv"]))

    release = delete


@hookimpl
def snapfw_disk_backends():
    return [LvmBackend]
