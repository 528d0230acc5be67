"""Memory state (system checkpoints): a snapshot that also keeps the guest's RAM and device state.

A memory backend (:class:`snapfw.backend.MemoryBackend`, from the ``snapfw_memory_backends`` hook)
serves the hypervisor drivers it names. Creating a snapshot with memory puts these prepare steps around
the disks' one live snapshot, so that memory and disks are of the same instant:

    SaveMemory      the image file (0600) is made, the backend writes it and leaves the guest paused
    LiveSnapshot    every disk at once, while the guest is paused (snapfw.live)
    CompleteMemory  the backend writes what is left (QEMU: the last pass and device state), fsync; the
                    guest runs again

A backend whose hypervisor takes memory and disks in one call for a kind (``with_disks``: libvirt's
live external snapshot) gets the disks' live actions in SaveMemory instead, and there is no LiveSnapshot.

The guest's pause is in this one place: SaveMemory holds it (a plan window, snapfw.live) and its undo
resumes it (and removes the partial image), so a failure, Ctrl-C or a crash followed by ``check --repair``
never leaves it paused. As a window's hold, that undo runs before the others: once QEMU has finished the
migration, its images are inactive (read-only) until the guest runs again, and the disks' transaction
cannot be undone before. Reverting to such a snapshot ends with :class:`RestoreMemory` instead of
starting the domain afresh.

The image is a file ``<domain>.<snapshot>.memory`` next to the domain's first disk: it stays with the
disks it resumes against, on storage sized for them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from . import plugins
from .backend import MEMORY_LIVE, MemoryBackend
from .connection import fsync_dir
from .errors import FileError, NotSupported, Refused
from .live import PAUSE_SECONDS, LiveSnapshot, describe_action
from .names import fit_file_name
from .plan import Step
from .steps import RemoveFile

SUFFIX = ".memory"
# how long writing or loading a memory image may take before it is given up (the guest resumes)
SAVE_SECONDS = 600.0
# free space asked for beyond the backend's estimate: device state, and pages a live copy sends again
MARGIN = 64 << 20


def backend_for(name: str | None, scheme: str) -> MemoryBackend:
    """Memory backend ``name``, or the one that serves driver ``scheme``; NotSupported if none does."""
    found = plugins.memory_backends()
    if name is not None:
        if name not in found:
            raise NotSupported(f"memory backend {name!r} is not installed (have: {', '.join(sorted(found)) or 'none'})")
        return found[name][0]()
    serving = sorted(n for n, (cls, _) in found.items() if scheme in cls.drivers)
    if not serving:
        raise NotSupported(f"no installed memory backend serves the {scheme} driver: snapshots of its domains "
                           "keep the disks only")
    return found[serving[0]][0]()


def image_path(domain: str, snapshot: str, folder: str) -> str:
    """A free name ``<domain>.<snapshot>[.N].memory`` in ``folder``."""
    stem = fit_file_name(f"{domain}.{snapshot}", 250 - len(SUFFIX))
    for n in range(0, 10000):
        path = os.path.join(folder, f"{stem}{'' if n == 0 else f'.{n}'}{SUFFIX}")
        if not os.path.lexists(path):
            return path
    raise Refused(f"no free file name for the memory image {stem}{SUFFIX} in {folder}")


def check_space(folder: str, needed: int, domain: str) -> None:
    """Refuse before any change unless ``folder`` has room for a memory image of ``needed`` bytes."""
    try:
        st = os.statvfs(folder)
    except OSError as e:
        raise FileError.of(e, folder) from None
    free = st.f_bavail * st.f_frsize
    if free < needed + MARGIN:
        raise Refused(f"not enough free space in {folder} for the memory image of {domain}: it needs about "
                      f"{needed + MARGIN} bytes (guest RAM and device state, plus {MARGIN >> 20} MiB), "
                      f"{free} are free")


@dataclass
class SaveMemory(Step):
    """Write running ``domain``'s memory to the new file ``path`` (mode 0600) with memory backend
    ``backend``, ``kind`` live or paused; the guest is left paused, for at most ``seconds`` before the next
    step. With ``actions`` (a backend's ``with_disks`` kind), the disks' live snapshot is taken in the same
    call. Undo: the backend's abort (the guest runs again if it ran before, ``resume``), the driver's undo
    of ``actions``, and the image, whole or partial, is removed."""

    domain: str
    backend: str
    path: str
    kind: str
    settings: dict
    resume: bool = True
    bytes_to_copy: int = 0
    seconds: float = PAUSE_SECONDS
    actions: list = field(default_factory=list)
    pauses = True

    def __post_init__(self):
        # a window from the end of the save to CompleteMemory; with the disks taken in the same call the
        # guest paused and ran again inside it, and the backend says for how long
        self.holds = self.held_after_do = not self.actions

    def do(self, ctx):
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise FileError.of(e, self.path) from e
        os.close(fd)
        fsync_dir(os.path.dirname(self.path))  # the journal names a file that exists, or none
        backend, deadline = backend_for(self.backend, ""), time.monotonic() + SAVE_SECONDS
        if self.actions:
            self.held_seconds = backend.save_with_disks(ctx.driver, self.domain, self.path, self.kind, self.settings,
                                                        self.actions, deadline)
        else:
            backend.save(ctx.driver, self.domain, self.path, self.kind, self.settings, deadline)

    def undo(self, ctx):
        try:
            backend_for(self.backend, "").abort(ctx.driver, self.domain, self.settings, self.resume)
            if self.actions:
                LiveSnapshot(self.domain, self.actions).undo(ctx)
        finally:
            RemoveFile(self.path).do(ctx)

    def writes(self):
        return LiveSnapshot(self.domain, self.actions).writes()

    def describe(self):
        how = ("copied while it runs, paused for the last pass" if self.kind == MEMORY_LIVE
               else "paused while it is written")
        said = (f"save the memory of {self.domain} to {self.path} ({how}; {self.backend} backend, about "
                f"{self.bytes_to_copy} bytes)")
        if self.actions:
            disks = "; ".join(map(describe_action, self.actions))
            return f"{said} and snapshot its disks at that instant, in the same call: {disks}"
        return f"{said}; it stays paused for the disks"


@dataclass
class CompleteMemory(Step):
    """Write the rest of the memory image ``path`` (fsynced) and let ``domain`` run again if ``resume``.
    Nothing to undo of its own: SaveMemory's undo lets the guest run and removes the image."""

    domain: str
    backend: str
    path: str
    settings: dict
    resume: bool = True
    releases = True

    def do(self, ctx):
        backend_for(self.backend, "").complete(ctx.driver, self.domain, self.path, self.settings, self.resume,
                                               time.monotonic() + SAVE_SECONDS)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)  # durable before the snapshot that names it is recorded
        finally:
            os.close(fd)

    def undo(self, ctx):
        pass

    def describe(self):
        return f"complete the memory image {self.path}" + (f" and resume {self.domain}" if self.resume else "")


