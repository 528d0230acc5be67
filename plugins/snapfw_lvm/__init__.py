"""The ``lvm`` disk backend: LVM2 snapshots of raw disks that are logical volumes (``/dev/VG/LV``).

Every lvm2 command runs on the connection's host (``op.host`` while planning, ``ctx.host`` in steps:
this machine, or a guest or dom0 through its guest agent, ``SNAPFW_HOST``), reading state only from
``--reportformat json`` reports. A thin origin gets thin snapshots (no size); any other LV gets classic
copy-on-write snapshots of ``create --lvm-size`` (else ``SNAPFW_LVM_SIZE``, else ``20%`` of the origin; or
bytes with a K/M/G suffix), all the classic snapshots of one operation in one volume group checked
together against its free extents. Each snapshot is its own LV, named by :func:`lv_name`, tagged
``snapfw`` (an undo removes only LVs carrying the tag). The disk keeps running on its origin LV: nothing ever changes the domain's
definition.

- revert, thin: a fresh thin snapshot OF the recorded snapshot, swapped in under the origin's name (two
  renames; the old origin is removed after the commit). The recorded snapshot is never touched.
- revert, classic: LVM cannot snapshot a classic snapshot, so the recorded snapshot is merged into the
  origin (``lvconvert --merge``, copying the chunks that changed since), then retaken at once under the
  same name from the merged origin, which reads exactly as it did. Both run after the commit: a crash
  between them is finished by ``snapfw check --repair`` (do not start the domain before it).
  A snapshot's state (:func:`status`) is LVM's, read when asked: invalid (its copy-on-write space
  overflowed) cannot be reverted to, only deleted; merge pending (the origin was open when the merge
  started) blocks the disk until ``check --repair`` finishes it with the origin closed.
- delete: ``lvremove`` of the snapshot LV; the origin and the other snapshots are untouched (every LVM
  snapshot is a whole view of the origin, so nothing merges).
"""

from __future__ import annotations

