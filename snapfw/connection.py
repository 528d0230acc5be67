"""Which connection, where its catalog lives, and the per-domain lock. Cheap to import: `list` uses it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time

from .errors import BadInput, FileError, LockTimeout, PluginError, SnapfwError
from .names import fit_file_name

CONNECT_ENV = "SNAPFW_CONNECT"
STATE_DIR_ENV = "SNAPFW_STATE_DIR"
# in cache_home(): scheme -> its driver's ``state_dir`` template, as a process that loaded the driver noted it
KNOWN_STATE_DIRS = "state-dirs.json"


def data_home() -> str:
    """/var/lib/snapfw for root, else $XDG_DATA_HOME/snapfw (~/.local/share/snapfw)."""
    return _home("/var/lib/snapfw", "XDG_DATA_HOME", os.path.join(".local", "share"))


def cache_home() -> str:
    """/var/cache/snapfw for root, else $XDG_CACHE_HOME/snapfw (~/.cache/snapfw): what snapfw may lose."""
    return _home("/var/cache/snapfw", "XDG_CACHE_HOME", ".cache")


def _home(as_root: str, xdg_variable: str, under_home: str) -> str:
    if os.geteuid() == 0:
        return as_root
    return os.path.join(os.environ.get(xdg_variable) or os.path.join(os.path.expanduser("~"), under_home), "snapfw")


def resolve_uri(uri: str | None) -> str:
    """The connection: ``uri``, else $SNAPFW_CONNECT, else the embedded default (the images driver on the
    data directory, as the README says)."""
    uri = uri or os.environ.get(CONNECT_ENV) or f"images://{os.path.join(data_home(), 'images')}"
    if "\0" in uri or "://" not in uri:
        raise BadInput(f"invalid connection URI {uri!r}: expected SCHEME://..., e.g. images:///srv/vms")
    return uri


def uri_path(uri: str) -> str:
    """The directory or file a ``SCHEME:///PATH`` URI names; BadInput unless PATH is absolute."""
    scheme, _, rest = uri.partition("://")
    if not rest.startswith("/"):
        raise BadInput(f"invalid connection URI {uri!r}: {scheme}:// needs an absolute path, "
                       f"e.g. {scheme}:///srv/vms")
    return os.path.normpath(rest)


def state_override(override: str | None) -> str | None:
    """The state directory the user chose (--state-dir, else $SNAPFW_STATE_DIR), if any."""
    override = override or os.environ.get(STATE_DIR_ENV)
    return os.path.abspath(override) if override else None


def state_dir(uri: str, template: str | None) -> str:
    """Where the driver whose ``state_dir`` is ``template`` keeps the catalog of ``uri``: the data directory
    for None, else the template with ``{path}`` the path the URI names."""
    if template is None:
        return data_home()
    try:
        folder = template.format(path=uri_path(uri))
    except (KeyError, IndexError, ValueError):
        folder = ""
    if not os.path.isabs(folder):
        raise PluginError(f"the driver for {uri.partition('://')[0]}:// has an invalid state_dir {template!r}: "
                          "expected an absolute path, {path} standing for the path the URI names")
    return os.path.normpath(folder)


def remember_state_dir(uri: str, template: str | None) -> None:
    """Note the ``state_dir`` template of ``uri``'s driver, so that ``snapfw list`` finds the catalog
    without loading any plugin. Best effort: without the note, ``list`` asks the driver itself."""
    scheme = uri.partition("://")[0]
    known = _known_state_dirs()
    if scheme in known and known[scheme] == template:
        return
    write_cache(KNOWN_STATE_DIRS, {**known, scheme: template})


def known_state_dir(uri: str) -> str | None:
    """The state directory of ``uri`` if its driver's ``state_dir`` is noted; None: ask the driver."""
    known = _known_state_dirs()
    scheme = uri.partition("://")[0]
    if scheme not in known:
        return None
    try:
        return state_dir(uri, known[scheme])
    except PluginError:
        return None


def _known_state_dirs() -> dict[str, str | None]:
    known = read_cache(KNOWN_STATE_DIRS)
    if not isinstance(known, dict):
        return {}
    return {k: v for k, v in known.items() if v is None or isinstance(v, str)}


def read_cache(name: str):
    """The JSON document ``name`` in cache_home(), or None if it is missing or unreadable."""
    try:
        fd = os.open(os.path.join(cache_home(), name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:  # bytes, not a text-mode file object: every command reads two or three of these
        with os.fdopen(fd, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def write_cache(name: str, document) -> None:
    """Replace the JSON document ``name`` in cache_home() atomically; best effort (a cache may be lost)."""
    import tempfile

    folder = cache_home()
    tmp = None
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(document))  # json.dump streams through the pure-Python encoder: 100 x slower
        os.replace(tmp, os.path.join(folder, name))
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


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
