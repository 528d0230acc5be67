"""Which QEMU processes have a file open, from ``/proc/PID/fd``: a file another QEMU holds must not be
written or removed under it, and QEMU's own image locks say so only once the write is tried."""

from __future__ import annotations

import os

# the programs whose open images snapfw looks for: qemu-system-*, qemu-storage-daemon, qemu-nbd, qemu-img...
# (/proc/PID/comm holds the first 15 bytes of the program's name)
PREFIX = "qemu"


def qemu_holders(paths) -> dict[str, list[tuple[int, str]]]:
    """path -> [(pid, program)] of the QEMU processes that have ``path`` open (the file itself, whatever
    name they opened it by). Only processes this user may inspect are seen (all of them as root); a
    missing path is held by nobody. Reads only the descriptors of processes named qemu*, so it is cheap."""
    wanted = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        wanted[(st.st_dev, st.st_ino)] = path
    out: dict[str, list[tuple[int, str]]] = {}
    if not wanted:
        return out
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            program = _comm(pid)
            if not program.startswith(PREFIX):
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone meanwhile, or another user's
            continue
        seen = set()
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            path = wanted.get((st.st_dev, st.st_ino))
            if path is not None and path not in seen:
                seen.add(path)
                out.setdefault(path, []).append((int(pid), program))
    return out


def _comm(pid: str) -> str:
    """The process's program name: read with plain system calls, as every process's is read for each
    change (a text-mode file object for each cost three times as much)."""
    fd = os.open(f"/proc/{pid}/comm", os.O_RDONLY)
    try:
        return os.read(fd, 64).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)
