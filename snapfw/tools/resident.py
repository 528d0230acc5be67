"""A resident interpreter that has already imported snapfw, forked once per command.

snapfw's own start-up (the interpreter and about 80 ms of imports) is most of what an everyday command
costs, where virsh is a small client of a libvirtd that is already running. The first command starts one
of these in the background and runs itself as before; later commands hand it their arguments, environment,
working directory, umask and standard input, output and error, and a worker forked from it runs the command
as the command itself would have, with the imports done. Nothing but imports runs before the fork: no state
is carried from one command to the next. The worker is forked while no command runs (a spare, waiting for
the next command), so that the fork is no part of a command's time either, and it tells its command the
exit status before its own process is torn down.

A command uses it only when all that a forked worker cannot take over from the command is the same (see
:func:`context`: the interpreter, its path and flags, user and groups, namespaces and root, priority, CPUs,
cgroup, limits, capabilities, blocked and ignored signals, and the loader's, interpreter's and locale's
variables); otherwise it runs itself. The resident interpreter exits after IDLE_SECONDS without a command,
and once a file it imported has changed (an upgrade). SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to the
command are passed on to its worker; a command killed outright (SIGKILL) has its worker killed the same
way; the command ends with its worker's exit status, or dies of the same signal. ``SNAPFW_RESIDENT=0``
runs every command in its own interpreter; ``SNAPFW_RESIDENT=N`` (seconds) sets how long the next
resident interpreter started waits idle.

The socket is an abstract one (no file to leave behind or to hold a mount busy), named by user and
context; each end checks that the other is the same user (SO_PEERCRED) before anything is sent.
"""

from __future__ import annotations

import os
import sys
import time

import _signal  # not `signal` and `socket`: building their enums costs a command more than it saves
import _socket

ENV = "SNAPFW_RESIDENT"
IDLE_SECONDS = 600.0
HANDSHAKE_SECONDS = 5.0
FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
_ACCEPTED, _DECLINED = b"+", b"-"
_MAX_REQUEST = 1 << 20
# of /proc/self/status: capabilities, privileges, the signals blocked
_STATUS_LINES = (b"Cap", b"NoNewPrivs", b"Seccomp", b"SigBlk")
# variables read once, as the interpreter starts: the loader's, the interpreter's, the locale
_START_VARIABLES = ("LD_", "PYTHON", "LC_", "LANG")
STALE = object()
_PRIME = (1 << 61) - 1


def context() -> bytes:
    """What a worker forked from a resident interpreter cannot take over from the command that asks."""

    def read(path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError:
            return b""

    status = b"".join(line for line in read("/proc/self/status").splitlines(keepends=True)
                      if line.startswith(_STATUS_LINES))
    parts = [sys.executable, repr(sys.path), repr(sys.flags), repr((os.getuid(), os.getgid(), os.getgroups())),
             *(os.readlink(f"/proc/self/{link}") for link in ("ns/mnt", "ns/pid", "ns/user", "ns/uts", "root")),
             repr((os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0)))),
             # a command started with SIGINT ignored (`snapfw ... &` in a script) keeps ignoring Ctrl-C
             repr([_signal.getsignal(number) == _signal.SIG_IGN for number in FORWARDED]),
             *sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith(_START_VARIABLES))]
    return b"\0".join([*(p.encode("utf-8", "surrogateescape") for p in parts), status,
                       read("/proc/self/cgroup"), read("/proc/self/limits"), read("/proc/self/attr/current"),
                       read("/proc/self/oom_score_adj")])


def _address(ctx: bytes) -> bytes:
    """The socket of the resident interpreter for ``ctx``: named by a hash of it, the context read as one
    number modulo a prime (not zlib's crc32: loading zlib, a shared library in some builds, was 0.4 ms of
    every command). Two contexts sharing a name only make one of them run its commands alone."""
    return b"\0snapfw-resident-%d-%016x" % (os.getuid(), int.from_bytes(ctx, "little") % _PRIME)


