"""Create, revert, delete, check: each builds a Plan from a request, then runs it under the domain lock.

Everything that can be refused is refused while building the plan, before the first step runs: names,
the domain and snapshot, the backends, the real image chains (``qemu-img info --backing-chain``, which
also fails on an image a running QEMU holds), and the agreement between those chains and the catalog.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time

from . import config, connection, freezehooks, memory, plugins
from .backend import (LIVE_CREATE, LIVE_DELETE, MEMORY_KINDS, MIRROR, OFFLINE_CREATE, DiskGraph, DiskOp,
                      HypervisorDriver)
from .catalog import FILENAME as CATALOG_FILE
from .catalog import Catalog
from .errors import (BadInput, ImageInUse, Inconsistent, NotSupported, PluginError, Refused, SnapfwError,
                     UnknownDomain)
from .live import (AGENT_SECONDS, EXTERNAL, FREEZE_SECONDS, PAUSE_SECONDS, LiveSnapshot, Pause, StartDomain,
                   StopDomain, held, window, window_seconds)
from .model import Disk, DiskRecord, Domain, ImageFile, MemoryRecord, Snapshot, Tree, find_snapshot
from .names import check_name
from .plan import Plan, execute, recover
from .steps import CreateOverlays, DefineDomain, DeleteTag, RemoveFile, work_name
from .tools import procs, qemuimg
from .tools.host import Host, open_host
from .tools.run import require


class Reporter:
    """Where a session tells what it is doing; the CLI draws progress bars or JSON lines from it."""

    def step(self, step):
        pass

    def progress(self, percent: float):
        pass

    def waiting(self, domain: str):
        pass

    def warn(self, message: str):
        pass


class Session:
    """An open connection: its driver, its catalog, its reporter. Also the context steps run with."""

    def __init__(self, uri: str | None = None, state_dir: str | None = None, lock_timeout: float = 30.0,
                 reporter: Reporter | None = None):
        self.uri = connection.resolve_uri(uri)
        self._state_override = state_dir
        self.lock_timeout = lock_timeout
        self.reporter = reporter or Reporter()

    @functools.cached_property
    def driver_class(self) -> type[HypervisorDriver]:
        scheme = self.uri.partition("://")[0]
        drivers = plugins.hypervisor_drivers()
        if scheme not in drivers:
            raise BadInput(f"no hypervisor driver for {scheme}:// (have: {', '.join(sorted(drivers))})")
        cls = drivers[scheme][0]
        if not connection.state_override(self._state_override):
            connection.remember_state_dir(self.uri, cls.state_dir)
            kept, used = connection.state_dir(self.uri, cls.state_dir), self.__dict__.get("state")
            if used is not None and used != kept:
                raise PluginError(f"the {scheme} driver keeps the catalog of {self.uri} in {kept}, not in {used} "
                                  "as snapfw had noted; the note is corrected: run the command again")
        return cls

    @functools.cached_property
    def driver(self) -> HypervisorDriver:
        return self.driver_class(self.uri)

    @functools.cached_property
    def state(self) -> str:
        """The state directory (catalog, locks): the user's choice, else where the driver keeps it, as
        noted by the last session that loaded the driver (reading needs no plugin), else from the driver."""
        return (connection.state_override(self._state_override) or connection.known_state_dir(self.uri)
                or connection.state_dir(self.uri, self.driver_class.state_dir))

    def _confirmed_state(self) -> str:
        """The state directory as the driver says (not only as noted): what changes is changed there."""
        self.driver_class
        return self.state

    @functools.cached_property
    def catalog(self) -> Catalog:
        # one that exists is opened where the note says (so reading needs no plugin); a new one is made
        # only where the driver says
        noted = os.path.exists(os.path.join(self.state, CATALOG_FILE))
        return Catalog.open(self.state if noted else self._confirmed_state())

    def close(self):
        """Close the catalog if it was opened: its last connection checkpoints and removes the WAL file, so
        the catalog is one file again (a process may end without tearing its objects down)."""
        if "catalog" in self.__dict__:
            self.catalog.close()

    @functools.cached_property
    def host(self) -> Host:
        """Where disks that are not local files live ($SNAPFW_HOST): steps find it here again on repair."""
        return open_host()

    def step(self, step):
        self.reporter.step(step)

    def progress(self, percent):
        self.reporter.progress(percent)

    def lock(self, domain: str):
        return connection.domain_lock(self._confirmed_state(), domain, self.lock_timeout, self.reporter.waiting)


# --- reading the world ---------------------------------------------------------------------------------
class Inspector:
    """``qemu-img info --backing-chain``'s view (:func:`qemuimg.chain`) once per file, refusing chains that
    leave the allowed roots, that let qemu guess a backing format, or that disagree with the catalog."""

    def __init__(self, roots, files: dict[str, ImageFile], in_use=None, live=None):
        """``in_use(path)``, for reports only: called for an image a running QEMU holds, which is then
        read with ``-U`` (advisory, rule 1) instead of raising ImageInUse. ``live``: path -> chain as a
        running hypervisor reports it (:attr:`Domain.live_chains`), checked here like qemu-img's."""
        self.roots = [os.path.realpath(r) for r in roots]
        self.files = files
        self.in_use = in_use
        self.live = live or {}
        self.cache: dict[str, list[dict]] = {}
        self.folders: dict[str, str] = {}  # folder -> its real path: a chain's files share a few

    def __call__(self, path: str, fmt: str) -> dict:
        return self.chain(path, fmt)[0]

    def chain(self, path: str, fmt: str) -> list[dict]:
        """The image and each file below it, top first."""
        if path not in self.cache:
            try:
                chain = self.live.get(path) or qemuimg.chain(path, fmt)
            except ImageInUse:
                if self.in_use is None:
                    raise
                self.in_use(path)
                chain = qemuimg.info(path, fmt, chain=True, shared=True)
            for node in chain:
                self._check_node(path, node)
            self.cache[path] = chain
        return self.cache[path]

    def _inside(self, name: str) -> bool:
        folder, base = os.path.split(name)
        if base in ("", ".", "..") or os.path.islink(name):
            real = os.path.realpath(name)
        else:  # realpath's answer, resolving each folder once
            if folder not in self.folders:
                self.folders[folder] = os.path.realpath(folder or os.curdir)
            real = os.path.join(self.folders[folder], base)
        return any(real == r or real.startswith(r.rstrip("/") + "/") for r in self.roots)

    def _check_node(self, top: str, node: dict):
        here = node["filename"]
        names = [("image", here)]
        for key in ("backing-filename", "full-backing-filename"):
            if node.get(key):
                names.append(("backing file", node[key]))
        data_file = node.get("format-specific", {}).get("data", {}).get("data-file")
        if data_file:
            names.append(("data file", data_file))
        for what, name in names:
            if name.startswith("json:"):
                raise BadInput(f"{top}: {what} {name[:60]!r} is a json: name; snapfw refuses those")
            resolved = os.path.join(os.path.dirname(here), name)
            if self.roots and not self._inside(resolved):
                raise BadInput(f"{top}: {what} {name} is outside the allowed directories "
                               f"({', '.join(self.roots)})")
        if node.get("backing-filename") and not node.get("backing-filename-format"):
            raise BadInput(f"{here} has a backing file but no recorded backing format; snapfw never lets "
                           f"qemu guess it (record it with: qemu-img rebase -u -f {node.get('format')} "
                           f"-b {node['backing-filename']} -F FORMAT {here})")
        known = self.files.get(here)
        if known is not None:
            actual = _backing_of(here, node)
            if actual != known.backing or node.get("format") != known.format:
                raise Inconsistent(f"catalog and disk disagree: the catalog has {here} as {known.format} on "
                                   f"{known.backing or 'nothing'}, the image is {node.get('format')} on "
                                   f"{actual or 'nothing'}; changes are refused until they agree again "
                                   "(`snapfw check` lists every difference)")


