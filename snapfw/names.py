"""Names users give (domains, snapshots, disks, clones) and the file names made from them: checked before
anything is changed. Apart from the model so that reading the catalog (``snapfw list``) needs no dataclass."""

from __future__ import annotations

import os

from .errors import BadInput

MAX_NAME_BYTES = 255


def check_name(kind: str, name) -> str:
    """Refuse names that could escape a directory, look like options or not fit a file name."""
    if not isinstance(name, str) or name == "":
        raise BadInput(f"{kind} name must be a non-empty string")
    problem = None
    if "\0" in name:
        problem = "contains a NUL byte"
    elif "/" in name:
        problem = "contains '/'"
    elif name in (".", "..") or name.startswith("."):
        problem = "starts with '.'"
    elif name.startswith("-"):
        problem = "starts with '-'"
    elif len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "contains a control character"
    if problem:
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise BadInput(f"invalid {kind} name {shown!r}: it {problem}")
    return name


def fit_file_name(name: str, room: int) -> str:
    """``name`` if its bytes fit in ``room``, else a cut of it plus a hash that keeps it unique: valid
    names of up to 255 bytes must still give file names (``<name>.lock``, overlays) within NAME_MAX."""
    raw = os.fsencode(name)
    if len(raw) <= room:
        return name
    import hashlib

    return raw[:room - 13].decode(errors="ignore") + "~" + hashlib.sha256(raw).hexdigest()[:12]
