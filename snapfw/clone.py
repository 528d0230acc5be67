"""Clones: new domains whose disks start as one snapshot's disk state, and detaching them again.

A linked clone's disk is a qcow2 overlay on a shared base: the snapshot's frozen image (external
records), or for an internal snapshot (a tag, which no overlay can read through) a read-only copy of the
tag (``qemu-img convert -l``) made once per tag and disk and shared by every clone of it. A full clone's
disk is a standalone sparse copy (``qemu-img convert``). Each clone is its own plan: the driver defines
the new domain in it, and its catalog changes (its files, one ``clone_bases`` row per disk: the base's
reference count) commit in one transaction, so a run of N interrupted anywhere leaves the clones before
complete and the one in progress for ``check --repair`` to roll back. While a base has rows, the gold
domain keeps it and everything it reads through unwritten (lifecycle pins them; deleting the snapshot is
refused naming the clones); ``detach`` streams the base into the clone and drops its row.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

from .backend import HypervisorDriver
from .connection import fsync_dir
from .errors import BadInput, Inconsistent, NotSupported, Refused
from .lifecycle import RUNS_ON, Operation, Reporter, Session, file_identity, find_snapshot
from .model import ImageFile
from .names import check_name, fit_file_name
from .plan import Plan, Step, execute
from .steps import CreateOverlay, CreateOverlays, RemoveFile, remove_if_there, same_file, work_name
from .tools import qemuimg

MAX_CLONES = 1000
NUMBER = "{n}"


@dataclass
class CopyImage(Step):
    """A standalone sparse copy at ``path`` of ``source`` as its chain reads, or of its internal snapshot
    ``tag``. Written under ``work`` (a hidden name journaled with the plan) and linked to ``path``;
    ``work`` stays until the plan's finish removes it, so an undo can always prove ``path`` is this copy."""

    programs = (qemuimg.QEMU_IMG,)
    path: str
    source: str
    source_format: str
    format: str
    tag: str | None = None
    bytes_to_copy: int = 0
    work: str = ""

    def __post_init__(self):
        self.work = self.work or work_name(self.path)

    def do(self, ctx):
        os.close(os.open(self.work, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # guest data: owner only
        qemuimg.convert(self.source, self.source_format, self.work, self.format, self.tag, progress=ctx.progress)
        os.link(self.work, self.path)
        fsync_dir(os.path.dirname(self.path))  # the copy's name is there before the journal says so

    def undo(self, ctx):
        if os.path.lexists(self.work):
            if same_file(self.work, self.path):
                remove_if_there(self.path)
            remove_if_there(self.work)

    def describe(self):
        what = f"internal snapshot {self.tag!r} of {self.source}" if self.tag else self.source
        return f"copy {what} to {self.path} ({self.bytes_to_copy} bytes)"

    def argv(self):
        return qemuimg.convert_argv(self.source, self.source_format, self.path, self.format, self.tag)


@dataclass
class DefineClone(Step):
    """The hypervisor's definition of the new domain, a copy of ``source``'s with the clone's disks."""

    source: str
    clone: dict

    def do(self, ctx):
        ctx.driver.define_clone(self.source, self.clone)

    def undo(self, ctx):
        ctx.driver.undefine_clone(self.clone)

    def describe(self):
        files = ", ".join(f"{d['target']}={d['path']}" for d in self.clone["disks"])
        return f"define domain {self.clone['name']} as a copy of {self.source} on {files}"


@dataclass
class UndefineClone(Step):
    """Remove the hypervisor's definition of clone ``clone["name"]`` (a finish step: its catalog entry is
    gone); refuses to go on, keeping its files, when the definition no longer names its disks."""

    clone: dict

    def do(self, ctx):
        ctx.driver.undefine_clone(self.clone)
        if self.clone["name"] in ctx.driver.list_domains():
            raise Inconsistent(f"domain {self.clone['name']} was changed since it was planned to go (its disks "
                               "are not the ones snapfw recorded): its definition and files are kept")

    def describe(self):
        return f"undefine domain {self.clone['name']}"


@dataclass
class StreamBase(Step):
    """Copy into ``path`` everything it reads through shared base ``base``; it then has no backing file.
    Undo relinks it (the data it got is what the base holds)."""

    programs = (qemuimg.QEMU_IMG,)
    path: str
    format: str
    base: str
    base_format: str
    bytes_to_copy: int = 0

    def _backed(self) -> bool:
        return bool(qemuimg.info(self.path, self.format).get("backing-filename"))

    def do(self, ctx):
        if self._backed():
            qemuimg.rebase(self.path, self.format, None, None, progress=ctx.progress)

    def undo(self, ctx):
        if os.path.exists(self.path) and not self._backed():
            qemuimg.rebase(self.path, self.format, self.base, self.base_format, unsafe=True)

    def describe(self):
        return f"stream {self.base} into {self.path} ({self.bytes_to_copy} bytes)"

    def argv(self):
        return qemuimg.rebase_argv(self.path, self.format, None, None)


@dataclass
class Clone:
    """One clone of a run: its name, its plan, and each file it makes with the bytes it needs."""

    name: str
    plan: Plan
    files: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class _Source:
    """What one disk of every clone starts from: ``base`` for linked clones (made by the first clone's
    plan when ``make_base``), else a copy of ``file`` (or its ``tag``)."""

    target: str
    file: str
    format: str
    tag: str | None
    base: str | None = None
    make_base: int = 0  # bytes of the shared copy of a tag still to make, 0 when it exists
    bytes: int = 0      # each clone's new file


def clone_names(pattern: str, count: int) -> list[str]:
    """The names of ``count`` clones: ``pattern`` with ``{n}`` replaced by 1..count."""
    if not 1 <= count <= MAX_CLONES:
        raise BadInput(f"--count {count}: must be from 1 to {MAX_CLONES}")
    if count > 1 and NUMBER not in pattern:
        raise BadInput(f"clone name {pattern!r}: with --count {count} it needs {NUMBER} where the number goes, "
                       f"e.g. {pattern}-{NUMBER}")
    names = [pattern.replace(NUMBER, str(i)) for i in range(1, count + 1)]
    for name in names:
        check_name("clone", name)
    return names


def clone(session: Session, domain: str, snapshot: str, pattern: str, count: int = 1, full: bool = False,
          start: bool = False, dry_run: bool = False) -> list[Clone]:
    """Make ``count`` new domains named from ``pattern`` whose disks read as snapshot ``snapshot`` of
    ``domain``: linked (overlays on shared bases) or ``full`` (sparse copies). Everything is checked before
    the first clone is made; the clones are then made one plan each."""
    check_name("domain", domain)
    check_name("snapshot", snapshot)
    names = clone_names(pattern, count)
    if start and type(session.driver).start is HypervisorDriver.start:
        raise NotSupported(f"driver {session.driver.scheme} cannot start domains (--start)")
    o = Operation(session, domain, "clone")
    with session.lock(o.name):
        o.load()
        snap = find_snapshot(o.tree, o.name, snapshot)
        taken = set(session.driver.list_domains()) | set(session.catalog.domains())
        for name in names:
            if name in taken:
                raise BadInput(f"domain {name} exists already; clones need new names")
        sources = [_source(o, snapshot, r, full) for r in snap.disks]
        clones = [_plan(o, snapshot, name, sources, full, i == 0) for i, name in enumerate(names)]
        _preflight(clones)
        if dry_run:
            return clones
        outer = session.reporter
        label = _Label(f"clone {len(names)} domain(s) from snapshot {snapshot} of {o.name}")
        outer.step(label)
        try:
            for i, c in enumerate(clones):
                session.reporter = _Across(outer, i, len(clones))
                with session.lock(c.name):
                    execute(c.plan, session.catalog, session)
                outer.progress(100 * (i + 1) / len(clones))
                if start:
                    session.driver.start(c.name, paused=False)
        finally:
            session.reporter = outer
    return clones


def _source(o: Operation, snapshot: str, record, full: bool) -> _Source:
    path = record.data.get("file")
    if path not in o.files:
        raise Inconsistent(f"disk {record.target}: snapshot {snapshot}'s file {path} is not in the catalog; "
                           "run `snapfw check`")
    fmt = o.files[path].format
    info = o.inspect(path, fmt)
    s = _Source(record.target, path, fmt, record.data.get("tag"))
    if full:
        s.bytes = qemuimg.measure(path, fmt, fmt, tag=s.tag)
        return s
    s.bytes = qemuimg.measure(None, None, "qcow2", size=info["virtual-size"])
    if s.tag is None:
        for other, target, how, _ in o.users.uses.get(file_identity(path), ()):
            if how == RUNS_ON:  # its guest would write under every clone
                raise Refused(f"snapshot {snapshot}'s file {path} for disk {record.target} is the file domain "
                              f"{other} disk {target} runs on; clones need a base nothing writes")
        s.base = path
        return s
    made = [c["base"] for c in o.s.catalog.clone_bases(gold=o.name)
            if (c["gold_snapshot"], c["gold_target"]) == (snapshot, record.target) and c["base"] in o.files]
    if made:
        s.base = made[0]
    else:
        folder = os.path.dirname(path)
        s.base = _free(folder, f"{o.name}-{record.target}.{snapshot}.clone-base", ".qcow2")
        s.make_base = qemuimg.measure(path, fmt, "qcow2", tag=s.tag)
    return s


def _free(folder: str, stem: str, suffix: str) -> str:
    """``folder/stem[.N]suffix``, the first that does not exist."""
    stem = fit_file_name(stem, 250 - len(os.fsencode(suffix)))
    for n in range(0, 10000):
        path = os.path.join(folder, f"{stem}{'' if n == 0 else f'.{n}'}{suffix}")
        if not os.path.lexists(path):
            return path
    raise Refused(f"no free file name for {stem} in {folder}")


def _plan(o: Operation, snapshot: str, name: str, sources: list[_Source], full: bool, first: bool) -> Clone:
    kind = "full" if full else "linked"
    c = Clone(name, Plan("clone", name, f"{kind} clone {name} of snapshot {snapshot} of {o.name}",
                         journal_at_once=True))  # CopyImage, CreateOverlay(s), DefineClone: undo finds nothing
    disks, overlays = [], []
    for s in sources:
        fmt = s.format if full else "qcow2"
        path = os.path.join(os.path.dirname(s.file),
                            fit_file_name(f"{name}-{s.target}", 240) + (".img" if fmt == "raw" else ".qcow2"))
        if os.path.lexists(path):
            raise BadInput(f"clone {name}: its disk {s.target} would be {path}, which exists already")
        if first and s.make_base:  # the shared copy of the tag, recorded as the gold domain's file
            copy = CopyImage(s.base, s.file, "qcow2", "qcow2", s.tag, s.make_base)
            c.plan.prepare.append(copy)
            c.plan.finish.append(RemoveFile(copy.work))
            c.files.append((s.base, s.make_base))
            c.plan.changes.append(functools.partial(_put, o.name, ImageFile(s.base, s.target, "qcow2", None, True)))
            c.plan.notes.append(f"{s.base} is a read-only copy of internal snapshot {s.tag!r} of {s.file}, "
                                f"shared by every linked clone of snapshot {snapshot}")
        if full:
            copy = CopyImage(path, s.file, s.format, fmt, s.tag, s.bytes)
            c.plan.prepare.append(copy)
            c.plan.finish.append(RemoveFile(copy.work))
        else:
            overlays.append(CreateOverlay(path, s.base, "qcow2" if s.tag else s.format))
            c.plan.changes.append(functools.partial(_link, name, s.target, s.base, o.name, snapshot))
        c.plan.changes.append(functools.partial(_put, name, ImageFile(path, s.target, fmt, s.base, True)))
        c.files.append((path, s.bytes))
        disks.append({"target": s.target, "path": path, "format": fmt})
    if len(overlays) > 1:
        c.plan.prepare.append(CreateOverlays([[v.path, v.backing, v.backing_format, v.work] for v in overlays]))
    else:
        c.plan.prepare += overlays
    left_out = sorted({d.target for d in o.domain.disks} - {s.target for s in sources})
    if left_out:
        c.plan.notes.append(f"disks {', '.join(left_out)} were added after snapshot {snapshot}: the clone has none")
    c.plan.prepare.append(DefineClone(o.name, {"name": name, "disks": disks}))
    c.plan.changes.append(functools.partial(_mark_clone, name, o.name, snapshot, full))
    return c


def _mark_clone(clone, gold, snapshot, full, changes):
    changes.add_clone(clone, gold, snapshot, full)


def _put(domain, f, changes):
    changes.put_file(domain, f)


def _link(clone, target, base, gold, snapshot, changes):
    changes.add_clone_base(clone, target, base, gold, snapshot, target)


def _preflight(clones: list[Clone]):
    """Refuse a run whose new files do not fit where they go (``qemu-img measure``), before any change."""
    need: dict[str, int] = {}
    for c in clones:
        for path, size in c.files:
            need[os.path.dirname(path)] = need.get(os.path.dirname(path), 0) + size
    for folder, size in sorted(need.items()):
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
        if size > free:
            raise BadInput(f"{folder} has {free} bytes free; the clones need {size} there (qemu-img measure)")


class _Label:
    """What the progress bar across a run of clones is labelled with."""

    def __init__(self, text):
        self.text = text

    def describe(self):
        return self.text


class _Across(Reporter):
    """The reporter of clone ``done`` of ``total``: its copies' progress moves the one bar of the run."""

    def __init__(self, outer: Reporter, done: int, total: int):
        self.outer, self.done, self.total = outer, done, total

    def progress(self, percent):
        self.outer.progress(100 * (self.done + percent / 100) / self.total)

    def waiting(self, domain):
        self.outer.waiting(domain)

    def warn(self, message):
        self.outer.warn(message)


def detach(session: Session, name: str, dry_run: bool = False) -> Plan:
    """Make linked clone ``name`` standalone: stream each shared base into the clone's file that reads
    through it, and drop the base's reference in the same transaction."""
    o = Operation(session, name, "detach")
    with session.lock(o.name):
        o.load()
        rows = session.catalog.clone_bases(clone=o.name)
        if not rows:
            raise BadInput(f"domain {o.name} is not a linked clone: none of its disks reads through a shared base")
        o.start([d for d in o.domain.disks if d.target in {r["target"] for r in rows}])
        plan = Plan("detach", o.name, f"detach {o.name} from its shared bases")
        for row in rows:
            path = next((p for p, f in o.files.items() if f.target == row["target"] and f.backing == row["base"]), None)
            if path is None:
                raise Inconsistent(f"disk {row['target']} of {o.name}: no file of it reads through its shared base "
                                   f"{row['base']}; run `snapfw check`")
            f = o.files[path]
            info = o.inspect(path, f.format)
            if info.get("snapshots"):
                raise Refused(f"cannot detach disk {f.target}: {path} holds internal snapshots that read through "
                              f"{row['base']}; streaming would change them. Delete them first")
            if path in o.pinned:
                raise Refused(f"cannot detach disk {f.target}: other domains read through {path} (clones of this "
                              "clone); detach them first")
            cost = sum(e["length"] for e in qemuimg.map_extents(path, f.format) if e["depth"] > 0 and e["data"])
            plan.prepare.append(StreamBase(path, f.format, row["base"], info["backing-filename-format"], cost))
            plan.changes.append(functools.partial(_put, o.name, ImageFile(path, f.target, f.format, None, f.owned)))
            plan.changes.append(functools.partial(_unlink, o.name, f.target))
        if not dry_run:
            execute(plan, session.catalog, session)
        return plan


def _unlink(clone, target, changes):
    changes.remove_clone_base(clone, target)


def delete_clone(session: Session, name: str, snapshots: bool = False, dry_run: bool = False) -> Plan:
    """Remove domain ``name``, which `snapfw clone` made: its definition, every file snapfw made for it and
    its catalog entries, with its references on shared bases, in one transaction before the forward-only
    removals. Refused for any other domain, a running one, one whose files other domains read through,
    and, unless ``snapshots``, one that has snapshots."""
    o = Operation(session, name, "clone-delete")
    with session.lock(o.name):
        origin = session.catalog.clone_origin(o.name)
        if origin is None:
            raise BadInput(f"domain {o.name} was not made by `snapfw clone`; snapfw removes only domains it made")
        if session.driver.domain(o.name).running:
            raise Refused(f"clone {o.name} is running; shut it down first")
        o.load()
        if len(o.tree) and not snapshots:
            raise Refused(f"clone {o.name} has {len(o.tree)} snapshot(s) ({', '.join(s.name for s in o.tree)}); "
                          "delete them first, or pass --snapshots to remove them with it")
        readers = sorted({c for c, f in session.catalog.placements() if c != o.name and f.backing in o.files})
        if readers:
            raise Refused(f"domains {', '.join(readers)} read through files of clone {o.name}; detach or delete "
                          "them first")
        for disk in o.domain.disks:
            o.inspect.chain(disk.path, disk.format)  # the catalog agrees with the images before anything goes
        plan = Plan("clone-delete", o.name, f"delete clone {o.name} of snapshot {origin['gold_snapshot']} of "
                                             f"{origin['gold_domain']} with its files")
        plan.changes.append(lambda ch: ch.remove_domain(o.name))
        plan.finish.append(UndefineClone({"name": o.name, "disks": [d.as_dict() for d in o.domain.disks]}))
        for path, f in sorted(o.files.items()):
            if f.owned:
                plan.finish.append(RemoveFile(path))
            else:
                plan.notes.append(f"{path} is not snapfw's file: it is left where it is")
        for disk in o.domain.disks:
            if disk.path not in o.files:
                plan.notes.append(f"disk {disk.target}'s {disk.path} is not snapfw's file: it is left where it is")
        if not dry_run:
            execute(plan, session.catalog, session)
        return plan
