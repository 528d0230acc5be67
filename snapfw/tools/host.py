"""The machine a connection's storage lives on: where backends of non-file storage run programs and
read devices. This machine by default; a guest (or dom0) through its QEMU guest agent with
``SNAPFW_HOST=qga:/path/to/agent.sock``.

A step never keeps a Host: it finds it again as ``ctx.host``, so ``snapfw check --repair`` replays a
journal on the same machine as long as it runs with the same ``SNAPFW_HOST``. Parsing a program's
errors belongs to that program's module (snapfw/tools/lvm.py), not here.
"""

from __future__ import annotations

import os

from ..errors import BadInput, ToolError
from .run import run as run_local

HOST_ENV = "SNAPFW_HOST"
TIMEOUT = 300.0


class Host:
    """Programs (explicit argv, no shell) and the few file operations a backend needs, on one machine."""

    spec: str

    def run(self, argv: list[str], timeout: float = TIMEOUT) -> str:
        """``argv``'s stdout; a non-zero exit is a ToolError with ``returncode`` and ``stderr``."""
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        return self._status(["test", "-e", path]) == 0

    def realpath(self, path: str) -> str:
        return self.run(["readlink", "-f", "--", path]).strip()

    def read(self, path: str, offset: int, length: int) -> bytes:
        """``length`` bytes of ``path`` from ``offset`` (fewer at its end), as the device holds them."""
        raise NotImplementedError

    def write(self, path: str, offset: int, data: bytes) -> None:
        """``data`` into ``path`` at ``offset``, on the device when this returns."""
        raise NotImplementedError

    def _status(self, argv: list[str]) -> int:
        try:
            self.run(argv)
        except ToolError as e:
            if e.returncode is None:
                raise
            return e.returncode
        return 0


class LocalHost(Host):
    spec = "local"

    def run(self, argv, timeout=TIMEOUT):
        return run_local(argv, timeout=timeout)

    def exists(self, path):
        return os.path.lexists(path)

    def realpath(self, path):
        return os.path.realpath(path)

    def read(self, path, offset, length):
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def write(self, path, offset, data):
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


class AgentHost(Host):
    """A machine reached through the QEMU guest agent (``guest-exec``) on a unix socket."""

    def __init__(self, socket_path: str):
        self.socket = socket_path
        self.spec = f"qga:{socket_path}"

    def _agent(self):
        from .qga import GuestAgent

        return GuestAgent(self.socket)

    def run(self, argv, timeout=TIMEOUT):
        with self._agent() as agent:
            code, out, err = agent.exec(argv, timeout)
        if code != 0:
            text = err.decode(errors="replace").strip()
            last = text.splitlines()[-1].strip() if text else f"exit code {code}"
            raise ToolError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed on {self.spec}: {last}", argv,
                            code, text)
        return out.decode(errors="replace")

    # dd with O_DIRECT: the guest's page cache of a block device goes stale when device-mapper changes
    # what lies below it (a merge), and a write must reach the device before a snapshot is taken
    def read(self, path, offset, length):
        return self._dd([f"if={path}", f"skip={offset}", f"count={length}", "iflag=direct,skip_bytes,count_bytes"])

    def write(self, path, offset, data):
        self._dd([f"of={path}", f"seek={offset}", "iflag=fullblock", "oflag=direct,seek_bytes", "conv=notrunc,fsync"],
                 data)

    def _dd(self, args: list[str], stdin: bytes | None = None) -> bytes:
        argv = ["dd", "bs=65536", *args]
        with self._agent() as agent:
            code, out, err = agent.exec(argv, TIMEOUT, stdin)
        if code != 0:
            raise ToolError(f"dd failed on {self.spec}: {err.decode(errors='replace').strip()}", argv, code,
                            err.decode(errors="replace"))
        return out


def open_host(spec: str | None = None) -> Host:
    """The host ``spec`` names (else $SNAPFW_HOST, else this machine): ``local`` or ``qga:SOCKET``."""
    spec = spec or os.environ.get(HOST_ENV) or "local"
    if spec == "local":
        return LocalHost()
    if spec.startswith("qga:") and os.path.isabs(spec[4:]):
        return AgentHost(spec[4:])
    raise BadInput(f"{HOST_ENV}={spec!r}: expected 'local' or 'qga:/path/to/guest-agent.sock'")
