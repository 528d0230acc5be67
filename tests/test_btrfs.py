"""contrib/snapfw_btrfs, pip-installed like any third-party plugin, on a real btrfs filesystem (a
loop-mounted image file): it shows in `snapfw plugins` and passes the conformance kit."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import IN_CI, KIB64, Env, reads
from snapfw import plugins
from snapfw.model import Disk
from snapfw.testing import BackendConformance

PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "contrib", "snapfw_btrfs")


def _unavailable(why: str):
    """No btrfs here: a failure in CI (.ci/run installs btrfs-progs), a skip on a laptop."""
    (pytest.fail if IN_CI else pytest.skip)(why)


@pytest.fixture(scope="module")
def btrfs(tmp_path_factory):
    """The mount point of a fresh 200 MB btrfs filesystem in a loop-mounted file."""
    if not (shutil.which("mkfs.btrfs") and shutil.which("btrfs")):
        _unavailable("btrfs-progs is not installed (apt-get install btrfs-progs)")
    root = tmp_path_factory.mktemp("btrfs")
    image, mnt = str(root / "fs.img"), str(root / "mnt")
    os.mkdir(mnt)
    with open(image, "wb") as f:
        f.truncate(200 << 20)
    for argv in (["mkfs.btrfs", "-q", image], ["mount", "-o", "loop", image, mnt]):
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode:
            _unavailable(f"{' '.join(argv)} failed: {r.stderr.strip()}")
    yield mnt
    # the conformance kit runs snapfw in this process: a catalog connection it opened on the filesystem
    # lives on in a reference cycle until the collector runs, and keeps the mount busy
    gc.collect()
    subprocess.run(["umount", mnt], check=True)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install` of a copy of the plugin (building in place would litter the repo) into a directory
    put on sys.path and PYTHONPATH, so this process and `snapfw` subprocesses load its entry point."""
    root = tmp_path_factory.mktemp("btrfs-plugin")
    source, target = str(root / "src"), str(root / "site")
    shutil.copytree(PLUGIN, source)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--target", target, source], check=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(target)
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [target, os.environ.get("PYTHONPATH")])))
        plugins.reset()
        yield target
    sys.modules.pop("snapfw_btrfs", None)
    plugins.reset()


def subvolume_disk(directory: str, name: str, size: int) -> tuple[str, str]:
    """A raw image alone in a new subvolume ``directory/name``."""
    subvolume = os.path.join(directory, name)
    subprocess.run(["btrfs", "subvolume", "create", subvolume], check=True, capture_output=True)
    path = os.path.join(subvolume, "disk.img")
    with open(path, "wb") as f:
        f.truncate(size)
    return path, "raw"


class TestBtrfs(BackendConformance):
    @pytest.fixture
    def snapfw_backend(self, installed):
        return "btrfs"

    @pytest.fixture
    def snapfw_dir(self, btrfs):
        return tempfile.mkdtemp(dir=btrfs)

    @pytest.fixture
    def snapfw_disk(self):
        return subvolume_disk


