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

    def read(self, path, offset, length):
        with self._agent() as agent:
            return agent.read_file(path, offset, length)


def open_host(spec: str | None = None) -> Host:
    """The host ``spec`` names (else $SNAPFW_HOST, else this machine): ``local`` or ``qga:SOCKET``."""
    spec = spec or os.environ.get(HOST_ENV) or "local"
    if spec == "local":
        return LocalHost()
    if spec.startswith("qga:") and os.path.isabs(spec[4:]):
        return AgentHost(spec[4:])
    raise BadInput(f"{HOST_ENV}={spec!r}: expected 'local' or 'qga:/path/to/guest-agent.sock'")
