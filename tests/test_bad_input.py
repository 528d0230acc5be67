"""Bad input and faults (TESTING.md items 1-5 and 13), through the real `snapfw` command.

Every refusal must exit non-zero with ONE line on stderr that names the problem (never a traceback),
and change nothing: the files in the connection directory (with their content hashes), the catalog's
rows, and the qemu-io patterns written before all stay as they were.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import fcntl
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import KIB64, exited_within, info_chain, qemu_io, require, write

EXIT_BAD_INPUT = 2
LONG = "n" * 256  # one byte too many
LONG_UTF8 = "é" * 128  # 128 characters, 256 bytes
BAD_NAMES = {  # name -> words the error line must contain
    "../x": ["'/'"],
    "a/b": ["'/'"],
    "": ["non-empty"],
    "..": ["'.'"],
    LONG: ["255 bytes"],
    LONG_UTF8: ["255 bytes"],
    "-x": ["'-'"],
}


# --- helpers -------------------------------------------------------------------------------------------
def catalog_file(env) -> str:
    return os.path.join(env.dir, ".snapfw", "catalog.sqlite")


def catalog_content(env):
    """The catalog's schema version and rows (None if there is none, a hash if it is unreadable).

    A refused command may create an empty catalog, so an absent one and one without rows compare equal.
    """
    path = catalog_file(env)
    if not os.path.exists(path):
        return None
    try:
        db = sqlite3.connect(path)
        try:
            rows = {t: sorted(map(repr, db.execute(f"SELECT * FROM {t}")))  # table names from sqlite_master
                    for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = db.execute("PRAGMA user_version").fetchone()[0]
        finally:
            db.close()
    except sqlite3.DatabaseError:
        with open(path, "rb") as f:
            return "unreadable " + hashlib.sha256(f.read()).hexdigest()
    rows = {t: r for t, r in rows.items() if r}
    return (version, rows) if rows else None


def capture(env):
    return env.state(), catalog_content(env)


def run_all(env, cases):
    """Run several refused commands at once (they never reach the domain lock, or never keep it)."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda args: env.run(*args, check=False), cases))


def refused(r, *words, code=None) -> str:
    """Assert a clean refusal; return its one error line."""
    what = f"snapfw {' '.join(r.args[5:])!r}"
    assert r.returncode != 0, f"{what} succeeded:\n{r.stdout}"
    if code is not None:
        assert r.returncode == code, f"{what} exited {r.returncode}, expected {code}:\n{r.stderr}"
    assert "Traceback" not in r.stderr, f"{what} crashed:\n{r.stderr}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("snapfw: waiting for lock")]
    assert len(lines) == 1 and lines[0].startswith("snapfw: error: "), f"{what}: not one error line:\n{r.stderr}"
    for w in words:
        assert w.lower() in lines[0].lower(), f"{what}: {w!r} not in {lines[0]!r}"
    return lines[0]


class Unchanged:
    """``with Unchanged(env, patterns):`` asserts that the block changed no file, catalog row or pattern."""

    def __init__(self, env, patterns=()):
        self.env, self.patterns = env, list(patterns)

    def __enter__(self):
        self.before = capture(self.env)
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            self.verify()

    def verify(self):
        state, catalog = capture(self.env)
        changed = sorted(n for n in state.keys() | self.before[0].keys() if state.get(n) != self.before[0].get(n))
        assert not changed, f"files changed: {changed}"
        assert catalog == self.before[1], "catalog changed"
        for target, byte, offset in self.patterns:
            assert self.env.reads("web", target, byte, offset), f"{target}: {byte:#x} at {offset} lost"


@pytest.fixture
def web(env):
    """Domain web (vda qcow2 -> internal snapshots, vdb raw -> external) with snapshot s1 and data after it.

    Returns the (target, byte, offset) patterns the disks hold now.
    """
    env.make_domain("web")
    env.write("web", "vda", 0x11, 0)
    env.write("web", "vdb", 0x21, 0)
    env.run("create", "web", "s1")
    env.write("web", "vda", 0x12, KIB64)
    env.write("web", "vdb", 0x22, KIB64)
    return [("vda", 0x11, 0), ("vda", 0x12, KIB64), ("vdb", 0x21, 0), ("vdb", 0x22, KIB64)]


def qemu_img(*args):
    require("qemu-img")
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


# --- 1. names, duplicates, unknown domain or snapshot, --disk ------------------------------------------
def _argv(cmd, *names):
    """`snapfw CMD NAMES...`, with `--` before them if one looks like an option."""
    return (cmd, "--", *names) if any(n.startswith("-") for n in names) else (cmd, *names)


