"""Which connection, where its catalog lives, and the per-domain lock. Cheap to import: `list` uses it."""

from __future__ import annotations

import contextlib
import errno
import os
import time

from .errors import BadInput, FileError, LockTimeout, SnapfwError
from .model import fit_file_name

CONNECT_ENV = "SNAPFW_CONNECT"
STATE_DIR_ENV = "SNAPFW_STATE_DIR"
LOCAL_SCHEME = "images"


def data_home() -> str:
    """/var/lib/snapfw for root, else $XDG_DATA_HOME/snapfw (~/.local/share/snapfw)."""
    if os.geteuid() == 0:
        return "/var/lib/snapfw"
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(xdg, "snapfw")


def resolve_uri(uri: str | None) -> str:
    uri = uri or os.environ.get(CONNECT_ENV) or f"{LOCAL_SCHEME}://{os.path.join(data_home(), 'images')}"
    if "\0" in uri or "://" not in uri:
        raise BadInput(f"invalid connection URI {uri!r}: expected SCHEME://..., e.g. images:///srv/vms")
    return uri


def local_dir(uri: str) -> str | None:
    """The directory of a local ``images:///DIR`` connection, whose catalog lives inside DIR."""
    scheme, _, rest = uri.partition("://")
    if scheme != LOCAL_SCHEME:
        return None
    if not rest.startswith("/"):
        raise BadInput(f"invalid connection URI {uri!r}: {LOCAL_SCHEME}:// needs an absolute directory")
    return os.path.normpath(rest)


def state_dir(uri: str, override: str | None = None) -> str:
    override = override or os.environ.get(STATE_DIR_ENV)
    if override:
        return os.path.abspath(override)
    local = local_dir(uri)
    return os.path.join(local, ".snapfw") if local else data_home()


@contextlib.contextmanager
def domain_lock(state: str, domain: str, timeout: float, waiting):
    """Hold an exclusive flock on the domain for the whole operation.

    If another process holds it, call ``waiting(domain)`` once and retry until ``timeout`` seconds.
    """
    import fcntl

    folder = os.path.join(state, "locks")
    name = fit_file_name(domain, 250)  # `<name>.lock` within NAME_MAX
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(folder, f"{name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise FileError(f"cannot lock domain {domain}: {FileError.of(e)}") from None
    try:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise SnapfwError(f"cannot lock domain {domain}: {e}") from None
            if not announced:
                waiting(domain)
                announced = True
            if time.monotonic() >= deadline:
                raise LockTimeout(f"domain {domain} is locked by another snapfw process "
                                  f"(waited {timeout:g} s; see --lock-timeout)")
            time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a rename or link into directory ``path`` durable (after a crash the new name is there)."""
    fd = os.open(path, os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