def _pack(parts: list[bytes]) -> bytes:
    return b"".join(b"%d:%s" % (len(p), p) for p in parts)


def _unpack(data: bytes) -> list[bytes]:
    parts, i = [], 0
    while i < len(data):
        colon = data.index(b":", i)
        size = int(data[i:colon])
        parts.append(data[colon + 1:colon + 1 + size])
        i = colon + 1 + size
    return parts


def _peer_is_me(sock) -> bool:
    cred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # struct ucred: pid, uid, gid
    return int.from_bytes(cred[4:8], sys.byteorder) == os.getuid()


# --- the command's side -------------------------------------------------------------------------------------
def attach(argv: list[str], server: str) -> None:
    """Run this command (``argv`` as sys.argv) in the resident interpreter and exit as its worker did.
    Returns when there is none (after starting one, module ``server``'s ``serve(address)``, for the next
    command) or it declines: the caller then runs the command itself."""
    if os.environ.get(ENV, "1").strip() == "0":
        return
    try:
        for fd in (0, 1, 2):  # one closed (`snapfw ... >&-`) would be taken by the next file opened here
            os.fstat(fd)
        ctx, cwd = context(), os.getcwd()
    except OSError:  # a standard stream closed, the working directory removed, no /proc: run here
        return
    address = _address(ctx)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(address)
    except OSError:
        _start(address, server)
        return
    # from here a signal is for the worker: held until it runs, for the command itself if it is declined
    held: list[int] | None = []

    def forward(number, _frame):
        if held is not None:
            held.append(number)
            return
        try:
            sock.send(bytes([number]))
        except OSError:
            pass

    caught = [n for n in FORWARDED if _signal.getsignal(n) != _signal.SIG_IGN]
    previous = {number: _signal.signal(number, forward) for number in caught}
    try:
        if not _peer_is_me(sock):
            raise ConnectionRefusedError("another user's socket")
        umask = os.umask(0o077)
        os.umask(umask)
        request = _pack([ctx, os.fsencode(cwd), b"%d" % umask, b"%d" % len(argv), *map(os.fsencode, argv),
                         *(k + b"=" + v for k, v in os.environb.items())])
        sock.settimeout(HANDSHAKE_SECONDS)
        sock.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                  b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2)))])
        if sock.recv(1) != _ACCEPTED:
            raise ConnectionRefusedError("declined")
    except OSError:  # another user's, too large, a standard stream closed, declined, no answer in time
        sock.close()
        for number, handler in previous.items():
            _signal.signal(number, handler)
        for number in held:  # the command, run here, gets them now
            os.kill(os.getpid(), number)
        return
    sock.settimeout(None)
    for number in held:
        sock.send(bytes([number]))
    held = None
    reply = sock.recv(2)
    if len(reply) != 2:
        os.write(2, b"snapfw: the resident interpreter running this command ended without its status\n")
        os._exit(1)
    if reply[:1] == b"s":  # the worker died of this signal: so does the command
        if reply[1] not in (_signal.SIGKILL, _signal.SIGSTOP):  # the two no process can catch
            _signal.signal(reply[1], _signal.SIG_DFL)
        os.kill(os.getpid(), reply[1])
        os._exit(128 + reply[1])
    os._exit(reply[1])


def _start(address: bytes, server: str) -> None:
    """Start a resident interpreter in the background, in a session of its own, on /dev/null."""
    # no descriptor of the command's but /dev/null stays open in it (a caller's pipe would not see its end)
    code = (f"import os, sys; os.closerange(3, 1 << 20); os.chdir('/'); sys.path[:] = sys.argv[2:]; "
            f"from {server} import serve; serve(bytes.fromhex(sys.argv[1]))")
    try:
        os.posix_spawn(sys.executable, [sys.executable, "-c", code, address.hex(), *sys.path], os.environ,
                       setsid=True, file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDWR, 0),
                                                  (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)])
    except OSError:
        pass  # the command runs here all the same