def test_bad_snapshot_and_domain_names_are_refused(env, web):
    """Every bad name through `create`; each other command with one of them (in turn) as each argument."""
    names = list(BAD_NAMES)
    cases, expect = [], []
    for name, words in BAD_NAMES.items():
        cases += [_argv("create", "web", name), _argv("create", name, "s1")]
        expect += [["snapshot name", *words], ["domain name", *words]]
    for i, cmd in enumerate(("revert", "delete", "show")):
        name = names[i % len(names)]
        cases += [_argv(cmd, "web", name), _argv(cmd, names[-1 - i], "s1")]
        expect += [["snapshot name", *BAD_NAMES[name]], ["domain name", *BAD_NAMES[names[-1 - i]]]]
    for i, cmd in enumerate(("list", "export", "check")):
        name = names[(i + 3) % len(names)]
        cases.append(_argv(cmd, name))
        expect.append(["domain name", *BAD_NAMES[name]])
    with Unchanged(env, web):
        for r, words in zip(run_all(env, cases), expect):
            refused(r, *words, code=EXIT_BAD_INPUT)
    assert env.snapshot_names() == ["s1"]


def test_every_operation_checks_both_names_before_anything_else(env, web):
    """The whole names x operations matrix, in-process (the CLI only parses and calls these)."""
    from snapfw import lifecycle
    from snapfw.errors import BadInput

    session = lifecycle.Session(env.uri)
    with Unchanged(env, web):
        for name in [*BAD_NAMES, "a\0b"]:
            calls = {
                "create": lambda n: lifecycle.create(session, "web", n),
                "create --disk": lambda n: lifecycle.create(session, "web", "s2", backends={n: "external"}),
                "revert": lambda n: lifecycle.revert(session, "web", n),
                "delete": lambda n: lifecycle.delete(session, "web", n),
                "delete --children": lambda n: lifecycle.delete(session, "web", n, children=True),
                "create domain": lambda n: lifecycle.create(session, n, "s2"),
                "revert domain": lambda n: lifecycle.revert(session, n, "s1"),
                "delete domain": lambda n: lifecycle.delete(session, n, "s1"),
                "snapshots domain": lambda n: lifecycle.snapshots(session, n),
                "ensure_domain": lambda n: lifecycle.ensure_domain(session, n),
                "check domain": lambda n: lifecycle.check(session, n, repair=True),
            }
            for what, call in calls.items():
                with pytest.raises(BadInput, match="name"):
                    call(name)
                    pytest.fail(f"{what} accepted {name!r}")


def test_nul_in_a_name_is_refused_by_the_library(env, web):
    """argv cannot carry NUL, so this goes through the Python API the CLI calls."""
    from snapfw import lifecycle, names
    from snapfw.errors import BadInput

    for kind in ("snapshot", "domain"):
        with pytest.raises(BadInput, match="NUL"):
            names.check_name(kind, "a\0b")
    with Unchanged(env, web):
        session = lifecycle.Session(env.uri)
        calls = [lambda: lifecycle.create(session, "web", "a\0b"),
                 lambda: lifecycle.create(session, "we\0b", "s2"),
                 lambda: lifecycle.create(session, "web", "s2", backends={"vd\0a": "external"}),
                 lambda: lifecycle.revert(session, "web", "s\0"),
                 lambda: lifecycle.delete(session, "web", "s1\0"),
                 lambda: lifecycle.snapshots(session, "web\0")]
        for call in calls:
            with pytest.raises(BadInput, match="NUL"):
                call()


def test_a_255_byte_name_is_allowed_or_refused_cleanly(env, web):
    """255 bytes is a valid name, but `<name>.yaml`, `<name>.lock` or `web-vdb.<name>.qcow2` is not."""
    name = "d" * 255
    with Unchanged(env, web):
        for r in run_all(env, [("create", name, "s2"), ("list", name), ("show", name, "s1")]):
            refused(r, "no domain", code=EXIT_BAD_INPUT)
    long_snapshot = "s" * 255
    env.run("create", "web", long_snapshot)  # vdb's overlay file name must still fit
    assert env.snapshot_names() == ["s1", long_snapshot]
    for target, byte, offset in web:
        assert env.reads("web", target, byte, offset)
    env.run("delete", "web", long_snapshot)
    assert env.snapshot_names() == ["s1"]
    env.assert_consistent()


def test_unknown_domain_or_snapshot_and_duplicates_are_refused(env, web):
    cases = [
        (("create", "nosuch", "s1"), ["nosuch"]),
        (("revert", "nosuch", "s1"), ["nosuch"]),
        (("delete", "nosuch", "s1"), ["nosuch"]),
        (("show", "nosuch", "s1"), ["nosuch"]),
        (("list", "nosuch"), ["nosuch"]),
        (("revert", "web", "nope"), ["no snapshot", "'nope'"]),
        (("delete", "web", "nope"), ["no snapshot", "'nope'"]),
        (("show", "web", "nope"), ["no snapshot", "'nope'"]),
        (("create", "web", "s1"), ["already has a snapshot", "'s1'"]),
    ]
    with Unchanged(env, web):
        for r, (_, words) in zip(run_all(env, [c for c, _ in cases]), cases):
            refused(r, *words, code=EXIT_BAD_INPUT)
        r = env.run("check", "nosuch", check=False)
        assert r.returncode != 0 and "nosuch" in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_a_tag_of_that_name_already_in_the_qcow2_file_is_refused(env, web):
    """A duplicate the catalog does not know: an internal snapshot made by hand with qemu-img."""
    vda, _ = env.domain()["vda"]
    qemu_img("snapshot", "-c", "s2", vda)
    with Unchanged(env, web):
        refused(env.run("create", "web", "s2", check=False), "already holds", "'s2'")


