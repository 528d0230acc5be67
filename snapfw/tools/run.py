"""Run one external program with the standard library's ``subprocess``: explicit argv, no shell, C locale,
typed errors. Not ``sh``: importing it alone cost 0.08 s per command (README, *Performance*)."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import resource
import selectors
import shutil
import signal
import subprocess

from ..errors import ImageInUse, ToolError

_PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")
_LINE_END = re.compile(r"[\r\n]")
# rule 9: what a qemu-img run on an image snapfw did not make may cost at most
LIMIT_CPU_SECONDS = 30
LIMIT_ADDRESS_SPACE = 2 << 30
LIMIT_WALL_SECONDS = 60
PACKAGE_HINT = {"qemu-img": "qemu-utils", "qemu-io": "qemu-utils"}


_PR_SET_PDEATHSIG = 1


@functools.cache
def _libc_prctl():
    """prctl(2), looked up before the first fork (no dlopen between fork and exec); not at import, as
    ctypes costs a command that runs no program (a live create) a few milliseconds."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent: int, prctl):
    """In the child: get SIGTERM when snapfw dies, even by SIGKILL.

    An orphaned qemu-img would go on writing and hold the image lock, so `snapfw check --repair` right
    after a crash would find the image "in use". SIGTERM, not SIGKILL: coreutils `timeout` passes it on.
    The kernel sends it when the forking thread ends, so programs are run from long-lived threads only.
    """
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # snapfw died before prctl took effect
        os._exit(128 + signal.SIGTERM)


def _child_setup(parent: int, limited: bool, prctl):
    _die_with_parent(parent, prctl)
    if limited:
        resource.setrlimit(resource.RLIMIT_CPU, (LIMIT_CPU_SECONDS, LIMIT_CPU_SECONDS))
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_ADDRESS_SPACE, LIMIT_ADDRESS_SPACE))


def run(argv: list[str], *, limited: bool = False, progress=None, timeout: float | None = None,
        env: dict | None = None) -> str:
    """Run ``argv`` and return its stdout as text.

    ``limited`` applies the CPU, address-space and wall-clock limits for untrusted images.
    ``progress`` receives percentages parsed from ``qemu-img -p`` output as they arrive.
    ``env``: variables added to its environment.
    """
    if shutil.which(argv[0]) is None:
        pkg = PACKAGE_HINT.get(argv[0])
        raise ToolError(f"{argv[0]} not found" + (f" (install {pkg})" if pkg else ""), argv)
    wall = timeout or (LIMIT_WALL_SECONDS if limited else None)
    parent, prctl = os.getpid(), _libc_prctl()
    # coreutils timeout: it kills the program (and only it) however snapfw waits for it
    full = ["timeout", "-k", "5", str(wall), *argv] if wall else argv
    child = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "LC_ALL": "C", **(env or {})}, preexec_fn=lambda: _child_setup(parent, limited, prctl))
    try:
        out, err = _read(child, progress)
        code = child.wait()
    except (KeyboardInterrupt, SystemExit):
        # interrupted: stop the program before the caller undoes what it was writing
        with contextlib.suppress(ProcessLookupError):  # it may have ended and been reaped already
            child.terminate()
        child.wait()
        raise
    finally:
        child.stdout.close()
        child.stderr.close()
    if code < 0:
        raise ToolError(f"{' '.join(argv[:2])} was killed ({signal.Signals(-code).name})", argv)
    if code:
        if wall and code in (124, 137):
            raise ToolError(f"{' '.join(argv[:2])} did not finish within {wall:g} s", argv)
        err = err.decode(errors="replace").strip()
        if "Is another process using the image" in err or ("Failed to get" in err and "lock" in err):
            raise ImageInUse(f"image in use by another process: {err.splitlines()[-1]}")
        last = err.splitlines()[-1] if err else f"exit code {code}"
        raise ToolError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed: {last}", argv, code, err)
    return out.decode(errors="replace")


def _read(child: subprocess.Popen, progress) -> tuple[bytes, bytes]:
    """Both outputs until the program closes them; each line of stdout (ended by CR or LF, as ``qemu-img
    -p`` redraws its counter) goes to ``progress`` as soon as it arrives."""
    chunks = {child.stdout: [], child.stderr: []}
    pending = ""
    with selectors.DefaultSelector() as selector:
        for pipe in chunks:
            selector.register(pipe, selectors.EVENT_READ)
        while selector.get_map():
            for key, _ in selector.select():
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                chunks[key.fileobj].append(data)
                if progress is not None and key.fileobj is child.stdout:
                    *lines, pending = _LINE_END.split(pending + data.decode(errors="replace"))
                    for line in lines:
                        m = _PROGRESS.search(line)
                        if m:
                            progress(float(m.group(1)))
    return b"".join(chunks[child.stdout]), b"".join(chunks[child.stderr])