# --- the resident interpreter's side --------------------------------------------------------------------------
def serve(address: bytes, main) -> None:
    """Listen on ``address`` and run ``main(argv)`` in a forked worker per command, until idle or stale.
    Call it once everything commands use is imported; a worker never returns from it (it ends with its
    command's status, see :func:`_run`)."""
    import gc
    import select

    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        listener.bind(address)
    except OSError:  # another one serves this address already
        return
    listener.listen(64)
    ctx, imported, idle = context(), _Imported(), _idle_seconds()
    gc.freeze()  # what is imported stays out of every collection: a worker's touch none of the shared pages
    workers: dict[int, tuple[int, object | None]] = {}  # pidfd -> (pid, the command's connection)
    watched: dict[object, int] = {}  # a command's connection -> its worker's pidfd
    spare = None  # the next command's worker, forked while no command runs: (pid, pidfd, socket to it)
    idle_since = time.monotonic()
    while listener is not None or workers:
        if spare is None and listener is not None and not workers:
            spare = _fork_spare([listener, *watched, *workers, imported], main)
        timeout = None if workers else max(0.0, idle_since + idle - time.monotonic())
        if timeout == 0.0:
            break
        ready, _, _ = select.select([*([listener] if listener is not None else []), *watched, *workers], [], [],
                                    timeout)
        for r in ready:
            if r is listener:
                job = _accept(listener, ctx, imported)
                if job is STALE:  # an upgrade: finish the running commands, let a new one take the address
                    listener.close()
                    listener = None
                    spare = _end_spare(spare)
                elif job is not None:
                    conn, fds, request = job
                    worker = None
                    for _attempt in range(2):  # a spare killed meanwhile: once more with a new one
                        # (forked now, it closes this command's descriptors too: it is handed its own)
                        candidate = spare or _fork_spare([listener, *watched, *workers, imported, conn, *fds], main)
                        spare = None
                        if _hand_over(candidate, conn, fds, request):
                            worker = candidate
                            break
                        _end_spare(candidate)
                    for fd in fds:
                        os.close(fd)
                    if worker is None:  # the command ends without its status, and says so
                        conn.close()
                        continue
                    workers[worker[1]] = (worker[0], conn)
                    watched[conn] = worker[1]
            elif r in watched:  # signals to pass on, or the command is gone (killed): kill its worker
                pidfd = watched[r]
                try:
                    data = r.recv(64)
                except OSError:
                    data = b""
                for number in data or bytes([_signal.SIGKILL]):
                    os.kill(workers[pidfd][0], number)
                if not data:
                    del watched[r]
            elif r in workers:  # a worker ended (its command may have ended already: see _worker)
                pid, conn = workers.pop(r)
                os.close(r)
                _, status = os.waitpid(pid, 0)
                if conn in watched:
                    del watched[conn]
                    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
                    try:
                        conn.send(b"s" + bytes([signum]) if signum else b"x" + bytes([os.WEXITSTATUS(status)]))
                    except OSError:
                        pass
                conn.close()
                idle_since = time.monotonic()
    _end_spare(spare)


def _idle_seconds() -> float:
    """SNAPFW_RESIDENT's value, if a number of seconds, is how long a resident interpreter waits idle."""
    try:
        seconds = float(os.environ.get(ENV, ""))
    except ValueError:
        return IDLE_SECONDS
    return seconds if seconds > 0 else IDLE_SECONDS


# inotify(7) events on a folder: a file in it written, its metadata changed, moved in or out, created, removed
_IN_CHANGED = 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200
# the folder itself removed or moved, its watch dropped, events lost (the queue overflowed)
_IN_GONE = 0x400 | 0x800 | 0x8000 | 0x4000


