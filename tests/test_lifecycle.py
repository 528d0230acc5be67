"""The offline lifecycle end to end through the `snapfw` command, on real qcow2/raw files.

Every generation g writes its own byte at its own offset on each disk (vda: 0x10+g, vdb: 0x80+g, at
g * 64 KiB); after each operation the test reads back exactly the generations that state must hold,
checks that later generations read as zeros, runs `qemu-img check` and compares the catalog with
`qemu-img info --backing-chain`.
"""

from __future__ import annotations

import os
import stat

import pytest

from conftest import IN_CI, KIB64, check_image, info_chain, write

BYTES = {"vda": 0x10, "vdb": 0x80}
BACKENDS = [
    pytest.param(({"vda": "qcow2", "vdb": "external"}, (("vda", "qcow2"), ("vdb", "raw"))), id="mixed"),
    pytest.param(({"vda": "external", "vdb": "external"}, (("vda", "qcow2"), ("vdb", "raw"))), id="external"),
    pytest.param(({"vda": "qcow2", "vdb": "qcow2"}, (("vda", "qcow2"), ("vdb", "qcow2"))), id="internal"),
]


def gen(env, g, domain="web"):
    for target in env.domain(domain):
        env.write(domain, target, BYTES[target] + g, g * KIB64)


def holds(env, gens, upto=8, domain="web"):
    """The disks read exactly generations ``gens`` (others in 1..upto read zeros)."""
    for target in env.domain(domain):
        for g in range(1, upto + 1):
            want = BYTES[target] + g if g in gens else 0
            assert env.reads(domain, target, want, g * KIB64), f"{target} generation {g}: expected {want:#x}"
    env.assert_consistent(domain)


def _backend_of(env, target):
    import yaml

    with open(os.path.join(env.dir, "web.yaml")) as f:
        return next(d["backend"] for d in yaml.safe_load(f)["disks"] if d["target"] == target)


def create(env, name, backends=None):
    args = ["create", "web", name]
    for t, b in (backends or {}).items():
        args += ["--disk", f"{t}={b}"]
    env.run(*args)


@pytest.fixture(params=BACKENDS)
def domain(request, env):
    backends, disks = request.param
    env.make_domain("web", disks=disks, backends=backends)
    return env


def test_create_list_revert_delete(domain):
    env = domain
    gen(env, 1)
    env.run("create", "web", "s1", "--description", "first one")
    gen(env, 2)
    env.run("create", "web", "s2")
    gen(env, 3)
    holds(env, {1, 2, 3})

    listed = env.json("list", "web")
    assert [(s["name"], s["parent"], s["current"]) for s in listed] == [("s1", None, False), ("s2", "s1", True)]
    assert listed[0]["description"] == "first one"
    wanted = {t: b for t, (_p, _f) in env.domain().items() for b in [_backend_of(env, t)]}
    assert {d["target"]: d["backend"] for d in listed[0]["disks"]} == wanted
    assert all(set(s) >= {"name", "parent", "current", "created", "disks"} for s in listed)

    env.run("revert", "web", "s1")
    holds(env, {1})
    assert [s["current"] for s in env.json("list", "web")] == [True, False]
    gen(env, 4)
    env.run("revert", "web", "s2")
    holds(env, {1, 2})

    env.run("delete", "web", "s1")
    assert env.snapshot_names() == ["s2"]
    holds(env, {1, 2})
    env.run("revert", "web", "s2")
    holds(env, {1, 2})
    env.run("delete", "web", "s2")
    assert env.snapshot_names() == []
    holds(env, {1, 2})


def test_tree_with_branches_keeps_every_branch(domain):
    env = domain
    gen(env, 1)
    create(env, "a")
    gen(env, 2)
    create(env, "b")          # a -> b
    env.run("revert", "web", "a")
    gen(env, 3)
    create(env, "c")          # a -> c
    gen(env, 4)
    env.run("revert", "web", "b")
    holds(env, {1, 2})
    env.run("revert", "web", "c")
    holds(env, {1, 3})
    env.run("revert", "web", "a")
    holds(env, {1})
    tree = env.run("list", "web", "--tree").stdout
    assert tree.splitlines()[0] == "a (current)" and "├── b" in tree and "└── c" in tree