def test_bad_disk_flags_are_refused(env, web):
    cases = [
        (("--disk", "vdz=external"), ["no disk", "'vdz'"], EXIT_BAD_INPUT),
        (("--disk", "vda=bogus"), ["--disk vda=bogus", "not installed"], EXIT_BAD_INPUT),
        (("--disk", "vda"), ["TARGET=BACKEND"], EXIT_BAD_INPUT),
        (("--disk", "=external"), ["TARGET=BACKEND"], EXIT_BAD_INPUT),
        (("--disk", "vda="), ["TARGET=BACKEND"], EXIT_BAD_INPUT),
        (("--disk", "vda:external"), ["TARGET=BACKEND"], EXIT_BAD_INPUT),
        (("--disk", "vda=external", "--disk", "vda=qcow2"), ["twice"], EXIT_BAD_INPUT),
        (("--disk", "../x=external"), ["disk target name"], EXIT_BAD_INPUT),
    ]
    env.make_domain("db", disks=(("vda", "raw"),))
    with Unchanged(env, web):
        results = run_all(env, [("create", "web", "s2", *flags) for flags, _, _ in cases]
                          + [("create", "db", "s1", "--disk", "vda=qcow2")])
        for r, (_, words, code) in zip(results, cases):
            refused(r, *words, code=code)
        refused(results[-1], "internal snapshots need a qcow2 file")  # backend that cannot take this disk
    assert env.snapshot_names() == ["s1"]


def test_an_unknown_backend_in_the_domain_file_or_a_missing_disk_file_is_bad_input(env, web):
    env.make_domain("db", disks=(("vda", "raw"),), backends={"vda": "zzz"})
    env.write_domain("gone", {"disks": [{"target": "vda", "path": "nosuch.qcow2", "format": "qcow2"}]})
    _edit_domain(env, "vdb", path="moved.img")  # a file the catalog has never seen
    with Unchanged(env):
        refused(env.run("create", "db", "s1", check=False), "disk vda", "backend 'zzz'", "domain's definition",
                "not installed", code=EXIT_BAD_INPUT)
        refused(env.run("create", "gone", "s1", check=False), os.path.join(env.dir, "nosuch.qcow2"),
                "does not exist", code=EXIT_BAD_INPUT)
        for args in (("create", "web", "s2"), ("revert", "web", "s1"), ("delete", "web", "s1")):
            refused(env.run(*args, check=False), os.path.join(env.dir, "moved.img"), "does not exist",
                    code=EXIT_BAD_INPUT)


# --- 2, 3. image chains: guessed formats, a raw disk that looks like qcow2, names outside the roots -------
def test_backing_file_without_recorded_format_is_refused(env):
    base, over = os.path.join(env.dir, "base.img"), os.path.join(env.dir, "over.qcow2")
    qemu_img("create", "-q", "-f", "raw", base, "4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", over)
    # qemu-img 7.2 no longer writes a backing file without its format: hide the format extension instead
    with open(over, "r+b") as f:
        header = f.read(KIB64)
        at = header.find(bytes.fromhex("e2792aca"), 72)  # qcow2 "backing file format name" extension
        assert at > 0
        f.seek(at)
        f.write(bytes.fromhex("5a5a5a5a"))  # an unknown extension, which qemu ignores
    assert "backing-filename-format" not in info_chain(over, "qcow2")[0]
    env.write_domain("web", {"disks": [{"target": "vda", "path": "over.qcow2", "format": "qcow2"}]})
    with Unchanged(env):
        for r in run_all(env, [("create", "web", "s1"), ("create", "web", "s1", "--disk", "vda=external")]):
            refused(r, "no recorded backing format")
    assert env.snapshot_names() == []


class OpenWatch:
    """inotify on one file: did anything open or read it since?"""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, path):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_ACCESS | self.IN_OPEN) < 0:
            pytest.skip(f"inotify unavailable: {os.strerror(ctypes.get_errno())}")

    def touched(self) -> bool:
        try:
            return bool(os.read(self.fd, 4096))
        except BlockingIOError:
            return False

    def close(self):
        os.close(self.fd)


def first_bytes(path, fmt) -> str:
    r = qemu_io(path, fmt, "read -v 0 4")
    assert r.returncode == 0, r.stderr
    return r.stdout.split(":", 1)[1].strip()[:11]


