"""qemu-img, one function per subcommand: formats always explicit, JSON output parsed into dicts.

Each ``*_argv`` builder is what a plan shows in ``--dry-run``; the function of the same name runs it.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
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


def snapshots(path: str, shared: bool = False) -> list[dict]:
    """qcow2 file ``path``'s internal snapshots as ``qemu-img info`` lists them, read from its snapshot
    table without starting qemu-img: a tag step looks for its tag before each run (to be run again after
    a crash), and a program start costs more than reading a few hundred bytes. An image this reader does
    not take for an ordinary qcow2 one (encrypted, damaged, missing) is left to ``qemu-img info``.
    ``shared``: a running QEMU may hold the file; the answer is advisory then (rule 1), as with ``-U``."""
    try:
        with _open_image(path) as f:
            return _read_qcow2(f).get("snapshots", [])
    except (OSError, ValueError, struct.error):
        return info(path, "qcow2", shared=shared).get("snapshots", [])


def tags(path: str) -> set[str]:
    """The names of :func:`snapshots`."""
    return {s["name"] for s in snapshots(path)}


def chain(path: str, fmt: str) -> list[dict]:
    """What ``qemu-img info --backing-chain`` says of ``path``, top first, read from the headers when every
    file is an ordinary local qcow2 or raw image no other process holds (each change reads its disks'
    chains first, and a qemu-img start is most of a small command's time); anything else (a lock, a
    protocol or ``json:`` name, encryption, an external data file, a dirty or corrupt image, a loop, a
    missing file) is left to qemu-img, which gives the error or the answer it always gave.

    Each node has ``filename``, ``format``, ``virtual-size``, the ``backing-filename``,
    ``full-backing-filename`` and ``backing-filename-format`` of a file that has one, and qcow2's
    ``cluster-size``, ``dirty-flag`` and ``snapshots`` (each with qemu-img's keys) as qemu-img prints them.
    """
    try:
        return _read_chain(path, fmt)
    except (OSError, ValueError, struct.error):
        return info(path, fmt, chain=True)


_MAX_CHAIN = 256
_INCOMPATIBLE_READ = 0b11000  # compression type, extended L2: headers read the same
_EXT_END, _EXT_BACKING_FORMAT = 0, 0xE2792ACA
_EXT_READ = {_EXT_BACKING_FORMAT, 0x6803F857, 0x23852875}  # and the feature names, bitmaps: nothing to read
# QEMU's lock bytes (block/file-posix.c: 100 + permission, 200 + permission it does not share)
_QEMU_LOCKS = struct.pack("@hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 100, 200, 0)


def _read_chain(path: str, fmt: str) -> list[dict]:
    nodes, seen = [], set()
    while True:
        if ":" in path or fmt not in ("qcow2", "raw") or len(nodes) >= _MAX_CHAIN:
            raise ValueError("a name or format this reader leaves to qemu-img")
        with _open_image(path) as f:
            st = os.fstat(f.fileno())
            locked = fcntl.fcntl(f, fcntl.F_OFD_GETLK, _QEMU_LOCKS)
            if struct.unpack_from("@h", locked)[0] != fcntl.F_UNLCK or (st.st_dev, st.st_ino) in seen:
                raise ValueError("a lock or a loop: qemu-img tells which")
            seen.add((st.st_dev, st.st_ino))
            node = _read_node(f, path, fmt)
        nodes.append(node)
        if "backing-filename" not in node:
            return nodes
        # QEMU's path_combine: a relative name is taken from the directory of the image naming it
        name = node["backing-filename"]
        path = name if name.startswith("/") or "/" not in path else path[:path.rindex("/") + 1] + name
        node["full-backing-filename"], fmt = path, node["backing-filename-format"]


def _read_node(f, path: str, fmt: str) -> dict:
    """One image's facts as qemu-img info names them, from ``f``, ``path`` opened (raw or qcow2)."""
    if fmt == "raw":  # QEMU counts whole 512-byte sectors
        return {"filename": path, "format": "raw", "virtual-size": -(-f.seek(0, os.SEEK_END) // 512) * 512}
    return {"filename": path, "format": "qcow2", **_read_qcow2(f, whole=True)}


def _open_image(path: str):
    """``path`` opened for reading if it is a regular file or a block device; ValueError for anything
    else (a FIFO would block the open, and the read, with no limit: qemu-img runs with one)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise ValueError(f"{path} is not a regular file or a block device")
    return os.fdopen(fd, "rb")


def _read_qcow2(f, whole: bool = False) -> dict:
    """The header's facts (``whole``) and the snapshot table of an ordinary qcow2 file, as qemu-img names
    them; ValueError for anything else, within QEMU's own bounds on what it reads."""
    header = f.read(104)
    if len(header) < 72 or header[:4] != QCOW2_MAGIC:
        raise ValueError("not a qcow2 header")
    version, backing_offset, backing_size, cluster_bits, size, crypt = struct.unpack_from(">IQIIQI", header, 4)
    count, offset = struct.unpack_from(">IQ", header, 60)
    if version not in (2, 3) or crypt or count > _MAX_SNAPSHOTS or (count and (not offset or offset % 8)):
        raise ValueError("a qcow2 header this reader leaves to qemu-img")
    facts = {}
    if whole:
        incompatible, header_length = (0, 72) if version == 2 else struct.unpack_from(">Q20xI", header, 72)
        if (incompatible & ~_INCOMPATIBLE_READ or not 9 <= cluster_bits <= 21 or backing_size > 1023
                or header_length < (72 if version == 2 else 104) or header_length % 8):
            raise ValueError("a qcow2 file this reader leaves to qemu-img")
        facts = {"virtual-size": size, "cluster-size": 1 << cluster_bits, "dirty-flag": False}
        backing_format = _backing_format(f, header_length, 1 << cluster_bits)
        if backing_offset:
            f.seek(backing_offset)
            name = f.read(backing_size).decode()
            if len(name) != backing_size or not name or backing_format is None:
                raise ValueError("a backing file this reader leaves to qemu-img")
            facts.update({"backing-filename": name, "backing-filename-format": backing_format})
    if count:
        facts["snapshots"] = _read_snapshots(f, count, offset)
    return facts


def _backing_format(f, at: int, cluster: int) -> str | None:
    """The backing format header extension, if any; the extensions end within the first cluster, and
    any this reader does not know (a data file's, encryption's) leave the image to qemu-img."""
    f.seek(at)
    found = None
    while at + 8 <= cluster:
        kind, length = struct.unpack(">II", f.read(8))
        if kind == _EXT_END:
            return found
        at += 8 + length + -length % 8
        if kind not in _EXT_READ or at > cluster:
            break
        data = f.read(length + -length % 8)
        if len(data) < length:
            break
        if kind == _EXT_BACKING_FORMAT:
            found = data[:length].decode()
    raise ValueError("header extensions this reader leaves to qemu-img")


def _read_snapshots(f, count: int, offset: int) -> list[dict]:
    f.seek(offset)
    snapshots, size = [], 0
    for _ in range(count):
        entry = f.read(40)
        if len(entry) < 40:
            raise ValueError("a truncated snapshot table")
        id_size, name_size, date_sec, date_nsec, clock, vm_state, extra = struct.unpack_from(">HHIIQII", entry, 12)
        length = 40 + extra + id_size + name_size
        padding = -length % 8  # before the next entry: the last one may end the file without it
        size += length + padding
        if extra > _MAX_SNAPSHOT_EXTRA or size > _MAX_SNAPSHOT_TABLE:
            raise ValueError("a snapshot table out of QEMU's bounds")
        rest = f.read(length + padding - 40)
        if len(rest) < length - 40:
            raise ValueError("a truncated snapshot table")
        if extra >= 8:
            vm_state = struct.unpack_from(">Q", rest)[0]
        snapshot = {"id": rest[extra:extra + id_size].decode("utf-8", "surrogateescape"),
                    "name": rest[extra + id_size:extra + id_size + name_size].decode("utf-8", "surrogateescape"),
                    "vm-state-size": vm_state, "date-sec": date_sec, "date-nsec": date_nsec,
                    "vm-clock-sec": clock // 10**9, "vm-clock-nsec": clock % 10**9}
        if extra >= 24 and (icount := struct.unpack_from(">q", rest, 16)[0]) != -1:
            snapshot["icount"] = icount
        snapshots.append(snapshot)
    return snapshots


def create_overlay_argv(path: str, backing: str, backing_fmt: str, size: int | None = None) -> list[str]:
    """With ``size`` (the backing file's virtual size, :func:`virtual_size`) qemu-img does not open the
    backing file (``-u``): one a running QEMU holds costs it its lock probes, 3 ms a disk."""
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_fmt]
    return argv + [path] if size is None else argv + ["-u", path, str(size)]


def create_overlay(path: str, backing: str, backing_fmt: str, size: int | None = None):
    run(create_overlay_argv(path, backing, backing_fmt, size))


def virtual_size(path: str, fmt: str) -> int | None:
    """The virtual size of raw or qcow2 image ``path``, from the file itself; None where qemu-img is left
    to learn it."""
    if fmt not in ("qcow2", "raw"):
        return None
    try:
        with _open_image(path) as f:
            return _read_node(f, path, fmt)["virtual-size"]
    except (OSError, ValueError):
        return None


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
