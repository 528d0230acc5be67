"""The backend conformance kit: a pytest plugin (entry point ``pytest11``) that runs the disk-backend
contract against any installed backend. A plugin's test module only names its backend::

    import pytest
    from snapfw.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def snapfw_backend(self):
            return "mybackend"

Each test makes a domain of the ``images`` driver whose two disks use that backend, runs snapfw's
lifecycle in this process (so errors arrive as their own snapfw.api types), and after every operation
compares each disk's guest-visible bytes, the snapshot tree and the files on disk with a model of what
they must be. ``snapfw_dir`` and ``snapfw_disk`` put the disks where the backend needs them (PLUGINS.md).
The live tests run the domain in a real QEMU through the ``qmp`` driver (:class:`LiveRig`) for a backend
that declares ``live.*`` capabilities.
The disks of a backend without ``local_files`` (LVs, possibly on another machine) are written and read
through the connection's host (``SNAPFW_HOST``), never opened here.

pytest loads this module in every run wherever snapfw is installed, so it imports snapfw's own modules
only when a test uses the kit.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os

import pytest
import yaml

DOMAIN = "vm"
SIZE = 1 << 20
SLOT = 64 << 10  # generation g writes its own byte over [g * SLOT, (g + 1) * SLOT) of every disk
TARGETS = {"vda": 0x10, "vdb": 0x80}  # disk -> its byte for generation 0
BAD_NAMES = ["a/b", "..", ".hidden", "-rf", "nul\0byte", "tab\there", "x" * 256, ""]
ODD_NAMES = ["before upgrade", "ünïcödé", "y" * 255]


# --- fixtures a plugin's tests override ---------------------------------------------------------------
@pytest.fixture
def snapfw_backend():
    """The name of the backend under test (override this one)."""
    pytest.fail("the snapfw conformance kit needs a `snapfw_backend` fixture returning your backend's name")


@pytest.fixture
def snapfw_dir(tmp_path):
    """A fresh empty directory per test where the kit makes its domains; override it to put them on the
    storage the backend needs."""
    return str(tmp_path)


@pytest.fixture
def snapfw_disk():
    """``make(directory, name, size) -> (path, format)``: a new zeroed disk image in ``directory`` that the
    backend can snapshot. The default makes a qcow2 file."""
    return make_image


@pytest.fixture
def snapfw_rig(snapfw_backend, snapfw_dir, snapfw_disk, tmp_path):
    """``rig()`` -> a new :class:`Rig` in ``snapfw_dir``, for tests of your own beyond the suite."""
    yield from _rigs(Rig, snapfw_backend, snapfw_dir, snapfw_disk, tmp_path)


@pytest.fixture
def snapfw_live_rig(snapfw_backend, snapfw_dir, snapfw_disk, tmp_path):
    """``rig()`` -> a new :class:`LiveRig`: the domain runs in a real QEMU, reached by the qmp driver. A
    backend that declares no live capability has no live scenario to pass: skipped before any QEMU starts
    (its disks may not even be on this machine)."""
    from . import plugins

    if not any(c.startswith("live.") for c in plugins.disk_backends()[snapfw_backend][0].capabilities):
        pytest.skip(f"backend {snapfw_backend} declares no live capability")
    yield from _rigs(LiveRig, snapfw_backend, snapfw_dir, snapfw_disk, tmp_path)


def _rigs(cls, backend, folder, make_disk, tmp_path):
    """The maker of ``cls`` rigs a fixture yields, closing every rig made once the test is over."""
    rigs = []
    scratch = tmp_path / "snapfw-scratch"
    scratch.mkdir(exist_ok=True)

    def rig():
        rigs.append(cls(os.path.join(folder, f"vms{len(rigs)}"), backend, make_disk, str(scratch)))
        rigs[-1].verify()  # the new disks read as zeros
        return rigs[-1]

    yield rig
    for r in rigs:  # a failed test's traceback keeps them alive: let go of their files (mounts, QEMUs)
        r.close()


def make_image(directory: str, name: str, size: int, fmt: str = "qcow2") -> tuple[str, str]:
    """A zeroed image file made by ``qemu-img create``; ``functools.partial(make_image, fmt="raw")`` for raw."""
    path = os.path.join(directory, f"{name}.{'qcow2' if fmt == 'qcow2' else 'img'}")
    _run(["qemu-img", "create", "-q", "-f", fmt, path, str(size)])
    return path, fmt


def _run(argv: list[str]) -> str:
    """Programs run through snapfw.tools, as everywhere in snapfw; a failure is a ToolError naming it."""
    from .tools.run import run

    return run(argv)


# --- the model ------------------------------------------------------------------------------------------
class Rig:
    """One domain whose disks all use the backend under test, driven in-process, and a model of it: what
    every disk must read now (``expected``) and in each snapshot (``saved``), the tree and current one.

    ``create``/``revert``/``delete`` run the operation and update the model; ``verify`` compares them
    after each operation, ``check`` (slower: ``qemu-img info`` of every file) once in a while.
    """

    def __init__(self, directory: str, backend: str, make_disk, scratch: str):
        from . import plugins
        from .lifecycle import Session

        installed = plugins.disk_backends()
        if backend not in installed:
            pytest.fail(f"backend {backend!r} is not installed (snapfw sees: {', '.join(sorted(installed))}); "
                        "install your plugin, e.g. pip install -e .")
        self.cls = installed[backend][0]
        self.backend, self.dir, self.scratch = backend, os.path.abspath(directory), scratch
        os.makedirs(self.dir)
        disks = []
        for target in TARGETS:
            path, fmt = make_disk(self.dir, f"{DOMAIN}-{target}", SIZE)
            disks.append({"target": target, "path": os.path.abspath(path), "format": fmt, "backend": backend})
        self.originals = {d["path"] for d in disks}
        with open(os.path.join(self.dir, f"{DOMAIN}.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump({"disks": disks}, f)
        self.session = Session(f"images://{self.dir}")
        for disk in self.domain().disks:
            why = self.cls().usable(disk)
            assert why is None, f"backend {backend} cannot snapshot the disk snapfw_disk made, {disk.path}: {why}"
        self.expected = {t: bytearray(SIZE) for t in TARGETS}
        self.own_files: set[str] = set()  # files of the rig's own in the directory (a QEMU's socket)
        self.saved: dict[str, dict] = {}
        self.parents: dict[str, str | None] = {}
        self.current: str | None = None

    @property
    def capabilities(self) -> frozenset[str]:
        return self.cls.capabilities

    def close(self):
        self.session.catalog.close()

    def domain(self):
        return self.session.driver.domain(DOMAIN)

    @property
    def remote(self) -> bool:
        """The backend's disks live on the connection's host: data goes through it."""
        return not self.cls.local_files

    # --- operations ------------------------------------------------------------------------------------
    def write(self, gen: int):
        """Generation ``gen``: each disk gets its own byte at its own offset."""
        for disk in self.domain().disks:
            byte = TARGETS[disk.target] + gen
            if self.remote:
                self.session.host.write(disk.path, gen * SLOT, bytes([byte]) * SLOT)
            else:
                _run(["qemu-io", "-f", disk.format, "-c", f"write -P {byte:#x} {gen * SLOT} {SLOT}", disk.path])
            self.expected[disk.target][gen * SLOT:(gen + 1) * SLOT] = bytes([byte]) * SLOT

    def create(self, name: str, dry_run: bool = False):
        from . import lifecycle

        # the backend named for every disk: a running domain's disks name none (the domain file is not read)
        plan = lifecycle.create(self.session, DOMAIN, name, backends={t: self.backend for t in TARGETS},
                                dry_run=dry_run)
        if not dry_run:
            self.done("create", name)
        return plan

    def revert(self, name: str, dry_run: bool = False):
        from . import lifecycle

        plan = lifecycle.revert(self.session, DOMAIN, name, dry_run=dry_run)
        if not dry_run:
            self.done("revert", name)
        return plan

    def delete(self, name: str, children: bool = False, dry_run: bool = False):
        from . import lifecycle

        plan = lifecycle.delete(self.session, DOMAIN, name, children=children, dry_run=dry_run)
        if not dry_run:
            self.done("delete", name, children)
        return plan

    def done(self, operation: str, name: str, children: bool = False):
        """Move the model as ``operation`` on ``name`` does (also after `check --repair` finished it)."""
        if operation == "create":
            self.saved[name] = copy.deepcopy(self.expected)
            self.parents[name], self.current = self.current, name
        elif operation == "revert":
            self.expected, self.current = copy.deepcopy(self.saved[name]), name
        else:
            parent = self.parents[name]
            gone = {name}
            while children and (more := {n for n, p in self.parents.items() if p in gone} - gone):
                gone |= more
            for n in gone:
                del self.saved[n], self.parents[n]
            self.parents = {n: parent if p == name else p for n, p in self.parents.items()}
            self.current = parent if self.current in gone else self.current

    # --- looking -----------------------------------------------------------------------------------------
    def read(self, path: str, fmt: str) -> bytes:
        """The guest-visible bytes of an image, through its whole backing chain."""
        if self.remote:
            return self.session.host.read(path, 0, SIZE)
        out = path if fmt == "raw" else os.path.join(self.scratch, "read.raw")
        if fmt != "raw":
            _run(["qemu-img", "convert", "-f", fmt, "-O", "raw", path, out])
        with open(out, "rb") as f:
            return f.read()

    def verify(self):
        """Disks read what the model says, the tree is the model's, and every file in the domain directory
        is one snapfw knows (no leftovers)."""
        from . import lifecycle

        for disk in self.domain().disks:
            data, want = self.read(disk.path, disk.format), self.expected[disk.target]
            assert len(data) == SIZE, f"disk {disk.target} is {len(data)} bytes; snapfw_disk must make {SIZE}"
            bad = next((g for g in range(SIZE // SLOT)
                        if data[g * SLOT:(g + 1) * SLOT] != want[g * SLOT:(g + 1) * SLOT]), None)
            assert bad is None, (f"disk {disk.target} ({disk.path}) reads {data[bad * SLOT]:#04x} at generation "
                                 f"{bad}'s offset where it should read {want[bad * SLOT]:#04x}")
        tree = lifecycle.snapshots(self.session, DOMAIN)
        assert {s.name: s.parent for s in tree} == self.parents, "snapshot tree differs from the model"
        assert tree.current == self.current, f"current snapshot is {tree.current}, should be {self.current}"
        left = self.leftovers()
        assert not left, f"files nothing uses any more were left behind: {left}"

    def check(self):
        """`snapfw check` finds nothing: the catalog agrees with every file, and no plan is unfinished."""
        from . import lifecycle

        findings = lifecycle.check(self.session, DOMAIN)
        assert not findings, f"`snapfw check` finds: {findings}"

    def leftovers(self) -> list[str]:
        """Paths in the domain directory that are neither a file snapfw knows nor a folder holding one."""
        known = set(self.session.catalog.files(DOMAIN)) | {d.path for d in self.domain().disks} | self.originals
        keep = {os.path.join(self.dir, f"{DOMAIN}.yaml"), os.path.join(self.dir, ".snapfw"), *self.own_files}
        for path in known:
            while path.startswith(self.dir + os.sep):
                keep.add(path)
                path = os.path.dirname(path)
        out = []
        for root, dirs, files in os.walk(self.dir):
            out += [p for p in (os.path.join(root, n) for n in dirs + files) if p not in keep]
            dirs[:] = [d for d in dirs if os.path.join(root, d) in keep and d != ".snapfw"]
        return sorted(out)

    def state(self) -> dict:
        """Everything a refused or rolled-back operation must leave as it was: the catalog, the domain
        definition, the paths in the directory, and each image's backing file, tags and bytes."""
        from . import lifecycle

        files = self.session.catalog.files(DOMAIN)
        images = {p: f.format for p, f in files.items()} | {d.path: d.format for d in self.domain().disks}
        seen = {}
        for path, fmt in sorted(images.items()):
            info = {} if self.remote else json.loads(_run(["qemu-img", "info", "--output=json", "-f", fmt, path]))
            # on the host, a snapshot volume may exist but not be readable until activated (LVM skips thin
            # snapshots when activating): its presence, then, not its bytes
            readable = not self.remote or self.session.host.exists(path)
            seen[path] = (info.get("backing-filename"), sorted(t["name"] for t in info.get("snapshots", [])),
                          hashlib.sha256(self.read(path, fmt)).hexdigest() if readable else "not readable here")
        paths = sorted(os.path.join(r, n) for r, ds, fs in os.walk(self.dir) for n in ds + fs
                       if ".snapfw" not in os.path.relpath(os.path.join(r, n), self.dir).split(os.sep))
        return {"snapshots": [(s.name, s.parent, s.current, [dataclasses.asdict(r) for r in s.disks])
                              for s in lifecycle.snapshots(self.session, DOMAIN)],
                "files": sorted(dataclasses.astuple(f) for f in files.values()),
                "disks": [d.as_dict() for d in self.domain().disks], "paths": paths, "images": seen}