def test_raw_disk_holding_a_qcow2_header_stays_raw(env, tmp_path):
    """The content of a raw disk is the guest's: a qcow2 header in it must never be interpreted.

    The header names a private decoy file as its backing file (rather than /etc/hostname, which other
    processes may open): inotify proves nothing opens it while snapfw creates, reverts and deletes.
    """
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret\n" * 100)
    evil = os.path.join(env.dir, "evil.img")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", evil, "4M")
    env.write_domain("web", {"disks": [{"target": "vda", "path": "evil.img", "format": "raw"}]})
    with open(evil, "rb") as f:
        header = f.read(4)
    assert header == b"QFI\xfb"
    watch = OpenWatch(secret)
    try:
        env.run("create", "web", "s1", "--disk", "vda=external")
        overlay, fmt = env.domain()["vda"]
        chain = info_chain(overlay, "qcow2")
        assert fmt == "qcow2" and len(chain) == 2
        assert chain[0]["backing-filename-format"] == "raw"
        assert chain[1]["filename"] == evil and chain[1]["format"] == "raw"
        assert first_bytes(overlay, "qcow2") == "51 46 49 fb"  # the raw bytes 'QFI\xfb'
        exported = env.export()
        assert {f["path"]: f["format"] for f in exported["files"]}[evil] == "raw"
        env.assert_consistent()

        env.write("web", "vda", 0x33, KIB64)
        env.run("revert", "web", "s1")
        assert not env.reads("web", "vda", 0x33, KIB64)
        assert info_chain(env.domain()["vda"][0], "qcow2")[1]["format"] == "raw"
        env.write("web", "vda", 0x34, 2 * KIB64)
        env.run("delete", "web", "s1")  # commits the overlay back into the raw file
        assert env.domain()["vda"] == (evil, "raw")
        assert env.reads("web", "vda", 0x34, 2 * KIB64)
        assert first_bytes(evil, "raw") == "51 46 49 fb"
        env.assert_consistent()
        assert not watch.touched(), f"something opened {secret}, the backing file named inside the raw disk"
    finally:
        watch.close()