def _backing_of(path: str, info: dict) -> str | None:
    name = info.get("full-backing-filename") or info.get("backing-filename")
    return os.path.normpath(os.path.join(os.path.dirname(path), name)) if name else None


def file_identity(path: str):
    """What makes two names one file: its device and inode (symlinks, hard links, other spellings), or
    for a file that does not exist its real path."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return st.st_dev, st.st_ino


def _read_domain(driver, name: str) -> Domain:
    """The driver's definition of ``name``, refused if two of its disks are one file: each disk's
    snapshots would freeze, tag or merge the same image behind the other's back."""
    domain = driver.domain(name)
    seen: dict = {}
    for disk in domain.disks:
        first = seen.setdefault(file_identity(disk.path), disk)
        if first is not disk:
            also = "" if first.path == disk.path else f" (also named {disk.path})"
            raise BadInput(f"domain {name}: disks {first.target} and {disk.target} are one image file, "
                           f"{first.path}{also}; give each disk its own image")
    return domain


RUNS_ON, RECORDS, READS_THROUGH = "runs on it", "has it in the catalog", "reads through it"


class ImageUsers:
    """Which disk of which domain uses each image file, keyed by the file itself (:func:`file_identity`):
    the file each disk runs on, from the driver; the files the catalog records for each disk, and the
    files those read through."""

    def __init__(self, driver, placements: list[tuple[str, ImageFile]], unreadable=None, read=None):
        """``unreadable(name, error)`` is told of a domain the driver cannot read (its disks are unknown);
        ``read``: name -> Domain the caller has just read from the driver, not asked for again."""
        self.uses: dict = {}
        for name in driver.list_domains():
            try:
                disks = ([(d.target, d.path) for d in read[name].disks] if name in (read or {})
                         else driver.disk_files(name))
            except SnapfwError as e:
                if unreadable is not None:
                    unreadable(name, e)
                continue
            for target, path in disks:
                self._add(path, name, target, RUNS_ON)
        for name, f in placements:
            self._add(f.path, name, f.target, RECORDS)
            if f.backing:
                self._add(f.backing, name, f.target, READS_THROUGH)

    def _add(self, path, domain, target, how):
        self.uses.setdefault(file_identity(path), []).append((domain, target, how, path))

    def conflict(self, domain: str, target: str, active: str | None, recorded=(), chain=()) -> str | None:
        """Why disk ``target`` of ``domain`` shares a file it must have to itself, or None.

        Nothing else may use ``active`` (the file the disk runs on, which its guest writes). No other disk
        may run on or record a file of ``recorded`` (the files snapfw keeps for this disk: it freezes,
        tags, merges and removes them). No other disk may run on a file of ``chain`` (what ``active``
        reads through). Reading through one base, and reading through a base one disk records, are
        what shared (gold) bases are: those stay allowed.
        """
        seen = set()
        rules = ([(active, RUNS_ON, (RUNS_ON, RECORDS, READS_THROUGH))] if active else [])
        rules += [(p, RECORDS, (RUNS_ON, RECORDS)) for p in sorted(recorded)]
        rules += [(p, READS_THROUGH, (RUNS_ON,)) for p in chain]
        for path, ours, refused in rules:
            key = file_identity(path)
            if key in seen:
                continue
            seen.add(key)
            for other, other_target, how, name in self.uses.get(key, ()):
                if (other, other_target) != (domain, target) and how in refused:
                    also = "" if name == path else f", as {name}"
                    return (f"{path} is used by domain {domain} (disk {target} {ours}) and by domain "
                            f"{other} (disk {other_target} {how}{also}); an image belongs to one disk, others "
                            "may only read through it as a shared base: give each disk its own image or overlay")
        return None


def _pinned(domain: str, placements: list[tuple[str, ImageFile]]) -> set[str]:
    """The files of ``domain`` that other domains' images read through (shared bases, linked clones' gold
    images), and every file those read through in turn: none of them may be written or removed."""
    mine = {f.path: f for d, f in placements if d == domain}
    pinned, todo = set(), [f.backing for d, f in placements if d != domain and f.backing]
    while todo:
        path = todo.pop()
        if path not in pinned:
            pinned.add(path)
            if path in mine and mine[path].backing:
                todo.append(mine[path].backing)
    return pinned


def _graph(disk: Disk, tree: Tree, files: dict[str, ImageFile], garbage, pinned, inspect) -> DiskGraph:
    mine = {p: f for p, f in files.items() if f.target == disk.target}
    records = {}
    for snap in tree:
        r = snap.record(disk.target)
        if r is not None:
            records[snap.name] = dict(r.data)
    info = inspect(disk.path, disk.format)
    if not mine:
        mine = {disk.path: ImageFile(disk.path, disk.target, disk.format, _backing_of(disk.path, info), False)}
    else:
        problem = _active_problem(disk, mine)
        if problem:
            raise Inconsistent(f"{problem}; run `snapfw check`")
    lost = sorted(n for n, r in records.items() if r.get("file") not in mine)
    if lost:  # a backend would fail far away on it
        raise Inconsistent(f"disk {disk.target}: snapshot {lost[0]}'s file {records[lost[0]].get('file')} is not "
                           "in the catalog; run `snapfw check`")
    return DiskGraph(disk.target, disk.path, disk.format, mine, records,
                     {(p, t) for p, t in garbage if p in mine}, frozenset(pinned))


