"""The ``external`` backend: a snapshot is the frozen image file; writes go to a new qcow2 overlay.

Create freezes the active file and puts an overlay on it. Revert to any snapshot puts a fresh overlay on
that snapshot's frozen file, so every other branch stays. Delete merges the frozen file's data away:
commit its only child into it, or stream it into each child (``qemu-img rebase``), whichever copies
fewer allocated bytes, except that the user's own image is committed into unless that copies far more
(``_keep_own_image``). A child holding internal snapshots reads their unallocated clusters through the
file; neither merge would keep those intact, so then the file stays as a hidden node of the tree.

While the domain runs, a merge that writes a file of the guest's chain is a block job of the hypervisor
(``LiveCommit`` / ``LiveStream``); files of other branches are not open in it and keep the qemu-img steps
(which may read the guest's backing files: the hypervisor holds those read-only and shares reads).
"""

from __future__ import annotations

from snapfw.api import (
    LIVE_CREATE,
    LIVE_DELETE,
    OFFLINE_CREATE,
    OFFLINE_DELETE,
    OFFLINE_REVERT,
    Commit,
    CreateOverlay,
    DiskBackend,
    ImageFile,
    LiveCommit,
    LiveStream,
    NotSupported,
    Rebase,
    external_action,
    hookimpl,
    qemuimg,
)

# Committing into the user's own image copies "far more" than streaming, and then streams instead,
# when it copies over FAR_MORE_BYTES in all and over FAR_MORE_RATIO times what streaming copies.
FAR_MORE_BYTES = 1 << 30
FAR_MORE_RATIO = 4


def _bytes(op, path: str, fmt: str, depth: int) -> int:
    """Bytes of ``path``'s view that come from the layer ``depth`` below it (0: the file itself).

    A file of a running guest's chain is mapped with ``-U`` (advisory: the guest may be writing it), which
    is good enough to price a merge; the merge itself is the hypervisor's job (rule 1)."""
    extents = qemuimg.map_extents(path, fmt, shared=path in op.domain.live_chains)
    return sum(e["length"] for e in extents if e["depth"] == depth and e["data"])


def _keep_own_image(op, frozen: str, child: str, commit: int, stream: int) -> bool:
    """Whether to commit ``child`` into ``frozen`` although streaming copies less: streaming would leave
    ``frozen`` read by nothing, and if snapfw did not create it, it is the user's own image, stale from
    then on, while committing makes it stand for ``child`` (the domain ends on its own file, as with
    ``virsh blockcommit --active --pivot``). Not when that copies far more: then the plan says so."""
    if op.graph.files[frozen].owned:
        return False
    if commit > FAR_MORE_BYTES and commit > FAR_MORE_RATIO * stream:
        op.notes.append(f"{frozen} is streamed into {child}, not committed into: committing would keep the "
                        f"disk on its own image but copy {commit} bytes, far more than streaming's {stream} "
                        f"(over {FAR_MORE_BYTES >> 30} GiB and over {FAR_MORE_RATIO} times as much)")
        return False
    return True


def _buried(op, children) -> str | None:
    """The child below a running disk's active file that a stream would write, if the driver cannot."""
    if op.domain.stream_below_active:
        return None
    return next((c for c in children if c in op.domain.live_chains and c != op.graph.active), None)


