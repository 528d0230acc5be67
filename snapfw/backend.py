"""What plugins implement: disk backends and hypervisor drivers, and the per-disk view they work on.

A disk backend never touches the catalog. For each disk of an operation the core hands it a
:class:`DiskOp`: the disk's image graph (files, backing links, which snapshot references which file,
the active file) as the catalog has it, already checked against ``qemu-img info``. The backend edits
that graph to what it will be afterwards and appends the steps that get the disks there; the core then
removes what nothing references any more and stores the graph in the same transaction as the snapshot.

Backend lifecycle, per disk (operations a backend does not list in ``capabilities`` raise NotSupported):

    (no record) --create--> [record] --revert--> [record, disk now reads as the record]
                                 \\--delete--> (no record; data merged into neighbours or kept hidden)
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import NotSupported, Refused
from .model import Disk, Domain, ImageFile, Tree
from .names import fit_file_name

OFFLINE_CREATE = "offline.create"
OFFLINE_REVERT = "offline.revert"
OFFLINE_DELETE = "offline.delete"
LIVE_CREATE = "live.create"
LIVE_REVERT = "live.revert"
LIVE_DELETE = "live.delete"
CAPABILITIES = (OFFLINE_CREATE, OFFLINE_REVERT, OFFLINE_DELETE, LIVE_CREATE, LIVE_REVERT, LIVE_DELETE)
# a driver capability: it keeps snapshot records of its own, and can mirror snapfw's into them
MIRROR = "mirror"


@dataclass
class DiskGraph:
    """The image files of one disk and what references them. ``records``: snapshot name -> record data;
    ``pinned``: files that other domains' images read through (shared bases), never changed or removed."""

    target: str
    active: str
    active_format: str
    files: dict[str, ImageFile]
    records: dict[str, dict]
    garbage: set[tuple[str, str]] = field(default_factory=set)
    pinned: frozenset[str] = frozenset()

    def copy(self) -> "DiskGraph":
        return copy.deepcopy(self)

    def format(self, path: str) -> str:
        return self.files[path].format

    def children(self, path: str) -> list[str]:
        return sorted(p for p, f in self.files.items() if f.backing == path)

    def referrers(self, path: str) -> list[str]:
        """Snapshots whose record for this disk keeps data in ``path``."""
        return sorted(n for n, r in self.records.items() if r.get("file") == path)

    def referenced(self, path: str) -> bool:
        return path == self.active or path in self.pinned or bool(self.referrers(path))

    def needed_overlays(self, path: str) -> list[str]:
        """The overlays of ``path`` that must stay if the active file moves to ``path``: each is, or lies
        below it, a file a snapshot or another domain uses, or one snapfw did not create (never removed).
        The others hold only the active state and hidden tags, so the core removes them with that state."""
        def needed(p):
            return (p in self.pinned or bool(self.referrers(p)) or not self.files[p].owned
                    or any(needed(c) for c in self.children(p)))

        return [c for c in self.children(path) if needed(c)]


