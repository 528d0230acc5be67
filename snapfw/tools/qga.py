"""A small synchronous client of the QEMU guest agent (qemu-ga), on the unix socket its chardev serves.

The agent speaks QMP's JSON framing without a greeting or capabilities. Its virtio-serial port keeps
bytes across host connections, so a session starts with ``guest-sync`` and a fresh random id and drops
everything before the answer carrying that id (a previous client's late replies).
"""

from __future__ import annotations

import base64
import json
import os
import time

from ..errors import ToolError
from .qmp import QMP

EXEC_POLL_SECONDS = 0.02


class GuestAgent(QMP):
    """A synced session with qemu-ga on the unix socket ``path``. Use :meth:`connect` (or ``with``)."""

    def connect(self) -> "GuestAgent":
        self._open("guest agent")
        try:
            token = int.from_bytes(os.urandom(4), "big") >> 1  # not `secrets`: 25 ms to import
            self._sock.sendall(json.dumps({"execute": "guest-sync", "arguments": {"id": token}}).encode() + b"\n")
            deadline = time.monotonic() + self.timeout
            while True:
                msg = self._read(deadline)
                if msg is None:
                    raise ToolError(f"the guest agent on {self.path} did not answer within {self.timeout:g} s "
                                    "(is qemu-ga running in the guest?)", ["qga"])
                if msg.get("return") == token:
                    return self
        except BaseException:
            self.close()
            raise

    def exec(self, argv: list[str], timeout: float, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
        """Run ``argv`` in the guest (``guest-exec``, searched in the agent's PATH); its exit code, stdout
        and stderr. A program still running at ``timeout`` is a ToolError: the agent cannot kill it."""
        args = {"path": argv[0], "arg": list(argv[1:]), "env": ["LC_ALL=C"], "capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        pid = self.execute("guest-exec", args)["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.execute("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                break
            if time.monotonic() > deadline:
                raise ToolError(f"{' '.join(argv[:2])} did not finish within {timeout:g} s in the guest", argv)
            time.sleep(EXEC_POLL_SECONDS)
        out = base64.b64decode(status.get("out-data", ""))
        err = base64.b64decode(status.get("err-data", ""))
        if "exitcode" not in status:
            raise ToolError(f"{' '.join(argv[:2])} was killed by signal {status.get('signal')} in the guest",
                            argv, None, err.decode(errors="replace"))
        return status["exitcode"], out, err
