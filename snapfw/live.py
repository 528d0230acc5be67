"""Live snapshots of a running domain (public API for plugins): backends say what, the driver says how.

For a running domain a backend does not append program steps for its disk: it appends a *live action*
to ``op.live``, a plain dict that names the disk (target, the hypervisor's node name), the file that is
active now and what to do with it. The core gathers every disk's actions into ONE :class:`LiveSnapshot`
step, which the hypervisor driver runs as one atomic operation (one QMP ``transaction``; one libvirt
``snapshotCreateXML`` with ATOMIC), with one undo. Actions are JSON: the step is journaled.

    {"kind": "external", "target": "vdb", "node": "disk1", "file": FROZEN, "format": "raw", "overlay": NEW}
        freeze FILE; the guest now writes to the new qcow2 overlay NEW on it (the driver makes NEW)
    {"kind": "internal", "target": "vda", "node": "disk0", "file": ACTIVE, "tag": NAME}
        an internal snapshot (tag) NAME inside the qcow2 file ACTIVE, taken by the running hypervisor

Deleting a snapshot of a running domain merges files the guest's chain holds: no ``qemu-img`` may write
them (rule 1), so a backend appends :class:`LiveCommit` / :class:`LiveStream` finish steps for those, and
the driver runs each as a block job of the hypervisor. A job outlives snapfw: its id is fixed by the step
(journaled before it starts), so ``check --repair`` re-attaches to it instead of starting it again.

An internal snapshot (tag) in the active file of a running disk is deleted by the hypervisor too
(:class:`LiveDeleteTag`): QEMU holds that file open read-write, so ``qemu-img snapshot -d`` may not touch it.

``create --quiesce`` adds the outer hold: :class:`Freeze` ... :class:`Thaw`, the guest's filesystems
frozen through its guest agent (the driver's ``freeze``/``thaw``), around the pause if there is one.

A disk whose snapshot is a host step rather than the hypervisor's (a btrfs subvolume, an LVM volume)
appends that step to ``op.window``: the core then runs the transaction and those steps inside a *plan
window* (:func:`window`) that pauses the guest (:class:`Pause` ... :class:`Resume`), so every disk is
taken at one instant; the executor resumes the guest first whatever fails, and ``check --repair`` after a
crash. Later holds (a guest-agent freeze, a memory image) join the same window.

Reverting a running domain stops it (:class:`StopDomain`, undone by starting it again), reverts the disks
offline as the backends always do, and starts it again from its definition (:class:`StartDomain`).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import config
from .errors import BadInput
from .plan import Step

EXTERNAL = "external"
INTERNAL = "internal"


def external_action(op, overlay: str) -> dict:
    """Freeze ``op``'s active file under a new overlay ``overlay`` (call before the graph moves on)."""
    g = op.graph
    return {"kind": EXTERNAL, "target": g.target, "node": op.disk.node, "file": g.active,
            "format": g.active_format, "overlay": overlay}


def internal_action(op, tag: str) -> dict:
    g = op.graph
    return {"kind": INTERNAL, "target": g.target, "node": op.disk.node, "file": g.active, "tag": tag}


def describe_action(a: dict) -> str:
    if a["kind"] == INTERNAL:
        return f"{a['target']}: internal snapshot {a['tag']!r} in {a['file']}"
    return f"{a['target']}: freeze {a['file']}, new overlay {a['overlay']}"


# the longest a plan window may keep a guest paused: a step that would start later fails, and the
# snapshot is undone with the guest running again
PAUSE_SECONDS = 30.0


@dataclass
class Pause(Step):
    """Open a pause window on running ``domain``: its vCPUs stop (QEMU drains and flushes every disk first),
    so host steps of disks that are not the hypervisor's see every disk at the same instant. Undo resumes it
    (only while paused: idempotent); the executor runs that first whenever the plan fails."""

    domain: str
    seconds: float = PAUSE_SECONDS
    holds = True
    pauses = True

    def do(self, ctx):
        ctx.driver.pause(self.domain)

    def undo(self, ctx):
        ctx.driver.resume(self.domain)

    def describe(self):
        return f"pause {self.domain} (at most {self.seconds:g} s)"


class _Release(Step):
    """Closes the innermost plan window. Nothing to undo: the holding step's undo releases again."""

    releases = True

    def undo(self, ctx):
        pass


@dataclass
class Resume(_Release):
    """Close the pause window: ``domain`` runs again."""

    domain: str

    def do(self, ctx):
        ctx.driver.resume(self.domain)

    def describe(self):
        return f"resume {self.domain}"