def test_delete_middle_with_one_child(domain):
    env = domain
    for i, name in enumerate(["s1", "s2", "s3"], 1):
        gen(env, i)
        create(env, name)
    gen(env, 4)
    env.run("delete", "web", "s2")
    assert [(s["name"], s["parent"]) for s in env.json("list", "web")] == [("s1", None), ("s3", "s1")]
    holds(env, {1, 2, 3, 4})
    env.run("revert", "web", "s3")
    holds(env, {1, 2, 3})
    env.run("revert", "web", "s1")
    holds(env, {1})


def test_delete_middle_with_two_children_and_root(domain):
    env = domain
    gen(env, 1)
    create(env, "root")
    gen(env, 2)
    create(env, "mid")
    gen(env, 3)
    create(env, "left")
    env.run("revert", "web", "mid")
    gen(env, 4)
    create(env, "right")
    gen(env, 5)
    env.run("delete", "web", "mid")
    assert {s["name"]: s["parent"] for s in env.json("list", "web")} == {"root": None, "left": "root", "right": "root"}
    holds(env, {1, 2, 4, 5})
    env.run("revert", "web", "left")
    holds(env, {1, 2, 3})
    env.run("delete", "web", "root")
    assert {s["name"]: s["parent"] for s in env.json("list", "web")} == {"left": None, "right": None}
    holds(env, {1, 2, 3})
    env.run("revert", "web", "right")
    holds(env, {1, 2, 4})


def test_delete_children_and_current_moves_up(domain):
    env = domain
    for i, name in enumerate(["s1", "s2", "s3"], 1):
        gen(env, i)
        create(env, name)
    gen(env, 4)
    env.run("delete", "web", "s2", "--children")
    listed = env.json("list", "web")
    assert [(s["name"], s["current"]) for s in listed] == [("s1", True)]
    holds(env, {1, 2, 3, 4})   # the running state is never touched by deleting snapshots
    env.run("revert", "web", "s1")
    holds(env, {1})


def test_external_delete_removes_only_files_nothing_uses(env):
    env.make_domain("web", disks=(("vda", "qcow2"),), backends={"vda": "external"})
    base = env.files()
    for i, name in enumerate(["s1", "s2", "s3"], 1):
        gen(env, i)
        create(env, name)
    assert len(env.files()) == len(base) + 3
    env.run("delete", "web", "s2")
    assert len(env.files()) == len(base) + 2
    env.run("delete", "web", "s1", "--children")
    holds(env, {1, 2, 3})
    assert env.snapshot_names() == []


def one_disk_chain(env, *snapshots):
    """A domain with one qcow2 disk: generation 1, then per (name, backend) a snapshot and the next one."""
    env.make_domain("web", disks=(("vda", "qcow2"),))
    gen(env, 1)
    for g, (name, backend) in enumerate(snapshots, 2):
        create(env, name, {"vda": backend})
        gen(env, g)


def test_internal_revert_under_overlays_is_refused(env):
    one_disk_chain(env, ("int", "qcow2"), ("ext", "external"))
    before = env.state()
    r = env.run("revert", "web", "int", check=False)
    assert r.returncode != 0 and "frozen image of snapshot(s) ext" in r.stderr and "Traceback" not in r.stderr
    assert env.state() == before
    holds(env, {1, 2, 3})
    # once the later external snapshot is gone (merged by commit), the internal one can be reverted
    env.run("delete", "web", "ext")
    holds(env, {1, 2, 3})
    env.run("revert", "web", "int")
    holds(env, {1})


