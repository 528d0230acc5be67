"""Faults (TESTING.md 6, 7, 8 and 13; issue 7), through the real `snapfw` command on real images.

- ENOSPC while creating overlays or writing internal tags (prepare phase: rolled back, no partial file,
  no tag left on the other disk) and while committing or streaming (finish phase: `snapfw check --repair`
  finishes it once there is room), on a small tmpfs;
- EIO from the base file while a delete streams from it or commits into it: snapfw passes plain file
  names, so the failing disk is a qcow2 exported as a raw file over FUSE by qemu-storage-daemon through
  blkdebug;
- the domain file's filesystem full while it is rewritten, and the images' filesystem read-only;
- the catalog's own filesystem full at open, and filling up while an operation journals its steps;
- qemu-img missing from PATH, or printing garbage;
- 4 processes hammering one domain, and 4 working on 4 domains at once;
- SIGKILL at every step boundary of an external delete, on its commit paths and its stream path; SIGKILL
  or SIGTERM in the middle of the qemu-img that commits or streams 512 MiB.

Every case ends with every written pattern read back and the catalog matching the disks.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import IN_CI, KIB64, Env, check_image, exited_within, fuse_export, info_chain, qemu_io, require, write

MIB = 1024 * 1024


# --- helpers -------------------------------------------------------------------------------------------
def reads_all(env, patterns, domain="web"):
    """Assert the domain's active disks read every (target, byte, offset, length); byte 0: never written."""
    disks = env.domain(domain)
    for target, byte, offset, length in patterns:
        path, fmt = disks[target]
        r = qemu_io(path, fmt, f"read -P {byte:#x} {offset} {length}")
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "Pattern verification failed" not in out, \
            f"{domain} {target}: {byte:#x} at {offset} (+{length}) does not read back from {path}:\n{out}"


def put(env, byte, offset, length=KIB64, target="vda"):
    """Write a pattern into the active file of one disk of ``web``; return it for reads_all."""
    write(*env.domain()[target], byte, offset, length)
    return (target, byte, offset, length)


def zero(pattern):
    """The same range, read as never written."""
    return (pattern[0], 0, *pattern[2:])


def one_error_line(r, *words):
    """A clean failure: non-zero exit, no traceback, one `snapfw: error:` line naming the problem."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("snapfw: error:")]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def unavailable(message: str):
    """A part the test needs is missing here: fail in CI, skip on a laptop."""
    (pytest.fail if IN_CI else pytest.skip)(message)


def hashes(folder, skip=()):
    """File name -> content hash, for files whose every byte must stay the same."""
    out = {}
    for n in sorted(os.listdir(folder)):
        p = os.path.join(folder, n)
        if os.path.isfile(p) and n not in skip:
            with open(p, "rb") as f:
                out[n] = hashlib.sha256(f.read()).hexdigest()
    return out


def no_problems(env):
    r = env.run("check")
    assert r.stdout.strip() == "No problems found.", r.stdout


# --- ENOSPC --------------------------------------------------------------------------------------------
FILLER = "filler"


@contextlib.contextmanager
def tmpfs(path):
    """A 16 MiB tmpfs on ``path`` for the length of the block (mounting needs root)."""
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        unavailable(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def small(env):
    """A small filesystem inside the connection directory holding the images; the catalog stays outside."""
    path = os.path.join(env.dir, "small")
    os.mkdir(path)
    with tmpfs(path):
        yield path


def fill(folder, leave: int) -> str:
    """Fill the filesystem of ``folder`` until only ``leave`` bytes are free."""
    st = os.statvfs(folder)
    path = os.path.join(folder, FILLER)
    with open(path, "ab") as f:
        f.write(b"\xff" * (st.f_bavail * st.f_frsize - leave))
    return path


def small_domain(env, small, disks=(("vda", "qcow2"),)):
    """``web`` with its images on the small filesystem, every disk snapshotted as external."""
    entries = []
    for target, fmt in disks:
        name = f"web-{target}.{'qcow2' if fmt == 'qcow2' else 'img'}"
        subprocess.run([require("qemu-img"), "create", "-q", "-f", fmt, os.path.join(small, name), "4M"], check=True)
        entries.append({"target": target, "path": f"small/{name}", "format": fmt, "backend": "external"})
    env.write_domain("web", {"disks": entries})


@pytest.mark.parametrize("operation", ["create", "revert"])
def test_enospc_creating_overlays_rolls_back(env, small, operation):
    """The second disk's overlay does not fit: the first disk's overlay is removed again (rule 6)."""
    small_domain(env, small, (("vda", "qcow2"), ("vdb", "raw")))
    gens = {}
    for g, name in enumerate(["s1", "s2"], 1):
        gens[g] = [put(env, 0x10 + g, g * KIB64), put(env, 0x80 + g, g * KIB64, target="vdb")]
        env.run("create", "web", name)
    args = ["create", "web", "s3"] if operation == "create" else ["revert", "web", "s1"]
    listed, files, layout = env.json("list", "web"), hashes(small), env.layout()
    filler = fill(small, 256 * 1024)  # one empty overlay takes 192 KiB
    r = env.run(*args, check=False)
    one_error_line(r, "No space left on device", "web-vdb.")
    assert hashes(small, skip={FILLER}) == files, "a partial overlay was left behind"
    assert env.json("list", "web") == listed and env.layout() == layout
    reads_all(env, gens[1] + gens[2])
    no_problems(env)
    os.unlink(filler)
    env.run(*args)
    reads_all(env, gens[1] + (gens[2] if operation == "create" else [zero(p) for p in gens[2]]))
    env.assert_consistent()


def tags(path) -> list[str]:
    """The internal snapshot tags in a qcow2 file."""
    return [tag["name"] for tag in info_chain(path, "qcow2")[0].get("snapshots", [])]


@pytest.mark.parametrize("operation", ["create", "revert"])
def test_enospc_writing_an_internal_tag_rolls_back(env, small, operation):
    """vda's tag is written, vdb's does not fit (its file is on the full filesystem): vda's goes again."""
    for target, folder in (("vda", env.dir), ("vdb", small)):
        subprocess.run([require("qemu-img"), "create", "-q", "-f", "qcow2", os.path.join(folder, f"web-{target}.qcow2"),
                        "4M"], check=True)
    env.write_domain("web", {"disks": [
        {"target": "vda", "path": "web-vda.qcow2", "format": "qcow2", "backend": "qcow2"},
        {"target": "vdb", "path": "small/web-vdb.qcow2", "format": "qcow2", "backend": "qcow2"}]})
    gens = {}
    for g, name in enumerate(["s1", "s2"], 1):
        gens[g] = [put(env, 0x10 + g, g * MIB, MIB), put(env, 0x80 + g, g * MIB, MIB, target="vdb")]
        env.run("create", "web", name)
    now = [put(env, 0x33, 3 * MIB, MIB), put(env, 0x93, 3 * MIB, MIB, target="vdb")]
    args = ["create", "web", "s3"] if operation == "create" else ["revert", "web", "s1"]

    def state():
        return {"tags": {t: tags(p) for t, (p, _) in env.domain().items()}, "catalog": env.run("export", "web").stdout}

    before = state()
    filler = fill(small, 0)
    r = env.run(*args, check=False)
    one_error_line(r, "small/web-vdb.qcow2", "No space left on device")
    assert state() == before, "a tag or a record was left behind"
    reads_all(env, gens[1] + gens[2] + now)
    for path, _ in env.domain().values():
        assert check_image(path, "qcow2") == 0, path
    no_problems(env)
    os.unlink(filler)
    env.run(*args)
    reads_all(env, gens[1] + (gens[2] + now if operation == "create" else [zero(p) for p in gens[2] + now]))
    env.assert_consistent()


