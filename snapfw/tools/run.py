"""Run one external program through ``sh``: explicit argv, no shell, C locale, typed errors."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import shutil
import signal

from ..errors import ImageInUse, ToolError

_PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")
# rule 9: what a qemu-img run on an image snapfw did not make may cost at most
LIMIT_CPU_SECONDS = 30
LIMIT_ADDRESS_SPACE = 2 << 30
LIMIT_WALL_SECONDS = 60
PACKAGE_HINT = {"qemu-img": "qemu-utils", "qemu-io": "qemu-utils"}


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: no dlopen between fork and exec


def _die_with_parent(parent: int):
    """In the child: get SIGTERM when snapfw dies, even by SIGKILL.

    An orphaned qemu-img would go on writing and hold the image lock, so `snapfw check --repair` right
    after a crash would find the image "in use". SIGTERM, not SIGKILL: coreutils `timeout` passes it on.
    The kernel sends it when the forking thread ends, so programs are run from long-lived threads only.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # snapfw died before prctl took effect
        os._exit(128 + signal.SIGTERM)


def _child_setup(parent: int, limited: bool):
    _die_with_parent(parent)
    if limited:
        resource.setrlimit(resource.RLIMIT_CPU, (LIMIT_CPU_SECONDS, LIMIT_CPU_SECONDS))
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_ADDRESS_SPACE, LIMIT_ADDRESS_SPACE))


def run(argv: list[str], *, limited: bool = False, progress=None, timeout: float | None = None) -> str:
    """Run ``argv`` and return its stdout as text.

    ``limited`` applies the CPU, address-space and wall-clock limits for untrusted images.
    ``progress`` receives percentages parsed from ``qemu-img -p`` output as they arrive.
    """
    import sh  # costs ~0.1 s: only paths that run programs pay for it

    if shutil.which(argv[0]) is None:
        pkg = PACKAGE_HINT.get(argv[0])
        raise ToolError(f"{argv[0]} not found" + (f" (install {pkg})" if pkg else ""), argv)
    # _tty_out=False: a pipe, not a pseudo-terminal, for stdout; saves ~10 ms per run
    kwargs = {"_env": {**os.environ, "LC_ALL": "C"}, "_return_cmd": True, "_tty_out": False}
    wall = timeout or (LIMIT_WALL_SECONDS if limited else None)
    parent = os.getpid()
    kwargs["_preexec_fn"] = lambda: _child_setup(parent, limited)
    # coreutils timeout, not sh's _timeout: sh polls its timer every 0.1 s, which costs that much per run
    full = ["timeout", "-k", "5", str(wall), *argv] if wall else argv
    cmd = sh.Command(full[0])
    if progress is not None:
        buf = []

        def feed(chunk):
            buf.append(chunk)
            if chunk in ("\r", "\n"):
                m = _PROGRESS.search("".join(buf))
                buf.clear()
                if m:
                    progress(float(m.group(1)))

        kwargs.update(_out=feed, _out_bufsize=0)
    running = cmd(*full[1:], _bg=True, _bg_exc=False, **kwargs)
    try:
        done = running.wait()
    except (KeyboardInterrupt, SystemExit):
        # interrupted: stop the program before the caller undoes what it was writing
        with contextlib.suppress(ProcessLookupError):  # it may have ended and been reaped already
            running.terminate()
        with contextlib.suppress(sh.ErrorReturnCode, sh.SignalException):
            running.wait()
        raise
    except sh.ErrorReturnCode as e:
        if wall and e.exit_code in (124, 137):
            raise ToolError(f"{' '.join(argv[:2])} did not finish within {wall:g} s", argv) from None
        err = e.stderr.decode(errors="replace").strip()
        if "Is another process using the image" in err or ("Failed to get" in err and "lock" in err):
            raise ImageInUse(f"image in use by another process: {err.splitlines()[-1]}") from None
        last = err.splitlines()[-1] if err else f"exit code {e.exit_code}"
        raise ToolError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed: {last}", argv,
                        e.exit_code, err) from None
    except sh.SignalException as e:
        raise ToolError(f"{' '.join(argv[:2])} was killed ({e.__class__.__name__})", argv) from None
    out = done.stdout
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")
