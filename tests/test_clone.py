"""Gold images (issue 20): `snapfw clone` and `snapfw detach` through the real command on the images driver."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import yaml

from conftest import info_chain, write
from test_faults import tmpfs

CLONES = 50


def _gold(env, backends=None):
    """A two-disk domain (vda qcow2, vdb raw) holding a pattern per disk in snapshot gold, then written
    over after it (clones must read the snapshot, not the gold's later state)."""
    env.make_domain("web", backends=backends)
    env.write("web", "vda", 0x11, 0)
    env.write("web", "vdb", 0x22, 0)
    env.run("create", "web", "gold")
    env.write("web", "vda", 0x99, 0)
    env.write("web", "vdb", 0x99, 0)


def _clone_files(env):
    return {n for n in env.files() if n[:5] in ("web-1", "web-2", "web-3")}


def test_fifty_linked_clones_each_their_own(env):
    _gold(env)  # vda: an internal snapshot (a shared copy of the tag), vdb: an external one (its frozen file)
    began = time.monotonic()
    out = env.json("clone", "web", "gold", "web-{n}", "--count", str(CLONES))
    took = time.monotonic() - began
    names = [f"web-{i}" for i in range(1, CLONES + 1)]
    assert out["clones"] == names
    # the same overlays made by a bare `qemu-img create -b` loop, for the target (1.5x)
    bases = [(top["backing-filename"], top["backing-filename-format"])
             for top in (info_chain(p, f)[0] for p, f in env.domain("web-1").values())]
    bare = os.path.join(env.dir, "bare")
    os.mkdir(bare)
    began = time.monotonic()
    for i in range(CLONES):
        for j, (base, fmt) in enumerate(bases):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.join(env.dir, base), "-F", fmt,
                            os.path.join(bare, f"{i}-{j}.qcow2")], check=True)
    loop = time.monotonic() - began
    print(f"\n{CLONES} linked clones of a two-disk domain: snapfw {took:.2f} s, "
          f"bare qemu-img create -b loop {loop:.2f} s ({took / loop:.2f}x)")
    for n in names:
        for target, (path, fmt) in env.domain(n).items():
            assert fmt == "qcow2" and os.path.getsize(path) < 1 << 20  # under 1 MiB of new data per clone
        assert env.reads(n, "vda", 0x11, 0) and env.reads(n, "vdb", 0x22, 0)
    # writes in one clone are seen neither in another nor in the gold snapshot
    env.write("web-7", "vda", 0x77, 0)
    assert env.reads("web-7", "vda", 0x77, 0) and env.reads("web-8", "vda", 0x11, 0)
    env.run("revert", "web", "gold")
    assert env.reads("web", "vda", 0x11, 0)
    # each clone is a domain like any other: snapshot, revert, delete
    env.run("create", "web-7", "mine", "--disk", "vda=external")
    env.write("web-7", "vda", 0x78, 0)
    env.run("revert", "web-7", "mine")
    assert env.reads("web-7", "vda", 0x77, 0) and env.reads("web-8", "vda", 0x11, 0)
    env.run("delete", "web-7", "mine")
    assert env.reads("web-7", "vda", 0x77, 0)
    for n in ("web", "web-7", "web-8"):
        env.assert_consistent(n)
    assert env.run("check").stdout.strip() == "No problems found."


def test_gold_delete_refused_until_detached(env):
    _gold(env, {"vda": "external"})
    env.run("clone", "web", "gold", "web-{n}", "--count", "2")
    before = env.layout()
    r = env.run("delete", "web", "gold", check=False)
    assert r.returncode == 1 and "web-1 (snapshot gold)" in r.stderr and "web-2 (snapshot gold)" in r.stderr
    assert "detach" in r.stderr and env.layout() == before
    env.run("detach", "web-1")
    r = env.run("delete", "web", "gold", check=False)
    assert r.returncode == 1 and "web-2" in r.stderr and "web-1 " not in r.stderr
    assert env.run("detach", "web-1", check=False).returncode == 2  # no shared base any more
    env.run("detach", "web-2")
    env.run("delete", "web", "gold")
    for n in ("web-1", "web-2"):
        assert env.reads(n, "vda", 0x11, 0) and env.reads(n, "vdb", 0x22, 0)
        assert all(yaml.safe_load(subprocess.run(["qemu-img", "info", "-f", fmt, path], capture_output=True,
                                                 text=True).stdout.replace("\t", " ")).get("backing file") is None
                   for path, fmt in env.domain(n).values())
        env.assert_consistent(n)
    env.assert_consistent("web")
    assert env.run("check").stdout.strip() == "No problems found."