@pytest.fixture(params=["outside", "symlink", "json", "data-file"])
def escaping_disk(request, env, tmp_path):
    """A qcow2 disk of domain web whose chain names a file outside the connection directory."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    base = str(other / "base.img")
    qemu_img("create", "-q", "-f", "raw", base, "4M")
    disk = os.path.join(env.dir, "web-vda.qcow2")
    kind = request.param
    if kind == "outside":
        qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", disk)
        words = ["outside", base]
    elif kind == "symlink":
        os.symlink(base, os.path.join(env.dir, "link.img"))
        qemu_img("create", "-q", "-f", "qcow2", "-b", "link.img", "-F", "raw", disk)
        words = ["outside", "link.img"]
    elif kind == "json":
        spec = f'json:{{"driver": "raw", "file": {{"driver": "file", "filename": "{base}"}}}}'
        qemu_img("create", "-q", "-f", "qcow2", "-b", spec, "-F", "raw", disk)
        words = ["json:"]
    else:
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={other / 'data.raw'}", disk, "4M")
        words = ["outside", "data file"]
    env.write_domain("web", {"disks": [{"target": "vda", "path": "web-vda.qcow2", "format": "qcow2"}]})
    return words


def test_chain_leaving_the_allowed_roots_is_refused(env, escaping_disk):
    with Unchanged(env):
        for r in run_all(env, [("create", "web", "s1"), ("create", "web", "s1", "--disk", "vda=external")]):
            refused(r, *escaping_disk, code=EXIT_BAD_INPUT)
    assert env.snapshot_names() == []


# --- 4. YAML tags, broken catalogs, a catalog that disagrees with the disks ----------------------------
def test_yaml_python_tags_are_refused_and_never_run(env, web, tmp_path):
    pwned = tmp_path / "pwned"
    evil = f'!!python/object/apply:os.system ["touch {pwned}"]'
    env.write_domain("evil", f"disks: {evil}\n")
    env.write_domain("evil2", f"{evil}\n")
    with open(os.path.join(env.dir, "web.yaml")) as f:
        good = f.read()
    env.write_domain("web", good.replace("disks:", f"name: {evil}\ndisks:", 1))
    cases = [("create", "evil", "s1"), ("list", "evil"), ("export", "evil2"), ("create", "web", "s2"),
             ("revert", "web", "s1"), ("delete", "web", "s1")]
    with Unchanged(env):
        for r in run_all(env, cases):
            refused(r, "not plain YAML", "python", code=EXIT_BAD_INPUT)
    assert not pwned.exists()
    env.write_domain("web", good)
    for target, byte, offset in web:
        assert env.reads("web", target, byte, offset)


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _emptied(path):
    os.truncate(path, 0)


def _garbage(path):
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(os.urandom(size))


def _newer_schema(path):
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()


@pytest.mark.parametrize("damage", [_truncate, _emptied, _garbage, _newer_schema],
                         ids=["truncated", "emptied", "garbage", "newer"])
def test_broken_catalog_is_refused(env, web, damage):
    path = catalog_file(env)
    assert not os.path.exists(path + "-wal") or os.path.getsize(path + "-wal") == 0
    damage(path)
    with open(path, "rb") as f:
        damaged = f.read()
    cases = [("list", "web"), ("create", "web", "s2"), ("revert", "web", "s1"), ("delete", "web", "s1"),
             ("show", "web", "s1"), ("export", "web")]
    with Unchanged(env, web):
        for r in run_all(env, cases):
            line = refused(r, "catalog")
            assert {_newer_schema: "newer", _emptied: "empty"}.get(damage, "unreadable") in line
    with open(path, "rb") as f:
        assert f.read() == damaged, "the damaged catalog was rewritten"


JOURNALS = {  # a plan row another snapfw wrote -> words its refusal names
    "newer": ({"format": 2, "plan": [{"step": "RemoveFile", "path": "/x"}]}, ["format 2", "upgrade snapfw"]),
    "older": ({"format": 0, "finish": []}, ["format 0", "the snapfw version that started it"]),
    "retired step": ({"prepare": [{"type": "snapfw.retired:Step", "args": {}}], "finish": []},
                     ["'snapfw.retired:Step'", "the snapfw version that started it"]),
}


@pytest.mark.parametrize("journal", sorted(JOURNALS))
def test_a_journal_written_by_another_version_is_refused_with_what_to_do(env, web, journal):
    import json

    steps, words = JOURNALS[journal]
    db = sqlite3.connect(catalog_file(env))
    db.execute("INSERT INTO plans(id, domain, operation, state, created, steps) VALUES (?, ?, ?, ?, ?, ?)",
               ("p1", "web", "create", "running", time.time(), json.dumps(steps)))
    db.commit()
    db.close()
    with Unchanged(env, web):
        line = refused(env.run("check", "--repair", check=False), "interrupted create of web", *words)
        assert "Traceback" not in line
        refused(env.run("create", "web", "s2", check=False), "check --repair")
        found = env.run("check", check=False)
        assert found.returncode == 1 and "interrupted create" in found.stdout and not found.stderr


def _rebase_overlay(env):
    overlay, _ = env.domain()["vda"]
    qemu_img("create", "-q", "-f", "raw", os.path.join(env.dir, "stranger.img"), "4M")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "stranger.img", "-F", "raw", overlay)


def _point_at_unknown_file(env):
    overlay, _ = env.domain()["vda"]
    stranger = os.path.join(env.dir, "stranger.qcow2")
    subprocess.run(["cp", "--sparse=always", overlay, stranger], check=True)
    _edit_domain(env, "vda", path="stranger.qcow2")


def _point_at_frozen_file(env):
    """The domain now runs on s2's frozen image, which s2's overlay reads through."""
    _edit_domain(env, "vda", path=env.json("show", "web", "s2")["disks"][0]["file"])


def _move_row_to_another_disk(env):
    """The catalog has s1's frozen vda file as vdb's (as INSERT OR REPLACE once made it): a clean refusal,
    not a KeyError in the backend."""
    frozen = next(d["file"] for d in env.json("show", "web", "s1")["disks"] if d["target"] == "vda")
    db = sqlite3.connect(catalog_file(env))
    with db:
        db.execute("UPDATE files SET target = 'vdb' WHERE path = ?", (frozen,))
    db.close()


def _change_format(env):
    _edit_domain(env, "vdb", format="raw")


def _edit_domain(env, target, **changes):
    import yaml

    with open(os.path.join(env.dir, "web.yaml")) as f:
        data = yaml.safe_load(f)
    for d in data["disks"]:
        if d["target"] == target:
            d.update(changes)
    env.write_domain("web", data)


@pytest.mark.parametrize("sabotage", [_rebase_overlay, _point_at_unknown_file, _point_at_frozen_file,
                                      _move_row_to_another_disk, _change_format],
                         ids=["rebased", "unknown-file", "frozen-file", "moved-row", "format"])
def test_catalog_disagreeing_with_the_disks_blocks_changes(env, sabotage):
    env.make_domain("web", disks=(("vda", "qcow2"), ("vdb", "qcow2")), backends={"vda": "external", "vdb": "external"})
    env.write("web", "vda", 0x41, 0)
    env.run("create", "web", "s1")
    env.write("web", "vda", 0x42, KIB64)
    env.run("create", "web", "s2")
    env.write("web", "vdb", 0x43, 2 * KIB64)
    sabotage(env)
    cases = [("create", "web", "s3"), ("revert", "web", "s1"), ("delete", "web", "s1")]
    with Unchanged(env):
        for r in run_all(env, cases):
            refused(r, "snapfw check")
        assert [s["name"] for s in env.json("list", "web")] == ["s1", "s2"]  # reading still works
        found = env.run("check", "web", check=False)  # and check names the difference the refusal points to
        assert found.returncode == 1 and found.stdout.startswith("web: "), found.stdout + found.stderr


# --- one image in two places: two disks or two domains on one file, a base others read through ---------
EXIT_REFUSED = 1
SPELLINGS = ["same", "relative", "symlink", "hardlink"]


def another_name(env, path, spelling) -> str:
    """A name for the file ``path`` as a domain file may give it: the same, spelled otherwise, or a link."""
    name = os.path.basename(path)
    if spelling == "same":
        return name
    if spelling == "relative":
        return f"./elsewhere/../{name}"
    link = os.path.join(env.dir, f"also-{name}")
    (os.symlink if spelling == "symlink" else os.link)(name if spelling == "symlink" else path, link)
    return os.path.basename(link)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_two_disks_on_one_image_are_refused(env, spelling):
    """A domain file naming one image for two disks (by any name): bad input for every changing command,
    and `check` names it. Before, `create` froze the file for both disks and a later `delete` crashed."""
    env.make_domain("web", disks=(("vda", "raw"),))
    env.write("web", "vda", 0x61, 0)
    vda, _ = env.domain()["vda"]
    env.write_domain("web", {"disks": [{"target": "vda", "path": "web-vda.img", "format": "raw"},
                                       {"target": "vdb", "path": another_name(env, vda, spelling), "format": "raw"}]})
    cases = [("create", "web", "s1"), ("create", "web", "s1", "--disk", "vda=external"),
             ("create", "web", "s1", "--dry-run")]
    with Unchanged(env, [("vda", 0x61, 0)]):
        for r in run_all(env, cases):
            refused(r, "disks vda and vdb are one image file", vda, code=EXIT_BAD_INPUT)
        found = env.run("check", "web", check=False)
        assert found.returncode == 1 and "disks vda and vdb are one image file" in found.stdout, found.stdout
    qemu_img("create", "-q", "-f", "raw", os.path.join(env.dir, "web-vdb.img"), "4M")
    _edit_domain(env, "vdb", path="web-vdb.img")
    env.run("create", "web", "s1")  # each disk its own image: fine
    env.run("delete", "web", "s1")
    assert env.reads("web", "vda", 0x61, 0)
    env.assert_consistent()


def _sharing_refused(r, path, ours, theirs, code=EXIT_REFUSED) -> str:
    """A refusal naming the shared file and both users, `domain NAME (disk ...)`."""
    line = refused(r, path, code=code)
    for who in (ours, theirs):
        assert f"domain {who} (disk" in line, f"{who} not named in {line!r}"
    return line


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_an_image_another_domain_runs_on_is_refused(env, spelling):
    """Domain db's file names web's image. Before any snapshot, neither may snapshot it; once web has
    (its frozen file is in the catalog), db may not snapshot it, web may not create, revert or delete
    while db writes into that frozen file, and `check` names both. Before, db's snapshot moved the file's
    catalog row to db and web's revert and delete crashed."""
    env.make_domain("web", disks=(("vda", "raw"),))
    env.write("web", "vda", 0x71, 0)
    vda, _ = env.domain()["vda"]
    env.write_domain("db", {"disks": [{"target": "vda", "path": another_name(env, vda, spelling), "format": "raw"}]})
    with Unchanged(env, [("vda", 0x71, 0)]):
        web, db = run_all(env, [("create", "web", "s1"), ("create", "db", "d1")])
        _sharing_refused(web, vda, "web", "db")
        _sharing_refused(db, vda, "db", "web")

    os.rename(os.path.join(env.dir, "db.yaml"), os.path.join(env.dir, "db.off"))
    env.run("create", "web", "s1")  # web alone: vda is frozen, an overlay takes the writes
    env.write("web", "vda", 0x72, KIB64)
    os.rename(os.path.join(env.dir, "db.off"), os.path.join(env.dir, "db.yaml"))
    patterns = [("vda", 0x71, 0), ("vda", 0x72, KIB64)]
    with Unchanged(env, patterns):
        results = run_all(env, [("create", "db", "d1"), ("create", "web", "s2"), ("revert", "web", "s1"),
                                ("delete", "web", "s1"), ("delete", "web", "s1", "--dry-run")])
        _sharing_refused(results[0], vda, "db", "web")
        for r in results[1:]:
            _sharing_refused(r, vda, "web", "db")
        found = env.run("check", check=False)
        assert found.returncode == 1 and f"web: {vda} is used by domain web" in found.stdout, found.stdout
        assert "domain db (disk vda runs on it" in found.stdout, found.stdout
    os.unlink(os.path.join(env.dir, "db.yaml"))
    env.run("revert", "web", "s1")
    assert env.reads("web", "vda", 0x71, 0) and not env.reads("web", "vda", 0x72, KIB64)
    env.assert_consistent()


