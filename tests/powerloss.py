"""Power-loss recording and replay (TESTING.md "Power-loss recording without device-mapper").

A raw device file is exported through FUSE by qemu-storage-daemon behind a ``blklogwrites`` node, so every
write and flush that reaches it is appended to a log in the dm-log-writes format (Linux
Documentation/admin-guide/device-mapper/log-writes.rst; QEMU block/blklogwrites.c):

    sector 0                 super: le64 magic, le64 version, le64 nr_entries, le32 sectorsize
    then per entry           one sector: le64 sector, le64 nr_sectors, le64 flags, le64 data_len
                             followed by nr_sectors sectors of data (none for a flush or a discard)

``sector`` and ``nr_sectors`` count log sectors. QEMU rewrites the super on every flush, so after a flush
its ``nr_entries`` covers everything before it. A power cut keeps every write logged before the last
completed flush and any subset of the writes after it; :func:`replay` rebuilds such a device.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass

from conftest import fuse_export, mounted

MAGIC = 0x6A736677736872
VERSION = 1
FLUSH, FUA, DISCARD, MARK = 1, 2, 4, 8
SECTOR = 512


@dataclass(frozen=True)
class Entry:
    index: int
    sector: int
    nr_sectors: int
    flags: int
    data: int  # offset of the written data in the log

    @property
    def is_write(self) -> bool:
        return self.nr_sectors > 0 and not self.flags & (DISCARD | MARK)


def read_log(path: str) -> list[Entry]:
    """Every entry of a dm-log-writes log, in the order the device completed them."""
    with open(path, "rb") as f:
        magic, version, count, sectorsize = struct.unpack("<QQQI", f.read(28))
        if magic != MAGIC or version != VERSION or sectorsize != SECTOR:
            raise ValueError(f"{path}: not a dm-log-writes log of {SECTOR}-byte sectors "
                             f"(magic {magic:#x}, version {version}, sector size {sectorsize})")
        entries, offset = [], SECTOR
        for index in range(count):
            f.seek(offset)
            sector, nr_sectors, flags, _data_len = struct.unpack("<QQQQ", f.read(32))
            offset += SECTOR
            entries.append(Entry(index, sector, nr_sectors, flags, offset))
            if not flags & (DISCARD | MARK):
                offset += nr_sectors * SECTOR
    return entries


def entries_so_far(path: str) -> int:
    """How many entries the log holds up to its last flush."""
    with open(path, "rb") as f:
        return struct.unpack("<QQQI", f.read(28))[2]


def apply(log: str, device: str, entries) -> None:
    """Write ``entries`` (writes and discards; flushes carry nothing) onto the device file, in order."""
    with open(log, "rb") as src, open(device, "r+b") as dst:
        for e in entries:
            if e.flags & DISCARD:  # a discarded range may read as anything: zeros is one such device
                dst.seek(e.sector * SECTOR)
                dst.write(bytes(e.nr_sectors * SECTOR))
            elif e.is_write:
                src.seek(e.data)
                dst.seek(e.sector * SECTOR)
                dst.write(src.read(e.nr_sectors * SECTOR))


def copy(src: str, dst: str) -> None:
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", src, dst], check=True)


@dataclass(frozen=True)
class Part:
    """One ext4 filesystem at ``offset`` of the device, mounted on ``mountpoint``."""

    offset: int
    size: int
    mountpoint: str

    def mount(self, device: str) -> None:
        """Mount read-write, so ext4 replays its journal as after a power cut. ``commit=300``: nothing
        but snapfw's own fsyncs makes a change durable while it runs (no 5-second journal commit)."""
        os.makedirs(self.mountpoint, exist_ok=True)
        subprocess.run(["mount", "-t", "ext4", "-o", f"loop,offset={self.offset},sizelimit={self.size},commit=300",
                        device, self.mountpoint], check=True, capture_output=True, text=True)

    def umount(self) -> None:
        if mounted(self.mountpoint):
            subprocess.run(["umount", self.mountpoint], check=True, capture_output=True, text=True)


def mkfs(device: str, parts) -> None:
    """ext4 on each part, tables written now (no lazy init writing behind the recording's back)."""
    for p in parts:
        with open(device, "r+b") as f:
            f.truncate(max(os.path.getsize(device), p.offset + p.size))
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E",
                        f"offset={p.offset},lazy_itable_init=0,lazy_journal_init=0,nodiscard",
                        device, f"{p.size // 1024}k"], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def recording(device: str, log: str, export: str, log_size: int = 1 << 30):
    """``export`` is ``device`` as a FUSE file whose every write and flush is logged to ``log``."""
    with open(log, "wb") as f:
        f.truncate(log_size)
    open(export, "w").close()
    with fuse_export([f"driver=file,node-name=dev,filename={device}", f"driver=file,node-name=logf,filename={log}",
                      f"driver=blklogwrites,node-name=lw,file=dev,log=logf,log-sector-size={SECTOR}"],
                     "lw", export):
        yield


def flush_points(entries, start: int, stop: int) -> list[int]:
    """Indexes of the flushes in entries[start:stop] after which the device differs from the flush
    before (a flush with no write since the last one leaves the same device)."""
    out, wrote = [], True
    for e in entries[start:stop]:
        if e.flags & FLUSH and wrote:
            out.append(e.index)
            wrote = False
        elif e.is_write or e.flags & DISCARD:
            wrote = True
    return out


class Replayer:
    """Devices as a power cut would leave them: a rolling copy of the starting device with the log
    applied up to a flush, copied for each cut."""

    def __init__(self, start: str, log: str, work: str):
        self.log = log
        self.entries = read_log(log)
        self.rolling = os.path.join(work, "rolling.raw")
        copy(start, self.rolling)
        self.applied = 0  # entries[:applied] are on the rolling copy

    def device(self, flush: int, target: str, unflushed=()) -> str:
        """``target``: the device once every entry before flush ``flush`` reached it, plus the
        ``unflushed`` entries (later writes the device happened to keep), in log order."""
        if flush < self.applied:
            raise ValueError("cut points must come in log order")
        apply(self.log, self.rolling, self.entries[self.applied:flush])
        self.applied = flush
        copy(self.rolling, target)
        apply(self.log, target, sorted(unflushed, key=lambda e: e.index))
        return target

    def after(self, flush: int, stop: int) -> list[Entry]:
        """The writes between flush ``flush`` and the next one (before entry ``stop``): what a cut may
        or may not keep."""
        out = []
        for e in self.entries[flush + 1:stop]:
            if e.flags & FLUSH:
                break
            if e.is_write or e.flags & DISCARD:
                out.append(e)
        return out


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