# how long the guest agent may take to answer, and the longest the guest's filesystems stay frozen
AGENT_SECONDS = 5.0
FREEZE_SECONDS = 10.0


@dataclass
class Freeze(Step):
    """Open a freeze window on running ``domain``: its guest agent flushes and freezes the guest's
    filesystems, so the snapshot holds them clean (quiesced), not only crash-consistent. Undo thaws them
    (idempotent); the executor runs that first whenever the plan fails, ``check --repair`` after a crash."""

    domain: str
    seconds: float = FREEZE_SECONDS
    holds = True
    filesystems = None  # how many the agent froze, once done

    def do(self, ctx):
        self.filesystems = ctx.driver.freeze(self.domain, AGENT_SECONDS + self.seconds)

    def undo(self, ctx):
        ctx.driver.thaw(self.domain, AGENT_SECONDS)

    def describe(self):
        return f"freeze the filesystems of {self.domain} through its guest agent (at most {self.seconds:g} s)"


@dataclass
class Thaw(_Release):
    """Close the freeze window: the guest's filesystems take writes again."""

    domain: str

    def do(self, ctx):
        ctx.driver.thaw(self.domain, AGENT_SECONDS)

    def describe(self):
        return f"thaw the filesystems of {self.domain}"


def window_seconds() -> tuple[float, float]:
    """The deadlines (pause, freeze) of plan windows: the ``window`` section of the configuration file
    (``pause_seconds``, ``freeze_seconds``), else PAUSE_SECONDS and FREEZE_SECONDS."""
    path, sections = config.load()
    given = sections.get("window") or {}
    if not isinstance(given, dict) or set(given) - {"pause_seconds", "freeze_seconds"}:
        raise BadInput(f"config {path}: window must be a mapping of pause_seconds and freeze_seconds")
    out = []
    for key, default in (("pause_seconds", PAUSE_SECONDS), ("freeze_seconds", FREEZE_SECONDS)):
        value = given.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise BadInput(f"config {path}: window {key} must be a positive number of seconds")
        out.append(float(value))
    return out[0], out[1]


def window(domain: str, steps: list, pause: bool, freeze: bool = False,
           seconds: tuple[float, float] = (PAUSE_SECONDS, FREEZE_SECONDS)) -> list:
    """``steps`` (the transaction, host snapshot steps) as the plan window of running ``domain``: between
    :class:`Pause` and :class:`Resume` if ``pause`` (some disk is not the hypervisor's: its host step and
    the transaction must see one instant; a guest already paused stays so and needs none), and all of it
    between :class:`Freeze` and :class:`Thaw` if ``freeze`` (quiesce). ``seconds``: their deadlines."""
    steps = [Pause(domain, seconds[0]), *steps, Resume(domain)] if pause else list(steps)
    return [Freeze(domain, seconds[1]), *steps, Thaw(domain)] if freeze else steps


def held(steps: list, quiesce_problem: str | None = None) -> dict:
    """What the plan window of ``steps`` did, once they ran, for the snapshot's record: how long the guest
    was paused and its filesystems frozen (seconds, or None if not), how many were frozen, and why a
    quiesce that was asked for (``--quiesce=try``) could not be done."""
    pause = next((s for s in steps if s.pauses), None)
    freeze = next((s for s in steps if isinstance(s, Freeze)), None)
    out = {"paused_seconds": pause.held_seconds if pause else None, "quiesced": freeze is not None,
           "frozen_seconds": freeze.held_seconds if freeze else None}
    if freeze is not None:
        out["frozen_filesystems"] = freeze.filesystems
    if quiesce_problem:
        out["quiesce_problem"] = quiesce_problem
    return out


@dataclass
class LiveSnapshot(Step):
    """Every disk's live action at once, atomically, by the driver; undo reverses what took effect
    (idempotent: ``check --repair`` may run it again, also after a partial or absent ``do``)."""

    domain: str
    actions: list

    def do(self, ctx):
        ctx.driver.live_snapshot(self.domain, self.actions)

    def undo(self, ctx):
        ctx.driver.undo_live_snapshot(self.domain, self.actions, progress=ctx.progress)

    def writes(self):
        """The files that take internal snapshots; a frozen file is only read from now on."""
        return [a["file"] for a in self.actions if a["kind"] == INTERNAL]

    def describe(self):
        actions = "; ".join(map(describe_action, self.actions))
        return f"snapshot the disks of running {self.domain} at once: {actions}"

    def explain(self, ctx):
        return ctx.driver.explain("live_snapshot", self.domain, self.actions)