class DiskOp:
    """One disk's part of a plan: the graph a backend edits, and the steps it appends."""

    def __init__(self, domain: Domain, disk: Disk, graph: DiskGraph, tree: Tree, inspect, host=None,
                 options: dict | None = None, shared: dict | None = None):
        self.domain = domain
        self.disk = disk
        self.graph = graph
        self.tree = tree
        self.inspect = inspect  # inspect(path, format) -> qemu-img info dict, checked and cached
        self.host = host  # the connection's Host (snapfw.tools.host), for backends whose disks are not local files
        self.options = options or {}  # backend options of the request by name (create --lvm-size: "lvm-size")
        # one dict for every disk of the operation: a backend's budgets across disks (free space in a pool)
        self.shared = {} if shared is None else shared
        self.prepare: list = []
        self.finish: list = []
        self.notes: list[str] = []
        self.define_after_finish = False  # the active file changes only once finish steps have run
        # the operation changes this disk only: a change it cannot undo cheaply may be a finish step (after
        # the commit, finished by `check --repair` if it fails), as there is no other disk to keep in step
        self.alone = False
        # a running domain: the backend appends live actions (snapfw.live) here instead of prepare steps
        self.live: list[dict] = []
        # create: the steps that take this disk's snapshot on the host (not the hypervisor's action); on a
        # running domain they run inside the plan window (the guest paused), after the driver's
        # transaction; offline, after every disk's prepare steps
        self.window: list = []

    def new_image_path(self, label: str, suffix: str = ".qcow2", folder: str | None = None) -> str:
        """A free name ``<domain>-<target>.<label>[.N]<suffix>``, in ``folder`` or next to the disk's base
        image. Backends whose snapshots are not files (subvolumes, volumes) pass their own suffix and folder."""
        if folder is None:
            folder = os.path.dirname(min(self.graph.files, key=len, default=self.disk.path))
        # room for `.NNNN<suffix>` within NAME_MAX
        stem = fit_file_name(f"{self.domain.name}-{self.disk.target}.{label}", 250 - len(os.fsencode(suffix)))
        taken = set(self.graph.files) | {s.path for s in self.prepare + self.window if hasattr(s, "path")}
        for n in range(0, 10000):
            path = os.path.join(folder, f"{stem}{'' if n == 0 else f'.{n}'}{suffix}")
            if path not in taken and not os.path.lexists(path):
                return path
        raise Refused(f"no free file name for {stem} in {folder}")


