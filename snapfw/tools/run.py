"""Run one external program with the standard library's ``subprocess``: explicit argv, no shell, C locale,
typed errors. Not ``sh``: importing it alone cost 0.08 s per command (README, *Performance*)."""

from __future__ import annotations

import contextlib
import functools
import os
import re
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
PACKAGE_HINT = {"qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "setpriv": "util-linux",
                "prlimit": "util-linux"}


def _wrapped(argv: list[str], limited: bool, wall: float | None) -> list[str]:
    """``argv`` under util-linux's setpriv, which has the kernel send it SIGTERM when snapfw dies (even by
    SIGKILL: an orphaned qemu-img would go on writing and hold the image lock, so `snapfw check --repair`
    right after a crash would find the image "in use"), and, if ``limited``, prlimit; each execs the next.
    Wrappers, not a preexec function doing the same in the forked child: that forbids vfork, and every run
    would be a full fork of the interpreter (3 ms more per program with the resident interpreter's modules
    loaded). SIGTERM, not SIGKILL: coreutils `timeout` passes it on to the program. The kernel sends it when
    the forking thread ends, so programs are run from threads that outlive them. A snapfw killed in the
    instant between the fork and setpriv's prctl leaves that one program to run to its end (or its limit)."""
    full = ["setpriv", "--pdeathsig", "TERM", "--"]
    if limited:
        full += ["prlimit", f"--cpu={LIMIT_CPU_SECONDS}", f"--as={LIMIT_ADDRESS_SPACE}", "--"]
    # coreutils timeout: it kills the program (and only it) however snapfw waits for it
    return full + (["timeout", "-k", "5", str(wall)] if wall else []) + argv


def require(program: str, argv: list[str] | None = None, limited: bool = False) -> None:
    """ToolError naming the package to install if ``program``, or a program :func:`run` runs it under, is
    not on PATH (``argv``: what would run it)."""
    for needed in (program, "setpriv", *(["prlimit"] if limited else [])):
        if _which(needed, os.environ.get("PATH")) is None:
            pkg = PACKAGE_HINT.get(needed)
            raise ToolError(f"{needed} not found" + (f" (install {pkg})" if pkg else ""), argv or [program])


@functools.cache
def _which(program: str, path: str | None) -> str | None:
    """shutil.which, once per program and PATH: a change checks its programs before the plan, then again
    as each one runs, each time a search of every folder of PATH."""
    return shutil.which(program, path=path)


def run(argv: list[str], *, limited: bool = False, progress=None, timeout: float | None = None,
        env: dict | None = None) -> str:
    """Run ``argv`` and return its stdout as text.

    ``limited`` applies the CPU, address-space and wall-clock limits for untrusted images.
    ``progress`` receives percentages parsed from ``qemu-img -p`` output as they arrive.
    ``env``: variables added to its environment.
    """
    require(argv[0], argv, limited)
    wall = timeout or (LIMIT_WALL_SECONDS if limited else None)
    child = subprocess.Popen(_wrapped(argv, limited, wall), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "LC_ALL": "C", **(env or {})})
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