def test_a_snapshot_below_the_base_is_deleted_without_writing_it(env):
    """Deleting an older snapshot whose file a clone's base reads through keeps it as a hidden node:
    neither merge may write the base or what it reads through."""
    env.make_domain("web", backends={"vda": "external", "vdb": "external"})
    env.write("web", "vda", 0x11, 0)
    env.run("create", "web", "old")
    env.write("web", "vda", 0x12, 65536)
    env.run("create", "web", "gold")
    env.run("clone", "web", "gold", "copy")
    path, fmt = env.domain("copy")["vda"]
    shared = [os.path.basename(node["filename"]) for node in info_chain(path, fmt)[1:]]  # base and below
    before = {n: env.state()[n] for n in shared}
    env.run("delete", "web", "old")
    assert {n: env.state()[n] for n in shared} == before, "a file the clone reads through was written"
    assert env.reads("copy", "vda", 0x11, 0) and env.reads("copy", "vda", 0x12, 65536)
    env.assert_consistent("web")
    assert env.run("check").stdout.strip() == "No problems found."


def test_bad_input_refused_before_any_change(env):
    _gold(env)
    env.make_domain("db")
    env.run("create", "db", "other")
    env.run("clone", "web", "gold", "web-2")
    before = env.layout()
    cases = [
        (("web", "gold", "web-{n}", "--count", "3"), "web-2 exists"),          # a name that exists
        (("web", "gold", "db"), "db exists"),
        (("web", "gold", "web-x", "--count", "2"), "{n}"),                      # no {n}
        (("web", "gold", "web-{n}", "--count", "0"), "--count 0"),
        (("web", "gold", "web-{n}", "--count", "1001"), "--count 1001"),
        (("web", "gold", ".web-{n}", "--count", "2"), "starts with '.'"),         # invalid names
        (("web", "gold", "a/{n}", "--count", "2"), "contains '/'"),
        (("web", "gold", "x" * 254 + "{n}", "--count", "10"), "longer than 255"),  # only web-10 is too long
        (("web", "other", "new"), "no snapshot 'other'"),                        # another domain's snapshot
        (("nosuch", "gold", "new"), "nosuch"),
        (("web", "gold", "new", "--start"), "cannot start"),
    ]
    for args, words in cases:
        r = env.run("clone", *args, check=False)
        assert r.returncode in (1, 2) and words in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert env.layout() == before, args


def test_no_room_refused_before_any_change(env):
    """qemu-img measure says what the copies need; a directory without that much free is refused."""
    with tmpfs(env.dir):
        env.make_domain("web")
        path, fmt = env.domain("web")["vda"]
        write(path, fmt, 0x11, 0, 3 << 20)
        env.run("create", "web", "gold")
        before = env.layout()
        r = env.run("clone", "web", "gold", "web-{n}", "--count", "4", "--full", check=False)
        assert r.returncode == 2 and "bytes free; the clones need" in r.stderr, r.stderr
        assert env.layout() == before
        env.run("clone", "web", "gold", "web-1", "--full")
        assert env.reads("web-1", "vda", 0x11, 3 << 19)