class DiskBackend:
    """Base of disk backends. Subclasses set ``name``/``capabilities`` and implement the operations."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    capabilities: ClassVar[frozenset[str]] = frozenset()
    # lower is preferred when several backends can snapshot a disk and nothing else decides
    priority: ClassVar[int] = 100
    cost: ClassVar[dict] = {}
    # True: the disk's files are image files on this machine, which the core checks exist, reads with
    # qemu-img and removes once nothing uses them. False: they live on the connection's host (block
    # devices, volumes): the backend checks them (check_disk, problems) and removes what it retires itself.
    local_files: ClassVar[bool] = True

    def check_disk(self, host, disk: Disk) -> None:
        """For a backend without ``local_files``: raise BadInput unless ``disk`` is there on ``host``."""

    def problems(self, host, target: str, records: dict[str, dict]) -> list[str]:
        """For a backend without ``local_files``: what ``snapfw check`` reports about the records of disk
        ``target`` (snapshot name -> record data) on ``host``."""
        return []

    def statuses(self, host, records: dict[str, dict]) -> dict[str, str]:
        """For a backend without ``local_files``: the state of each record (snapshot name -> record data)
        on ``host`` as one word or two, shown by ``list`` and ``show``: "valid", or what keeps it from
        being reverted to ("invalid", "merge pending", "missing"). Records left out are not shown."""
        return {}

    def usable(self, disk: Disk) -> str | None:
        """Why this backend cannot snapshot ``disk``, or None if it can."""
        return None

    def create(self, op: DiskOp, snapshot: str) -> dict:
        """Plan a snapshot of the disk; return its record data (must include ``file``)."""
        raise NotSupported(f"backend {self.name} cannot create snapshots")

    def revert(self, op: DiskOp, snapshot: str, record: dict) -> None:
        raise NotSupported(f"backend {self.name} cannot revert snapshots")

    def delete(self, op: DiskOp, snapshot: str, record: dict) -> None:
        """Plan removal of the record, keeping its data where later states still read it.

        The core drops the record from ``op.graph.records`` afterwards and removes files left unused.
        """
        raise NotSupported(f"backend {self.name} cannot delete snapshots")

    def release(self, op: DiskOp, snapshot: str, record: dict) -> None:
        """Plan removal of a record whose whole subtree goes too (delete --children): nothing to merge.

        The default suits backends whose data lives only in ``record["file"]``, which the core removes
        once nothing references it.
        """
        if OFFLINE_DELETE not in self.capabilities:
            raise NotSupported(f"backend {self.name} cannot delete snapshots")


MEMORY_LIVE = "live"
MEMORY_PAUSED = "paused"
MEMORY_KINDS = (MEMORY_LIVE, MEMORY_PAUSED)


class MemoryBackend:
    """Base of memory backends: how to write a running domain's memory (RAM and device state) to an image
    file and start the domain from it again, for the hypervisor drivers named in ``drivers``.

    Lifecycle, driven by the core (snapfw.memory), around the disks' one live snapshot:

        running --save--> paused at the instant --the disks' snapshot--> --complete--> running, image whole
        after a failure (or a crash, then check --repair): --abort--> running, image removed by the core
        stopped --restore(image)--> running (or paused) at that instant, on disks reverted to it

    The core makes the image file (mode 0600, empty) and passes its path. ``settings`` is what
    :meth:`settings` returned before any change, journaled: what ``save`` changes in the hypervisor and
    ``complete``/``abort`` put back, also in another process after a crash. Every method but ``save`` is
    idempotent, since ``check --repair`` may call it again.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    drivers: ClassVar[frozenset[str]] = frozenset()  # URI schemes of the drivers it works with
    kinds: ClassVar[frozenset[str]] = frozenset(MEMORY_KINDS)
    # kinds whose memory and disks the hypervisor takes in one call (libvirt's live external snapshot):
    # ``save_with_disks`` then replaces both ``save`` and the disks' live snapshot
    with_disks: ClassVar[frozenset[str]] = frozenset()

    def image_size(self, driver: "HypervisorDriver", domain: str) -> int:
        """About how many bytes the image of running ``domain`` takes (RAM and device state), for the
        free-space check before any change."""
        raise NotImplementedError

    def settings(self, driver: "HypervisorDriver", domain: str) -> dict:
        """The hypervisor settings of ``domain`` that ``save`` changes (JSON), read before any change."""
        return {}

    def save(self, driver: "HypervisorDriver", domain: str, path: str, kind: str, settings: dict,
             deadline: float) -> None:
        """Write the memory of ``domain`` to the existing file ``path`` and leave the domain paused at that
        instant, its disks flushed for their snapshot. ``kind`` MEMORY_PAUSED: pause first; MEMORY_LIVE:
        copy while it runs, pausing only for the last pass. What is left to write once the disks are
        done, :meth:`complete` writes. Past ``deadline`` (monotonic), raise."""
        raise NotSupported(f"memory backend {self.name} cannot save memory")

    def disks_problem(self, kind: str, actions: list[dict]) -> str | None:
        """For a kind in ``with_disks``: why the disks' live ``actions`` (snapfw.live) cannot be taken in
        the same call as the memory, or None; asked while planning, before any change."""
        return None

    def save_with_disks(self, driver: HypervisorDriver, domain: str, path: str, kind: str, settings: dict,
                        actions: list[dict], deadline: float) -> float | None:
        """For a kind in ``with_disks``: write the memory of ``domain`` to the existing file ``path`` and
        take the disks' live ``actions`` at the same instant, in one call of the hypervisor; the guest may
        run again when it returns (:meth:`complete` still follows). Return how long the guest was paused
        (seconds), or None if the hypervisor does not tell. If it fails or is interrupted, the core undoes
        it with :meth:`abort`, then the driver's ``undo_live_snapshot(actions)``."""
        raise NotSupported(f"memory backend {self.name} cannot take the disks with the memory")

    def complete(self, driver: "HypervisorDriver", domain: str, path: str, settings: dict, resume: bool,
                 deadline: float) -> None:
        """Finish the image ``save`` began (nothing if it is whole) and let ``domain`` run if ``resume``."""
        raise NotSupported(f"memory backend {self.name} cannot save memory")

    def abort(self, driver: "HypervisorDriver", domain: str, settings: dict, resume: bool) -> None:
        """Undo :meth:`save`, also a failed or interrupted one: stop whatever still writes the image and
        let ``domain`` run if ``resume``. Nothing if the domain is gone."""
        raise NotSupported(f"memory backend {self.name} cannot save memory")

    def restore(self, driver: "HypervisorDriver", domain: str, path: str, paused: bool) -> None:
        """Start stopped ``domain`` from its definition with the memory image ``path`` loaded, then let it
        run unless ``paused``. Idempotent: finish a restore a crash interrupted."""
        raise NotSupported(f"memory backend {self.name} cannot restore memory")