def job_id(*parts: str) -> str:
    """A block job's id, the same for the same work in every run, so recovery finds the job again."""
    import hashlib  # here: only live merges need it, and importing it costs every command

    return "snapfw-" + hashlib.sha256("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:20]


@dataclass
class LiveCommit(Step):
    """Merge ``top`` into ``base``, its backing file, on disk ``target`` of running ``domain``, as the
    hypervisor's block job ``job`` (``top`` active: the disk then runs on ``base``). Forward-only and
    idempotent: ``do`` re-attaches to the job if it still runs and returns only once the hypervisor's own
    view shows ``top`` out of the disk's chain and closed, so a later step may remove it."""

    domain: str
    target: str
    top: str
    base: str
    bytes_to_copy: int = 0
    job: str = ""

    def __post_init__(self):
        self.job = self.job or job_id("commit", self.domain, self.target, self.top, self.base)

    def do(self, ctx):
        ctx.driver.block_commit(self.domain, self.target, self.top, self.base, self.job, ctx.progress)

    def writes(self):
        return [self.base]

    def describe(self):
        return (f"live commit {self.top} into {self.base} on disk {self.target} of running {self.domain} "
                f"(block job {self.job}, {self.bytes_to_copy} bytes)")

    def explain(self, ctx):
        return ctx.driver.explain("block_commit", self.domain, self.target, self.top, self.base, self.job)


@dataclass
class LiveStream(Step):
    """Copy into ``path`` what it reads from its backing file ``old_backing``, then back it by
    ``new_backing`` (None: standalone), on disk ``target`` of running ``domain``, as block job ``job``.
    Forward-only and idempotent like :class:`LiveCommit`; ``old_backing`` is closed when it returns."""

    domain: str
    target: str
    path: str
    old_backing: str
    new_backing: str | None
    bytes_to_copy: int = 0
    job: str = ""

    def __post_init__(self):
        self.job = self.job or job_id("stream", self.domain, self.target, self.path, self.old_backing)

    def do(self, ctx):
        ctx.driver.block_stream(self.domain, self.target, self.path, self.old_backing, self.new_backing,
                                self.job, ctx.progress)

    def writes(self):
        return [self.path]

    def describe(self):
        onto = self.new_backing or "no backing file (standalone)"
        return (f"live stream {self.old_backing} into {self.path} onto {onto} on disk {self.target} of running "
                f"{self.domain} (block job {self.job}, {self.bytes_to_copy} bytes)")

    def explain(self, ctx):
        return ctx.driver.explain("block_stream", self.domain, self.target, self.path, self.old_backing,
                                  self.new_backing, self.job)


@dataclass
class LiveDeleteTag(Step):
    """Delete internal snapshot ``tag`` from ``path``, the active file of disk ``target`` of running
    ``domain``, through the hypervisor that holds it. Forward-only and idempotent: a tag already gone is done."""

    domain: str
    target: str
    path: str
    tag: str

    def do(self, ctx):
        ctx.driver.delete_tag(self.domain, self.target, self.path, self.tag)

    def describe(self):
        return (f"delete internal snapshot {self.tag!r} from {self.path} (disk {self.target}) through running "
                f"{self.domain}")


@dataclass
class StopDomain(Step):
    """Stop running ``domain`` so a revert can work on its images offline (the state since the current
    snapshot is discarded, as with ``virsh snapshot-revert``). Undo starts it again from its definition,
    which the undo of the later steps has put back to the old chain, ``paused`` as it was."""

    domain: str
    paused: bool = False

    def do(self, ctx):
        ctx.driver.stop(self.domain)

    def undo(self, ctx):
        ctx.driver.start(self.domain, self.paused)

    def describe(self):
        return f"stop {self.domain} (its running state is discarded)"

    def explain(self, ctx):
        return (ctx.driver.explain("stop", self.domain)[0],
                "the guest is down from here until the plan starts it again (or until a failure's undo does)")


@dataclass
class StartDomain(Step):
    """Start ``domain`` from its (new) definition, ``paused`` or running; forward-only and idempotent."""

    domain: str
    paused: bool = False

    def do(self, ctx):
        ctx.driver.start(self.domain, self.paused)

    def describe(self):
        return f"start {self.domain}{' paused' if self.paused else ''}"

    def explain(self, ctx):
        return ctx.driver.explain("start", self.domain, self.paused)