def test_internal_revert_discards_an_overlay_only_the_active_state_reads_through(env):
    """Issue 16: once the external snapshots are deleted, the tag's file is read through only by the
    active overlay, which the revert discards anyway; it must not block the revert (nor leave the tag
    undeletable)."""
    one_disk_chain(env, ("i1", "qcow2"), ("e1", "external"), ("e2", "external"))
    env.run("revert", "web", "e1")
    gen(env, 5)
    env.run("delete", "web", "e1")
    env.run("delete", "web", "e2")
    assert env.snapshot_names() == ["i1"]
    holds(env, {1, 2, 5})
    overlay = env.domain()["vda"][0]
    env.json("delete", "web", "i1", "--dry-run")
    plan = env.json("revert", "web", "i1", "--dry-run")["plan"]
    assert f"remove {overlay}" in [s["describe"] for s in plan["steps"] if s["phase"] == "finish"]
    # the tag is applied under the doomed overlay: a failure before the commit gives back what it read,
    # and a crash after it leaves the overlay to `check --repair` to remove
    before = env.layout()
    r = env.run("revert", "web", "i1", check=False, env={"SNAPFW_FAULT": "commit:0:raise"})
    assert r.returncode == 1 and "injected fault" in r.stderr and env.layout() == before
    holds(env, {1, 2, 5})
    assert env.run("revert", "web", "i1", check=False, env={"SNAPFW_FAULT": "finish:1:kill"}).returncode == -9
    env.run("check", "--repair")
    holds(env, {1})
    assert not os.path.exists(overlay)
    assert env.files() == {"web-vda.qcow2"}
    env.run("delete", "web", "i1")
    tags = info_chain(os.path.join(env.dir, "web-vda.qcow2"), "qcow2")[0].get("snapshots", [])
    assert tags == [] and env.snapshot_names() == []
    holds(env, {1})


def test_trap_child_with_internal_snapshots_keeps_hidden_backing_file(env):
    """DESIGN rule 5's trap: streaming or committing would corrupt the child's internal snapshot."""
    env.make_domain("web", disks=(("vda", "qcow2"),))
    own, _fmt = env.domain()["vda"]
    gen(env, 1)
    env.run("create", "web", "e1", "--disk", "vda=external")
    gen(env, 2)
    env.run("create", "web", "i2", "--disk", "vda=qcow2")   # tag inside the overlay, reads through e1's file
    gen(env, 3)
    r = env.json("delete", "web", "e1")
    assert [n for n in r["plan"]["notes"] if own in n] == [f"{own} stays as a hidden backing file: "
                                                          f"{env.domain()['vda'][0]} hold internal snapshots "
                                                          "that read through it"]  # the user's own image too
    assert env.snapshot_names() == ["i2"]
    holds(env, {1, 2, 3})
    env.run("revert", "web", "i2")
    holds(env, {1, 2})
    env.run("delete", "web", "i2")
    holds(env, {1, 2})


@pytest.mark.parametrize("order", [("b", "a"), ("a", "b")], ids=["last-first", "first-first"])
def test_deleting_every_external_snapshot_gives_the_disks_their_own_files_back(env, order):
    """Issue 16.3: streaming the user's image into the overlay is cheaper here, but would leave it
    stale and the domain on a snapfw file; it is committed into instead (raw and qcow2 alike)."""
    env.make_domain("web", backends={"vda": "external", "vdb": "external"})
    own, files = env.domain(), env.files()
    gen(env, 1)
    create(env, "a")
    gen(env, 2)
    create(env, "b")
    gen(env, 3)
    notes = []
    for name in order:
        notes += env.json("delete", "web", name)["plan"]["notes"]
    assert env.domain() == own and env.files() == files and notes == []
    assert env.snapshot_names() == []
    holds(env, {1, 2, 3})
    assert check_image(*own["vda"]) in (0, 3)


def test_own_image_is_streamed_and_named_when_committing_copies_far_more(env):
    """Committing 1 GiB + 64 KiB into the user's image against streaming its 64 KiB: over 1 GiB and
    over 4 times as much, so the overlay takes the data, and the plan says the user's file is left."""
    env.make_domain("web", disks=(("vda", "qcow2"),), size="2G", backends={"vda": "external"})
    own, _fmt = env.domain()["vda"]
    gen(env, 1)
    create(env, "a")
    overlay, _fmt = env.domain()["vda"]
    big = (1 << 30) + KIB64
    write(overlay, "qcow2", 0x22, 2 * KIB64, big)
    layout = env.layout()
    dry = env.run("delete", "web", "a", "--dry-run").stdout
    assert env.layout() == layout and env.snapshot_names() == ["a"]
    real = env.run("delete", "web", "a").stdout
    for out in (dry, real):
        assert f"Note: {own} is streamed into {overlay}, not committed into" in out and "far more" in out
        assert f"Note: {own} is not snapfw's file: it is left where it is" in out
    assert env.domain()["vda"] == (overlay, "qcow2") and os.path.exists(own)
    assert not info_chain(overlay, "qcow2")[0].get("backing-filename")
    for byte, offset in ((0, 0), (0x11, KIB64), (0x22, 2 * KIB64), (0x22, big + KIB64), (0, big + 2 * KIB64)):
        assert env.reads("web", "vda", byte, offset), (byte, offset)
    env.assert_consistent()