@pytest.mark.parametrize("base", ["gold", "snapshot"])
def test_a_base_two_domains_read_through_is_never_run_on(env, base):
    """Two domains reading through one base (a gold image; a clone of web's snapshot) is allowed. A third
    domain running on that base would write under both: then every one of them is refused."""
    if base == "gold":
        shared = os.path.join(env.dir, "gold.img")
        qemu_img("create", "-q", "-f", "raw", shared, "4M")
        readers = ["web", "copy"]
    else:
        env.make_domain("web", disks=(("vda", "raw"),))
        shared, _ = env.domain()["vda"]
        readers = ["copy"]
    write(shared, "raw", 0x81, 0)
    if base == "snapshot":
        env.run("create", "web", "s1")  # web's frozen file is now the shared base
    for name in readers:
        qemu_img("create", "-q", "-f", "qcow2", "-b", os.path.basename(shared), "-F", "raw",
                 os.path.join(env.dir, f"{name}-vda.qcow2"))
        env.write_domain(name, {"disks": [{"target": "vda", "path": f"{name}-vda.qcow2", "format": "qcow2"}]})
    env.run("create", "copy", "c1")
    if base == "gold":
        env.run("create", "web", "s1")
    for name in ("web", "copy"):
        env.write(name, "vda", 0x82, KIB64)
        assert env.reads(name, "vda", 0x81, 0)
    env.write_domain("tmpl", {"disks": [{"target": "vda", "path": os.path.basename(shared), "format": "raw"}]})
    with Unchanged(env):
        results = run_all(env, [("create", "tmpl", "t1"), ("create", "web", "s2"), ("create", "copy", "c2")])
        line = refused(results[0], shared, "domain tmpl (disk vda runs on it)", code=EXIT_REFUSED)
        assert "domain web (disk" in line or "domain copy (disk" in line, line
        _sharing_refused(results[1], shared, "web", "tmpl")
        _sharing_refused(results[2], shared, "copy", "tmpl")
    for name in ("web", "copy"):
        assert env.reads(name, "vda", 0x81, 0) and env.reads(name, "vda", 0x82, KIB64)
        env.assert_consistent(name)