def test_a_one_disk_revert_applies_its_tag_after_the_commit(env, small, tmp_path):
    """A revert of one qcow2 disk keeps no copy of the state it discards (that copy is what lets a
    revert of several disks put them all back): one `qemu-img snapshot -a`, after the commit. It works
    on a full filesystem, where keeping the copy could not; killed once its qemu-img has run (or while it
    runs), `check --repair` applies the tag again and releases what a cut run left counted."""
    subprocess.run([require("qemu-img"), "create", "-q", "-f", "qcow2", os.path.join(small, "web-vda.qcow2"), "4M"],
                   check=True)
    env.write_domain("web", {"disks": [{"target": "vda", "path": "small/web-vda.qcow2", "format": "qcow2",
                                        "backend": "qcow2"}]})
    gens = []
    for g, name in enumerate(["s1", "s2", None], 1):
        gens.append(put(env, 0x10 + g, g * MIB, MIB))
        if name:
            env.run("create", "web", name)
    steps = env.json("revert", "web", "s1", "--dry-run")["plan"]["steps"]
    assert [(s["phase"], s["describe"]) for s in steps] == [
        ("finish", f"revert {os.path.join(small, 'web-vda.qcow2')} to internal snapshot 's1'")], steps
    filler = fill(small, 0)
    env.run("revert", "web", "s1")
    reads_all(env, [gens[0], zero(gens[1]), zero(gens[2])])
    os.unlink(filler)
    path = env.domain()["vda"][0]
    assert tags(path) == ["s1", "s2"] and check_image(path, "qcow2") == 0
    # killed once its qemu-img has applied s2: the commit says s2, repair applies it again
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "qemu-img"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        {require("qemu-img")} "$@" || exit
        [ "$1" = snapshot ] && kill -KILL $PPID && sleep 10
        exit 0
        """))
    fake.chmod(0o755)
    r = env.run("revert", "web", "s2", check=False, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert r.returncode == -9, r.stderr
    assert "interrupted revert" in env.run("check", check=False).stdout
    assert "finished revert" in env.run("check", "--repair").stdout
    no_problems(env)
    assert [s["name"] for s in env.json("list", "web") if s["current"]] == ["s2"]
    reads_all(env, [gens[0], gens[1], zero(gens[2])])
    assert tags(path) == ["s1", "s2"] and check_image(path, "qcow2") == 0
    # its qemu-img fails (an I/O error): recorded, so it is finished by repair, and nothing else runs first
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        [ "$1" = snapshot ] && [ "$3" = -a ] && echo "qemu-img: Could not apply: Input/output error" >&2 && exit 1
        exec {require("qemu-img")} "$@"
        """))
    r = env.run("revert", "web", "s1", check=False, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    one_error_line(r, "Input/output error", "check --repair")
    one_error_line(env.run("delete", "web", "s2", check=False), "check --repair")
    assert "finished revert" in env.run("check", "--repair").stdout
    no_problems(env)
    reads_all(env, [gens[0], zero(gens[1]), zero(gens[2])])
    env.assert_consistent()


def test_enospc_committing_is_finished_by_repair(env, small):
    """Deleting s2 commits its small child into its big file; the commit runs out of space midway."""
    small_domain(env, small)
    g1 = put(env, 0x11, 0)
    env.run("create", "web", "s1")
    g2 = put(env, 0x12, MIB, MIB)
    env.run("create", "web", "s2")
    g3 = put(env, 0x13, 2 * MIB, 512 * 1024)
    env.run("create", "web", "s3")
    g4 = put(env, 0x14, 3 * MIB)
    steps = env.json("delete", "web", "s2", "--dry-run")["plan"]["steps"]
    assert steps[0]["describe"].startswith("commit "), steps
    filler = fill(small, KIB64)
    r = env.run("delete", "web", "s2", check=False)
    one_error_line(r, "No space left on device", "check --repair")
    reads_all(env, [g1, g2, g3, g4])  # the domain still runs on the old chain, which reads the same
    for f in os.listdir(small):
        if f.endswith(".qcow2"):
            assert check_image(os.path.join(small, f), "qcow2") in (0, 3), f
    assert env.run("check", check=False).returncode == 1
    one_error_line(env.run("revert", "web", "s1", check=False), "check --repair")
    one_error_line(env.run("check", "--repair", check=False), "No space left on device")  # still full
    os.unlink(filler)
    assert "finished delete" in env.run("check", "--repair").stdout
    no_problems(env)
    assert env.snapshot_names() == ["s1", "s3"]
    reads_all(env, [g1, g2, g3, g4])
    env.assert_consistent()
    env.run("revert", "web", "s3")
    reads_all(env, [g1, g2, g3, zero(g4)])
    env.run("revert", "web", "s1")
    reads_all(env, [g1, zero(g2), zero(g3), zero(g4)])
    env.assert_consistent()


def test_enospc_streaming_is_finished_by_repair(env, small):
    """Deleting a snapshot with two children streams its data into both; the space runs out midway."""
    small_domain(env, small)
    g1 = put(env, 0x11, 0)
    env.run("create", "web", "s1")
    g2 = put(env, 0x12, MIB, 2 * MIB)
    env.run("create", "web", "s2")
    left = put(env, 0x33, 3 * MIB)
    env.run("create", "web", "left")
    env.run("revert", "web", "s2")
    right = put(env, 0x44, 3 * MIB + KIB64)
    env.run("create", "web", "right")
    steps = env.json("delete", "web", "s2", "--dry-run")["plan"]["steps"]
    assert sum(s["describe"].startswith("stream ") for s in steps) == 2, steps
    filler = fill(small, 512 * 1024)  # s2's 2 MiB fits into neither child
    r = env.run("delete", "web", "s2", check=False)
    one_error_line(r, "No space left on device", "check --repair")
    reads_all(env, [g1, g2, zero(left), right])
    one_error_line(env.run("check", "--repair", check=False), "No space left on device")  # still full
    os.unlink(filler)
    assert "finished delete" in env.run("check", "--repair").stdout
    no_problems(env)
    assert {s["name"]: s["parent"] for s in env.json("list", "web")} == {"s1": None, "left": "s1", "right": "s1"}
    reads_all(env, [g1, g2, zero(left), right])
    env.assert_consistent()
    env.run("revert", "web", "left")
    reads_all(env, [g1, g2, left, zero(right)])
    env.run("revert", "web", "right")
    reads_all(env, [g1, g2, zero(left), right])
    env.run("revert", "web", "s1")
    reads_all(env, [g1, zero(g2), zero(left), zero(right)])
    env.assert_consistent()


def test_enospc_writing_the_domain_file_rolls_back_and_names_it(env, tmp_path, monkeypatch):
    """The domain file's filesystem is full when an external create rewrites it: one error naming the
    file, the old file intact and no temp file left, the overlay removed; once there is room it works."""
    images, state = tmp_path / "images", tmp_path / "state"
    images.mkdir()
    monkeypatch.setenv("SNAPFW_STATE_DIR", str(state))
    with tmpfs(env.dir):
        subprocess.run([require("qemu-img"), "create", "-q", "-f", "qcow2", str(images / "web-vda.qcow2"), "4M"],
                       check=True)
        env.write_domain("web", {"disks": [{"target": "vda", "path": str(images / "web-vda.qcow2"),
                                            "format": "qcow2", "backend": "external"}]})
        g1 = put(env, 0x11, 0)
        env.run("create", "web", "s1")
        g2 = put(env, 0x12, KIB64)
        before, image_files, listed = hashes(env.dir), hashes(images), env.json("list", "web")
        filler = fill(env.dir, 0)
        line = one_error_line(env.run("create", "web", "s2", check=False), "web.yaml", "No space left on device")
        assert "internal error" not in line, line
        assert hashes(env.dir, skip={FILLER}) == before, "the domain file changed or a temp file was left"
        assert hashes(images) == image_files and env.json("list", "web") == listed
        reads_all(env, [g1, g2])
        no_problems(env)
        os.unlink(filler)
        env.run("create", "web", "s2")
        reads_all(env, [g1, g2])
        env.assert_consistent()


def test_images_on_a_read_only_filesystem_are_one_error_naming_the_file(env, tmp_path):
    """The overlay cannot even be created (EROFS from snapfw's own open, not from qemu-img)."""
    images = tmp_path / "images"
    images.mkdir()
    with tmpfs(images):
        subprocess.run([require("qemu-img"), "create", "-q", "-f", "qcow2", str(images / "web-vda.qcow2"), "4M"],
                       check=True)
        env.write_domain("web", {"disks": [{"target": "vda", "path": str(images / "web-vda.qcow2"),
                                            "format": "qcow2", "backend": "external"}]})
        g1 = put(env, 0x11, 0)
        subprocess.run(["mount", "-o", "remount,ro", str(images)], check=True)
        before = env.state()
        line = one_error_line(env.run("create", "web", "s1", check=False), str(images / "web-vda.s1.qcow2"),
                              "Read-only file system")
        assert "internal error" not in line, line
        assert env.state() == before and env.snapshot_names() == []
        subprocess.run(["mount", "-o", "remount,rw", str(images)], check=True)
        reads_all(env, [g1])
        assert os.listdir(images) == ["web-vda.qcow2"]
        no_problems(env)


def test_catalog_on_a_full_filesystem_is_refused_without_harm(tmp_path):
    """The catalog cannot even be opened: the error says why, and never to move a good catalog away."""
    require("qemu-img")
    env = Env(tmp_path / "vms")
    os.mkdir(env.dir)
    with tmpfs(env.dir):
        env.make_domain("web", backends={"vdb": "external"})
        pats = [put(env, 0x11, 0), put(env, 0x81, 0, target="vdb")]
        env.run("create", "web", "s1")
        pats += [put(env, 0x12, KIB64), put(env, 0x82, KIB64, target="vdb")]
        env.run("create", "web", "s2")
        listed, before = env.json("list", "web"), env.state()
        filler = fill(env.dir, 0)
        for args in (["create", "web", "s3"], ["revert", "web", "s1"], ["delete", "web", "s1"], ["list", "web"],
                     ["check"]):
            line = one_error_line(env.run(*args, check=False), "catalog")
            assert "full" in line and "move it away" not in line, line
        os.unlink(filler)
        assert env.state() == before and env.json("list", "web") == listed
        reads_all(env, pats)
        no_problems(env)
        env.run("create", "web", "s3")
        env.assert_consistent()


CATALOG_FULL = {  # args; whether it took effect, from the listing; the generations the disks then hold
    "create": (["create", "web", "s3"], lambda listed: "s3" in {s["name"] for s in listed}, (1, 2, 3)),
    "revert": (["revert", "web", "s1"], lambda listed: any(s["current"] and s["name"] == "s1" for s in listed),
               (1,)),
    "delete": (["delete", "web", "s1"], lambda listed: "s1" not in {s["name"] for s in listed}, (1, 2, 3)),
}


@pytest.mark.parametrize("operation", sorted(CATALOG_FULL))
def test_catalog_filling_up_during_an_operation(env, tmp_path, monkeypatch, operation):
    """The catalog's filesystem has less and less room left, from none up, until the operation fits:
    every failure is one clear error, and the disks are rolled back or the change is finished by
    `check --repair` once there is room, the catalog always matching the disks."""
    args, took_effect, holds_after = CATALOG_FULL[operation]
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("SNAPFW_STATE_DIR", str(state))
    with tmpfs(state):
        env.make_domain("web", backends={"vdb": "external"})
        gens = {}
        for g, name in enumerate(["s1", "s2", None], 1):
            gens[g] = [put(env, 0x10 + g, g * KIB64), put(env, 0x80 + g, g * KIB64, target="vdb")]
            if name:
                env.run("create", "web", name)
        seen = collections.Counter()
        for leave in range(0, 1024 * 1024, 8 * 1024):
            filler = fill(str(state), leave)
            r = env.run(*args, check=False)
            os.unlink(filler)
            if r.returncode == 0:
                seen["done"] += 1
                break
            line = one_error_line(r)
            if "check --repair" in line:
                seen["repaired"] += 1
                env.run("check", "--repair")
            else:
                assert "catalog" in line and "full" in line, line
                seen["refused"] += 1
            assert env.run("check").stdout.strip() == "No problems found."
            if took_effect(env.json("list", "web")):
                break
        print(f"catalog filling up during {operation}: {dict(seen)}")
        assert seen["refused"] and (seen["done"] or seen["repaired"]), seen
        listed = env.json("list", "web")
        assert took_effect(listed), listed
        reads_all(env, [p for g in (1, 2, 3) for p in (gens[g] if g in holds_after else map(zero, gens[g]))])
        env.assert_consistent()


# --- EIO ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def exported(store: str, mountpoint: str, fail: str | None = None):
    """The qcow2 ``store`` as a raw file at ``mountpoint``: qemu-storage-daemon's FUSE export, through
    blkdebug, which fails every data read (``fail="read_aio"``) or write (``"write_aio"``) with EIO.
    snapfw sees a plain file whose disk is failing."""
    require("qemu-storage-daemon")
    if not os.path.exists("/dev/fuse"):
        unavailable("no /dev/fuse")
    debug = {"driver": "blkdebug", "node-name": "dbg", "image": "store"}
    if fail:
        debug["inject-error"] = [{"event": fail, "iotype": fail.partition("_")[0], "errno": 5}]
    with fuse_export([f"driver=file,node-name=store,filename={store}", json.dumps(debug),
                      "driver=qcow2,node-name=disk,file=dbg"], "disk", mountpoint):
        yield


@pytest.fixture
def failing_base(env, tmp_path):
    """``web`` whose one disk is a raw file on a disk that can be made to fail, external snapshots."""
    store = str(tmp_path / "store.qcow2")
    subprocess.run([require("qemu-img"), "create", "-q", "-f", "qcow2", store, "4M"], check=True)
    base = os.path.join(env.dir, "web-vda.img")
    open(base, "w").close()
    env.write_domain("web", {"disks": [{"target": "vda", "path": "web-vda.img", "format": "raw",
                                        "backend": "external"}]})
    return lambda fail=None: exported(store, base, fail)


EIO = {  # merge path: the blkdebug event that fails, what qemu-img then says
    "stream": ("read_aio", "error while reading from old backing file"),
    "commit": ("write_aio", "Input/output error"),
}


@pytest.mark.parametrize("path", sorted(EIO))
def test_eio_on_the_base_during_a_merge_is_finished_by_repair(env, failing_base, path):
    """TESTING.md 8: deleting s1 streams the base into its children (reads fail) or commits the child
    into the base (writes fail); the error is reported, the chain stays valid, and once the disk is
    healthy again `snapfw check --repair` finishes the merge."""
    with failing_base():
        g1 = put(env, 0x11, 0)
        env.run("create", "web", "s1")
        g2 = put(env, 0x12, MIB)
        env.run("create", "web", "s2")
        if path == "stream":  # a second child: the base (the user's own image) cannot be committed into
            env.run("revert", "web", "s1")
        g2_now = g2 if path == "commit" else zero(g2)  # the stream case runs on s1's new branch
        g3 = put(env, 0x13, 3 * MIB)
        steps = env.json("delete", "web", "s1", "--dry-run")["plan"]["steps"]
        assert steps[0]["describe"].startswith(path), steps
    event, says = EIO[path]
    with failing_base(event):
        r = env.run("delete", "web", "s1", check=False)
        one_error_line(r, says, "check --repair")
        for f in [f for f in os.listdir(env.dir) if f.endswith(".qcow2")]:
            assert check_image(os.path.join(env.dir, f), "qcow2") == 0, f
        assert env.run("check", check=False).returncode == 1
        reads_all(env, [g2_now, g3] if path == "stream" else [g1, g2_now, g3])  # g1 lives on the failing disk
    with failing_base():
        assert "finished delete" in env.run("check", "--repair").stdout
        no_problems(env)
        assert env.snapshot_names() == ["s2"]
        reads_all(env, [g1, g2_now, g3])
        env.assert_consistent()
        env.run("revert", "web", "s2")
        reads_all(env, [g1, g2, zero(g3)])
        env.assert_consistent()


# --- a tool missing or printing garbage ----------------------------------------------------------------
@pytest.fixture
def web(env):
    """vda qcow2 (internal snapshots), vdb raw (external): s1 <- s2, patterns in both generations."""
    env.make_domain("web", backends={"vda": "qcow2", "vdb": "external"})
    pats = []
    for g in (1, 2):
        pats += [put(env, 0x10 + g, g * KIB64), put(env, 0x80 + g, g * KIB64, target="vdb")]
        env.run("create", "web", f"s{g}")
    return pats


OPERATIONS = [["create", "web", "s3"], ["revert", "web", "s1"], ["delete", "web", "s1"]]


def unchanged_after(env, pats, runs):
    """Run each (args, extra env) and hand back its result; then check that nothing changed."""
    listed, before = env.json("list", "web"), env.state()
    results = [env.run(*args, check=False, env=extra) for args, extra in runs]
    assert env.state() == before and env.json("list", "web") == listed
    reads_all(env, pats)
    no_problems(env)
    return results


def test_qemu_img_missing(env, web, tmp_path):
    """PATH has everything snapfw runs except qemu-img: each operation names the missing program before it
    changes anything (even delete, whose qemu-img runs after the commit); check reads the images' headers
    itself, and finds nothing wrong."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(require("timeout"), bin_dir / "timeout")
    extra = {"PATH": str(bin_dir)}
    *changes, check = unchanged_after(env, web, [(args, extra) for args in OPERATIONS + [["check"]]])
    for r in changes:
        one_error_line(r, "qemu-img not found", "qemu-utils")
    assert check.returncode == 0 and check.stdout == "No problems found.\n"
    assert env.run("list", "web", env=extra).returncode == 0  # listing runs no program


GARBAGE = {  # what a broken qemu-img prints on stdout, exiting 0
    "text": "image: this is not JSON",
    "empty": "",
    "truncated": '{"filename": "x", "format": "qcow2"',
    "wrong-shape": '{"virtual-size": 4194304}',
    "list-of-strings": '["web-vda.qcow2"]',
}


@pytest.mark.parametrize("subcommand", ["info", "map"])
@pytest.mark.parametrize("garbage", sorted(GARBAGE))
def test_qemu_img_printing_garbage(env, web, tmp_path, subcommand, garbage):
    """A qemu-img that answers one subcommand with garbage: a clear error naming it, nothing changed. snapfw
    reads a chain's headers itself, and asks `qemu-img info` only of an image it leaves to qemu-img: here
    one another process (as a QEMU reading it would) holds a lock on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "qemu-img"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = {subcommand} ]; then printf '%s' '{GARBAGE[garbage]}'; exit 0; fi
        exec {require("qemu-img")} "$@"
        """))
    fake.chmod(0o755)
    extra = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    # map only runs when a delete weighs commit against stream: deleting s1 (vdb has a child) does
    ops = OPERATIONS if subcommand == "info" else [["delete", "web", "s1"]]
    with open(os.path.join(env.dir, "web-vda.qcow2"), "rb") as held:
        if subcommand == "info":  # QEMU's lock byte for "consistent read" (block/file-posix.c)
            fcntl.fcntl(held, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 100, 1, 0))
        for r in unchanged_after(env, web, [(args, extra) for args in ops]):
            line = one_error_line(r, f"qemu-img {subcommand}")
            assert "JSON" in line, line


# --- concurrency ---------------------------------------------------------------------------------------
CLEAN_REFUSALS = ("is locked by another snapfw process", "has no snapshot", "already has a snapshot named",
                  "cannot revert disk")


def hammer(env, domain, seed, rounds=8):
    """One worker: a seeded random run of snapfw commands on ``domain``; returns (args, result) pairs."""
    rng = random.Random(seed)
    done = []
    for _ in range(rounds):
        name = rng.choice(["a", "b", "c"])
        args = rng.choice([
            ["create", domain, name] + rng.choice([[], ["--disk", "vda=external"]]),
            ["delete", domain, name] + rng.choice([[], ["--children"]]),
            ["revert", domain, name],
            ["list", domain, "--json"],
        ])
        timeout = rng.choice(["0.2", "30"])
        done.append((args, env.run("--lock-timeout", timeout, *args, check=False)))
    return done


def outcomes(results) -> collections.Counter:
    """(command, "ok" or its clean refusal) -> count; any other failure fails the test."""
    seen = collections.Counter()
    for args, r in results:
        how = "ok"
        if r.returncode:
            line = one_error_line(r)
            how = next((k for k in CLEAN_REFUSALS if k in line), None)
            assert how, f"snapfw {' '.join(args)}: {line}"
        seen[args[0], how] += 1
    return seen


def all_states_read(env, domain, pats):
    """Nobody wrote while the workers ran, so every snapshot and the active state read the same."""
    no_problems(env)
    env.assert_consistent(domain)
    reads_all(env, pats, domain)
    for name in env.snapshot_names(domain):
        r = env.run("revert", domain, name, check=False)
        if r.returncode:
            one_error_line(r, "cannot revert disk")
        reads_all(env, pats, domain)
    env.assert_consistent(domain)


def seeded(env, domain):
    """A two-disk domain with patterns on both disks, before any snapshot."""
    env.make_domain(domain)
    pats = [("vda", 0x11, 0, KIB64), ("vda", 0x12, 3 * KIB64, KIB64), ("vdb", 0x81, 0, KIB64),
            ("vdb", 0x82, 2 * KIB64, KIB64)]
    for target, byte, offset, _ in pats:
        env.write(domain, target, byte, offset)
    return pats


def test_four_processes_on_one_domain(env):
    """The lock serialises them: some wait (and say so), some give up after --lock-timeout, none harm."""
    pats = seeded(env, "web")
    with ThreadPoolExecutor(4) as pool:
        results = [x for done in pool.map(lambda seed: hammer(env, "web", seed), range(4)) for x in done]
    seen = outcomes(results)
    print(f"4 processes on one domain: {dict(seen)}")
    assert seen["create", "ok"]
    assert any("snapfw: waiting for lock on web" in r.stderr for _, r in results)
    all_states_read(env, "web", pats)


def test_four_processes_on_four_domains(env):
    """One lock per domain: nobody waits, though all four share one catalog."""
    domains = [f"d{i}" for i in range(4)]
    pats = {d: seeded(env, d) for d in domains}
    with ThreadPoolExecutor(4) as pool:
        results = [x for done in pool.map(lambda i: hammer(env, domains[i], 10 + i), range(4)) for x in done]
    seen = outcomes(results)
    print(f"4 processes on 4 domains: {dict(seen)}")
    assert seen["create", "ok"] and seen["delete", "ok"]
    assert not any("waiting for lock" in r.stderr for _, r in results)
    for d in domains:
        all_states_read(env, d, pats[d])


# --- SIGKILL at every step boundary of an external delete -----------------------------------------------
GENS = {1: (0, KIB64), 2: (MIB, MIB), 3: (2 * MIB, 256 * 1024), 4: (3 * MIB, KIB64), 5: (3 * MIB + KIB64, KIB64)}
CHAIN = [1, "s1", 2, "s2", 3, "s3", 4]  # generation g writes 0x10+g; a name creates that snapshot
BRANCHES = [1, "s1", 2, "mid", 3, "left", ("revert", "mid"), 4, "right", 5]
SCENARIOS = {  # script, snapshot to delete, its plan's first step, the parents afterwards
    # s2's file holds 1 MiB, its only child 256 KiB: committing the child is cheaper
    "commit": (CHAIN, "s2", "commit ", {"s1": None, "s3": "s1"}),
    # s3 is current: its only child is the active file, so the domain moves to s3's file at the end
    "commit-active": (CHAIN, "s3", "commit ", {"s1": None, "s2": "s1"}),
    # mid's file has two children (left's and right's branches): only streaming into both works
    "stream": (BRANCHES, "mid", "stream ", {"s1": None, "left": "s1", "right": "s1"}),
    # s1's file is the user's own image: streaming its 64 KiB would be cheaper, but the 1 MiB overlay is
    # committed into it so the domain ends on its own file again (defined anew at the end)
    "commit-own": (CHAIN[:3], "s1", "commit ", {}),
}


def holds(env, gens):
    reads_all(env, [("vda", 0x10 + g if g in gens else 0, offset, length) for g, (offset, length) in GENS.items()])


def play(env, script) -> dict:
    """Run a script in-process (fast); return {snapshot or None: generations it holds}."""
    from snapfw import lifecycle

    session = lifecycle.Session(env.uri)
    held, active = {}, set()
    for token in script:
        if isinstance(token, int):
            put(env, 0x10 + token, *GENS[token])
            active.add(token)
        elif isinstance(token, tuple):
            lifecycle.revert(session, "web", token[1])
            active = set(held[token[1]])
        else:
            lifecycle.create(session, "web", token)
            held[token] = set(active)
    session.catalog.close()
    return {**held, None: active}


def parents_of(env) -> dict:
    return {s["name"]: s["parent"] for s in env.json("list", "web")}


def expect(env, parents: dict, state: dict):
    """The tree; the active disk, then each snapshot once reverted to, read exactly their generations."""
    assert parents_of(env) == parents
    holds(env, state[None])
    env.assert_consistent()
    for name in parents:
        env.run("revert", "web", name)
        holds(env, state[name])
    env.assert_consistent()


@pytest.mark.parametrize("path", sorted(SCENARIOS))
def test_sigkill_at_every_step_boundary_of_an_external_delete(tmp_path, capsys, path):
    """SIGKILL before each step; `snapfw check --repair` rolls back (before the commit) or finishes it."""
    script, victim, first, parents_after = SCENARIOS[path]
    boundaries, crashes, failures, i = None, 0, [], 0
    while boundaries is None or i < len(boundaries):
        env = Env(tmp_path / f"b{i}")
        os.mkdir(env.dir)
        env.make_domain("web", disks=(("vda", "qcow2"),), backends={"vda": "external"})
        before = play(env, script)
        parents, layout = parents_of(env), env.layout()
        if boundaries is None:
            steps = env.json("delete", "web", victim, "--dry-run")["plan"]["steps"]
            assert steps[0]["describe"].startswith(first), steps
            n_prepare = sum(st["phase"] == "prepare" for st in steps)
            boundaries = ([f"prepare:{k}" for k in range(n_prepare)] + ["commit:0"]
                          + [f"finish:{k}" for k in range(len(steps) - n_prepare)])
        fault = boundaries[i]
        r = env.run("delete", "web", victim, check=False, env={"SNAPFW_FAULT": f"{fault}:kill"})
        assert r.returncode == -9, (fault, r.stderr)
        crashes += 1
        try:
            env.run("check", "--repair")
            no_problems(env)
            if not fault.startswith("finish"):  # killed before the commit: rolled back, then done again
                assert parents_of(env) == parents
                assert env.layout() == layout
                holds(env, before[None])
                env.run("delete", "web", victim)
            expect(env, parents_after, {k: v for k, v in before.items() if k != victim})
        except AssertionError as e:
            failures.append(f"{fault}: {e}")
        i += 1
    with capsys.disabled():
        print(f"\ncrash matrix, external delete ({path}): {len(boundaries)} step boundaries, "
              f"{crashes} SIGKILLs injected, {len(failures)} failures")
    assert not failures, failures


# --- SIGKILL while qemu-img is copying ----------------------------------------------------------------
def programs_on(folder: str, name: str) -> list[int]:
    """The processes running program ``name`` with an argument in ``folder``: the command's own children,
    or its worker's when a resident interpreter runs it (snapfw.tools.resident)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            if os.path.basename(argv[0]) == name and any(folder in a for a in argv[1:]):
                found.append(int(entry))
    return found