def _active_problem(disk: Disk, mine: dict[str, ImageFile]) -> str | None:
    """Why the file the domain runs ``disk`` on cannot be the active file snapfw recorded, or None."""
    if disk.path not in mine:
        return f"disk {disk.target} now runs on {disk.path}, a file the catalog does not know for it"
    overlays = sorted(p for p, f in mine.items() if f.backing == disk.path)
    if overlays:  # the guest would write under them (rule 3), and their own branch would look unused
        return f"disk {disk.target} now runs on {disk.path}, the backing file of {', '.join(overlays)}"
    if mine[disk.path].format != disk.format:
        return (f"disk {disk.target}: the domain declares {disk.path} as {disk.format}, the catalog has it "
                f"as {mine[disk.path].format}")
    return None


def _backend(name: str):
    backends = plugins.disk_backends()
    if name not in backends:
        raise PluginError(f"backend {name!r} is not installed (have: {', '.join(sorted(backends))})")
    return backends[name][0]()


def _pick_backend(disk: Disk, tree: Tree, wanted: str | None, capability: str = OFFLINE_CREATE):
    """--disk flag, else the domain file, else the backend of the disk's current snapshot, else the best;
    only a backend with ``capability`` (live.create for a running domain)."""
    backends = plugins.disk_backends()
    choice = wanted or disk.backend
    if choice is not None and choice not in backends:
        named = f"--disk {disk.target}={choice}" if wanted else f"disk {disk.target} in the domain's definition"
        raise BadInput(f"{named}: backend {choice!r} is not installed (have: {', '.join(sorted(backends))})")
    if choice is None and tree.current:
        r = tree.by_name[tree.current].record(disk.target)
        choice = r.backend if r else None
        if choice and (choice not in backends or backends[choice][0]().usable(disk)
                       or capability not in backends[choice][0].capabilities):
            choice = None
    if choice is None:
        usable = sorted((cls.priority, n) for n, (cls, _) in backends.items()
                        if capability in cls.capabilities and cls().usable(disk) is None)
        if not usable:
            raise NotSupported(f"no installed backend can snapshot disk {disk.target} ({disk.format})"
                               + (" while the domain runs" if capability == LIVE_CREATE else ""))
        choice = usable[0][1]
    backend = _backend(choice)
    why = backend.usable(disk)
    if why:
        raise NotSupported(f"backend {choice} cannot snapshot disk {disk.target}: {why}")
    if capability not in backend.capabilities:
        why = " (the domain runs)" if capability == LIVE_CREATE else ""
        raise NotSupported(f"backend {choice} cannot snapshot disk {disk.target}: it has no {capability}{why}")
    return backend