class _Imported:
    """Whether a file imported so far changed since (snapfw upgraded), told by inotify: a read that finds
    no event, where a stat of each of the 300 files took 0.6 ms of every command. The folders of the
    files (and of their targets, for the symbolic links of an editable install) are watched; events on
    other files there are read and let be. Where inotify cannot be had (its limits reached), each file's
    modification time is compared instead."""

    def __init__(self):
        paths = {os.path.abspath(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
        self.names: dict[int, set[bytes]] = {}  # watch -> names of imported files in its folder
        self.stamps: dict[str, int] = {}
        self.fd, self.stale = -1, False
        try:
            import ctypes
            import errno

            libc = ctypes.CDLL(None, use_errno=True)
            self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if self.fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            for path in {p for path in paths for p in (path, os.path.realpath(path))}:
                folder, name = os.path.split(path)
                watch = libc.inotify_add_watch(self.fd, os.fsencode(folder), _IN_CHANGED | _IN_GONE)
                if watch >= 0:
                    self.names.setdefault(watch, set()).add(os.fsencode(name))
                elif ctypes.get_errno() not in (errno.ENOENT, errno.ENOTDIR):  # no folder (a zip's): no change
                    raise OSError(ctypes.get_errno(), "inotify_add_watch")
        except (ImportError, OSError):
            self.close()
            self.fd, self.stamps = -1, {path: _mtime(path) for path in paths}

    def changed(self) -> bool:
        if self.fd < 0:
            return any(_mtime(path) != mtime for path, mtime in self.stamps.items())
        while not self.stale:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:  # no event left
                break
            i = 0
            while i < len(data):  # struct inotify_event: wd, mask, cookie, len, then the name, NUL-padded
                watch, mask, size = (int.from_bytes(data[i + k:i + k + 4], sys.byteorder, signed=k == 0)
                                     for k in (0, 4, 12))
                if mask & _IN_GONE or data[i + 16:i + 16 + size].rstrip(b"\0") in self.names.get(watch, ()):
                    self.stale = True
                i += 16 + size
        return self.stale

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)


def _accept(listener, ctx: bytes, imported: _Imported):
    """Read one command's request: (connection, its three descriptors, the request as it came, for its
    worker: see :func:`_job`); None when it is declined (another user or context, a bad request); STALE
    when a file imported changed."""
    fd, _ = listener._accept()
    conn, fds = _socket.socket(fileno=fd), []
    try:
        if not _peer_is_me(conn):
            return None
        conn.settimeout(HANDSHAKE_SECONDS)
        data, ancillary, _, _ = conn.recvmsg(_MAX_REQUEST, _socket.CMSG_SPACE(3 * 4))
        fds = _descriptors(ancillary)
        parts = _unpack(data)
        stale = imported.changed()
        if stale or parts[0] != ctx or len(fds) != 3:
            conn.send(_DECLINED)
            return STALE if stale else None
        _job(parts[1:])  # a request its worker could not read is declined here
        conn.send(_ACCEPTED)
        conn.settimeout(None)
        job, conn, fds = (conn, fds, data), None, []
        return job
    except (OSError, ValueError, IndexError):
        return None
    finally:
        for fd in fds:
            os.close(fd)
        if conn is not None:
            conn.close()


def _descriptors(ancillary) -> list[int]:
    """The descriptors an SCM_RIGHTS message brought."""
    fds = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += [int.from_bytes(payload[i:i + 4], sys.byteorder) for i in range(0, len(payload) - 3, 4)]
    return fds


def _job(parts: list[bytes]) -> tuple[str, int, list[str], dict[bytes, bytes]]:
    """(cwd, umask, argv, environment) of a command's request (what follows its context)."""
    count = int(parts[2])
    return (os.fsdecode(parts[0]), int(parts[1]), [os.fsdecode(a) for a in parts[3:3 + count]],
            dict(p.partition(b"=")[::2] for p in parts[3 + count:]))


def _fork_spare(close: list, main) -> tuple[int, int, object]:
    """Fork the next command's worker before its command comes: the fork, and what the interpreter does
    in a child after one, are then no part of the command's time (1.2 to 2 ms). (pid, pidfd, the socket
    its command's request and descriptors are handed over on.)"""
    ours, its = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        _spare(its, [*close, ours], main)
    its.close()
    return pid, os.pidfd_open(pid), ours


def _hand_over(spare, conn, fds: list[int], request: bytes) -> bool:
    """Give the command to ``spare``: False if it is gone (killed)."""
    try:
        spare[2].sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                      b"".join(fd.to_bytes(4, sys.byteorder) for fd in (conn.fileno(), *fds)))])
        return True
    except OSError:
        return False
    finally:
        spare[2].close()