class ExternalBackend(DiskBackend):
    name = "external"
    description = "external snapshots: frozen image + qcow2 overlay (qemu-img create -b, commit, rebase)"
    capabilities = frozenset({OFFLINE_CREATE, OFFLINE_REVERT, OFFLINE_DELETE, LIVE_CREATE, LIVE_DELETE})
    priority = 20
    cost = {"create": "metadata only", "revert": "metadata only",
            "delete": "copies the smaller side's allocated bytes", "space": "one overlay file per branch"}

    def _overlay(self, op, label, backing):
        g = op.graph
        path = op.new_image_path(label)
        if op.domain.running:  # the running QEMU makes the overlay and switches to it (blockdev-snapshot-sync)
            op.live.append(external_action(op, path))
        else:
            op.prepare.append(CreateOverlay(path, backing, g.format(backing)))
        g.files[path] = ImageFile(path, g.target, "qcow2", backing, True)
        g.active, g.active_format = path, "qcow2"

    def create(self, op, snapshot):
        frozen = op.graph.active
        self._overlay(op, snapshot, frozen)
        return {"file": frozen}

    def revert(self, op, snapshot, record):
        op.inspect(record["file"], op.graph.format(record["file"]))
        self._overlay(op, snapshot, record["file"])

    def delete(self, op, snapshot, record):
        g = op.graph
        frozen = record["file"]
        children = g.children(frozen)
        if not children:
            return  # nothing reads through it: the core removes it
        shared = [c for c in children if c in g.pinned]
        if shared:  # either merge would write a file other domains (linked clones) read through
            op.notes.append(f"{frozen} stays as a hidden backing file: {', '.join(shared)} is a shared base "
                            "other domains read through")
            return
        fmt = g.format(frozen)
        op.inspect(frozen, fmt)
        with_tags = [c for c in children if op.inspect(c, g.format(c)).get("snapshots")]
        if with_tags:
            op.notes.append(f"{frozen} stays as a hidden backing file: {', '.join(with_tags)} hold internal "
                            "snapshots that read through it")
            return
        commit = stream = None
        if len(children) == 1 and frozen not in g.pinned:  # never write into a base others read
            commit = _bytes(op, children[0], g.format(children[0]), 0)
        streamed = {}  # child -> bytes it would copy from ``frozen``
        if frozen in g.pinned or not [n for n in g.referrers(frozen) if n != snapshot]:
            buried = _buried(op, children)
            if buried and commit is None:
                raise NotSupported(f"snapshot {snapshot} of disk {g.target} cannot be deleted while domain "
                                   f"{op.domain.name} runs: {frozen} would be streamed into {buried}, below the "
                                   "active file, which this driver cannot do live (shut the domain down first)")
            if not buried:
                streamed = {c: _bytes(op, c, g.format(c), 1) for c in children}
                stream = sum(streamed.values())
        if commit is not None and (stream is None or commit <= stream
                                   or _keep_own_image(op, frozen, children[0], commit, stream)):
            self._commit(op, frozen, children[0], commit)
        elif stream is not None:
            self._stream(op, frozen, streamed, op.inspect(frozen, fmt))

    def _commit(self, op, base, top, cost):
        """``top`` (the only child) is written into ``base``, which then stands for whatever ``top`` was."""
        g, live = op.graph, op.domain.live_chains
        if top in live:  # the guest's chain: QEMU merges (an active top pivots) and relinks its child
            op.finish.append(LiveCommit(op.domain.name, g.target, top, base, cost))
        else:
            op.finish.append(Commit(top, g.format(top), base, cost))
        for name in g.referrers(top):
            g.records[name] = {**g.records[name], "file": base}
        for child in g.children(top):
            if child not in live:
                op.finish.append(Rebase(child, g.format(child), base, g.format(base), unsafe=True))
            g.files[child].backing = base
        if g.active == top:
            g.active, g.active_format = base, g.format(base)
            op.define_after_finish = True

    def _stream(self, op, base, streamed, info):
        """Each child first copies what it read from ``base`` (``streamed``: child -> bytes), then is
        backed by ``base``'s own backing."""
        g = op.graph
        below = g.files[base].backing
        below_fmt = info.get("backing-filename-format") if below else None
        for child, cost in streamed.items():
            if child in op.domain.live_chains:
                op.finish.append(LiveStream(op.domain.name, g.target, child, base, below, cost))
            else:
                op.finish.append(Rebase(child, g.format(child), below, below_fmt, bytes_to_copy=cost))
            g.files[child].backing = below


@hookimpl
def snapfw_disk_backends():
    return [ExternalBackend]
