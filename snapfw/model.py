"""Domains, disks, snapshots, the snapshot tree and the image files snapfw manages: plain data, no I/O."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import BadInput, UnknownSnapshot

FORMATS = ("qcow2", "raw")


@dataclass
class Disk:
    """One disk of a domain as its definition names it: the active image file. ``node``: the hypervisor's
    name for the disk's top block node while it runs (QMP node-name), for live actions."""

    target: str
    path: str
    format: str
    backend: str | None = None
    node: str | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Domain:
    """A guest as its hypervisor driver defines it.

    ``running``: a hypervisor process holds its images (``state`` says "running" or "paused"; "shut off"
    when not). ``live_chains``: for each file a running disk's chain holds, that chain from the file down
    (top first, in ``qemu-img info`` form) as the hypervisor reports it; inspection reads it instead of
    opening an image the guest holds (rule 1). ``notes``: what the driver leaves out and why (a
    read-only CD-ROM), for every plan to say. ``stream_below_active``: the driver can stream into a file
    below a running disk's active one (QEMU's block-stream can; libvirt's block pull writes the active
    file only), so a live delete plans a stream there. ``definition``: the rest of the domain's
    configuration in the driver's own form (libvirt: the inactive XML; qmp: the launch spec's argv), kept
    with each snapshot so a revert puts it back; empty for a driver that has none. ``pid``: the
    hypervisor process running it, the one QEMU that may hold its images while snapfw writes them.
    """

    name: str
    disks: list[Disk]
    running: bool = False
    allowed_roots: tuple[str, ...] = ()
    state: str = ""
    live_chains: dict[str, list[dict]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    stream_below_active: bool = True
    definition: dict = field(default_factory=dict)
    pid: int | None = None

    def __post_init__(self):
        self.state = self.state or ("running" if self.running else "shut off")

    def disk(self, target: str) -> Disk:
        for d in self.disks:
            if d.target == target:
                return d
        raise BadInput(f"domain {self.name!r} has no disk {target!r}")

    def config(self) -> dict:
        """What a snapshot keeps of the domain so a revert can rebuild it."""
        config = {"name": self.name, "disks": [{"target": d.target, "format": d.format} for d in self.disks]}
        return {**config, "definition": self.definition} if self.definition else config


@dataclass
class ImageFile:
    """An image file snapfw manages for one disk of a domain; ``owned``: snapfw made it (may remove it)."""

    path: str
    target: str
    format: str
    backing: str | None
    owned: bool


@dataclass
class DiskRecord:
    """A snapshot's state of one disk, as the backend that took it describes it (``data``)."""

    target: str
    backend: str
    data: dict


@dataclass
class MemoryRecord:
    """A snapshot's memory image: the guest's RAM and device state at the snapshot's instant, in ``file``
    (mode 0600: it holds guest secrets), written by memory backend ``backend``. ``kind``: how it was
    taken (MEMORY_LIVE or MEMORY_PAUSED). ``data``: what it is bound to, ``{"disks": {target: backend}}``
    (the disk records it resumes against) plus what the backend keeps."""

    backend: str
    kind: str
    file: str
    size: int = 0
    data: dict = field(default_factory=dict)


@dataclass
class Snapshot:
    name: str
    parent: str | None
    created: float
    description: str = ""
    current: bool = False
    disks: list[DiskRecord] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    children: list[str] = field(default_factory=list)
    memory: MemoryRecord | None = None

    def record(self, target: str) -> DiskRecord | None:
        for r in self.disks:
            if r.target == target:
                return r
        return None


class Tree:
    """The snapshots of one domain, by name, with parent/children links and the current one."""

    def __init__(self, snapshots: list[Snapshot]):
        self.by_name = {s.name: s for s in snapshots}
        for s in snapshots:
            s.children = []
        for s in snapshots:
            if s.parent is not None and s.parent in self.by_name:
                self.by_name[s.parent].children.append(s.name)
        self.current = next((s.name for s in snapshots if s.current), None)

    def __contains__(self, name):
        return name in self.by_name

    def __iter__(self):
        return iter(self.by_name.values())

    def __len__(self):
        return len(self.by_name)

    def descendants(self, name: str) -> list[str]:
        """All snapshots below ``name``, children before their own children (breadth first)."""
        out, queue = [], list(self.by_name[name].children)
        while queue:
            n = queue.pop(0)
            out.append(n)
            queue.extend(self.by_name[n].children)
        return out


def find_snapshot(tree: Tree, domain: str, name: str) -> Snapshot:
    """``name`` in ``domain``'s tree, or UnknownSnapshot."""
    if name not in tree:
        raise UnknownSnapshot.of(domain, name)
    return tree.by_name[name]