# --- building and running plans ------------------------------------------------------------------------
class Operation:
    """The shared frame of every changing operation on one domain."""

    def __init__(self, session: Session, domain: str, operation: str, options: dict | None = None):
        self.s = session
        self.name = check_name("domain", domain)
        self.operation = operation
        self.options = options or {}
        self.quiesce = False  # create: freeze the guest's filesystems around the snapshot
        self.window_seconds = (PAUSE_SECONDS, FREEZE_SECONDS)  # deadlines of the pause and the freeze

    def load(self):
        s = self.s
        plans = s.catalog.unfinished_plans(self.name)
        if plans:
            raise Inconsistent(f"an interrupted {plans[0]['operation']} of {self.name} is unfinished; "
                               "run `snapfw check --repair` first")
        self.domain = _read_domain(s.driver, self.name)
        self.ran = self.domain.running  # a revert plans on the domain as it will be once stopped
        live = f"live.{self.operation}"
        if self.domain.running and live not in type(s.driver).capabilities:
            raise NotSupported(f"domain {self.name} is {self.domain.state}: the {type(s.driver).scheme} driver cannot "
                               f"{self.operation} snapshots of a running domain yet (shut it down first)")
        self.tree = s.catalog.tree(self.name)
        self.files = s.catalog.files(self.name)
        self.garbage = s.catalog.garbage_tags(self.name)
        placements = s.catalog.placements()
        self.pinned = _pinned(self.name, placements)
        self.users = ImageUsers(s.driver, placements, lambda other, e: s.reporter.warn(
            f"domain {other} cannot be read ({e}); images it runs on are not compared with {self.name}'s"),
            {self.name: self.domain})
        self.inspect = Inspector(self.domain.allowed_roots, self.files, live=self.domain.live_chains)

    def start(self, disks, backends: dict | None = None) -> list[DiskOp]:
        """One DiskOp per disk, remembering each graph as it was so the plan can store the difference.
        ``backends``: target -> the backend at work on it; one without ``local_files`` checks its disk."""
        self.ops, self.befores, self.shared = [], {}, {}
        for disk in disks:
            backend = (backends or {}).get(disk.target)
            if backend is not None and not backend.local_files:
                self._start_remote(disk, backend)
                continue
            if not os.path.exists(disk.path):
                if disk.path in self.files:
                    raise Inconsistent(f"disk {disk.target}: {disk.path} is in the catalog but missing on disk; "
                                       "run `snapfw check`")
                raise BadInput(f"disk {disk.target}: {disk.path}, named by the domain's definition, does not exist")
            recorded = [p for p, f in self.files.items() if f.target == disk.target]
            chain = [node["filename"] for node in self.inspect.chain(disk.path, disk.format)]
            self._refuse_sharing(disk.target, disk.path, recorded, chain)
            graph = _graph(disk, self.tree, self.files, self.garbage, self.pinned, self.inspect)
            before = graph.copy()
            if not any(f.target == disk.target for f in self.files.values()):
                before.files = {}  # first snapshot of this disk: its image is new to the catalog
            self.befores[disk.target] = before
            self.ops.append(self._op(disk, graph))
        for op in self.ops:
            op.alone = len(self.ops) == 1
        return self.ops

    def _start_remote(self, disk: Disk, backend):
        """A disk on the connection's host (a block device there): the backend checks it, qemu-img never
        opens it, and it reads through nothing."""
        backend.check_disk(self.s.host, disk)
        recorded = [p for p, f in self.files.items() if f.target == disk.target]
        self._refuse_sharing(disk.target, disk.path, recorded, [disk.path])
        graph = _graph(disk, self.tree, self.files, self.garbage, self.pinned, lambda path, fmt: {})
        before = graph.copy()
        if not recorded:
            before.files = {}
        self.befores[disk.target] = before
        self.ops.append(self._op(disk, graph))

    def _op(self, disk: Disk, graph: DiskGraph) -> DiskOp:
        return DiskOp(self.domain, disk, graph, self.tree, self.inspect, self.s.host, self.options, self.shared)

    def _refuse_sharing(self, target: str, active: str | None, recorded, chain=()):
        problem = self.users.conflict(self.name, target, active, recorded, chain)
        if problem:
            raise Refused(problem)

    def assemble(self, summary: str, definition: dict | None = None) -> Plan:
        """The plan of the operation's disks; ``definition``: a domain configuration (driver's form) to put
        back with the new active files."""
        plan = Plan(self.operation, self.name, summary)
        plan.notes += self.domain.notes
        for op in self.ops:  # the files the backends add, as the catalog will record them
            added = op.graph.files.keys() - self.befores[op.disk.target].files.keys()
            self._refuse_sharing(op.disk.target, None, added)
        collect = []
        for op in self.ops:
            plan.prepare += op.prepare
            plan.finish += op.finish
            plan.notes += op.notes
            collect += _collect(op.graph, plan.notes, frozenset(self.domain.live_chains))
        live = [a for op in self.ops for a in op.live]
        hosted = [s for op in self.ops for s in op.window]
        made = [a for a in live if a["kind"] == EXTERNAL] if type(self.s.driver).reuses_overlays else []
        if made:  # before the window: the guest is not held while qemu-img runs
            plan.prepare.append(CreateOverlays([[a["overlay"], a["file"], a["format"], work_name(a["overlay"]),
                                                 qemuimg.virtual_size(a["file"], a["format"])] for a in made]))
        # every disk's live action in one atomic step, after the disks' own preparations; with host steps
        # of other disks, all of it paused at one instant
        plan.prepare += window(self.name, ([LiveSnapshot(self.name, live)] if live else []) + hosted,
                               pause=bool(hosted) and self.domain.state == RUNNING, freeze=self.quiesce,
                               seconds=self.window_seconds)
        old = {"name": self.domain.name, "disks": [d.as_dict() for d in self.domain.disks]}
        new = {"name": self.domain.name, "disks": [dict(d) for d in old["disks"]]}
        for op in self.ops:
            entry = next(d for d in new["disks"] if d["target"] == op.disk.target)
            entry["path"], entry["format"] = op.graph.active, op.graph.active_format
        if definition and definition != self.domain.definition:
            old["definition"], new["definition"] = self.domain.definition, definition
        if new != old:
            late = any(op.define_after_finish for op in self.ops)
            (plan.finish if late else plan.prepare).append(DefineDomain(new, old))
        plan.finish += collect
        for op in self.ops:
            plan.changes.append(functools.partial(_store_graph, self.name, self.befores[op.disk.target], op.graph))
        return plan

    def _refuse_held(self, plan: Plan):
        """Refuse a plan that would write or remove a file another QEMU has open (one snapfw does not know:
        a clone reading through it, a qemu-nbd export): QEMU's lock would fail the write only once it is
        tried, possibly after the change is recorded. The domain's own hypervisor (``Domain.pid``) holds
        its images by right; for a running domain whose driver does not say which process that is,
        nothing can be told apart and the check is left to QEMU's locks."""
        if self.ran and self.domain.pid is None:
            return
        for path, holders in sorted(procs.qemu_holders({p for _ph, s in plan.steps() for p in s.writes()}).items()):
            others = [(pid, program) for pid, program in holders if pid != self.domain.pid]
            if others:
                pid, program = others[0]
                raise ImageInUse(f"{path} is open in another QEMU (pid {pid}, {program}); the plan would write or "
                                 "remove it under that process: stop it, or make it let go of the file, first")

    def run(self, plan: Plan, dry_run: bool, pre, post: functools.partial, done: str, mirror: bool = False):
        """Run ``plan`` between ``pre()`` and ``post``, a post hook with its arguments; ``done`` says what
        the plan made, for the warning of a post hook that fails. ``mirror``: the plan makes a mirrored
        snapshot (the tree may have some already)."""
        plugins.hook().snapfw_plan_built(operation=self.operation, domain=self.domain, plan=plan)
        for program in sorted({p for _phase, step in plan.steps() for p in step.programs}):
            require(program)
        self._refuse_held(plan)
        if dry_run:
            return plan
        pre()
        execute(plan, self.s.catalog, self.s)
        if mirror or any(MIRRORED in s.config for s in self.tree):
            self._mirror(done)
        _after(post.func, post.keywords, self.s.reporter, done)
        return plan

    def _mirror(self, done: str):
        """Bring the driver's own snapshot records in line with the catalog just committed. Best effort,
        after the commit: they are derived from the catalog, so a failure loses nothing and `check
        --repair` redoes it, whereas inside the plan it would roll back (or hold up) the disks' change."""
        try:
            sync_mirror(self.s, self.name, repair=True)
        except SnapfwError as e:
            self.s.reporter.warn(f"{done}, but mirroring its snapshots into the {type(self.s.driver).scheme} "
                                 f"driver's records failed ({e}); the catalog is right: `snapfw check --repair` "
                                 "mirrors them again")


def _after(hook, kwargs: dict, reporter: Reporter, done: str):
    """Call each plugin's implementation of post hook ``hook`` on its own: the change is made, so one that
    raises anything is a warning naming it (never a traceback), and the others still run."""
    pm = plugins.get_plugin_manager()
    for impl in reversed(hook.get_hookimpls()):  # pluggy's order
        try:
            pm.subset_hook_caller(hook.name, [p for p in pm.get_plugins() if p is not impl.plugin])(**kwargs)
        except Exception as e:
            why = e if isinstance(e, SnapfwError) else f"{type(e).__name__}: {e}"
            reporter.warn(f"{done}, but the {hook.name} hook of plugin {impl.plugin_name!r} failed: {why}")


def _collect(graph: DiskGraph, notes: list[str], live: frozenset[str] = frozenset()) -> list:
    """Remove what nothing needs any more: unreferenced leaf files, and pending tags in leaf files.

    A file snapfw did not create is only forgotten, never removed; its pending tags are deleted first,
    and ``notes`` gets a line naming it, since the user may want it back or may want the space. Pending
    tags in a file a running guest holds (``live``) stay pending: no qemu-img may write it (rule 1).
    """
    steps = []
    changed = True
    while changed:
        changed = False
        for path, f in sorted(graph.files.items()):
            if graph.referenced(path) or graph.children(path):
                continue
            tags = sorted(t for p, t in graph.garbage if p == path)
            steps += [RemoveFile(path)] if f.owned else [DeleteTag(path, t) for t in tags]
            if not f.owned:
                notes.append(f"{path} is not snapfw's file: it is left where it is, but no snapshot and no "
                             "disk uses it any more")
            graph.garbage -= {(path, t) for t in tags}
            del graph.files[path]
            changed = True
    for path, tag in sorted(graph.garbage):
        if not graph.children(path) and path not in live:
            steps.append(DeleteTag(path, tag))
            graph.garbage.discard((path, tag))
    return steps