import math
import os
import re
import time
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
MERGE_WAIT = 300.0  # seconds a repair waits for a merge that started on the origin's activation
THIN_POOL_LIMIT = 90.0  # percent of a thin pool's data or metadata space a new snapshot may find in use
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def lv_name(vg: str, origin: str, snapshot: str, suffix: str = "") -> str:
    """The LV holding ``snapshot`` of ``origin`` in volume group ``vg``: ``ORIGIN.NAME``. Characters LVM does
    not allow (and ``_``, which starts its reserved suffixes) become ``-``; a name changed or cut that way
    ends in ``.`` and 8 hex digits of its sha256, so distinct snapshot names never share an LV. Cut to what
    LVM holds: ``VG/LV`` and the device-mapper name ``VG-LV`` (each ``-`` in either doubled) within its
    NAME_LEN."""

    def fits(slug: str) -> bool:
        lv = f"{origin}.{slug}{suffix}"
        return (len(vg) + 1 + len(lv) <= lvm.MAX_NAME
                and len(vg) + vg.count("-") + 1 + len(lv) + lv.count("-") <= lvm.MAX_NAME)

    slug = re.sub(r"[^A-Za-z0-9+.-]", "-", snapshot)
    if slug != snapshot or not fits(slug):
        import hashlib  # here: every command loads this plugin, few need a digest

        digest = hashlib.sha256(snapshot.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        keep = len(slug)
        while keep and not fits(f"{slug[:keep]}.{digest}"):
            keep -= 1
        slug = f"{slug[:keep]}.{digest}"
    return f"{origin}.{slug}{suffix}"


def _size(policy: str, origin_bytes: int, extent: int, given_by: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%|[KMGT]?)i?B?\s*", policy, re.I)
    if not m:
        raise BadInput(f"{given_by} {policy!r}: expected a percentage of the origin (20%) or a size (512M)")
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


def _merging(info: dict) -> bool:
    """A merge into the origin started but waits for the origin to close (``lv_attr`` ``S`` on the
    snapshot, ``O`` on its origin)."""
    return info["lv_attr"][:1] in ("S", "O") or info.get("lv_merging") not in ("", "unknown", None)


def _open(info: dict) -> bool:
    return info["lv_attr"][5:6] == "o"


VALID, INVALID, MERGE_PENDING, MISSING = "valid", "invalid", "merge pending", "missing"
_WHY = {INVALID: "is invalid: its copy-on-write space overflowed, so it no longer holds the disk as it was; "
                 "it can only be deleted",
        MERGE_PENDING: "is being merged into its origin, which waits for the origin to be closed; close it "
                       "(stop what uses it) and run `snapfw check --repair`",
        MISSING: "is missing"}


def status(info: dict | None) -> str:
    if info is None:
        return MISSING
    return INVALID if _invalid(info) else MERGE_PENDING if _merging(info) else VALID


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
    """``vg/old`` becomes ``vg/new``; done and undone by looking at which of the two names exists. A rename
    into a name another LV held (``aside``: the name that LV was moved to by the step before) is undone only
    while that LV is aside: otherwise ``new`` is still the other LV, and this rename never ran."""

    vg: str
    old: str
    new: str
    aside: str | None = None

    def _names(self, ctx) -> set[str]:
        return {r["lv_name"] for r in lvm.lvs(ctx.host, self.vg)}

    def do(self, ctx):
        names = self._names(ctx)
        if self.old in names and self.new not in names:
            lvm.lvm(ctx.host, self.argv())

    def undo(self, ctx):
        names = self._names(ctx)
        if self.new in names and self.old not in names and (self.aside is None or self.aside in names):
            lvm.lvm(ctx.host, ["lvrename", "-q", self.vg, self.new, self.old])

    def describe(self):
        return f"rename {self.vg}/{self.old} to {self.new}"

    def argv(self):
        return ["lvrename", "-q", self.vg, self.old, self.new]


@dataclass
class MergeSnapshotLV(Step):
    """Merge snapshot ``vg/name`` into its origin (the LV then goes away); gone already: done. An origin
    that is open defers the merge to its next activation (merge pending): this step then fails, keeping
    its plan for ``snapfw check --repair``, which reactivates the origin once it is closed and waits for
    the merge."""

    vg: str
    name: str
    origin: str

    def do(self, ctx):
        info = lvm.lv(ctx.host, self.vg, self.name)
        if info is not None and not _merging(info):
            lvm.lvm(ctx.host, self.argv())
            info = lvm.lv(ctx.host, self.vg, self.name)
        if info is None:
            return
        if _open(lvm.lv(ctx.host, self.vg, self.origin)):
            raise Refused(f"the merge of snapshot {self.vg}/{self.name} into {self.vg}/{self.origin} is pending: "
                          f"{self.vg}/{self.origin} is open; close it (stop what uses it) and run "
                          "`snapfw check --repair` to finish the revert")
        for active in (False, True):  # the merge starts when the origin is activated again
            lvm.lvm(ctx.host, lvm.activate_argv(self.vg, self.origin, active))
        deadline = time.monotonic() + MERGE_WAIT
        while lvm.lv(ctx.host, self.vg, self.name) is not None:  # lvm's background poll ends the merge
            if time.monotonic() > deadline:
                raise Refused(f"the merge of snapshot {self.vg}/{self.name} into {self.vg}/{self.origin} is still "
                              f"running after {MERGE_WAIT:g} s; run `snapfw check --repair` again to wait for it")
            time.sleep(1)

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

    def statuses(self, host, records):
        """One ``lvs`` per volume group."""
        lvs = {}
        for vg_name in sorted({r["vg"] for r in records.values()}):
            lvs |= {(vg_name, row["lv_name"]): row for row in lvm.lvs(host, vg_name)}
        return {n: status(lvs.get((r["vg"], r["lv"]))) for n, r in records.items()}

    def problems(self, host, target, records):
        return [f"snapshot {n}'s logical volume {records[n]['vg']}/{records[n]['lv']} {_WHY[s]}"
                + (f" on {host.spec}" if s == MISSING else "")
                for n, s in sorted(self.statuses(host, records).items()) if s != VALID]

    def create(self, op, snapshot):
        host = op.host
        origin = self._origin(host, op.disk)
        vg_name, name = origin["vg_name"], lv_name(origin["vg_name"], origin["lv_name"], snapshot)
        if lvm.lv(host, vg_name, name) is not None:
            raise Refused(f"disk {op.disk.target}: logical volume {vg_name}/{name} already exists")
        if _merging(origin):
            raise Refused(f"disk {op.disk.target}: a snapshot is being merged into {vg_name}/{origin['lv_name']} "
                          f"(merge pending until it is closed); {_WHY[MERGE_PENDING].split('; ')[1]}")
        if origin["segtype"] == "thin":
            size = None
            pool = lvm.lv(host, vg_name, origin["pool_lv"])
            for what in ("data", "metadata"):
                used = float(pool[f"{what}_percent"] or 0)
                if used >= THIN_POOL_LIMIT:
                    raise Refused(f"disk {op.disk.target}: thin pool {vg_name}/{pool['lv_name']} has {used:g}% of "
                                  f"its {what} space in use (snapfw stops at {THIN_POOL_LIMIT:g}%); extend it first")
        else:
            size = self._budget(op, vg_name, origin)
        op.prepare.append(CreateSnapshotLV(vg_name, origin["lv_name"], name, size))
        path = f"/dev/{vg_name}/{name}"
        op.graph.files[path] = ImageFile(path, op.disk.target, "raw", None, owned=True)
        return {"file": path, "host": host.spec, "vg": vg_name, "lv": name, "origin": origin["lv_name"],
                "kind": "classic" if size else "thin", **({"size": size} if size else {})}

    def _budget(self, op, vg_name: str, origin: dict) -> int:
        """The classic snapshot's size, taken from its volume group's free space as left by the disks of
        this operation planned before it (one budget per VG, in ``op.shared``)."""
        policy, flag = ((op.options["lvm-size"], "--lvm-size") if op.options.get("lvm-size")
                        else (os.environ.get(SIZE_ENV, DEFAULT_SIZE), SIZE_ENV))
        budget = op.shared.get(("lvm", vg_name))
        if budget is None:
            group = lvm.vg(op.host, vg_name)
            extent = int(group["vg_extent_size"])
            budget = op.shared[("lvm", vg_name)] = {"extent": extent, "free": int(group["vg_free_count"]) * extent,
                                                    "taken": []}
        size = _size(policy, int(origin["lv_size"]), budget["extent"], flag)
        if size > budget["free"]:
            others = " and ".join(f"disk {t}'s snapshot takes {n}" for t, n in budget["taken"])
            raise Refused(f"disk {op.disk.target}: a snapshot of {vg_name}/{origin['lv_name']} needs {size} bytes "
                          f"of copy-on-write space, volume group {vg_name} has {budget['free']} free"
                          + (f" once {others}" if others else "") + " (give --lvm-size or free extents)")
        budget["free"] -= size
        budget["taken"].append((op.disk.target, size))
        return size

    def revert(self, op, snapshot, record):
        vg_name, name, origin = record["vg"], record["lv"], record["origin"]
        lvs = {row["lv_name"]: row for row in lvm.lvs(op.host, vg_name)}
        state = status(lvs.get(name))
        if state != VALID:
            raise Refused(f"disk {op.disk.target}: snapshot {snapshot}'s logical volume {vg_name}/{name} {_WHY[state]}")
        if origin not in lvs or _merging(lvs[origin]):
            raise Refused(f"disk {op.disk.target}: {vg_name}/{origin} "
                          + ("is missing" if origin not in lvs else "has a merge pending into it"))
        if _open(lvs[origin]):
            raise Refused(f"disk {op.disk.target}: {vg_name}/{origin} is open (something holds it, maybe a "
                          "running guest); a revert needs it closed")
        if record["kind"] == "thin":
            fresh, old = lv_name(vg_name, origin, snapshot, ".new"), lv_name(vg_name, origin, snapshot, ".old")
            op.prepare += [CreateSnapshotLV(vg_name, name, fresh, active=True), RenameLV(vg_name, origin, old),
                           RenameLV(vg_name, fresh, origin, aside=old)]
            op.finish.append(RemoveLV(vg_name, old))
        else:
            op.finish += [MergeSnapshotLV(vg_name, name, origin),
                          CreateSnapshotLV(vg_name, origin, name, record["size"])]

    def delete(self, op, snapshot, record):
        if status(lvm.lv(op.host, record["vg"], record["lv"])) == MERGE_PENDING:
            raise Refused(f"disk {op.disk.target}: snapshot {snapshot}'s logical volume {record['vg']}/{record['lv']} "
                          f"{_WHY[MERGE_PENDING]}")
        del op.graph.files[record["file"]]
        op.finish.append(RemoveLV(record["vg"], record["lv"]))

    release = delete


@hookimpl
def snapfw_disk_backends():
    return [LvmBackend]
