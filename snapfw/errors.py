"""The exceptions snapfw raises, one tree so callers can catch at the level they care about.

    SnapfwError                  every error snapfw raises on purpose; the CLI prints it as one line
    ├── BadInput                 a name, flag, file or request is invalid; nothing was changed
    │   ├── UnknownDomain
    │   └── UnknownSnapshot
    ├── NotSupported             a backend or driver cannot do what was asked (never a silent no-op)
    ├── Refused                  the request is valid but would lose data or break a chain
    ├── ImageInUse               another process (a running QEMU) holds the image's lock
    ├── FileError                reading or writing a file failed (disk full, I/O error, no permission)
    ├── CatalogError             the catalog database is unreadable, corrupt or of a newer schema
    ├── Inconsistent             catalog and disks disagree, or a plan is unfinished: run `snapfw check`
    ├── LockTimeout              another snapfw process kept the domain's lock past --lock-timeout
    ├── PluginError              a plugin is broken or two plugins claim the same name
    └── ToolError                an external program failed or printed something unparsable
"""


class SnapfwError(Exception):
    """Base of every error snapfw raises on purpose.

    ``step`` is the plan step that failed, if one did: with several disks, the one-line error must say
    which file the program failed on.
    """

    step: str | None = None

    def __str__(self):
        text = super().__str__()
        return f"{self.step}: {text}" if self.step else text


class BadInput(SnapfwError):
    """Invalid request or input file; raised before anything is changed."""


class UnknownDomain(BadInput):
    pass


class UnknownSnapshot(BadInput):
    @classmethod
    def of(cls, domain: str, name: str) -> "UnknownSnapshot":
        return cls(f"domain {domain} has no snapshot {name!r}")


class NotSupported(SnapfwError):
    """The chosen backend or driver cannot perform the operation."""


class Refused(SnapfwError):
    """Valid request that would lose data or break another chain, so it is not done."""


class ImageInUse(SnapfwError):
    pass


class FileError(SnapfwError):
    """The system refused a file operation snapfw made after checking the request; names the file."""

    @classmethod
    def of(cls, error: OSError, path: str | None = None) -> "FileError":
        """``error`` (ENOSPC, EIO, EACCES ...) as one line naming the file it concerns."""
        where, what = path or error.filename, error.strerror or str(error)
        return cls(f"{where}: {what}" if where else what)


class CatalogError(SnapfwError):
    pass


class Inconsistent(SnapfwError):
    pass


class LockTimeout(SnapfwError):
    pass


class PluginError(SnapfwError):
    pass


class ToolError(SnapfwError):
    """An external program failed; carries its argv, exit code and stderr."""

    def __init__(self, message, argv=(), returncode=None, stderr=""):
        super().__init__(message)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