def _store_graph(domain: str, before: DiskGraph, after: DiskGraph, changes):
    for path in before.files.keys() - after.files.keys():
        changes.remove_file(path)
    for path, f in after.files.items():
        if before.files.get(path) != f:
            changes.put_file(domain, f)
    for path, tag in after.garbage - before.garbage:
        changes.add_garbage_tag(domain, path, tag)
    for path, tag in before.garbage - after.garbage:
        changes.remove_garbage_tag(path, tag)
    for name, data in after.records.items():
        if name in before.records and before.records[name] != data:
            changes.set_record(domain, name, after.target, data)


QUIESCE, QUIESCE_TRY = "yes", "try"
MEMORY_NONE = "none"


def create(session: Session, domain: str, name: str, description: str = "",
           backends: dict[str, str] | None = None, dry_run: bool = False, mirror: bool | None = None,
           options: dict | None = None, quiesce: str | None = None, memory: str | None = None) -> Plan:
    """Snapshot every disk of ``domain`` as ``name``, a child of the current snapshot. ``mirror``: also
    record it in the driver's own snapshot records (None: as the config file's ``mirror`` says, for a
    driver that can). ``options``: backend options by name (``lvm-size``), each read by the backend it
    belongs to. ``quiesce`` (a running domain): freeze its filesystems through its guest agent around the
    snapshot; QUIESCE refuses before any change if that cannot be done, QUIESCE_TRY then takes it
    crash-consistent. ``memory``: MEMORY_LIVE or MEMORY_PAUSED also saves a running domain's memory
    (default MEMORY_NONE: disks only)."""
    o = Operation(session, domain, "create", options)
    check_name("snapshot", name)
    if quiesce not in (None, QUIESCE, QUIESCE_TRY):
        raise BadInput(f"invalid --quiesce {quiesce!r}: expected {QUIESCE} or {QUIESCE_TRY}")
    mirror = _wants_mirror(session, mirror)
    backends = dict(backends or {})
    for target, b in backends.items():
        check_name("disk target", target)
    memory = memory or MEMORY_NONE
    if memory not in (MEMORY_NONE, *MEMORY_KINDS):
        raise BadInput(f"invalid --memory {memory!r}: expected {MEMORY_NONE}, {', '.join(MEMORY_KINDS)}")
    if quiesce is not None and memory != MEMORY_NONE:  # as libvirt: --quiesce only with --disk-only
        raise BadInput(f"--quiesce with --memory {memory}: the memory image would hold the guest with its "
                       "filesystems frozen, and a revert would resume it so; a snapshot with memory needs no "
                       "quiesce (what the disks lack is in its RAM)")
    with session.lock(o.name):
        o.load()
        if name in o.tree:
            raise BadInput(f"domain {o.name} already has a snapshot named {name!r}")
        if memory != MEMORY_NONE and not o.domain.running:
            raise BadInput(f"--memory {memory}: domain {o.name} is {o.domain.state}, it has no memory to save")
        for target in backends:
            o.domain.disk(target)
        capability = LIVE_CREATE if o.domain.running else OFFLINE_CREATE
        chosen = {d.target: _pick_backend(d, o.tree, backends.get(d.target), capability) for d in o.domain.disks}
        ops = o.start(o.domain.disks, chosen)
        records = [DiskRecord(op.disk.target, chosen[op.disk.target].name,
                              chosen[op.disk.target].create(op, name)) for op in ops]
        for op, r in zip(ops, records):
            op.graph.records[name] = r.data
        problem = _quiesce_problem(session, o, quiesce)
        if o.domain.running:
            o.window_seconds = window_seconds()
        snap = Snapshot(name, o.tree.current, time.time(), description, True, records, o.domain.config())
        if mirror:
            snap.config[MIRRORED] = {"state": o.domain.state, "active": {op.disk.target: op.graph.active
                                                                          for op in ops}}
        disks = ", ".join(f"{r.target}: {r.backend}" for r in records)
        plan = o.assemble(f"create snapshot {name} of {o.name} ({disks}"
                          f"{'' if memory == MEMORY_NONE else f'; memory: {memory}'})")
        if memory != MEMORY_NONE:
            snap.memory = _save_memory(o, ops, records, plan, name, memory)
            plan.changes.append(lambda ch: _measure(snap.memory))
        if o.domain.running:  # how the guest was held, measured while the plan runs (before this change)
            plan.changes.append(lambda ch: snap.config.update(window=held(plan.prepare, problem)))
            hooks = freezehooks.scripts(o.name)
            if freezehooks.wanted(hooks):  # first of all: a failing one aborts before any change
                after = hooks[freezehooks.POST_THAW]
                plan.prepare.insert(0, freezehooks.PreFreeze(o.name, name, hooks[freezehooks.PRE_FREEZE], after))
                plan.finish.insert(0, freezehooks.PostThaw(o.name, name, after))
        if problem:
            plan.notes.append(f"not quiesced ({problem}): the snapshot is crash-consistent")
        plan.changes += [lambda ch: ch.add_snapshot(o.name, snap), lambda ch: ch.set_current(o.name, name)]
        if mirror:
            plan.notes.append(f"once recorded, snapshot {name} is mirrored into the {session.driver_class.scheme} "
                              "driver's own snapshot records (virsh snapshot-list)")
        h = plugins.hook()
        return o.run(plan, dry_run, lambda: h.snapfw_pre_snapshot(domain=o.domain, name=name),
                     functools.partial(h.snapfw_post_snapshot, domain=o.domain, snapshot=snap),
                     f"snapshot {name} of {o.name} was created", mirror)


# the key of a snapshot's config that says it is mirrored into the driver's own records, and holds what
# the catalog keeps nowhere else: the domain's state when it was taken, each disk's active file after it
MIRRORED = "mirror"


def _wants_mirror(session: Session, mirror: bool | None) -> bool:
    """Whether a new snapshot is mirrored: ``mirror`` if given (refused before any change where the driver
    cannot), else the config file's ``mirror`` where the driver can."""
    can = MIRROR in session.driver_class.capabilities
    if mirror and not can:
        raise NotSupported(f"--mirror: the {session.driver_class.scheme} driver keeps no snapshot records of its "
                           "own to mirror into")
    return can and (mirror if mirror is not None else config.setting("mirror", bool, False))


