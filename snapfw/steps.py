"""Steps over image files that any backend may put in a plan (public API for plugins).

Every step is idempotent and its undo tolerates a partial or missing ``do``, because after a crash
``snapfw check --repair`` may run either of them again.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from .connection import fsync_dir
from .names import fit_file_name
from .plan import Step
from .tools import qemuimg


def _delete_tag(path: str, tag: str) -> bool:
    """Delete ``tag`` if it is there (a step may run again after a crash); whether it was there."""
    if os.path.exists(path) and tag in qemuimg.tags(path):
        qemuimg.snapshot("-d", path, tag)
        return True
    return False


def work_name(path: str) -> str:
    """A hidden name ``.<name>.<token>.tmp`` next to ``path`` to write it under, drawn when a plan is made."""
    folder, name = os.path.split(path)
    token = os.urandom(6).hex()  # secrets.token_hex's bytes, without importing it; within NAME_MAX
    return os.path.join(folder, f".{fit_file_name(name, 255 - 18)}.{token}.tmp")


def _release_leaks(path: str):
    """After a tag operation that may have been cut short (by a power cut, say), release the clusters it
    had counted for a snapshot that never came to be, or that is gone."""
    if os.path.exists(path):
        qemuimg.repair_leaks(path)


def same_file(a: str, b: str) -> bool:
    """Whether names ``a`` and ``b`` are links to one file (neither followed, both there)."""
    try:
        x, y = os.lstat(a), os.lstat(b)
    except FileNotFoundError:
        return False
    return (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)


def remove_if_there(path: str):
    """Unlink ``path``; a name already gone is done (a step may run again after a crash)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def overlay_on(path: str, backing: str) -> bool:
    """Whether ``path`` is a whole qcow2 overlay whose header names ``backing``: the file a snapshot step
    made, and the only one its undo may remove."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != b"QFI\xfb":
                return False
            offset, size = struct.unpack(">QI", header[8:20])
            f.seek(offset)
            return f.read(size) == os.fsencode(backing)
    except FileNotFoundError:
        return False


def remove_overlay(path: str, backing: str) -> None:
    """Remove ``path`` if it is the overlay on ``backing`` a snapshot made (a hypervisor's, when live)."""
    if overlay_on(path, backing):
        remove_if_there(path)


@dataclass
class CreateOverlay(Step):
    """A new qcow2 overlay on ``backing``: the external snapshot's new active file.

    ``qemu-img create`` writes it under ``work``, a hidden name drawn when the plan is made and journaled
    with it, and only then is it linked to ``path`` (a link never replaces a file somebody else made
    there). So whatever state qemu-img died in, the file is provably this step's: by its journaled name
    until it is whole, by being the same file as ``work`` once linked.
    """

    programs = (qemuimg.QEMU_IMG,)
    path: str
    backing: str
    backing_format: str
    work: str = ""
    size: int | None = None  # the backing file's virtual size, if known (qemu-img then need not open it)

    def __post_init__(self):
        self.work = self.work or work_name(self.path)

    def do(self, ctx):
        os.close(os.open(self.work, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # guest data: owner only
        qemuimg.create_overlay(self.work, self.backing, self.backing_format, self.size)
        os.link(self.work, self.path)
        os.unlink(self.work)
        fsync_dir(os.path.dirname(self.path))  # the overlay's name is there before the journal says so

    def undo(self, ctx):
        if self._ours():
            remove_if_there(self.path)
        if os.path.lexists(self.work):  # unlink on a read-only filesystem fails even for a missing name
            remove_if_there(self.work)

    def _ours(self) -> bool:
        """Whether the file at ``path`` is this step's, so an undo after ``do`` found the name taken never
        removes somebody else's file: while ``work`` is there, only if it is the same file; after ``do``
        removed ``work``, only the whole overlay on ``backing`` that ``do`` leaves."""
        if os.path.lexists(self.work):
            return same_file(self.work, self.path)
        return overlay_on(self.path, self.backing)

    def describe(self):
        return f"create overlay {self.path} on {self.backing}"

    def argv(self):
        return qemuimg.create_overlay_argv(self.path, self.backing, self.backing_format, self.size)


@dataclass
class CreateOverlays(Step):
    """Overlays of several disks (a linked clone's, a live snapshot's made before it), one
    :class:`CreateOverlay` each (its arguments as a list: ``[path, backing, backing_format, work]`` and
    perhaps ``size``), their ``qemu-img create`` runs side by side: each run is mostly qemu-img starting,
    so N disks cost about one. Undo undoes each (idempotent, as theirs)."""

    programs = (qemuimg.QEMU_IMG,)
    overlays: list

    def _each(self) -> list[CreateOverlay]:
        return [CreateOverlay(*o) for o in self.overlays]

    def do(self, ctx):
        from concurrent.futures import ThreadPoolExecutor  # here: a plain snapshot needs none

        # a run's PDEATHSIG follows its forking thread, which lives until its program has ended
        with ThreadPoolExecutor(len(self.overlays), thread_name_prefix="snapfw-overlay") as pool:
            for done in [pool.submit(step.do, ctx) for step in self._each()]:
                done.result()

    def undo(self, ctx):
        for step in self._each():
            step.undo(ctx)

    def describe(self):
        together = " (side by side)" if len(self.overlays) > 1 else ""
        return "; ".join(step.describe() for step in self._each()) + together


@dataclass
class TagStep(Step):
    """A ``qemu-img snapshot`` on tag ``tag`` of qcow2 file ``path``, which it writes."""

    programs = (qemuimg.QEMU_IMG,)
    option = ""  # qemu-img snapshot's -c (create), -a (apply) or -d (delete): what --dry-run shows it run
    path: str
    tag: str

    def writes(self):
        return [self.path]

    def argv(self):
        return qemuimg.snapshot_argv(self.option, self.path, self.tag)


@dataclass
class CreateTag(TagStep):
    """An internal snapshot (tag) inside a qcow2 file."""

    option = "-c"

    def do(self, ctx):
        qemuimg.snapshot("-c", self.path, self.tag)

    def undo(self, ctx):
        _delete_tag(self.path, self.tag)
        _release_leaks(self.path)

    def describe(self):
        return f"create internal snapshot {self.tag!r} in {self.path}"


@dataclass
class ApplyTag(TagStep):
    """Revert a qcow2 file to a tag, first saving its current state as ``keep`` so undo can restore it."""

    option = "-a"
    keep: str

    def do(self, ctx):
        if self.keep not in qemuimg.tags(self.path):
            qemuimg.snapshot("-c", self.path, self.keep)
        qemuimg.snapshot("-a", self.path, self.tag)

    def undo(self, ctx):
        if self.keep in qemuimg.tags(self.path):
            qemuimg.snapshot("-a", self.path, self.keep)
            qemuimg.snapshot("-d", self.path, self.keep)
        _release_leaks(self.path)

    def describe(self):
        return f"revert {self.path} to internal snapshot {self.tag!r} (current state kept as {self.keep!r} until done)"


@dataclass
class ApplyTagForward(TagStep):
    """Revert a qcow2 file to a tag for good: a finish step, for a revert that has no other disk to keep in
    step with. Applying a tag again leaves what applying it once does, so after a crash `check --repair`
    applies it again, then releases the clusters a run cut short left counted."""

    option = "-a"

    def do(self, ctx):
        qemuimg.snapshot("-a", self.path, self.tag)
        if self.resumed:
            _release_leaks(self.path)

    def describe(self):
        return f"revert {self.path} to internal snapshot {self.tag!r}"


@dataclass
class DeleteTag(TagStep):
    option = "-d"

    def do(self, ctx):
        # a whole run leaves no cluster counted for nothing; one cut short may have dropped the tag but
        # not its clusters' counts
        if not _delete_tag(self.path, self.tag):
            _release_leaks(self.path)

    def describe(self):
        return f"delete internal snapshot {self.tag!r} from {self.path}"


@dataclass
class Commit(Step):
    """Write ``top``'s data into its backing file (which then reads as ``top`` did)."""

    programs = (qemuimg.QEMU_IMG,)
    top: str
    top_format: str
    base: str
    bytes_to_copy: int = 0

    def do(self, ctx):
        if os.path.exists(self.top):  # gone: a previous run finished and removed it
            qemuimg.commit(self.top, self.top_format, progress=ctx.progress)

    def writes(self):
        return [self.top, self.base]  # qemu-img commit empties the top file

    def describe(self):
        return f"commit {self.top} into {self.base} ({self.bytes_to_copy} bytes)"

    def argv(self):
        return qemuimg.commit_argv(self.top, self.top_format)


@dataclass
class Rebase(Step):
    """Point ``path`` at a new backing file; safe mode first copies what the old chain supplied."""

    programs = (qemuimg.QEMU_IMG,)
    path: str
    format: str
    backing: str | None
    backing_format: str | None
    unsafe: bool = False
    bytes_to_copy: int = 0

    def do(self, ctx):
        if os.path.exists(self.path):
            qemuimg.rebase(self.path, self.format, self.backing, self.backing_format, self.unsafe,
                           progress=None if self.unsafe else ctx.progress)

    def writes(self):
        return [self.path]

    def describe(self):
        onto = self.backing or "no backing file (standalone)"
        how = "relink" if self.unsafe else f"stream ({self.bytes_to_copy} bytes)"
        return f"{how} {self.path} onto {onto}"

    def argv(self):
        return qemuimg.rebase_argv(self.path, self.format, self.backing, self.backing_format, self.unsafe)


@dataclass
class RemoveFile(Step):
    """Remove an image nothing references any more (only ever a file snapfw created)."""

    path: str

    def do(self, ctx):
        remove_if_there(self.path)
        fsync_dir(os.path.dirname(self.path))  # gone for good before the journal says so

    def writes(self):
        return [self.path]

    def describe(self):
        return f"remove {self.path}"

    def argv(self):
        return ["rm", "--", self.path]


@dataclass
class DefineDomain(Step):
    """Make the hypervisor's definition of the domain name the new active files (undo: the old ones)."""

    new: dict
    old: dict

    def do(self, ctx):
        ctx.driver.define(self.new)

    def undo(self, ctx):
        ctx.driver.define(self.old)

    def describe(self):
        files = ", ".join(f"{d['target']}={d['path']}" for d in self.new["disks"])
        config = " with the configuration stored with the snapshot" if "definition" in self.new else ""
        return f"point domain {self.new['name']} at {files}{config}"