def test_dry_run_changes_nothing_and_shows_commands(domain):
    env = domain
    gen(env, 1)
    create(env, "s1")
    gen(env, 2)
    create(env, "s2")
    before = env.state()
    for args in (["create", "web", "s3"], ["revert", "web", "s1"], ["delete", "web", "s1"]):
        out = env.json(*args, "--dry-run")
        assert out["dry_run"] is True and out["plan"]["steps"]
        text = env.run(*args, "--dry-run").stdout
        assert "qemu-img" in text and "Nothing was changed" in text
    assert env.state() == before


def test_show_json_has_each_disks_files(domain):
    env = domain
    gen(env, 1)
    create(env, "s1")
    gen(env, 2)
    create(env, "s2")
    shown = env.json("show", "web", "s2")
    assert shown["parent"] == "s1" and shown["current"] is True
    for d in shown["disks"]:
        assert d["files"] and all(os.path.exists(f) for f in d["files"])
        if d["backend"] == "external":
            chain = [n["filename"] for n in info_chain(d["files"][0], "qcow2" if d["files"][0].endswith("qcow2") else "raw")]
            assert [os.path.normpath(os.path.join(os.path.dirname(d["files"][0]), c)) for c in chain] == d["files"]


OPERATIONS = {  # args, and the generations the disks hold once the operation is complete
    "create": (["create", "web", "s3"], {1, 2, 3}),
    "revert": (["revert", "web", "s1"], {1}),
    "delete": (["delete", "web", "s1"], {1, 2, 3}),
}


def three_generations(folder):
    """A mixed domain (vda qcow2 internal, vdb raw external) with s1, s2 and generations 1-3 written."""
    from conftest import Env

    env = Env(folder)
    os.mkdir(env.dir)
    env.make_domain("web", backends={"vda": "qcow2", "vdb": "external"})
    gen(env, 1)
    env.run("create", "web", "s1")
    gen(env, 2)
    env.run("create", "web", "s2")
    gen(env, 3)
    return env


def phases(env, args) -> tuple[int, int]:
    steps = env.json(*args, "--dry-run")["plan"]["steps"]
    n_prepare = sum(1 for st in steps if st["phase"] == "prepare")
    return n_prepare, len(steps) - n_prepare


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_a_crash_while_undoing_or_repairing_is_repaired(tmp_path, capsys, operation):
    """Recovery is itself interruptible: SIGKILL before each undo step of a failed operation, and before
    each finish step of a repair; the next `snapfw check --repair` rolls back or finishes all the same."""
    args, after_gens = OPERATIONS[operation]
    n_prepare, n_finish = phases(three_generations(tmp_path / "probe"), args)
    cases = ([("undo", f"commit:0:raise,undo:{j}:kill", None) for j in range(n_prepare)]
             + [("finish", f"finish:{k}:kill", f"finish:{k + 1}:kill") for k in range(n_finish - 1)])
    assert cases
    for n, (kind, fault, repair_fault) in enumerate(cases):
        env = three_generations(tmp_path / f"c{n}")
        listed, before = env.json("list", "web"), env.layout()
        assert env.run(*args, check=False, env={"SNAPFW_FAULT": fault}).returncode == -9, fault
        if repair_fault:
            r = env.run("check", "--repair", check=False, env={"SNAPFW_FAULT": repair_fault})
            assert r.returncode == -9, (fault, r.stderr)
        env.run("check", "--repair")
        assert env.run("check").stdout.strip() == "No problems found.", fault
        if kind == "undo":
            assert env.json("list", "web") == listed and env.layout() == before, fault
            holds(env, {1, 2, 3})
        else:
            holds(env, after_gens)
    with capsys.disabled():
        print(f"\n{operation}: {n_prepare} SIGKILLs while undoing, {max(n_finish - 1, 0)} while repairing")