BIG = 512 * MIB
MID_SCRIPTS = {  # what to write and snapshot, the snapshot whose delete copies 512 MiB, its first step
    # s2's file holds 1 GiB, its only child 512 MiB: commit the child into it
    "commit": ([(0x11, 0, KIB64), "s1", (0x12, MIB, 2 * BIG), "s2", (0x13, 2 * BIG + 2 * MIB, BIG), "s3"],
               "s2", "commit "),
    # mid's file holds 512 MiB and has two children: stream it into each
    "stream": ([(0x11, 0, KIB64), "s1", (0x12, MIB, BIG), "mid", (0x13, BIG + 2 * MIB, KIB64), "left",
                ("revert", "mid"), (0x14, BIG + 3 * MIB, KIB64), "right"], "mid", "stream "),
}


@pytest.mark.parametrize("path, signal", [("commit", "KILL"), ("stream", "KILL"), ("commit", "TERM")])
def test_a_signal_while_qemu_img_copies(env, path, signal):
    """snapfw gets SIGKILL or SIGTERM while its qemu-img is half way through a merge: the qemu-img stops
    too (no orphan that goes on writing and holds the image lock), and `check --repair` at once finishes
    the delete. SIGTERM is reported as an interruption that needs that repair."""
    script, victim, first = MID_SCRIPTS[path]
    env.make_domain("web", disks=(("vda", "qcow2"),), size="2G", backends={"vda": "external"})
    written, held = [], {}
    for token in script:
        if isinstance(token, str):
            env.run("create", "web", token)
            held[token] = list(written)
        elif token[0] == "revert":
            env.run("revert", "web", token[1])
            written = list(held[token[1]])
        else:
            written.append(put(env, *token))
    assert env.json("delete", "web", victim, "--dry-run")["plan"]["steps"][0]["describe"].startswith(first)
    proc = subprocess.Popen([sys.executable, "-m", "snapfw", "--connect", env.uri, "delete", "--json", "web",
                             victim], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        percent = None
        for line in proc.stderr:  # kill on the first sign of copying
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "progress" and 0 < event["percent"] < 50:
                percent = event["percent"]
                break
        assert percent is not None, f"qemu-img reported no progress: {line}"
        copying = programs_on(env.dir, "qemu-img")
        assert copying
        proc.kill() if signal == "KILL" else proc.terminate()
        stderr = proc.stderr.read()
    finally:
        proc.wait()
    if signal == "KILL":
        assert proc.returncode == -9
    else:
        assert proc.returncode == 1 and "finishing it was interrupted" in stderr and "check --repair" in stderr
    assert all(exited_within(pid, 1.0) for pid in copying), "qemu-img outlived snapfw"
    assert "finished delete" in env.run("check", "--repair").stdout
    no_problems(env)
    assert victim not in env.snapshot_names()
    reads_all(env, written)
    env.assert_consistent()
    for name in env.snapshot_names():
        env.run("revert", "web", name)
        reads_all(env, held[name])
    env.assert_consistent()


# --- SIGKILL leaving half-made files (issue 16) ---------------------------------------------------------
HALF_MADE = {  # how far qemu-img got when snapfw died: a shell command making that file from "$img"
    # qemu-img writes the backing file name last: a whole qcow2 header that names no backing file yet
    "no-backing-name": f'{require("qemu-img")} create -q -f qcow2 "$img" 4M',
    "half-a-header": 'printf "QFI\\373\\0\\0" > "$img"',
    "empty": ': > "$img"',
}


@pytest.mark.parametrize("operation", [["create", "web", "s3"], ["revert", "web", "s1"]])
@pytest.mark.parametrize("made", sorted(HALF_MADE))
def test_sigkill_while_qemu_img_creates_an_overlay(env, tmp_path, made, operation):
    """snapfw dies while its `qemu-img create` has made only part of an overlay: `check` reports the
    interrupted plan, `check --repair` removes the half-made file as its own, and the name is free again."""
    env.make_domain("web", backends={"vda": "external", "vdb": "external"})
    pats = [put(env, 0x21, 0), put(env, 0x31, 0, target="vdb")]
    env.run("create", "web", "s1")
    pats += [put(env, 0x22, KIB64), put(env, 0x32, KIB64, target="vdb")]
    env.run("create", "web", "s2")
    listed, layout = env.json("list", "web"), env.layout()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "qemu-img"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = create ]; then
            for img; do :; done
            {HALF_MADE[made]}
            kill -KILL $PPID
            sleep 10
        fi
        exec {require("qemu-img")} "$@"
        """))
    fake.chmod(0o755)
    r = env.run(*operation, check=False, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert r.returncode == -9, r.stderr
    assert f"interrupted {operation[0]}" in env.run("check", check=False).stdout
    assert f"rolled back {operation[0]}" in env.run("check", "--repair").stdout
    no_problems(env)
    assert env.json("list", "web") == listed and env.layout() == layout
    reads_all(env, pats[2:] if operation[0] == "create" else pats)
    env.run(*operation)
    no_problems(env)
    env.assert_consistent()


KILL_BEFORE_RENAME = """\
import os, signal
_replace = os.replace


