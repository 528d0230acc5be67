"""A small synchronous QMP client: one unix socket, JSON lines, events kept while waiting.

stdlib only (``socket``, ``json``): a live snapshot must cost a few milliseconds, not the 0.1 s an async
QMP library costs to import. QEMU's monitor serves one client at a time, so a socket that accepts but
never greets (another client holds it, or it is not QEMU's) is a timeout error, never a hang.
"""

from __future__ import annotations

import json
import os
import socket
import time

from ..errors import BadInput, ToolError

CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0
# events a caller may wait on; others are dropped so a long-running client does not grow without end
KEPT_EVENTS = ("JOB_STATUS_CHANGE", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR",
               "BLOCK_JOB_CANCELLED", "STOP", "RESUME", "SHUTDOWN")


class QMPError(ToolError):
    """QEMU answered a command with an error: ``error_class`` (GenericError, DeviceNotFound...) and ``desc``."""

    def __init__(self, command: str, error_class: str, desc: str):
        super().__init__(f"QMP {command} failed: {desc}", ["qmp", command], None, f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class _Closed(ToolError):
    """QEMU closed the connection (it exited)."""


class QMP:
    """A negotiated QMP session on the unix socket ``path``. Use :meth:`connect` (or ``with``)."""

    def __init__(self, path: str, timeout: float = CONNECT_TIMEOUT):
        self.path = path
        self.timeout = timeout
        self.events: list[dict] = []
        self.greeting: dict = {}
        self._sock: socket.socket | None = None
        self._buf = b""

    @staticmethod
    def listening(path: str) -> bool:
        """Whether a process listens on the unix socket ``path`` (a QEMU that is up, whether or not its
        monitor is free); False when the socket is missing or refuses (the QEMU that made it has exited)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(CONNECT_TIMEOUT)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError as e:
            raise ToolError(f"cannot connect to QMP socket {path}: {e.strerror or e}", ["qmp"]) from None
        finally:
            s.close()
        return True

    def _open(self, what: str = "QMP"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except FileNotFoundError:
            s.close()
            raise BadInput(f"no {what} socket at {self.path}") from None
        except OSError as e:
            s.close()
            raise ToolError(f"cannot connect to {what} socket {self.path}: {e.strerror or e}", ["qmp"]) from None
        self._sock = s

    def connect(self) -> "QMP":
        self._open()
        try:
            greeting = self._answer(time.monotonic() + self.timeout, "greet", self.timeout)
            if not isinstance(greeting.get("QMP"), dict):
                raise ToolError(f"{self.path} is not a QMP socket: it greeted with {json.dumps(greeting)[:80]}",
                                ["qmp"])
            self.greeting = greeting["QMP"]
            self.execute("qmp_capabilities", timeout=self.timeout)
        except BaseException:
            self.close()
            raise
        return self

    def peer_pid(self) -> int | None:
        """The process at the other end of the socket (QEMU itself), from the kernel (SO_PEERCRED)."""
        import struct

        if self._sock is None:
            return None
        pid, _uid, _gid = struct.unpack("3i", self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                    struct.calcsize("3i")))
        return pid or None

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self.connect() if self._sock is None else self

    def __exit__(self, *exc):
        self.close()

    # --- wire ----------------------------------------------------------------------------------------
    def _read(self, deadline: float) -> dict | None:
        """The next JSON message, or None once ``deadline`` (monotonic) has passed without one."""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                return None
            except ConnectionResetError:
                chunk = b""
            except OSError as e:
                raise ToolError(f"QMP socket {self.path}: {e.strerror or e}", ["qmp"]) from None
            if not chunk:
                raise _Closed(f"QMP socket {self.path} closed the connection (QEMU exited?)", ["qmp"])
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            raise ToolError(f"{self.path} is not a QMP socket: it sent {line[:80]!r}", ["qmp"])
        return msg

    def _answer(self, deadline: float, what: str, seconds: float) -> dict:
        msg = self._read(deadline)
        if msg is None:
            raise ToolError(f"QMP socket {self.path} did not {what} within {seconds:g} s (not QEMU's, hung, "
                            "or another client holds the monitor)", ["qmp"])
        return msg

    def _keep(self, msg: dict):
        if msg.get("event") in KEPT_EVENTS:
            self.events.append(msg)

    def execute(self, command: str, args: dict | None = None, timeout: float = COMMAND_TIMEOUT, fds=()):
        """Run ``command`` and return its ``return`` value; a QMP error is a :class:`QMPError`.
        ``fds``: file descriptors passed with it (SCM_RIGHTS), as ``getfd`` takes them."""
        if self._sock is None:
            raise ToolError(f"QMP {command}: not connected to {self.path}", ["qmp", command])
        msg = {"execute": command, **({"arguments": args} if args else {})}
        data = json.dumps(msg).encode() + b"\n"
        try:
            if fds:
                sent = socket.send_fds(self._sock, [data], list(fds))
                self._sock.sendall(data[sent:])
            else:
                self._sock.sendall(data)
        except OSError as e:
            raise ToolError(f"QMP socket {self.path}: {e.strerror or e}", ["qmp", command]) from None
        deadline = time.monotonic() + timeout
        while True:
            reply = self._answer(deadline, f"answer {command}", timeout)
            if "event" in reply:
                self._keep(reply)
            elif "error" in reply:
                err = reply["error"]
                raise QMPError(command, err.get("class", "GenericError"), err.get("desc", str(err)))
            elif "return" in reply:
                return reply["return"]

    def pass_file(self, name: str, path: str, flags: int) -> None:
        """Open ``path`` with ``flags`` here and hand the descriptor to QEMU as ``name`` (``getfd``), for a
        ``fd:NAME`` migration URI: QEMU then needs no access of its own to the file."""
        try:
            fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise ToolError(f"cannot open {path}: {e.strerror}", ["qmp", "getfd"]) from None
        try:
            self.execute("getfd", {"fdname": name}, fds=[fd])
        finally:
            os.close(fd)

    def migration(self, deadline: float, until: str = "completed") -> dict:
        """Wait until the migration QEMU runs (``migrate`` or ``migrate-incoming``) has reached status
        ``until`` and return ``query-migrate``'s answer; QMPError if it failed, ToolError at ``deadline``
        (monotonic), leaving it running for the caller to cancel."""
        while True:
            info = self.execute("query-migrate")
            status = info.get("status")
            if status == until:
                return info
            if status in ("failed", "cancelled"):
                raise QMPError("migrate", "MigrationFailed", info.get("error-desc") or f"migration {status}")
            if time.monotonic() >= deadline:
                raise ToolError(f"the migration of the QEMU at {self.path} did not finish by its deadline "
                                f"(status {status})", ["qmp", "query-migrate"])
            self.wait_events(0.01)

    def quit(self, timeout: float = COMMAND_TIMEOUT) -> None:
        """Quit QEMU and wait until it has exited: it closes the monitor only after closing every image
        (so their locks are released), and its listening socket only as its process ends (until then a
        new connection is taken, then dropped). Then close this session."""
        deadline = time.monotonic() + timeout
        pid = self.peer_pid()
        try:
            self.execute("quit")
            while self._read(deadline) is not None:
                pass
            raise ToolError(f"QEMU at {self.path} did not exit within {timeout:g} s of quit", ["qmp", "quit"])
        except _Closed:
            while pid is not None and _running(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            self.close()

    def wait_events(self, seconds: float):
        """Collect events for up to ``seconds``, returning as soon as some have arrived."""
        msg = self._read(time.monotonic() + seconds)
        while msg is not None:
            self._keep(msg)
            msg = self._read(0) if b"\n" in self._buf else None

    # --- jobs ----------------------------------------------------------------------------------------
    def job(self, job_id: str) -> dict | None:
        """The job ``job_id`` as ``query-jobs`` has it (status, current/total-progress, error), or None."""
        return next((j for j in self.execute("query-jobs") if j.get("id") == job_id), None)

    def run_job(self, job_id: str, deadline: float, progress=None, complete: bool = False) -> None:
        """Wait for job ``job_id`` (started with auto-dismiss off) to conclude, then dismiss it.

        ``complete``: send ``job-complete`` once it is ready (an active commit pivots then). ``progress``
        receives the percentage (offset/len). Raises QMPError with the job's own error if it failed, and
        ToolError at ``deadline`` (monotonic), leaving the job running for the caller to decide.
        """
        completing = False
        while True:
            job = self.job(job_id)
            if job is None:
                raise ToolError(f"block job {job_id} vanished from QEMU before it concluded", ["qmp"])
            total = job.get("total-progress") or 0
            if progress is not None and total:
                progress(100.0 * job.get("current-progress", 0) / total)
            status = job.get("status")
            if status == "ready" and complete and not completing:
                self.execute("job-complete", {"id": job_id})
                completing = True
            elif status == "concluded":
                self.execute("job-dismiss", {"id": job_id})
                if job.get("error"):
                    raise QMPError(f"block job {job_id}", "JobError", job["error"])
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise ToolError(f"block job {job_id} did not finish by its deadline (status {status})", ["qmp"])
            self.events.clear()
            self.wait_events(min(0.1, left))


def _running(pid: int) -> bool:
    """Whether process ``pid`` has not exited (a zombie has: it holds no socket any more)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