def _end_spare(spare) -> None:
    """Let a spare that got no command end (it reads the end of its socket), and reap it."""
    if spare is not None:
        pid, pidfd, sock = spare
        sock.close()
        os.close(pidfd)
        os.waitpid(pid, 0)


def _spare(sock, close: list, main):
    """In the forked child: close what is the resident interpreter's, wait for a command (its connection
    and three descriptors, its request) and become its worker; end if none comes."""
    try:
        for opened in close:  # sockets of the resident interpreter, pidfds of workers, its inotify
            if isinstance(opened, int):
                os.close(opened)
            else:
                opened.close()
        data, ancillary, _, _ = sock.recvmsg(_MAX_REQUEST, _socket.CMSG_SPACE(4 * 4))
        fds = _descriptors(ancillary)
        sock.close()
        if len(fds) != 4:  # the resident interpreter ended
            os._exit(0)
        conn = _socket.socket(fileno=fds[0])
        cwd, umask, argv, env = _job(_unpack(data)[1:])
    except BaseException:  # noqa: BLE001 - no command to tell: end
        os._exit(0)
    _worker(conn, fds[1:], cwd, umask, argv, env, main)


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def _worker(conn, fds: list[int], cwd: str, umask: int, argv: list[str], env: dict[bytes, bytes], main):
    """In the forked child: become the command (its streams, directory, umask, environment, argv), run it,
    and tell the command its exit status (on ``conn``) before this process is torn down: its memory, the
    resident interpreter's pages it wrote, takes most of a millisecond to release, which the command need
    not wait for. The resident interpreter says how a worker that died of a signal ended."""
    try:
        for number, fd in enumerate(fds):
            os.dup2(fd, number)
            os.close(fd)
        os.chdir(cwd)
        os.umask(umask)
        environ = os.environb  # only what differs: each change is a putenv, clearing all was 0.4 ms
        for key in [key for key in environ if key not in env]:
            del environ[key]
        for key, value in env.items():
            if environ.get(key) != value:
                environ[key] = value
        time.tzset()  # TZ as the command has it
        sys.argv = argv
        sys.stdout.reconfigure(line_buffering=sys.stdout.isatty())
    except BaseException as e:  # noqa: BLE001 - nothing of the command has run: say why, fail
        os.write(2, f"snapfw: could not take over this command: {e}\n".encode())
        os._exit(1)
    code = _run(main, argv[1:])
    for number in (0, 1, 2):  # the command's streams end with it: a reader of its pipe sees the end now
        os.close(number)
    try:
        conn.send(b"x" + bytes([code]))
    except OSError:
        pass
    os._exit(code)


def _run(main, args: list[str]) -> int:
    """Run the command and end as the interpreter ends a process (non-daemon threads joined, atexit
    functions run, standard streams flushed), with its exit status, but without the tens of milliseconds
    of tearing down the modules every worker shares."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:  # as the interpreter: the traceback, then death by SIGINT
        sys.excepthook(*sys.exc_info())
        code = -_signal.SIGINT
    except BaseException:  # noqa: BLE001 - the interpreter's own handling of an uncaught exception
        sys.excepthook(*sys.exc_info())
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120  # what the interpreter returns when it cannot flush stdout at exit
    if code < 0:
        _signal.signal(-code, _signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code & 0xFF