def replace(src, dst, *args, **kwargs):  # SIGKILL once the new domain file is written, before its rename
    if str(dst).endswith(".yaml"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *args, **kwargs)


os.replace = replace
"""


@pytest.mark.parametrize("operation", [["create", "web", "s3"], ["delete", "web", "s2"]])
def test_sigkill_while_the_domain_file_is_rewritten(env, tmp_path, operation):
    """snapfw dies between writing the new domain file and renaming it into place (a create points the
    domain at new overlays before its commit, a delete of the current external snapshot after it):
    `check --repair` rolls back or finishes, and no temporary file of the domain's is left behind."""
    env.make_domain("web", disks=(("vda", "qcow2"),), backends={"vda": "external"})
    pats = [put(env, 0x41, 0)]
    env.run("create", "web", "s1")
    pats.append(put(env, 0x42, KIB64))
    env.run("create", "web", "s2")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_BEFORE_RENAME)
    r = env.run(*operation, check=False, env={"PYTHONPATH": f"{hook}:{os.environ.get('PYTHONPATH', '')}"})
    assert r.returncode == -9, r.stderr
    assert f"interrupted {operation[0]}" in env.run("check", check=False).stdout
    env.run("check", "--repair")
    no_problems(env)
    assert sorted(n for n in os.listdir(env.dir) if n.startswith(".")) == [".snapfw"]
    reads_all(env, pats)
    env.assert_consistent()