def test_an_image_recorded_for_another_disk_is_refused(env):
    """A disk added to web after its snapshot, naming vda's frozen file: it is vda's, so snapshotting vdb
    would move it to vdb in the catalog (before: it did, and vda's snapshot lost its file)."""
    env.make_domain("web", disks=(("vda", "raw"),))
    env.write("web", "vda", 0x91, 0)
    env.run("create", "web", "s1")
    env.write("web", "vda", 0x92, KIB64)
    frozen = env.json("show", "web", "s1")["disks"][0]["file"]
    with open(os.path.join(env.dir, "web.yaml")) as f:
        data = yaml.safe_load(f)
    data["disks"].append({"target": "vdb", "path": os.path.basename(frozen), "format": "raw"})
    env.write_domain("web", data)
    with Unchanged(env, [("vda", 0x91, 0), ("vda", 0x92, KIB64)]):
        for r in run_all(env, [("create", "web", "s2"), ("revert", "web", "s1"), ("delete", "web", "s1")]):
            line = refused(r, frozen, "disk vdb runs on it", "disk vda has it in the catalog", code=EXIT_REFUSED)
        found = env.run("check", check=False)
        assert found.returncode == 1 and "disk vdb runs on it" in found.stdout, found.stdout
    assert line.count("domain web (disk") == 2


def test_the_catalog_never_moves_a_file_to_another_disk(tmp_path):
    """The last line of defence under the plan's checks: recording a file another disk has is an error,
    never INSERT OR REPLACE taking the row over."""
    from snapfw.catalog import Catalog
    from snapfw.model import ImageFile
    from snapfw.errors import Refused

    catalog = Catalog.open(str(tmp_path))
    with catalog.write() as changes:
        changes.put_file("web", ImageFile("/vms/a.img", "vda", "raw", None, False))
    for domain, target in (("db", "vda"), ("web", "vdb")):
        with pytest.raises(Refused, match="recorded for domain web disk vda"):
            with catalog.write() as changes:
                changes.put_file(domain, ImageFile("/vms/a.img", target, "raw", None, False))
    with catalog.write() as changes:  # the same disk may update its own row
        changes.put_file("web", ImageFile("/vms/a.img", "vda", "raw", "/vms/base.img", False))
    assert catalog.placements() == [("web", ImageFile("/vms/a.img", "vda", "raw", "/vms/base.img", False))]
    assert catalog.domains() == ["web"]


