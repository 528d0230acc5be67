"""qemu-img, one function per subcommand: formats always explicit, JSON output parsed into dicts.

Each ``*_argv`` builder is what a plan shows in ``--dry-run``; the function of the same name runs it.
"""

from __future__ import annotations

import json
import struct

from ..errors import ToolError
from .run import run

QEMU_IMG = "qemu-img"
QCOW2_MAGIC = b"QFI\xfb"
# QEMU's own bounds on a snapshot table (block/qcow2.h): anything beyond is not an image qemu-img wrote
_MAX_SNAPSHOTS, _MAX_SNAPSHOT_EXTRA, _MAX_SNAPSHOT_TABLE = 65536, 1024, 64 << 20


def _json(argv, out, valid):
    """Parse the output; JSON without the fields ``valid`` checks is as broken as text (a ToolError, not
    a KeyError far away in a backend)."""
    what = " ".join(argv[:2])
    try:
        data = json.loads(out)
    except ValueError:
        raise ToolError(f"{what} printed output that is not JSON: {out[:80]!r}", argv) from None
    if not valid(data):
        raise ToolError(f"{what} printed JSON that is not what it documents: {out[:80]!r}", argv)
    return data


def _image(node) -> bool:
    return isinstance(node, dict) and isinstance(node.get("filename"), str) and isinstance(node.get("format"), str)


def _extent(e) -> bool:
    return isinstance(e, dict) and all(isinstance(e.get(k), int) for k in ("length", "depth", "data"))


def info(path: str, fmt: str, chain: bool = False, limited: bool = True, shared: bool = False):
    """``qemu-img info --output=json``: a dict, or with ``chain`` the list top first.

    Without ``shared`` (``-U``) this takes the image lock, so an image a running QEMU writes raises
    ImageInUse; with it the read is advisory (rule 1), for reports only.
    """
    argv = [QEMU_IMG, "info", "--output=json", "-f", fmt]
    if shared:
        argv.append("-U")
    if chain:
        argv.append("--backing-chain")
    argv.append(path)
    data = _json(argv, run(argv, limited=limited),
                 lambda d: _image(d) or (chain and isinstance(d, list) and bool(d) and all(map(_image, d))))
    if chain and not isinstance(data, list):
        data = [data]
    return data


def tags(path: str) -> set[str]:
    """The names of qcow2 file ``path``'s internal snapshots, read from its snapshot table as qemu-img
    reads it, without starting qemu-img: a tag step looks for its tag before each run (to be run again
    after a crash), and a program start cost more than reading a few hundred bytes. An image this reader
    does not take for an ordinary qcow2 one (encrypted, damaged, missing) is left to ``qemu-img info``."""
    try:
        with open(path, "rb") as f:
            return _read_tags(f)
    except (OSError, ValueError, struct.error):
        return {s["name"] for s in info(path, "qcow2").get("snapshots", [])}


def _read_tags(f) -> set[str]:
    header = f.read(72)
    if len(header) < 72 or header[:4] != QCOW2_MAGIC:
        raise ValueError("not a qcow2 header")
    version, crypt = struct.unpack(">I", header[4:8])[0], struct.unpack(">I", header[32:36])[0]
    count, offset = struct.unpack(">IQ", header[60:72])
    if version not in (2, 3) or crypt or count > _MAX_SNAPSHOTS or (count and (not offset or offset % 8)):
        raise ValueError("a qcow2 header this reader leaves to qemu-img")
    f.seek(offset)
    names, size = set(), 0
    for _ in range(count):
        entry = f.read(40)
        id_size, name_size = struct.unpack(">HH", entry[12:16])
        extra = struct.unpack(">I", entry[36:40])[0]
        length = 40 + extra + id_size + name_size
        padding = -length % 8  # before the next entry: the last one may end the file without it
        size += length + padding
        if extra > _MAX_SNAPSHOT_EXTRA or size > _MAX_SNAPSHOT_TABLE:
            raise ValueError("a snapshot table out of QEMU's bounds")
        rest = f.read(length + padding - 40)
        if len(entry) < 40 or len(rest) < length - 40:
            raise ValueError("a truncated snapshot table")
        names.add(rest[extra + id_size:extra + id_size + name_size].decode("utf-8", "surrogateescape"))
    return names


