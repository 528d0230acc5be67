"""Random sequences of create / revert / delete against a model of the tree and of every byte written.

A hypothesis state machine drives ``snapfw.lifecycle`` in-process (the command in a subprocess would
cost 0.4 s a step) on an ``images`` domain with a qcow2 disk and a raw disk, picking each disk's backend
at random where it is valid, and reusing names of deleted snapshots. After every operation it reads
every 16 KiB slot of each disk's ACTIVE state against the model (zeros where nothing was written), then
writes a byte no earlier step used into one slot per disk (a quarter of a qcow2 cluster, so overlays
copy partial clusters). After every step the tree, the parents and the current snapshot must match the
model, the catalog must match the image files, and no snapshot may be stranded: a revert to and a delete
of every listed snapshot must plan (dry run) without error.

The only refusal the model accepts is reverting to an internal snapshot whose file another snapshot
still needs: it checks in the catalog that this is so, and that the refusal changed no byte of any file.

A third of the operations get a failure injected before one of their steps (SNAPFW_FAULT, when the plan
has that step), then `check --repair` runs as a user would: a failure before the commit must leave the
model's state, one after it the operation's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from unittest import mock

import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from conftest import Env, require
from snapfw.errors import BadInput, Inconsistent, Refused, SnapfwError
from snapfw.plan import FAULT_ENV

SLOT = 16 * 1024
SLOTS = 16
TARGETS = ("vda", "vdb")
NAMES = ("a", "b", "c", "d", "e", "f")  # a small pool, so names of deleted snapshots come back
BACKENDS = st.sampled_from(["qcow2", "external", None])  # None: let snapfw pick
SLOT_PER_DISK = st.tuples(st.integers(0, SLOTS - 1), st.integers(0, SLOTS - 1))
FAULTS = st.one_of(st.none(), st.none(), st.tuples(st.sampled_from(["prepare", "commit", "finish"]), st.integers(0, 3)))
# tmpfs when there is one: the catalog fsyncs every journal entry, the slowest part on a real disk
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


class InProcessEnv(Env):
    """Env whose `export` reads the catalog in this process (`snapfw export` in a subprocess, and its
    YAML, would cost more than the step it checks) and whose `domain` parses with libyaml."""

    def __init__(self, root, session):
        super().__init__(root)
        self.session = session

    def domain(self, name: str = "web") -> dict:
        with open(os.path.join(self.dir, f"{name}.yaml")) as f:
            data = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        return {d["target"]: (os.path.join(self.dir, d["path"]), d["format"]) for d in data["disks"]}

    def export(self, domain: str = "web") -> dict:
        tree, files = self.session.catalog.tree(domain), self.session.catalog.files(domain)
        return {"current": tree.current,
                "snapshots": [{"name": s.name, "parent": s.parent,
                               "disks": [{"target": r.target, "backend": r.backend, **r.data} for r in s.disks]}
                              for s in tree],
                "files": [{"path": f.path, "target": f.target, "format": f.format, "backing": f.backing}
                          for f in files.values()]}


def _stat(path):
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Inspections:
    """qemu-img results reused while ``stamp(path)`` stays the same. For assert_consistent, the file's
    inode, size, mtime and ctime, also across this test's own pattern writes (qemu-io writing data
    neither corrupts a file nor changes its backing file, and what snapfw left was checked just before)."""

    def __init__(self, stamp=_stat):
        """``stamp(path)``: what must stay the same for a result about ``path`` to be reused."""
        self.stamp = stamp
        self.memo: dict[str, dict] = {}  # path -> {(function, format, options, stamp): result}

    def wrap(self, function):
        def call(path, fmt, **options):
            seen = self.memo.setdefault(path, {})
            key = (function.__name__, fmt, tuple(sorted(options.items())), self.stamp(path))
            if key not in seen:
                seen[key] = function(path, fmt, **options)
            return seen[key]

        return call

    @contextlib.contextmanager
    def writing(self, paths):
        before = {p: _stat(p) for p in paths}
        yield
        for path, stat in before.items():
            seen = self.memo.get(path, {})
            for (name, fmt, options, st), result in list(seen.items()):
                if st == stat:
                    seen[(name, fmt, options, self.stamp(path))] = result


INSPECTIONS = Inspections()


def verify_then_write(disks, want, writes) -> str | None:
    """One qemu-io for all disks: read every slot of each against ``want[target]`` (slot -> byte,
    absent: zeros), then write ``writes[target]`` = (slot, byte). Returns what failed, or None."""
    argv = ["qemu-io"]
    for target, (path, fmt) in disks.items():
        argv += ["-c", f"open -o driver={fmt} {path}"]
        argv += [a for i in range(SLOTS) for a in ("-c", f"read -P {want[target].get(i, 0):#x} {i * SLOT} {SLOT}")]
        slot, byte = writes[target]
        argv += ["-c", f"write -P {byte:#x} {slot * SLOT} {SLOT}", "-c", "close"]
    r = subprocess.run(argv, capture_output=True, text=True)
    out = r.stdout + r.stderr
    if r.returncode == 0 and "Pattern verification failed" not in out and "error" not in out.lower():
        return None
    wrong = []
    for target, (path, fmt) in disks.items():  # which slots, for the failure message
        for i in range(SLOTS):
            byte = want[target].get(i, 0)
            one = subprocess.run(["qemu-io", "-r", "-f", fmt, "-c", f"read -P {byte:#x} {i * SLOT} {SLOT}", path],
                                 capture_output=True, text=True)
            if one.returncode != 0 or re.search("Pattern verification failed|error", one.stdout + one.stderr):
                wrong.append(f"{target} slot {i}: expected {byte:#x}")
    return "; ".join(wrong) or out


class Snapshots(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        from snapfw import lifecycle

        self.lc = lifecycle
        self.dir = tempfile.mkdtemp(prefix="snapfw-model-", dir=SCRATCH)
        self.session = lifecycle.Session(f"images://{self.dir}")
        self.env = InProcessEnv(self.dir, self.session)
        self.env.make_domain("web", size=str(SLOT * SLOTS))
        self.parents: dict[str, str | None] = {}
        self.saved: dict[str, dict[str, dict[int, int]]] = {}  # snapshot -> target -> slot -> byte
        self.current: str | None = None
        self.active = {t: {} for t in TARGETS}
        self.byte = 0
        # what snapfw reads to plan the invariant's dry runs, reused while no file of the chain changed:
        # a step changes only a few files, and a dry run after it would read all of them again
        self.plan_reads = Inspections(self.chain_stamp)

    def chain_stamp(self, path):
        """The stats of ``path`` and of its backing files as the catalog has them (checked each step)."""
        files = self.session.catalog.files("web")
        stamps = []
        while path is not None:
            stamps.append(_stat(path))
            path = files[path].backing if path in files else None
        return tuple(stamps)

    def teardown(self):
        INSPECTIONS.memo.clear()
        if "catalog" in self.session.__dict__:
            self.session.catalog.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def settle(self, slots):
        """The catalog matches the files and every slot reads as the model says; then one new byte
        per disk into its active file. Every rule ends with this."""
        self.env.assert_consistent("web")
        disks = self.env.domain("web")
        writes = {}
        for target, slot in zip(TARGETS, slots):
            self.byte = self.byte % 255 + 1
            writes[target] = (slot, self.byte)
        with INSPECTIONS.writing([path for path, _fmt in disks.values()]):
            failed = verify_then_write(disks, self.active, writes)
        assert failed is None, failed
        for target, (slot, byte) in writes.items():
            self.active[target][slot] = byte

    def attempt(self, fault, operation, *args, **kwargs) -> bool:
        """Run a lifecycle operation on ``web`` with ``fault`` injected before that step if the plan has
        it, then repair. Returns whether the operation took effect."""
        os.environ[FAULT_ENV] = "%s:%d:raise" % fault if fault else ""
        try:
            operation(self.session, "web", *args, **kwargs)
            interrupted, took = False, True
        except Inconsistent as e:  # failed after the commit: recorded, to be finished
            assert "injected fault before finish" in str(e), e
            interrupted, took = True, True
        except SnapfwError as e:
            if "injected fault" not in str(e):
                raise
            interrupted, took = False, False
        finally:
            del os.environ[FAULT_ENV]
        repaired = self.lc.check(self.session, "web", repair=True)
        assert repaired == ([f"web: finished {operation.__name__} of web"] if interrupted else []), repaired
        return took

    # --- steps ---------------------------------------------------------------------------------------
    @rule(name=st.sampled_from(NAMES), vda=BACKENDS, vdb=BACKENDS, slots=SLOT_PER_DISK, fault=FAULTS)
    def create(self, name, vda, vdb, slots, fault):
        formats = {t: fmt for t, (_path, fmt) in self.env.domain("web").items()}
        wanted = {t: b for t, b in (("vda", vda), ("vdb", vdb)) if b and (b != "qcow2" or formats[t] == "qcow2")}
        if name in self.parents:
            try:
                self.lc.create(self.session, "web", name, backends=wanted)
            except BadInput as e:
                assert "already has a snapshot" in str(e), e
            else:
                raise AssertionError(f"a second snapshot named {name} was created")
        elif self.attempt(fault, self.lc.create, name, backends=wanted):
            self.parents[name] = self.current
            self.saved[name] = {t: dict(d) for t, d in self.active.items()}
            self.current = name
            chosen = {r.target: r.backend for r in self.session.catalog.tree("web").by_name[name].disks}
            assert wanted.items() <= chosen.items(), (wanted, chosen)
        self.settle(slots)

    @precondition(lambda self: self.parents)
    @rule(data=st.data(), slots=SLOT_PER_DISK, fault=FAULTS)
    def revert(self, data, slots, fault):
        name = data.draw(st.sampled_from(sorted(self.parents)), label="revert to")
        before = self.env.state()
        try:
            took = self.attempt(fault, self.lc.revert, name)
        except Refused as e:
            self.legitimate_refusal(name, str(e))
            assert self.env.state() == before, "a refused revert changed files"
        else:
            if took:
                self.current = name
                self.active = {t: dict(d) for t, d in self.saved[name].items()}
        self.settle(slots)

    @precondition(lambda self: self.parents)
    @rule(data=st.data(), children=st.booleans(), slots=SLOT_PER_DISK, fault=FAULTS)
    def delete(self, data, children, slots, fault):
        name = data.draw(st.sampled_from(sorted(self.parents)), label="delete")
        if not self.attempt(fault, self.lc.delete, name, children=children):
            self.settle(slots)
            return
        gone = {name}
        while children and {n for n, p in self.parents.items() if p in gone} - gone:
            gone |= {n for n, p in self.parents.items() if p in gone}
        parent = self.parents[name]
        for n in gone:
            del self.parents[n], self.saved[n]
        self.parents = {n: parent if p == name else p for n, p in self.parents.items()}
        if self.current in gone:
            self.current = parent
        self.settle(slots)

    def legitimate_refusal(self, name: str, message: str):
        """Only an internal snapshot whose file another snapshot still needs: as its frozen image, or as
        a backing file (at any depth) of a file a snapshot keeps data in. Overlays that only the active
        state reads through go with it and never block."""
        exported = self.env.export("web")
        backing = {f["path"]: f["backing"] for f in exported["files"]}
        kept = {d["file"] for s in exported["snapshots"] for d in s["disks"]}
        needed = {d["file"] for s in exported["snapshots"] for d in s["disks"] if "tag" not in d}
        for path in kept:
            while backing.get(path):
                path = backing[path]
                needed.add(path)
        snap = next(s for s in exported["snapshots"] if s["name"] == name)
        blocked = [d for d in snap["disks"] if "tag" in d and d["file"] in needed]
        assert blocked, f"revert to {name} refused, but no other snapshot needs its files: {message}"
        assert "overlay" in message or "frozen image" in message, message

    # --- after every step ----------------------------------------------------------------------------
    @invariant()
    def tree_matches(self):
        tree = self.lc.snapshots(self.session, "web")
        assert {s.name: s.parent for s in tree} == self.parents
        assert tree.current == self.current

    @invariant()
    def every_snapshot_can_be_reverted_to_and_deleted(self):
        """Issue 16: no snapshot is stranded. Each listed one can be deleted, and reverted to unless another
        listed snapshot still needs its file. Dry runs build a run's plan, refusals included, and change
        nothing."""
        from snapfw.tools import qemuimg

        reads = self.plan_reads
        with mock.patch.object(qemuimg, "info", reads.wrap(qemuimg.info)), \
                mock.patch.object(qemuimg, "map_extents", reads.wrap(qemuimg.map_extents)):
            for name in sorted(self.parents):
                try:
                    self.lc.revert(self.session, "web", name, dry_run=True)
                except Refused as e:
                    self.legitimate_refusal(name, str(e))
                self.lc.delete(self.session, "web", name, dry_run=True)


def test_random_sequences_keep_every_byte(monkeypatch):
    """200 sequences of 8 steps."""
    import conftest

    require("qemu-img")
    require("qemu-io")
    # assert_consistent runs after every step, but a step changes only a few of the files it inspects
    monkeypatch.setattr(conftest, "info_chain", INSPECTIONS.wrap(conftest.info_chain))
    monkeypatch.setattr(conftest, "check_image", INSPECTIONS.wrap(conftest.check_image))
    run_state_machine_as_test(Snapshots, settings=settings(
        max_examples=120, stateful_step_count=8, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow]))


class Drawn:
    """Hypothesis' ``data`` for a replayed step: every draw gives ``value``."""

    def __init__(self, value):
        self.value = value

    def draw(self, strategy, label=None):
        return self.value


def test_the_sequence_of_issue_16_strands_no_snapshot():
    """Random search seldom builds this one (200 sequences did not): internal a, external b and c,
    revert to b, delete b and c left a's tag unrevertible. Replayed through the machine and its checks."""
    require("qemu-img")
    require("qemu-io")
    machine = Snapshots()
    steps = [(machine.create, "a", "qcow2", None), (machine.create, "b", "external", None),
             (machine.create, "c", "external", None), (machine.revert, Drawn("b")),
             (machine.delete, Drawn("b"), False), (machine.delete, Drawn("c"), False), (machine.revert, Drawn("a"))]
    try:
        for i, (rule, *args) in enumerate(steps):
            rule(*args, slots=(i, i), fault=None)
            machine.tree_matches()
            machine.every_snapshot_can_be_reverted_to_and_deleted()
        assert machine.current == "a"
    finally:
        machine.teardown()