LEFTOVERS = {  # named as snapfw names its files, left where nothing records them (by a crash under an
    # older snapfw, or once the catalog is restored from an export): how to make each
    "web-vda.s9.qcow2": ["create", "-q", "-f", "qcow2"],  # an overlay killed before its backing name
    ".web-vda.s9.qcow2.0123456789ab.tmp": ["create", "-q", "-f", "qcow2"],  # one still being written
    ".web.k3x9q2mz.tmp": None,  # a domain file being rewritten
}
NOT_OURS = ["web-vda.qcow2.bak", "web-vdb.s1.img", ".web.yaml.swp", "other-vda.s1.qcow2", "notes.tmp"]


def test_check_reports_files_named_like_snapfw_ones_that_nothing_uses(env):
    """`check` names each file in the domain's directory that looks like one of snapfw's and that nothing
    uses; `check --repair` cannot prove snapfw made them, so it leaves them (and every other file) alone."""
    env.make_domain("web", backends={"vda": "qcow2", "vdb": "external"})
    env.run("create", "web", "s1")
    no_problems(env)
    for name, how in LEFTOVERS.items():
        path = os.path.join(env.dir, name)
        if how:
            subprocess.run([require("qemu-img"), *how, path, "4M"], check=True)
        else:
            with open(path, "w") as f:
                f.write("disks: []\n")
    for name in NOT_OURS:
        with open(os.path.join(env.dir, name), "w") as f:
            f.write("the user's\n")
    before = env.state()
    for args in (["check"], ["check", "--repair"]):
        r = env.run(*args, check=False)
        assert r.returncode == (0 if "--repair" in args else 1), r.stdout + r.stderr
        for name in LEFTOVERS:
            assert sum(os.path.join(env.dir, name) in line for line in r.stdout.splitlines()) == 1, r.stdout
        assert not [n for n in NOT_OURS if n in r.stdout], r.stdout
        assert env.state() == before
    for name in LEFTOVERS:
        os.unlink(os.path.join(env.dir, name))
    no_problems(env)