def test_dry_run_lists_every_file_and_bytes(env):
    _gold(env)
    before = env.layout()
    out = env.json("clone", "web", "gold", "web-{n}", "--count", "3", "--dry-run")
    assert env.layout() == before and out["dry_run"]
    paths = [os.path.basename(f["path"]) for f in out["files"]]
    assert paths == ["web-vda.gold.clone-base.qcow2"] + [f"web-{i}-{t}.qcow2" for i in (1, 2, 3)
                                                          for t in ("vda", "vdb")]
    assert all(f["bytes"] > 0 for f in out["files"]) and out["bytes"] == sum(f["bytes"] for f in out["files"])
    text = env.run("clone", "web", "gold", "web-{n}", "--count", "2", "--full", "--dry-run").stdout
    assert "File: " in text and "Bytes to write: " in text and "Nothing was changed" in text
    assert env.layout() == before


def test_internal_tag_copied_once_and_full_clones(env):
    _gold(env)  # vda: qcow2 internal snapshot, vdb: external
    env.run("clone", "web", "gold", "a-{n}", "--count", "2")
    env.run("clone", "web", "gold", "b")
    bases = [n for n in env.files() if "clone-base" in n]
    assert bases == ["web-vda.gold.clone-base.qcow2"]  # one copy of the tag, shared by all three
    env.run("clone", "web", "gold", "solo", "--full")
    for n in ("a-1", "a-2", "b", "solo"):
        assert env.reads(n, "vda", 0x11, 0) and env.reads(n, "vdb", 0x22, 0)
        env.assert_consistent(n)
    assert env.domain("solo")["vdb"][1] == "raw"
    # the gold tag can be reverted to (it writes the gold's file, not the copy) and clones keep reading it
    env.run("revert", "web", "gold")
    env.write("web", "vda", 0x55, 0)
    assert env.reads("b", "vda", 0x11, 0)
    for n in ("a-1", "a-2", "b"):
        env.run("detach", n)
    env.run("delete", "web", "gold")  # the shared copy goes with the last operation on the gold's disk
    assert not [n for n in env.files() if "clone-base" in n]
    assert env.run("check").stdout.strip() == "No problems found."


# every step boundary of a run of 3 clones (checked against the run's --dry-run below): (fault, the clone
# it interrupts, how many clones are complete once `check --repair` ran). The first clone also copies the
# tag of the gold snapshot (the shared base) and removes that copy's work name in its finish.
BOUNDARIES = [*[(f"prepare:{i}:kill:1", 1, 0) for i in range(3)], ("commit:0:kill:1", 1, 0),
              ("finish:0:kill:1", 1, 1),
              *[(f"{phase}:{i}:kill:{k}", k, k - 1) for k in (2, 3)
                for phase, i in (("prepare", 0), ("prepare", 1), ("commit", 0))]]


def test_the_boundaries_are_every_step_of_a_run_of_three(env):
    _gold(env)
    plans = env.json("clone", "web", "gold", "web-{n}", "--count", "3", "--dry-run")["plans"]
    every = []
    for k, plan in enumerate(plans, 1):
        phases = [st["phase"] for st in plan["steps"]]
        every += [f"prepare:{i}:kill:{k}" for i in range(phases.count("prepare"))] + [f"commit:0:kill:{k}"]
        every += [f"finish:{i}:kill:{k}" for i in range(phases.count("finish"))]
    assert sorted(every) == sorted(fault for fault, _, _ in BOUNDARIES)