def create_overlay_argv(path: str, backing: str, backing_fmt: str) -> list[str]:
    return [QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_fmt, path]


def create_overlay(path: str, backing: str, backing_fmt: str):
    run(create_overlay_argv(path, backing, backing_fmt))


def image_opts(path: str, fmt: str) -> str:
    """An --image-opts spec naming the format, for subcommands that have no ``-f``."""
    return f"driver={fmt},file.driver=file,file.filename={path.replace(',', ',,')}"


def snapshot_argv(op: str, path: str, tag: str) -> list[str]:
    """``op`` is ``-c`` (create), ``-a`` (apply) or ``-d`` (delete); the file is qcow2 by definition."""
    return [QEMU_IMG, "snapshot", "--image-opts", op, tag, image_opts(path, "qcow2")]


def snapshot(op: str, path: str, tag: str):
    run(snapshot_argv(op, path, tag))


def repair_leaks(path: str):
    """Lower refcounts nothing references to what is referenced (only that: ``-r leaks``). A qcow2
    ``snapshot`` cut short by a power cut leaves clusters counted for a snapshot that was never written,
    which ``qemu-img check`` reports as corruption (OFLAG_COPIED, exit 2) until they are released."""
    run([QEMU_IMG, "check", "-q", "-r", "leaks", "-f", "qcow2", path])


def commit_argv(top: str, top_fmt: str) -> list[str]:
    # -d: leave the top image as it was, so until it is removed it still reads the same
    return [QEMU_IMG, "commit", "-p", "-d", "-f", top_fmt, top]


def commit(top: str, top_fmt: str, progress=None):
    run(commit_argv(top, top_fmt), progress=progress)


def rebase_argv(path: str, fmt: str, backing: str | None, backing_fmt: str | None,
                unsafe: bool = False) -> list[str]:
    argv = [QEMU_IMG, "rebase", "-p", "-f", fmt]
    # a safe rebase copies data, then rewrites the header: writethrough makes the data durable first, so
    # a power cut never leaves a header saying "no backing file" over data that never reached the disk
    argv += ["-u"] if unsafe else ["-t", "writethrough"]
    if backing is None:
        argv += ["-b", ""]
    else:
        argv += ["-b", backing, "-F", backing_fmt]
    return argv + [path]


def rebase(path: str, fmt: str, backing: str | None, backing_fmt: str | None, unsafe: bool = False,
           progress=None):
    run(rebase_argv(path, fmt, backing, backing_fmt, unsafe), progress=progress)


def map_extents(path: str, fmt: str, shared: bool = False) -> list[dict]:
    """``qemu-img map``; ``shared`` (``-U``) reads an image a running QEMU holds, advisory (as :func:`info`)."""
    argv = [QEMU_IMG, "map", "--output=json", "-f", fmt, *(["-U"] if shared else []), path]
    return _json(argv, run(argv, limited=True), lambda d: isinstance(d, list) and all(map(_extent, d)))



def measure(path: str | None, fmt: str | None, out_fmt: str, size: int | None = None, tag: str | None = None) -> int:
    """``qemu-img measure``: the bytes a new ``out_fmt`` image needs, either as a copy of ``path`` (through
    its backing chain; of internal snapshot ``tag`` if given) or, with ``size``, empty."""
    argv = [QEMU_IMG, "measure", "--output=json", "-O", out_fmt]
    if size is not None:
        argv += ["--size", str(size)]
    else:
        argv += ["-f", fmt] + (["-l", f"snapshot.name={tag}"] if tag else []) + [path]
    return _json(argv, run(argv, limited=True), lambda d: isinstance(d, dict) and isinstance(d.get("required"), int))[
        "required"]


def convert_argv(src: str, src_fmt: str, dst: str, dst_fmt: str, tag: str | None = None) -> list[str]:
    """A standalone sparse copy of ``src`` as its whole chain reads (or of its internal snapshot ``tag``):
    zeroed and unallocated clusters are not written."""
    snap = ["-l", f"snapshot.name={tag}"] if tag else []
    return [QEMU_IMG, "convert", "-p", "-f", src_fmt, *snap, "-O", dst_fmt, src, dst]


def convert(src: str, src_fmt: str, dst: str, dst_fmt: str, tag: str | None = None, progress=None):
    run(convert_argv(src, src_fmt, dst, dst_fmt, tag), progress=progress)