@pytest.mark.parametrize("action", ["raise", "kill", "term"])
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_failure_at_every_step_boundary(tmp_path, operation, action):
    """Fail, SIGKILL or SIGTERM before each step: before the commit the operation rolls back, after it
    `snapfw check --repair` finishes it; either way every expected pattern reads back."""
    args, after_gens = OPERATIONS[operation]
    boundaries = None
    i = 0
    while boundaries is None or i < len(boundaries):
        env = three_generations(tmp_path / f"b{i}")
        listed, before = env.json("list", "web"), env.layout()
        if boundaries is None:
            n_prepare, n_finish = phases(env, args)
            boundaries = ([f"prepare:{k}" for k in range(n_prepare)] + ["commit:0"]
                          + [f"finish:{k}" for k in range(n_finish)])
        fault = boundaries[i]
        r = env.run(*args, check=False, env={"SNAPFW_FAULT": f"{fault}:{action}"})
        assert r.returncode != 0 and "Traceback" not in r.stderr, fault
        committed = fault.startswith("finish")
        if action == "term":
            assert r.returncode == (1 if committed else 130), (fault, r.stderr)
            assert ("was interrupted" if committed else "interrupted") in r.stderr, (fault, r.stderr)
        if action != "kill":
            assert ("check --repair" in r.stderr) == committed, (fault, r.stderr)
        if (action != "kill" or not n_prepare) and not committed:
            # raised (and undone), or killed before anything ran: a plan with nothing to prepare is journaled
            # by its commit, so there is nothing to repair, and nothing blocks the next change
            assert env.run("check").stdout.strip() == "No problems found."
        else:
            assert env.run("check", check=False).returncode == 1
            blocked = env.run(*args, check=False)
            assert blocked.returncode != 0 and "check --repair" in blocked.stderr
            env.run("check", "--repair")
        assert env.run("check").stdout.strip() == "No problems found."
        if committed:
            holds(env, after_gens)
        else:
            assert env.json("list", "web") == listed and env.layout() == before, fault
            holds(env, {1, 2, 3})
        i += 1
    assert len(boundaries) >= 3


def test_a_base_another_domain_reads_through_is_never_written_or_removed(env):
    """Rule 3: `web`'s frozen base is also the backing file of domain `copy`; deleting web's snapshot
    must stream web's overlay instead of committing into the shared base, and keep the base."""
    import subprocess

    env.make_domain("web", disks=(("vda", "qcow2"),), backends={"vda": "external"})
    gen(env, 1)
    env.run("create", "web", "s1")
    base = env.json("show", "web", "s1")["disks"][0]["file"]
    copy = os.path.join(env.dir, "copy-vda.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", copy], check=True)
    env.write_domain("copy", {"disks": [{"target": "vda", "path": "copy-vda.qcow2", "format": "qcow2",
                                         "backend": "external"}]})
    env.run("create", "copy", "c1")
    gen(env, 2)
    before = open(base, "rb").read()
    plan = env.json("delete", "web", "s1")["plan"]
    assert not any(s["describe"].startswith("commit") for s in plan["steps"])
    assert open(base, "rb").read() == before
    holds(env, {1, 2})
    assert env.reads("copy", "vda", BYTES["vda"] + 1, KIB64) and env.reads("copy", "vda", 0, 2 * KIB64)
    env.assert_consistent("copy")


def test_a_rewritten_domain_file_keeps_its_mode_and_owner(env):
    if os.geteuid() != 0:
        (pytest.fail if IN_CI else pytest.skip)("giving the domain file another owner needs root")
    env.make_domain("web", disks=(("vda", "qcow2"),), backends={"vda": "external"})
    path = os.path.join(env.dir, "web.yaml")
    os.chown(path, 1234, 2345)
    os.chmod(path, 0o640)
    for args in (("create", "web", "s1"), ("revert", "web", "s1")):
        before = env.domain()["vda"]
        env.run(*args)
        assert env.domain()["vda"] != before, "the domain file was not rewritten"
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 2345)