@pytest.mark.parametrize("fault, interrupted, made", BOUNDARIES)
def test_sigkill_at_each_step_boundary_then_repair(env, fault, interrupted, made):
    """A run of 3 killed at a step boundary: the clones before are complete, the one in progress is whole
    (finished) or rolled back by `check --repair`, never half made, and no later one was begun."""
    _gold(env)
    r = env.run("clone", "web", "gold", "web-{n}", "--count", "3", check=False, env={"SNAPFW_FAULT": fault})
    assert r.returncode == -9
    found = env.run("check", check=False)
    assert found.returncode == 1 and f"web-{interrupted}: interrupted clone" in found.stdout, found.stdout
    env.run("check", "--repair")
    assert env.run("check").stdout.strip() == "No problems found."
    made = [f"web-{i}" for i in range(1, made + 1)]
    assert sorted(n[:-5] for n in os.listdir(env.dir) if n.endswith(".yaml")) == ["web"] + made
    assert _clone_files(env) == {f"{n}-{t}.qcow2" for n in made for t in ("vda", "vdb")}
    assert not [n for n in os.listdir(env.dir) if n.endswith(".tmp")]
    for n in made:
        assert env.reads(n, "vda", 0x11, 0) and env.reads(n, "vdb", 0x22, 0)
        env.assert_consistent(n)
    r = env.run("delete", "web", "gold", check=False)
    if made:
        assert r.returncode == 1 and all(n in r.stderr for n in made) and "web-3" not in r.stderr
    else:  # no clone reads it: the gold snapshot goes, and the shared copy of its tag with it
        assert r.returncode == 0, r.stderr
        assert not [n for n in env.files() if "clone-base" in n]


def test_clone_delete_removes_only_what_snapfw_made(env):
    """`clone-delete` removes a clone's definition, files and references; it refuses domains snapfw did not
    make, clones with snapshots (unless --snapshots) and clones other domains read through; once every
    clone is gone the gold snapshot can be deleted."""
    _gold(env)
    env.run("clone", "web", "gold", "web-{n}", "--count", "2")
    env.run("clone", "web", "gold", "solo", "--full")
    env.run("create", "web-1", "mine", "--disk", "vda=external")
    env.run("create", "web-2", "base", "--disk", "vda=external", "--disk", "vdb=external")
    env.run("clone", "web-2", "base", "grandchild")
    user_file = os.path.join(env.dir, "web-1-keep.qcow2")  # the user's own file beside the clones
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", user_file, "1M"], check=True)
    before = env.layout()
    for args, code, words in [(("web-1",), 1, "has 1 snapshot(s) (mine)"),
                              (("web",), 2, "not made by `snapfw clone`"),
                              (("web-2", "--snapshots"), 1, "grandchild read through files of clone web-2"),
                              (("nosuch",), 2, "nosuch")]:
        r = env.run("clone-delete", *args, check=False)
        assert r.returncode == code and words in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and env.layout() == before
    plan = env.json("clone-delete", "web-1", "--snapshots", "--dry-run")["plan"]
    assert env.layout() == before and plan["steps"][0]["describe"] == "undefine domain web-1"
    env.run("clone-delete", "web-1", "--snapshots")
    env.run("clone-delete", "solo")
    assert not [n for n in env.files() if n.startswith(("web-1-v", "solo"))] and os.path.exists(user_file)
    assert sorted(n for n in os.listdir(env.dir) if n.endswith(".yaml")) == ["grandchild.yaml", "web-2.yaml",
                                                                            "web.yaml"]
    r = env.run("delete", "web", "gold", check=False)
    assert r.returncode == 1 and "web-2 (snapshot gold)" in r.stderr and "web-1" not in r.stderr
    env.run("clone-delete", "grandchild")
    env.run("clone-delete", "web-2", "--snapshots")
    env.run("delete", "web", "gold")
    assert sorted(n for n in env.files() if not n.startswith("web-v")) == ["web-1-keep.qcow2"]
    assert env.reads("web", "vda", 0x99, 0)
    env.assert_consistent("web")
    assert env.run("check").stdout.strip() == "No problems found."


def test_clone_delete_killed_then_repaired(env):
    """Killed after its catalog commit, between removing the definition and the files: `check --repair`
    finishes it."""
    _gold(env)
    env.run("clone", "web", "gold", "web-1")
    r = env.run("clone-delete", "web-1", check=False, env={"SNAPFW_FAULT": "finish:1:kill"})
    assert r.returncode == -9 and not os.path.exists(os.path.join(env.dir, "web-1.yaml"))
    assert "web-1: interrupted clone-delete" in env.run("check", check=False).stdout
    env.run("check", "--repair")
    assert not [n for n in env.files() if n.startswith("web-1")]
    env.run("delete", "web", "gold")
    assert env.run("check").stdout.strip() == "No problems found."