# --- 5. an image a running QEMU holds ------------------------------------------------------------------
def test_image_held_by_a_running_qemu_is_in_use(env, web, tmp_path):
    qemu = require("qemu-system-x86_64")
    vda, _ = env.domain()["vda"]
    pidfile = tmp_path / "qemu.pid"
    subprocess.run([qemu, "-accel", "tcg", "-machine", "q35", "-m", "64", "-nodefaults", "-display", "none",
                    "-daemonize", "-pidfile", str(pidfile),
                    "-blockdev", f"driver=file,filename={vda},node-name=f0",
                    "-blockdev", "driver=qcow2,file=f0,node-name=d0", "-device", "virtio-blk-pci,drive=d0"],
                   check=True, capture_output=True, timeout=60)
    pid = int(pidfile.read_text())
    try:
        held = subprocess.run(["qemu-img", "info", "-f", "qcow2", vda], capture_output=True, text=True)
        assert held.returncode != 0 and "lock" in held.stderr, "QEMU does not hold the image lock"
        with Unchanged(env):
            cases = [("create", "web", "s2", "--disk", "vda=external"), ("revert", "web", "s1"),
                     ("delete", "web", "s1")]
            for r in run_all(env, cases):
                refused(r, "in use", vda)
            checked = env.run("check")  # a running domain is no problem: compared from an advisory read
            assert checked.stdout.strip() == "No problems found.", checked.stdout
            assert f"{vda} is in use by a running process" in checked.stderr, checked.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
        if not exited_within(pid, 5):
            os.kill(pid, signal.SIGKILL)
            exited_within(pid, 5)
    for target, byte, offset in web:
        assert env.reads("web", target, byte, offset)
    env.run("create", "web", "s2")  # once QEMU is gone the same command works
    env.assert_consistent()


# --- 13. two snapfw processes on one domain ------------------------------------------------------------
def hold_lock(env, domain="web"):
    folder = os.path.join(env.dir, ".snapfw", "locks")
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, f"{domain}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_second_process_fails_fast_or_waits_on_the_lock(env, web):
    fd = hold_lock(env)
    try:
        with Unchanged(env, web):
            r = env.run("--lock-timeout", "1", "create", "web", "s2", check=False)
            refused(r, "locked", "--lock-timeout")
            assert "waiting for lock on web" in r.stderr
    finally:
        os.close(fd)

    fd = hold_lock(env)
    release = threading.Timer(1.0, os.close, (fd,))
    start = time.monotonic()
    release.start()
    try:
        r = env.run("--lock-timeout", "10", "create", "web", "s2", check=False)
    finally:
        release.join()
    assert r.returncode == 0, r.stderr
    assert "waiting for lock on web" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - start >= 0.9
    assert env.snapshot_names() == ["s1", "s2"]
    env.assert_consistent()


def test_concurrent_creates_on_one_domain_all_succeed(env):
    env.make_domain("web")
    env.write("web", "vda", 0x51, 0)
    env.write("web", "vdb", 0x52, 0)
    names = [f"c{i}" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-m", "snapfw", "--connect", env.uri, "create", "web", n],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in names]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "Traceback" not in err, err + out
    snaps = env.json("list", "web")
    assert sorted(s["name"] for s in snaps) == names
    parents = [s["parent"] for s in snaps]
    assert parents[0] is None and parents[1:] == [s["name"] for s in snaps[:-1]]  # one chain, in lock order
    assert [s["current"] for s in snaps] == [False] * 3 + [True]
    env.assert_consistent()
    assert env.reads("web", "vda", 0x51, 0) and env.reads("web", "vdb", 0x52, 0)


def test_concurrent_first_creates_on_two_domains_share_a_new_catalog(env):
    """Different domains do not share a lock: the first catalog must still be made only once."""
    from snapfw.catalog import Catalog

    # deterministic form of the race: a process saw version 0, then another migrated before it locked
    state = str(env.dir) + "-state"
    Catalog.open(state).close()
    late = sqlite3.connect(os.path.join(state, "catalog.sqlite"), isolation_level=None)
    Catalog._migrate(late, 0)
    late.close()
    for name in ("web", "db"):
        env.make_domain(name)
    procs = [subprocess.Popen([sys.executable, "-m", "snapfw", "--connect", env.uri, "create", d, "s1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for d in ("web", "db", "web", "db")]
    results = [(d, p.communicate(timeout=120), p.returncode) for d, p in zip(("web", "db", "web", "db"), procs)]
    for domain in ("web", "db"):
        mine = [(out, err, code) for d, (out, err), code in results if d == domain]
        assert sorted(code for *_, code in mine) == [0, EXIT_BAD_INPUT], mine  # one wins, one is a duplicate
        for out, err, code in mine:
            assert "Traceback" not in err, err
            if code:
                refused_line = [ln for ln in err.splitlines() if ln.startswith("snapfw: error:")]
                assert len(refused_line) == 1 and "already has a snapshot" in refused_line[0], err
    assert env.snapshot_names("web") == ["s1"] and env.snapshot_names("db") == ["s1"]
    env.assert_consistent("web")
    env.assert_consistent("db")