@dataclass
class RestoreMemory(Step):
    """Start stopped ``domain`` from its (reverted) definition with the memory image ``path`` loaded,
    ``paused`` or running: the guest is back at the snapshot's instant. Forward-only and idempotent."""

    domain: str
    backend: str
    path: str
    paused: bool = False

    def do(self, ctx):
        backend_for(self.backend, "").restore(ctx.driver, self.domain, self.path, self.paused)

    def describe(self):
        return (f"start {self.domain} from its memory image {self.path}"
                f"{' (left paused)' if self.paused else ''}")


def check_restorable(snapshot, domain, keep_config: bool) -> None:
    """Refuse, before any change, to resume ``snapshot``'s memory image on disks or a configuration other
    than those of its instant."""
    m = snapshot.memory
    bound = m.data.get("disks", {})
    recorded = {r.target: r.backend for r in snapshot.disks}
    why = None
    if recorded != bound:
        why = (f"its disk records ({_listed(recorded)}) are not those it was saved with ({_listed(bound)})")
    elif {d.target for d in domain.disks} != set(bound):
        why = (f"the domain's disks are now {', '.join(sorted(d.target for d in domain.disks))}, the image was "
               f"saved with {', '.join(sorted(bound))}")
    elif keep_config:
        why = "--keep-config would start it with today's configuration, not the one of its instant"
    elif not snapshot.config.get("definition"):
        why = "the snapshot stored no configuration to start it with"
    else:
        try:
            size = os.path.getsize(m.file)
        except OSError as e:
            raise Refused(f"cannot resume snapshot {snapshot.name}'s memory: its image {m.file} is unreadable "
                          f"({e.strerror}); revert with --stopped to get its disks only") from None
        if size != m.size:
            why = f"its image {m.file} has {size} bytes, {m.size} were written"
    if why:
        raise Refused(f"cannot resume snapshot {snapshot.name}'s memory: {why}; revert with --stopped to get "
                      "its disks only")


def _listed(disks: dict) -> str:
    return ", ".join(f"{t}={b}" for t, b in sorted(disks.items())) or "none"

