"""lvm2, one function per command, run on a :class:`~snapfw.tools.host.Host`; every read is
``--reportformat json`` with sizes in bytes, and lvm's error lines become typed errors here."""

from __future__ import annotations

import json
import re

from ..errors import BadInput, Refused, ToolError

LV_FIELDS = ("lv_name", "vg_name", "lv_path", "lv_attr", "lv_size", "origin", "pool_lv", "data_percent",
             "metadata_percent", "lv_tags", "lv_snapshot_invalid", "lv_merging", "segtype")
VG_FIELDS = ("vg_name", "vg_extent_size", "vg_free_count", "vg_free")
MAX_NAME = 127  # lvm's NAME_LEN less its terminating NUL
OWNER_TAG = "snapfw"  # on every LV snapfw creates: an undo removes only those

_SHORT = re.compile(r"Insufficient free space|insufficient suitable|Cannot create new thin volume, free space in "
                    r"thin pool|is full|exceeds the size of thin pool|free space", re.I)
_MISSING = re.compile(r"not found|Failed to find|doesn't exist", re.I)


def _error(e: ToolError, argv: list[str]) -> Exception:
    """lvm's own first error line, typed: not enough space is Refused, an unknown name BadInput."""
    lines = [ln.strip() for ln in (e.stderr or "").splitlines() if ln.strip() and "WARNING" not in ln]
    line = lines[0] if lines else str(e)
    what = " ".join(argv[:1])
    if _SHORT.search(line):
        return Refused(f"{what}: {line}")
    if _MISSING.search(line):
        return BadInput(f"{what}: {line}")
    return ToolError(f"{what} failed: {line}", argv, e.returncode, e.stderr)


def lvm(host, argv: list[str], timeout: float | None = None) -> str:
    try:
        return host.run(argv, **({"timeout": timeout} if timeout else {}))
    except ToolError as e:
        if e.returncode is None:  # did not run to its end: no lvm error to read
            raise
        raise _error(e, argv) from None


def _report(host, argv: list[str], kind: str) -> list[dict]:
    out = lvm(host, [*argv, "--reportformat", "json", "--units", "b", "--nosuffix"])
    try:
        rows = [row for part in json.loads(out)["report"] for row in part[kind]]
    except (ValueError, KeyError, TypeError):
        raise ToolError(f"{argv[0]} printed output that is not its JSON report: {out[:80]!r}", argv) from None
    return rows


def lvs(host, *names: str) -> list[dict]:
    """The LVs ``names`` (``VG``, ``VG/LV`` or ``/dev/VG/LV``) as dicts of LV_FIELDS. Hidden LVs (a
    pool's parts, a snapshot being merged) are named without the brackets ``lvs -a`` puts around them."""
    rows = _report(host, ["lvs", "-a", "-o", ",".join(LV_FIELDS), *names], "lv")
    for row in rows:
        row["lv_name"] = row["lv_name"].strip("[]")
    return rows


def lv(host, vg: str, name: str) -> dict | None:
    """The LV ``vg/name``, or None if there is none."""
    return next((r for r in lvs(host, vg) if r["lv_name"] == name), None)


def vg(host, name: str) -> dict:
    return _report(host, ["vgs", "-o", ",".join(VG_FIELDS), name], "vg")[0]


def create_snapshot_argv(vg_name: str, origin: str, name: str, size: int | None, active: bool = False) -> list[str]:
    """A thin snapshot without ``size`` (skipped by activation unless ``active``), else a classic COW
    snapshot of ``size`` bytes."""
    sized = ["-L", f"{size}b"] if size is not None else ["-kn"] if active else []
    return ["lvcreate", "-q", "-s", *sized, "-n", name, "--addtag", OWNER_TAG, f"{vg_name}/{origin}"]


def merge_argv(vg_name: str, name: str) -> list[str]:
    """Merge snapshot ``name`` into its origin, waiting for the copy (``-i 1``) when the origin is not open."""
    return ["lvconvert", "-q", "-y", "--merge", "-i", "1", f"{vg_name}/{name}"]


def activate_argv(vg_name: str, name: str, active: bool) -> list[str]:
    return ["lvchange", "-q", "-ay" if active else "-an", f"{vg_name}/{name}"]


def remove_argv(vg_name: str, name: str) -> list[str]:
    return ["lvremove", "-q", "-y", f"{vg_name}/{name}"]