class HypervisorDriver:
    """Base of hypervisor drivers: how to reach domains behind a connection URI.

    ``define`` takes and ``domain_dict`` gives the plain-dict form of a domain (as steps journal it): its
    name, its disks and, when a revert puts back a snapshot's configuration, ``definition`` (see
    :attr:`Domain.definition`).
    Live operations (pause, freeze, block jobs) raise NotSupported until a driver provides them.
    """

    scheme: ClassVar[str]
    description: ClassVar[str] = ""
    # Where a connection's catalog (and lock files) live: None for snapfw's data directory, or a template
    # with ``{path}`` for the absolute path the URI names (``scheme:///path``). Data, not code, so that
    # ``snapfw list`` finds the catalog without loading any plugin (see connection.remember_state_dir).
    state_dir: ClassVar[str | None] = None
    # what the driver can do to a running domain (LIVE_CREATE, LIVE_REVERT, LIVE_DELETE): the core refuses
    # the others before any change, never half way through a plan
    capabilities: ClassVar[frozenset[str]] = frozenset()
    # True: a live snapshot's new overlays are made by snapfw before it (qemu-img, side by side, outside
    # any pause or freeze) and the driver has the hypervisor take them as they are (libvirt's REUSE_EXT);
    # False: the hypervisor makes them within the snapshot (QMP's blockdev-snapshot-sync)
    reuses_overlays: ClassVar[bool] = False

    def __init__(self, uri: str):
        self.uri = uri

    def list_domains(self) -> list[str]:
        raise NotImplementedError

    def domain(self, name: str) -> Domain:
        raise NotImplementedError

    def disk_files(self, name: str) -> list[tuple[str, str]]:
        """(target, file) of each disk of domain ``name``: all that the check that no two domains share an
        image needs of every other domain, for each change. The default reads the whole domain; a driver
        whose :meth:`domain` asks more of its hypervisor overrides it (the same disks, or the same error)."""
        return [(d.target, d.path) for d in self.domain(name).disks]

    def domain_state(self, name: str) -> str:
        """"running", "paused" or "shut off" (``snapfw domains``). The default reads the whole domain; a
        driver overrides it to tell the state also of a domain snapfw cannot snapshot."""
        return self.domain(name).state

    def define(self, domain: dict) -> None:
        raise NotSupported(f"driver {self.scheme} cannot change a domain's definition")

    def define_clone(self, source: str, clone: dict) -> None:
        """Define a new domain ``clone["name"]`` as a copy of domain ``source``'s definition with a new
        identity and each disk of ``clone["disks"]`` (target, path, format) on the given file; disks of
        ``source`` not in the list are left out. Refuses a name that exists; never starts it."""
        raise NotSupported(f"driver {self.scheme} cannot define new domains (clones)")

    def undefine_clone(self, clone: dict) -> None:
        """Undo :meth:`define_clone`, also after a partial one: remove ``clone["name"]``'s definition only
        while it is still the one define_clone made (the same disk files)."""
        raise NotSupported(f"driver {self.scheme} cannot define new domains (clones)")

    def pause(self, domain: str) -> None:
        """Pause running ``domain`` (its disks drained and flushed) for a plan window."""
        raise NotSupported(f"driver {self.scheme} cannot pause domains")

    def resume(self, domain: str) -> None:
        """Let ``domain`` run again if it is paused; idempotent (a plan's undo and ``check --repair`` call it)."""
        raise NotSupported(f"driver {self.scheme} cannot resume domains")

    def agent_problem(self, domain: str, seconds: float) -> str | None:
        """Why the guest agent of running ``domain`` cannot freeze its filesystems now (none, silent for
        ``seconds``, frozen already), or None if it can: asked before any change, for ``--quiesce``."""
        return f"driver {self.scheme} cannot freeze guest filesystems"

    def freeze(self, domain: str, seconds: float) -> int:
        """Freeze the guest's filesystems through its agent within ``seconds``; how many it froze."""
        raise NotSupported(f"driver {self.scheme} cannot freeze guest filesystems")

    def thaw(self, domain: str, seconds: float) -> None:
        """Thaw the guest's filesystems if frozen (idempotent), within ``seconds``."""
        raise NotSupported(f"driver {self.scheme} cannot thaw guest filesystems")

    def restart_problem(self, domain: Domain) -> str | None:
        """Why snapfw cannot stop ``domain`` and start it again from its definition (a live revert does,
        and so does its rollback), or None if it can."""
        return f"driver {self.scheme} cannot stop and start domains"

    def stop(self, domain: str) -> None:
        """Stop running ``domain`` at once, discarding its running state (the disks keep what was
        written); return once the hypervisor holds none of its images. Idempotent: nothing if stopped."""
        raise NotSupported(f"driver {self.scheme} cannot stop domains")

    def start(self, domain: str, paused: bool) -> None:
        """Start ``domain`` from its definition as it is now (the disks it names), ``paused`` or running.
        Idempotent: a domain that runs already is left as it is, except that one a crash left waiting to
        be continued is continued unless ``paused``."""
        raise NotSupported(f"driver {self.scheme} cannot start domains")

    def mirror(self, domain: str, snapshots: list[dict], current: str | None, repair: bool) -> list[str]:
        """Compare the hypervisor's own snapshot records of ``domain`` with ``snapshots``, the catalog's
        mirrored ones (parents first; each a dict: name, parent (its nearest mirrored ancestor), created,
        description, state (the domain's when it was taken), definition, and disks: target, file, active
        (the file the disk ran on right after it), tag for an internal one; and memory: its memory image
        file, or None for a disk-only snapshot), and with ``current``; return
        each difference in words. With ``repair``, first make the records match, saying so in each line:
        only records snapfw made may be changed or removed, never one the user made. Drivers with
        MIRROR in ``capabilities`` only."""
        raise NotSupported(f"driver {self.scheme} keeps no snapshot records of its own to mirror into")

    def explain(self, method: str, *args) -> tuple[list[str], str | None]:
        """For --dry-run: the hypervisor calls ``self.<method>(*args)`` will make, in this driver's own words
        (QMP commands with their arguments, libvirt API calls with their flags), and whether and for how
        long at most the guest pauses meanwhile (None: the driver does not say). Reads the hypervisor's
        state (node names) but changes nothing. ``method``: live_snapshot, block_commit, block_stream, stop
        or start, with the arguments those take (without ``progress``)."""
        return [], None

    def live_snapshot(self, domain: str, actions: list[dict]) -> None:
        """Run every disk's live action (snapfw.live) of running ``domain`` as ONE atomic operation:
        all take effect or none does."""
        raise NotSupported(f"driver {self.scheme} cannot snapshot running domains")

    def undo_live_snapshot(self, domain: str, actions: list[dict], progress=None) -> None:
        """Reverse whatever of :meth:`live_snapshot` took effect; idempotent. ``progress(percent)`` for
        block jobs it waits for."""
        raise NotSupported(f"driver {self.scheme} cannot snapshot running domains")

    def block_commit(self, domain: str, target: str, top: str, base: str, job: str, progress=None) -> None:
        """Merge file ``top`` into ``base`` (its backing file) on disk ``target`` of running ``domain`` as
        block job ``job``; when ``top`` is the active file, complete the job so the disk pivots to ``base``.
        Return once the hypervisor's own view shows ``top`` out of the disk's chain and no longer open.
        Idempotent: re-attach to ``job`` if it exists, return at once if the result is already there.
        ``progress(percent)`` from the job's offset/length."""
        raise NotSupported(f"driver {self.scheme} cannot merge the disks of running domains")

    def delete_tag(self, domain: str, target: str, path: str, tag: str) -> None:
        """Delete internal snapshot ``tag`` from ``path``, the active file of disk ``target`` of running
        ``domain``, through the hypervisor (it holds the file read-write); nothing if the tag is gone."""
        raise NotSupported(f"driver {self.scheme} cannot delete internal snapshots of running domains")

    def block_stream(self, domain: str, target: str, path: str, old_backing: str, new_backing: str | None,
                     job: str, progress=None) -> None:
        """Copy into file ``path`` of disk ``target`` of running ``domain`` what it reads from
        ``old_backing``, so it is then backed by ``new_backing`` (None: nothing), as block job ``job``.
        Return once the hypervisor's view shows that chain and ``old_backing`` closed; idempotent."""
        raise NotSupported(f"driver {self.scheme} cannot merge the disks of running domains")