def test_pip_install_makes_snapfw_plugins_show_it(installed):
    r = subprocess.run([sys.executable, "-m", "snapfw", "plugins", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    row = next(r for r in json.loads(r.stdout) if r["name"] == "btrfs")
    assert (row["kind"], row["plugin"], row["version"]) == ("disk backend", "btrfs", "0.1.0")
    assert row["capabilities"] == ["live.create", "offline.create", "offline.delete", "offline.revert"]


def test_usable_only_for_raw_images_in_a_subvolume_of_their_own(installed, btrfs):
    backend = plugins.disk_backends()["btrfs"][0]()
    folder = tempfile.mkdtemp(dir=btrfs)
    raw, _ = subvolume_disk(folder, "vm-vda", 1 << 20)
    assert backend.usable(Disk("vda", raw, "raw")) is None
    assert "raw" in backend.usable(Disk("vda", raw, "qcow2"))
    for plain in (os.path.join(folder, "plain.img"), os.path.join(btrfs, "top.img")):
        open(plain, "wb").close()
        assert "subvolume" in backend.usable(Disk("vda", plain, "raw"))


def test_picked_by_default_and_never_deletes_a_subvolume_it_did_not_make(installed, btrfs):
    """Through the `snapfw` command: a raw disk in a subvolume gets btrfs unasked; after a revert the
    original subvolume stays (with a note), the writable snapshots snapfw made go when left behind."""
    env = Env(tempfile.mkdtemp(dir=btrfs))
    original, _ = subvolume_disk(env.dir, "vm-vda", 1 << 20)
    env.write_domain("vm", {"disks": [{"target": "vda", "path": original, "format": "raw"}]})
    env.write("vm", "vda", 0x11, 0)
    env.run("create", "vm", "s1")
    assert env.json("list", "vm")[0]["disks"] == [{"target": "vda", "backend": "btrfs"}]
    env.write("vm", "vda", 0x22, 0)
    out = env.run("revert", "vm", "s1").stdout
    assert "snapfw did not make it, so it stays" in out and os.path.exists(original)
    first, _ = env.domain("vm")["vda"]
    assert env.reads("vm", "vda", 0x11, 0) and first.startswith(os.path.join(env.dir, "vm-vda.s1"))
    env.run("revert", "vm", "s1")
    assert not os.path.exists(os.path.dirname(first)) and env.reads("vm", "vda", 0x11, 0)
    listed = subprocess.run(["btrfs", "subvolume", "list", btrfs], capture_output=True, text=True).stdout
    subvolumes = {ln.split(" path ", 1)[1] for ln in listed.splitlines()}
    assert os.path.relpath(os.path.dirname(first), btrfs) not in subvolumes
    env.assert_consistent("vm")


def test_undo_deletes_only_the_snapshot_it_made(installed, btrfs):
    """A subvolume that appeared at the planned path before the step ran is someone else's: kept."""
    from snapfw_btrfs import SnapshotSubvolume

    folder = tempfile.mkdtemp(dir=btrfs)
    source = os.path.dirname(subvolume_disk(folder, "vm-vda", 1 << 20)[0])
    theirs = os.path.dirname(subvolume_disk(folder, "vm-vda.s1", 1 << 20)[0])
    step = SnapshotSubvolume(source, theirs, readonly=True)
    with pytest.raises(FileExistsError):
        step.do(None)
    step.undo(None)
    assert os.path.exists(os.path.join(theirs, "disk.img"))
    mine = SnapshotSubvolume(source, os.path.join(folder, "vm-vda.s2"), readonly=True)
    mine.do(None)
    mine.undo(None)
    assert not os.path.exists(mine.path)


# --- live: a btrfs disk beside a qcow2 one on a running QEMU, in one pause window ---------------------------
BYTES = {"vda": 0x10, "vdb": 0x80}


@pytest.fixture
def mixed(installed, btrfs):
    """A running bare QEMU (qmp driver, launch spec) with vda a qcow2 image and vdb a raw image alone in
    its btrfs subvolume, and the `snapfw` command on it."""
    from live import LiveEnv, Qemu

    folder = tempfile.mkdtemp(dir=btrfs, prefix="window-")
    qemu = Qemu(folder, disks=(("vda", "qcow2"), ("vdb", "raw")))
    os.unlink(qemu.images["vdb"][0])
    qemu.images["vdb"] = subvolume_disk(folder, "web-vdb", 4 << 20)
    qemu.write_spec()
    qemu.start()
    yield LiveEnv(folder, qemu)
    qemu.kill()


def gen(live, g):
    for target, byte in BYTES.items():
        live.write("web", target, byte + g, g * KIB64)


def subvolumes(btrfs) -> set[str]:
    listed = subprocess.run(["btrfs", "subvolume", "list", btrfs], capture_output=True, text=True, check=True)
    return {ln.split(" path ", 1)[1] for ln in listed.stdout.splitlines()}


def status(live) -> str:
    return live.qemu.qmp("query-status")["status"]


def test_live_create_pauses_the_guest_around_the_transaction_and_the_subvolume_snapshot(mixed, btrfs):
    """Each snapshot holds both disks at one instant: every generation written before it reads back after
    a revert to it, none written after; the guest ran throughout and the pause is recorded."""
    live = mixed
    gen(live, 1)
    steps = [s["describe"] for s in live.json("create", "web", "s1", "--disk", "vda=external")["plan"]["steps"]]
    assert steps[0] == "pause web (at most 30 s)" and steps[3] == "resume web", steps
    assert "snapshot the disks of running web at once" in steps[1] and "snapshot of subvolume" in steps[2]
    assert status(live) == "running"
    gen(live, 2)
    live.run("create", "web", "s2", "--disk", "vda=external")
    gen(live, 3)
    for name in ("s1", "s2"):
        shown = live.json("show", "web", name)
        assert {d["target"]: d["backend"] for d in shown["disks"]}["vdb"] == "btrfs"
        assert 0 < shown["config"]["window"]["paused_seconds"] < 30
    assert "Paused:" in live.run("show", "web", "s2").stdout
    assert "No problems found" in live.run("check", "web").stdout
    for name, last in (("s1", 1), ("s2", 2)):
        live.run("revert", "web", name, "--stopped")
        for target, (path, fmt) in live.domain().items():
            for g in (1, 2, 3):
                assert reads(path, fmt, BYTES[target] + g if g <= last else 0, g * KIB64), (name, target, g)
        live.assert_consistent()


def test_a_failure_in_the_btrfs_part_undoes_the_qcow2_part_and_resumes_the_guest(mixed, btrfs):
    live = mixed
    original, before, subs = live.domain(), live.files(), subvolumes(btrfs)
    gen(live, 1)
    # prepare: [pause, transaction, subvolume snapshot, resume, define]: fail just before the btrfs step
    r = live.run("create", "web", "s1", "--disk", "vda=external", env={"SNAPFW_FAULT": "prepare:2"}, check=False)
    assert r.returncode == 1 and "injected fault before prepare step 2" in r.stderr, r.stderr
    assert status(live) == "running"
    assert live.domain() == original and live.files() == before and subvolumes(btrfs) == subs
    assert live.json("list", "web") == []
    gen(live, 2)
    live.qemu.quit()
    for target, (path, fmt) in original.items():
        assert reads(path, fmt, BYTES[target] + 1, KIB64) and reads(path, fmt, BYTES[target] + 2, 2 * KIB64)


def test_kill_inside_the_pause_window_then_repair_resumes_the_guest(mixed, btrfs):
    live = mixed
    original, before, subs = live.domain(), live.files(), subvolumes(btrfs)
    gen(live, 1)
    r = live.run("create", "web", "s1", "--disk", "vda=external", env={"SNAPFW_FAULT": "prepare:2:kill"},
                 check=False)
    assert r.returncode == -9 and status(live) == "paused"  # the transaction ran, the btrfs step did not
    assert live.domain() != original
    assert "rolled back create" in live.run("check", "web", "--repair").stdout
    assert status(live) == "running"
    assert live.domain() == original and live.files() == before and subvolumes(btrfs) == subs
    gen(live, 2)
    live.run("create", "web", "s1")
    assert status(live) == "running" and live.snapshot_names() == ["s1"]


def test_past_the_pause_deadline_the_guest_is_resumed_and_nothing_changes(mixed, btrfs, tmp_path):
    live = mixed
    original, before, subs = live.domain(), live.files(), subvolumes(btrfs)
    config = tmp_path / "config.yaml"
    config.write_text("window: {pause_seconds: 0.001}\n")
    r = live.run("create", "web", "s1", env={"SNAPFW_CONFIG": str(config)}, check=False)
    assert r.returncode == 1 and "'pause web (at most 0.001 s)' passed its deadline of 0.001 s" in r.stderr, r.stderr
    assert status(live) == "running"
    assert live.domain() == original and live.files() == before and subvolumes(btrfs) == subs
    assert live.json("list", "web") == []