def mirror_entries(tree: Tree) -> tuple[list[dict], str | None]:
    """The catalog's mirrored snapshots as :meth:`HypervisorDriver.mirror` takes them, parents first, each
    one's parent its nearest mirrored ancestor; and the current snapshot if it is mirrored."""
    def parent(s: Snapshot) -> str | None:
        p = s.parent
        while p is not None and MIRRORED not in tree.by_name[p].config:
            p = tree.by_name[p].parent
        return p

    entries, queue = [], [s.name for s in tree if s.parent is None]
    while queue:
        s = tree.by_name[queue.pop(0)]
        queue += s.children
        if MIRRORED in s.config:
            m = s.config[MIRRORED]
            disks = [{"target": r.target, "file": r.data.get("file"), "active": m["active"].get(r.target)}
                     for r in s.disks]
            for d, r in zip(disks, s.disks):
                if "tag" in r.data:
                    d["tag"] = r.data["tag"]
            entries.append({"name": s.name, "parent": parent(s), "created": s.created, "description": s.description,
                            "state": m["state"], "definition": s.config.get("definition", {}), "disks": disks,
                            "memory": s.memory.file if s.memory else None})
    current = tree.current if tree.current and MIRRORED in tree.by_name[tree.current].config else None
    return entries, current


def sync_mirror(session: Session, domain: str, repair: bool) -> list[str]:
    """The differences between the catalog's mirrored snapshots of ``domain`` and the driver's records, in
    words; with ``repair``, the driver's records are made to match first."""
    entries, current = mirror_entries(session.catalog.tree(domain))
    return session.driver.mirror(domain, entries, current, repair)


def _quiesce_problem(session: Session, o: "Operation", quiesce: str | None) -> str | None:
    """Decide the freeze window before any change: ``o.quiesce`` if the guest agent can freeze the
    filesystems now; else refuse (QUIESCE) or return why not (QUIESCE_TRY, recorded with the snapshot).
    A shut-off domain's disks are consistent as they are: nothing to freeze."""
    if quiesce is None or not o.domain.running:
        return None
    problem = ("it is paused, so its guest agent cannot run" if o.domain.state == PAUSED
               else session.driver.agent_problem(o.name, AGENT_SECONDS))
    if problem is None:
        o.quiesce = True
    elif quiesce == QUIESCE:
        raise Refused(f"cannot quiesce {o.name}: {problem}; nothing was changed (--quiesce=try takes a "
                      "crash-consistent snapshot instead)")
    return problem


def _save_memory(o: "Operation", ops: list[DiskOp], records: list[DiskRecord], plan: Plan, name: str,
                 kind: str) -> MemoryRecord:
    """Put the memory save around the disks' live snapshot in ``plan`` (snapfw.memory); the record it
    makes, bound to the disk records of snapshot ``name``."""
    if any(isinstance(s, Pause) for s in plan.prepare):  # its own pause would end inside the window's
        raise NotSupported(f"--memory: a disk of {o.name} is snapshotted by a host step, in a pause window; memory "
                           "state beside such disks is not supported yet")
    backend = memory.backend_for(None, type(o.s.driver).scheme)
    if kind not in backend.kinds:
        raise NotSupported(f"memory backend {backend.name} cannot take --memory {kind} snapshots")
    folder = os.path.dirname(min(ops[0].graph.files, key=len)) if ops else os.path.dirname(o.domain.disks[0].path)
    size = backend.image_size(o.s.driver, o.name)
    memory.check_space(folder, size, o.name)
    path = memory.image_path(o.name, name, folder)
    live = [i for i, s in enumerate(plan.prepare) if isinstance(s, LiveSnapshot)]
    at = live[0] if live else len(plan.prepare)
    disks = plan.prepare[at:at + len(live)]
    actions = [a for s in disks for a in s.actions] if kind in backend.with_disks else []
    if actions:  # the backend takes them with the memory, in one call
        problem = backend.disks_problem(kind, actions)
        if problem:
            raise NotSupported(f"--memory {kind} through memory backend {backend.name}: {problem}")
        disks = []
    resume, settings = o.domain.state == RUNNING, backend.settings(o.s.driver, o.name)
    save = memory.SaveMemory(o.name, backend.name, path, kind, settings, resume, size, o.window_seconds[0],
                             actions)
    plan.prepare[at:at + len(live)] = [save, *disks,
                                       memory.CompleteMemory(o.name, backend.name, path, settings, resume)]
    plan.notes.append(f"the memory image {path} holds the guest's secrets: it is made mode 0600")
    return MemoryRecord(backend.name, kind, path, 0, {"disks": {r.target: r.backend for r in records}})


def _measure(record: MemoryRecord):
    """The size of the image as written, recorded so a revert can tell a truncated one."""
    record.size = os.path.getsize(record.file)


RUNNING, PAUSED, STOPPED = "running", "paused", "shut off"


def revert(session: Session, domain: str, name: str, dry_run: bool = False, state: str | None = None,
           keep_config: bool = False) -> Plan:
    """Make every disk read as snapshot ``name`` and make it current; other branches stay. A running
    domain is stopped first and started again afterwards. ``state``: RUNNING, PAUSED or STOPPED once
    done (default: as it was). The configuration stored with the snapshot is put back unless
    ``keep_config``."""
    o = Operation(session, domain, "revert")
    check_name("snapshot", name)
    if state not in (None, RUNNING, PAUSED, STOPPED):
        raise BadInput(f"invalid state {state!r} after a revert: expected {RUNNING}, {PAUSED} or {STOPPED}")
    with session.lock(o.name):
        o.load()
        snap = find_snapshot(o.tree, o.name, name)
        was = o.domain.state
        # a system checkpoint resumes its guest unless told otherwise; disk-only ones keep the state it had
        state = state or (RUNNING if snap.memory else was if o.domain.running else STOPPED)
        restore = snap.memory is not None and state != STOPPED
        if restore:
            memory.check_restorable(snap, o.domain, keep_config)
        if o.domain.running or state != STOPPED:
            problem = session.driver.restart_problem(o.domain)
            if problem:
                raise NotSupported(f"cannot revert {o.name} to {name} {'live' if o.domain.running else 'and start it'}:"
                                   f" {problem}")
        if o.domain.running:  # the backends revert offline, once the guest is stopped
            o.domain = dataclasses.replace(o.domain, running=False, state=STOPPED, live_chains={})
        targets = {r.target for r in snap.disks}
        ops = o.start([d for d in o.domain.disks if d.target in targets],
                      {r.target: _backend(r.backend) for r in snap.disks})
        for op in ops:
            r = snap.record(op.disk.target)
            _backend(r.backend).revert(op, name, r.data)
        definition = None if keep_config else snap.config.get("definition")
        plan = o.assemble(f"revert {o.name} to snapshot {name}", definition)
        if was != STOPPED:
            plan.prepare.insert(0, StopDomain(o.name, paused=was == PAUSED))
        if restore:
            plan.finish.append(memory.RestoreMemory(o.name, snap.memory.backend, snap.memory.file, state == PAUSED))
        elif state != STOPPED:
            plan.finish.append(StartDomain(o.name, paused=state == PAUSED))
        if snap.memory is not None and not restore:
            plan.notes.append(f"snapshot {name}'s memory image is not loaded (--stopped): {o.name} will boot afresh")
        if definition is None and not keep_config and o.domain.definition:
            plan.notes.append(f"snapshot {name} was taken without a stored configuration; {o.name} keeps its own")
        for d in o.domain.disks:
            if d.target not in targets:
                plan.notes.append(f"disk {d.target} was added after snapshot {name}; it is left as it is")
        plan.changes.append(lambda ch: ch.set_current(o.name, name))
        h = plugins.hook()
        return o.run(plan, dry_run, lambda: h.snapfw_pre_revert(domain=o.domain, name=name),
                     functools.partial(h.snapfw_post_revert, domain=o.domain, name=name),
                     f"{o.name} was reverted to snapshot {name}")