class LiveRig(Rig):
    """A :class:`Rig` whose domain runs: a real ``qemu-system-x86_64`` (firmware only, no guest OS) started
    from a launch spec by the ``qmp`` driver itself, its disks on the backend under test. Generations are
    written live, as the guest would, through HMP ``qemu-io`` on each disk's device; ``verify`` stops QEMU
    (through the driver), compares the files offline as the offline kit does, and starts it again."""

    def __init__(self, directory: str, backend: str, make_disk, scratch: str):
        import shutil

        from .lifecycle import Session

        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:  # a CI run must not pass by skipping what it was meant to test
            missing = "the live conformance tests need qemu-system-x86_64 (Debian: qemu-system-x86)"
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(missing)
            pytest.skip(missing)
        super().__init__(directory, backend, make_disk, scratch)
        sock = os.path.join(self.dir, f"{DOMAIN}.qmp")
        pidfile = os.path.join(self.dir, f"{DOMAIN}.pid")
        argv = [qemu, "-machine", "q35,accel=kvm:tcg", "-m", "64", "-nodefaults", "-display", "none",
                "-qmp", f"unix:{sock},server=on,wait=off", "-name", DOMAIN, "-daemonize", "-pidfile", pidfile]
        disks = {}
        for i, disk in enumerate(super().domain().disks):
            argv += ["-blockdev", f"driver=file,filename={{{disk.target}}},node-name=file{i}",
                     "-blockdev", f"driver={{{disk.target}.format}},file=file{i},node-name=disk{i}",
                     "-device", f"virtio-blk-pci,drive=disk{i},id={disk.target}"]
            disks[disk.target] = {"path": disk.path, "format": disk.format}
        self.own_files = {sock, pidfile, sock + ".launch.yaml"}
        with open(sock + ".launch.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump({"name": DOMAIN, "argv": argv, "disks": disks}, f)
        self.pidfile = pidfile
        self.session = Session(f"qmp://{sock}", os.path.join(self.dir, ".snapfw"))
        self.session.driver.start(DOMAIN, paused=False)

    def write(self, gen: int):
        """Generation ``gen``, written while the domain runs, through each disk's own device."""
        qmp = self.session.driver.qmp  # QEMU's monitor serves one client: the driver's own connection
        for disk in self.domain().disks:
            byte = TARGETS[disk.target] + gen
            out = qmp.execute("human-monitor-command", {"command-line": (
                f'qemu-io -d /machine/peripheral/{disk.target}/virtio-backend "write -P {byte:#x} {gen * SLOT} {SLOT}"')})
            assert out == "", f"writing generation {gen} to disk {disk.target} live failed: {out}"
            self.expected[disk.target][gen * SLOT:(gen + 1) * SLOT] = bytes([byte]) * SLOT

    def running(self) -> bool:
        return self.domain().running

    def verify(self):
        """Stop QEMU, compare offline (and check the catalog against the files), start it again."""
        self.session.driver.stop(DOMAIN)
        super().verify()
        self.check()
        self.session.driver.start(DOMAIN, paused=False)

    def close(self):
        """Stop the rig's QEMU, by the driver, else by its pid file."""
        import signal

        try:
            self.session.driver.stop(DOMAIN)
        except Exception:
            try:
                with open(self.pidfile, encoding="ascii") as f:
                    os.kill(int(f.read()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        super().close()


# --- the contract ------------------------------------------------------------------------------------------
def _needs(rig: Rig, *capabilities: str):
    missing = [c for c in capabilities if c not in rig.capabilities]
    if missing:
        pytest.skip(f"backend {rig.backend} does not declare {', '.join(missing)}")


def _scenario(rig: Rig):
    """s1 -> {s2, s3}, current s3, with a revert in between; the disks hold generations 1, 3 and 4."""
    rig.write(1)
    rig.create("s1")
    rig.write(2)
    rig.create("s2")
    rig.revert("s1")
    rig.write(3)
    rig.create("s3")
    rig.write(4)


OPERATIONS = {"create": ("offline.create", "s4"), "revert": ("offline.revert", "s2"),
              "delete": ("offline.delete", "s1")}


class BackendConformance:
    """The disk-backend contract. Subclass it as ``Test...`` and provide a ``snapfw_backend`` fixture."""

    def test_backend_is_installed_and_declares_known_capabilities(self, snapfw_rig):
        from .backend import CAPABILITIES

        rig = snapfw_rig()
        unknown = rig.capabilities - set(CAPABILITIES)
        assert not unknown, f"backend {rig.backend} declares unknown capabilities {sorted(unknown)}"
        assert rig.cls.description, f"backend {rig.backend} has no description for `snapfw plugins`"

    def test_chain(self, snapfw_rig):
        rig = snapfw_rig()
        _needs(rig, "offline.create", "offline.revert", "offline.delete")
        for gen, name in enumerate(["s1", "s2", "s3"], 1):
            rig.write(gen)
            rig.create(name)
            rig.verify()
        rig.write(4)
        for name in ["s1", "s3", "s2"]:
            rig.revert(name)
            rig.verify()
            rig.write(5)
        rig.delete("s2")        # in the middle, and current
        rig.verify()
        for name in ["s3", "s1"]:
            rig.revert(name)
            rig.verify()
        rig.delete("s1")        # the root
        rig.verify()
        rig.revert("s3")
        rig.verify()
        rig.delete("s3")        # the last one
        rig.verify()
        rig.check()

    def test_tree(self, snapfw_rig):
        rig = snapfw_rig()
        _needs(rig, "offline.create", "offline.revert", "offline.delete")
        for gen, name in enumerate(["root", "mid", "left"], 1):
            rig.write(gen)
            rig.create(name)
        rig.revert("mid")
        rig.write(4)
        rig.create("right")     # root -> mid -> {left, right}
        rig.write(5)
        rig.verify()
        for name in ["left", "root", "right"]:
            rig.revert(name)
            rig.verify()
        rig.delete("mid")       # two children move up to root
        rig.verify()
        rig.revert("left")
        rig.verify()
        rig.write(6)
        rig.create("leaf")      # root -> {left -> leaf, right}
        rig.delete("root")      # a root with two children
        rig.verify()
        rig.revert("right")
        rig.verify()
        rig.delete("left", children=True)
        rig.verify()
        rig.check()
        rig.revert("right")
        rig.verify()

    def test_bad_names_are_refused_before_any_change(self, snapfw_rig):
        from .errors import BadInput, UnknownSnapshot

        rig = snapfw_rig()
        _needs(rig, "offline.create")
        rig.write(1)
        rig.create("s1")
        rig.write(2)
        before = rig.state()
        for name in BAD_NAMES:
            for attempt in (rig.create, rig.revert, rig.delete):
                with pytest.raises(BadInput):
                    attempt(name)
        with pytest.raises(BadInput, match="already has"):
            rig.create("s1")
        for attempt in (rig.revert, rig.delete):
            with pytest.raises(UnknownSnapshot):
                attempt("nosuch")
        assert rig.state() == before, "a refused request changed something"
        rig.check()

    def test_unusual_valid_names_work(self, snapfw_rig):
        rig = snapfw_rig()
        _needs(rig, "offline.create", "offline.revert", "offline.delete")
        for gen, name in enumerate(ODD_NAMES, 1):
            rig.write(gen)
            rig.create(name)
        for name in ODD_NAMES:
            rig.revert(name)
            rig.verify()
        for name in ODD_NAMES:
            rig.delete(name)
        rig.verify()
        rig.check()

    def test_operations_not_declared_raise_not_supported(self, snapfw_rig):
        """An operation missing from ``capabilities`` raises NotSupported and changes nothing."""
        from .errors import NotSupported

        rig = snapfw_rig()
        attempts = [("offline.create", "create", lambda: rig.create("s2"))]
        if "offline.create" in rig.capabilities:
            rig.write(1)
            rig.create("s1")
            rig.write(2)
            attempts += [("offline.revert", "revert", lambda: rig.revert("s1")),
                         ("offline.delete", "delete", lambda: rig.delete("s1")),
                         ("offline.delete", "delete --children", lambda: rig.delete("s1", children=True))]
        for capability, what, attempt in attempts:
            if capability in rig.capabilities:
                continue
            before = rig.state()
            try:
                attempt()
            except NotSupported:
                pass
            except Exception as e:
                pytest.fail(f"{what} on backend {rig.backend} raised {type(e).__name__} ({e}); an operation not "
                            f"in capabilities must raise snapfw.api.NotSupported")
            else:
                pytest.fail(f"{what} worked on backend {rig.backend} although {capability!r} is not in its "
                            "capabilities: declare it, or raise snapfw.api.NotSupported")
            assert rig.state() == before, f"the refused {what} changed something"

    def test_live_chain(self, snapfw_live_rig):
        """On a running domain (the qmp driver, a real QEMU): snapshots taken live, deleted live where the
        backend declares live.delete, reverted live (QEMU stopped, the disks reverted offline, QEMU started
        again); the disks read what they must after each, checked with QEMU stopped."""
        rig = snapfw_live_rig()
        _needs(rig, "live.create", "offline.revert")
        for gen, name in enumerate(["s1", "s2", "s3"], 1):
            rig.write(gen)
            rig.create(name)
            assert rig.running(), f"the domain stopped running when {name} was taken live"
        rig.write(4)
        rig.verify()
        if "live.delete" in rig.capabilities:
            rig.delete("s2")    # in the middle
            rig.verify()
            rig.write(5)
            rig.delete("s3")    # the current one: its data goes into the running chain
            rig.verify()
        rig.revert("s1")
        assert rig.running(), "a live revert must start the domain again"
        rig.write(6)
        rig.create("s4")
        rig.verify()
        if "live.delete" in rig.capabilities:
            rig.delete("s1")    # the root
            rig.verify()
        for name in list(rig.saved):
            rig.revert(name)
            rig.verify()

    def test_live_failure_at_every_step_boundary_is_undone_live(self, snapfw_live_rig, monkeypatch):
        """A live create that fails before any of its prepare steps or its commit (so also after its live step) rolls back
        while the domain runs on: the disks run on their old files and read as before, no file is left."""
        from .errors import SnapfwError
        from .plan import FAULT_ENV

        rig = snapfw_live_rig()
        _needs(rig, "live.create")
        rig.write(1)
        rig.create("s1")
        rig.write(2)
        before = [d.as_dict() for d in rig.domain().disks]
        plan = rig.create("s2", dry_run=True)
        for fault in [f"prepare:{i}" for i in range(len(plan.prepare))] + ["commit:0"]:
            monkeypatch.setenv(FAULT_ENV, f"{fault}:raise")
            with pytest.raises(SnapfwError):
                rig.create("s2")
            monkeypatch.delenv(FAULT_ENV)
            assert [d.as_dict() for d in rig.domain().disks] == before, f"fault before {fault}: the domain " \
                "does not run on its old files"
            assert not rig.session.catalog.unfinished_plans(DOMAIN), f"fault before {fault}: the journal kept it"
        rig.verify()
        rig.write(3)
        rig.create("s2")
        rig.verify()

    @pytest.mark.parametrize("operation", sorted(OPERATIONS))
    def test_failure_at_every_step_boundary(self, snapfw_rig, operation, monkeypatch):
        """SNAPFW_FAULT fails the operation before each step. Before the commit everything rolls back (and
        undoing a step that never ran changes nothing); after it `check --repair` finishes the operation,
        even when a finish step runs twice. A rollback that fails before its last undo is completed by
        `check --repair`, which undoes every step again. A dry run changes nothing; every step survives
        the journal."""
        from . import lifecycle
        from .errors import Inconsistent, SnapfwError
        from .plan import FAULT_ENV, Step

        def scenario():
            rig = snapfw_rig()
            _needs(rig, "offline.create", "offline.revert", capability)
            _scenario(rig)
            return rig

        capability, name = OPERATIONS[operation]
        rig = scenario()
        before = rig.state()
        plan = getattr(rig, operation)(name, dry_run=True)
        assert rig.state() == before, f"a dry run of {operation} changed something"
        for step in plan.prepare + plan.finish:
            assert Step.from_json(json.loads(json.dumps(step.to_json()))) == step, \
                f"{step!r} does not survive the journal: its fields must be JSON values"
        boundaries = ([("prepare", i) for i in range(len(plan.prepare))] + [("commit", 0)]
                      + [("undo", len(plan.prepare) - 1)] * bool(plan.prepare)
                      + [("finish", i) for i in range(len(plan.finish))])
        for phase, i in boundaries:
            rig = rig or scenario()  # after a committed fault, start again
            monkeypatch.setenv(FAULT_ENV, f"{phase}:{i}:raise" if phase != "undo" else f"commit:0:raise,undo:{i}:raise")
            with pytest.raises(SnapfwError) as failed:
                getattr(rig, operation)(name)
            monkeypatch.delenv(FAULT_ENV)
            where = f"{operation}, fault before {phase} step {i}"
            if phase == "undo":
                assert isinstance(failed.value, Inconsistent) and "check --repair" in str(failed.value), where
                assert lifecycle.check(rig.session, DOMAIN, repair=True), where
            if phase != "finish":
                assert not rig.session.catalog.unfinished_plans(DOMAIN), f"{where}: the journal kept the plan"
                if i == 0 and phase == "prepare":  # no step ran: undoing any of them must change nothing
                    for step in reversed(plan.prepare):
                        step.undo(rig.session)
                assert rig.state() == before, f"{where}: not rolled back, or undoing a step that never ran acted"
                continue
            assert isinstance(failed.value, Inconsistent) and "check --repair" in str(failed.value), where
            with pytest.raises(Inconsistent):
                getattr(rig, operation)(name)
            if i:
                [journal] = rig.session.catalog.unfinished_plans(DOMAIN)
                Step.from_json(journal["steps"]["finish"][i - 1]).do(rig.session)
            assert lifecycle.check(rig.session, DOMAIN, repair=True), where
            rig.done(operation, name)
            rig.verify()
            rig.check()
            rig = None
        rig = rig or scenario()
        getattr(rig, operation)(name)
        rig.verify()
        rig.check()
        for snapshot in list(rig.saved):
            rig.revert(snapshot)
            rig.verify()


class MemoryBackendConformance:
    """The memory-backend contract, as far as it holds without a running domain: subclass it as
    ``Test...`` with a ``snapfw_memory_backend`` fixture returning the backend's name. Saving and restoring
    need a running guest of a driver the backend serves (snapfw's own tests/test_memory.py runs them on a
    booted guest for the built-in ``qemu`` backend)."""

    def test_memory_backend_is_installed_and_declares_what_it_serves(self, snapfw_memory_backend):
        from . import plugins
        from .backend import MEMORY_KINDS, MemoryBackend

        found = plugins.memory_backends()
        assert snapfw_memory_backend in found, f"memory backend {snapfw_memory_backend!r} is not installed"
        cls = found[snapfw_memory_backend][0]
        assert cls.description, f"memory backend {cls.name} has no description for `snapfw plugins`"
        assert cls.drivers and all(isinstance(s, str) for s in cls.drivers), "it must name the drivers it serves"
        assert cls.kinds and set(cls.kinds) <= set(MEMORY_KINDS), f"unknown kinds {sorted(cls.kinds)}"
        assert set(cls.with_disks) <= set(cls.kinds), f"with_disks {sorted(cls.with_disks)} are not all its kinds"
        missing = [m for m in ("image_size", "save", "complete", "abort", "restore",
                               *(["save_with_disks"] if cls.with_disks else []))
                   if getattr(cls, m) is getattr(MemoryBackend, m)]
        assert not missing, f"memory backend {cls.name} does not implement {', '.join(missing)}"

    def test_its_steps_survive_the_journal(self, snapfw_memory_backend):
        from .memory import CompleteMemory, RestoreMemory, SaveMemory
        from .plan import Step

        action = {"kind": "external", "target": "vda", "node": "n", "file": "/a", "format": "raw", "overlay": "/b"}
        for step in (SaveMemory("vm", snapfw_memory_backend, "/m", "live", {"k": 1}, True, 5),
                     SaveMemory("vm", snapfw_memory_backend, "/m", "live", {}, True, 5, 30.0, [action]),
                     CompleteMemory("vm", snapfw_memory_backend, "/m", {"k": 1}, False),
                     RestoreMemory("vm", snapfw_memory_backend, "/m", True)):
            assert Step.from_json(json.loads(json.dumps(step.to_json()))) == step
