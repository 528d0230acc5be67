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
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def describe(self):
        actions = "; ".join(map(describe_action, self.actions))
        return f"snapshot the disks of running {self.domain} at once: {actions}"