def delete(session: Session, domain: str, name: str, children: bool = False, dry_run: bool = False) -> Plan:
    """Delete snapshot ``name`` (merging its data into its neighbours), or with ``children`` its subtree."""
    o = Operation(session, domain, "delete")
    check_name("snapshot", name)
    with session.lock(o.name):
        o.load()
        find_snapshot(o.tree, o.name, name)
        names = [name] + (o.tree.descendants(name) if children else [])
        _refuse_clone_bases(session.catalog, o.name, names)
        targets = {r.target for n in names for r in o.tree.by_name[n].disks}
        ops = o.start([d for d in o.domain.disks if d.target in targets],
                      {r.target: _backend(r.backend) for n in names for r in o.tree.by_name[n].disks})
        for op in ops:
            for n in reversed(names):  # deepest first; the top one merges only if it goes alone
                r = o.tree.by_name[n].record(op.disk.target)
                if r is None:
                    continue
                backend = _backend(r.backend)
                if o.domain.running and LIVE_DELETE not in backend.capabilities:
                    raise NotSupported(f"backend {r.backend} cannot delete snapshot {n} of disk {op.disk.target} "
                                       f"while domain {o.name} is {o.domain.state} (it has no {LIVE_DELETE})")
                if children:
                    backend.release(op, n, r.data)
                else:
                    backend.delete(op, n, r.data)
                del op.graph.records[n]
        what = f"snapshot {name}" + (f" and its {len(names) - 1} descendants" if children else "")
        plan = o.assemble(f"delete {what} of {o.name}")
        plan.finish += [RemoveFile(o.tree.by_name[n].memory.file) for n in names if o.tree.by_name[n].memory]
        for n in reversed(names):
            plan.changes.append(functools.partial(lambda n, ch: ch.remove_snapshot(o.name, n), n))
        h = plugins.hook()
        return o.run(plan, dry_run, lambda: h.snapfw_pre_delete(domain=o.domain, names=names),
                     functools.partial(h.snapfw_post_delete, domain=o.domain, names=names),
                     f"{what} of {o.name} was deleted")


def _refuse_clone_bases(catalog: Catalog, domain: str, names: list[str]):
    """Linked clones read through the disk state of these snapshots: deleting one is refused, naming them."""
    deps = [c for c in catalog.clone_bases(gold=domain) if c["gold_snapshot"] in names]
    if deps:
        listed = ", ".join(sorted({f"{c['clone']} (snapshot {c['gold_snapshot']})" for c in deps}))
        raise Refused(f"linked clones of {domain} read through snapshots being deleted: {listed}; "
                      "`snapfw detach` them first")


# --- reading -----------------------------------------------------------------------------------------
def snapshots(session: Session, domain: str) -> Tree:
    """The snapshot tree of ``domain``; an unknown domain is an error, a domain without snapshots is not."""
    catalog = ensure_domain(session, domain)
    return catalog.tree(domain) if catalog is not None else Tree([])


def domains(session: Session) -> list[dict]:
    """The domains of the connection, by name: their state (running, paused, shut off; "unknown" with the
    ``problem`` when the driver cannot tell) and, from the catalog, their snapshot count and current one."""
    catalog = Catalog.open(session.state, create=False)
    out = []
    for name in session.driver.list_domains():
        row = {"name": name, "state": "unknown", "snapshots": 0, "current": None}
        try:
            row["state"] = session.driver.domain_state(name)
        except SnapfwError as e:
            row["problem"] = str(e)
        rows = catalog.list_rows(name) if catalog is not None else []
        row["snapshots"] = len(rows)
        row["current"] = next((n for n, _p, _t, _d, current, *_rest in rows if current), None)
        out.append(row)
    return out


def statuses(session: Session, domain: str) -> dict[str, dict[str, str]]:
    """snapshot -> disk target -> its state on the connection's host, for the disks whose backend keeps
    them there (not local files, and their records name that ``host``): the backend's
    :meth:`~snapfw.backend.DiskBackend.statuses`."""
    tree = snapshots(session, domain)
    if not any("host" in r.data for snap in tree for r in snap.disks):
        return {}  # no plugin to load
    installed = plugins.disk_backends()
    remote: dict[tuple[str, str], dict[str, dict]] = {}
    for snap in tree:
        for r in snap.disks:
            if r.backend in installed and not installed[r.backend][0].local_files:
                remote.setdefault((r.backend, r.target), {})[snap.name] = r.data
    out: dict[str, dict[str, str]] = {}
    for (backend, target), records in sorted(remote.items()):
        try:
            found = _backend(backend).statuses(session.host, records)
        except SnapfwError as e:  # reading the catalog still works: say why the state is not known
            session.reporter.warn(f"{domain}: disk {target}: its snapshots' state cannot be read: {e}")
            found = dict.fromkeys(records, "unknown")
        for name, state in found.items():
            out.setdefault(name, {})[target] = state
    return out


def ensure_domain(session: Session, domain: str) -> Catalog | None:
    """Raise UnknownDomain unless the catalog or the driver knows ``domain``; return the catalog if it
    knows it (without creating a catalog just to read)."""
    check_name("domain", domain)
    catalog = Catalog.open(session.state, create=False)
    if catalog is not None and catalog.has_domain(domain):
        return catalog
    session.driver.domain(domain)  # raises UnknownDomain
    return None


def check(session: Session, domain: str | None = None, repair: bool = False) -> list[str]:
    """Compare the catalog with the disks and report every difference in words; report interrupted
    plans, and with ``repair`` finish or roll them back first. Returns the findings (empty: all good)."""
    if domain is not None:
        ensure_domain(session, domain)
    findings = []
    for plan in session.catalog.unfinished_plans(domain):
        if not repair:
            findings.append(f"{plan['domain']}: interrupted {plan['operation']} ({plan['state']}); "
                            "`snapfw check --repair` will finish or roll it back")
            continue
        with session.lock(plan["domain"]):
            findings.append(f"{plan['domain']}: " + recover(session.catalog, session, plan))
    pending = {p["domain"] for p in session.catalog.unfinished_plans(domain)}
    names = [n for n in ([domain] if domain else session.catalog.domains()) if n not in pending]
    users = ImageUsers(session.driver, session.catalog.placements()) if names else None
    for name in names:
        findings += [f"{name}: {problem}" for problem in _disagreements(session, name, users)]
        if MIRROR in session.driver_class.capabilities:
            findings += [f"{name}: {problem}" for problem in _mirror_drift(session, name, repair)]
    return list(dict.fromkeys(findings))


def _mirror_drift(session: Session, name: str, repair: bool) -> list[str]:
    """Where the driver's own snapshot records of ``name`` differ from the catalog (with ``repair``,
    mirrored again under the domain's lock)."""
    try:
        if not repair:
            return sync_mirror(session, name, repair=False)
        with session.lock(name):
            return sync_mirror(session, name, repair=True)
    except UnknownDomain:
        return []  # _disagreements says so
    except SnapfwError as e:
        return [f"comparing its mirrored snapshots with the {session.driver_class.scheme} driver's records failed: {e}"]


def _disagreements(session: Session, name: str, users: ImageUsers) -> list[str]:
    """Where catalog, domain definition and image files disagree, for one domain, and which of its
    files another disk uses too."""
    try:
        dom = _read_domain(session.driver, name)
    except SnapfwError as e:
        return [str(e)]
    tree = session.catalog.tree(name)
    files = session.catalog.files(name)

    def in_use(path):
        session.reporter.warn(f"{name}: {files[path].target}: {path} is in use by a running process; compared "
                              "from an advisory read (qemu-img -U), changes are refused while it runs")

    inspect = Inspector(dom.allowed_roots, files, in_use, dom.live_chains)
    out = []
    remote = _remote_backends(dom, tree)
    for target, backend in sorted(remote.items()):
        records = {s.name: s.record(target).data for s in tree if s.record(target)}
        out += [f"{target}: {problem}" for problem in backend.problems(session.host, target, records)]
    for path, f in sorted(files.items()):
        if f.target in remote:
            continue
        if not os.path.exists(path):
            out.append(f"{f.target}: {path} is in the catalog but missing on disk")
            continue
        try:
            info = inspect(path, f.format)
        except SnapfwError as e:
            out.append(f"{f.target}: {e}")
            continue
        for snap in tree:
            r = snap.record(f.target)
            if r and r.data.get("file") == path and "tag" in r.data:
                if r.data["tag"] not in {t["name"] for t in info.get("snapshots", [])}:
                    out.append(f"{f.target}: snapshot {snap.name}'s tag {r.data['tag']!r} is missing from {path}")
    for d in dom.disks:
        mine = {p: f for p, f in files.items() if f.target == d.target}
        problem = _active_problem(d, mine) if mine else None
        if problem:
            out.append(problem)
        try:
            chain = inspect.chain(d.path, d.format) if d.path in mine and d.target not in remote else []
        except SnapfwError:
            chain = []  # reported above
        problem = users.conflict(name, d.target, d.path, mine, [node["filename"] for node in chain])
        if problem:
            out.append(problem)
    for snap in tree:
        if snap.memory is not None and not os.path.isfile(snap.memory.file):
            out.append(f"snapshot {snap.name}'s memory image {snap.memory.file} is missing")
        for r in snap.disks:
            f = files.get(r.data.get("file"))
            if f is None or f.target != r.target:
                out.append(f"{r.target}: snapshot {snap.name}'s file {r.data.get('file')} is not in the catalog")
    known = set(session.catalog.files()) | {d.path for d in dom.disks} | {s.memory.file for s in tree if s.memory}
    for path in _leftovers(dom, {f.target for f in files.values()} | {d.target for d in dom.disks},
                           {os.path.dirname(p) for p in files}, known):
        out.append(f"{path} is named like a file snapfw makes, but no catalog entry or disk uses it; snapfw "
                   "cannot prove it made it, so `check --repair` leaves it: remove it if nothing needs it")
    return out


def _remote_backends(dom: Domain, tree: Tree) -> dict:
    """target -> backend, for the disks whose backend (named by the domain or by their snapshots'
    records) keeps them on the connection's host rather than in local files."""
    backends = plugins.disk_backends()
    out = {}
    for d in dom.disks:
        names = {d.backend} | {r.backend for s in tree for r in s.disks if r.target == d.target}
        for name in sorted(n for n in names if n in backends):
            if not backends[name][0].local_files:
                out[d.target] = backends[name][0]()
    return out


def _leftovers(dom: Domain, targets: set[str], folders: set[str], known: set[str]) -> list[str]:
    """Files in the domain's directories, not in ``known``, named as snapfw names its own: an overlay
    ``<domain>-<target>.<label>[.N].qcow2`` (DiskOp.new_image_path), one still being written
    ``.<domain>-<target>.<label>[.N].qcow2.<random>.tmp`` (CreateOverlay), a domain definition being
    rewritten ``.<domain>.<anything>.tmp`` (drivers), a memory image ``<domain>.<snapshot>[.N].memory``
    (snapfw.memory).

    A name proves nothing (the user may have made the file), so these are only reported. The files
    snapfw provably made are those an interrupted plan's journal names; `check --repair` removes them
    when it rolls that plan back.
    """
    d, disks = re.escape(dom.name), "|".join(re.escape(t) for t in sorted(targets))
    ours = re.compile(rf"{d}-(?:{disks})\..+\.qcow2|\.{d}-(?:{disks})\..+\.tmp|\.{d}\..+\.tmp|{d}\..+\.memory",
                      re.DOTALL)
    out = []
    for folder in sorted({os.path.normpath(f) for f in set(dom.allowed_roots) | folders}):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for path in (os.path.join(folder, n) for n in sorted(names) if ours.fullmatch(n)):
            if path not in known and os.path.isfile(path) and not os.path.islink(path):
                out.append(path)
    return out
