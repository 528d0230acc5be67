"""Memory state (system checkpoints) on a real booted guest: the TCG Linux guest as a qmp domain with a
launch spec (tests/live.py ``Qemu(system=...)``), one boot for the module.

What a revert must bring back is read by the guest itself, through its agent: a marker in its RAM (a file
in its /run tmpfs) and the bytes at the start of each disk, read after dropping its page cache so they
come from the disks. vda is qcow2 (an internal snapshot while it runs), vdb raw (an external overlay).
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from live import (
    LiveEnv,
    Qemu,
    boundaries,
    gen,
    kill_then_repair,
    live_chains,
    qemu_chains,
    quit_then_read,
    spec_disks,
)

from snapfw.tools.qmp import QMP

TARGETS = ("vda", "vdb")


@pytest.fixture(scope="module")
def booted(tmp_path_factory, guest_system):
    folder = tmp_path_factory.mktemp("memwt")
    qemu = Qemu(str(folder), disks=(("vda", "qcow2"), ("vdb", "raw")), size="16M", system=guest_system)
    qemu.write_spec()
    qemu.start()
    yield qemu, LiveEnv(folder, qemu)
    qemu.kill()


def mark(qemu: Qemu, word: str):
    """Put ``word`` in the guest's RAM (/run is a tmpfs) and at the start of each disk (fsynced)."""
    disks = "; ".join(f"printf {word} | dd of=/dev/disk/by-serial/{t} conv=fsync 2>/dev/null" for t in TARGETS)
    qemu.sh(f"echo {word} > /run/marker; {disks}")


def marks(qemu: Qemu) -> dict:
    """What the guest reads: its RAM marker, and each disk's first bytes past its page cache."""
    out = qemu.sh("cat /run/marker; sync; echo 3 > /proc/sys/vm/drop_caches; " + "; ".join(
        f"dd if=/dev/disk/by-serial/{t} bs=6 count=1 2>/dev/null; echo" for t in TARGETS))[1].split()
    return dict(zip(("ram", *TARGETS), out))


def status(qemu: Qemu) -> str:
    return qemu.qmp("query-status")["status"]


def revert(live: LiveEnv, qemu: Qemu, name: str, *flags: str):
    live.run("revert", "web", name, *flags)
    assert qemu.reattach()


def memory_files(live: LiveEnv) -> list[str]:
    return sorted(n for n in os.listdir(live.dir) if n.endswith(".memory"))


def test_revert_brings_back_ram_and_disks_of_that_instant_on_either_branch(booted):
    qemu, live = booted
    mark(qemu, "AAAAAA")
    live.run("create", "web", "s1", "--memory", "paused")
    mark(qemu, "BBBBBB")
    live.run("create", "web", "s2", "--memory", "live")
    mark(qemu, "CCCCCC")
    held = live.json("show", "web", "s2")["config"]["window"]
    assert 0 < held["paused_seconds"] < 10 and not held["quiesced"], held  # the last pass and the disks
    assert "Paused:       yes, " in live.run("show", "web", "s2").stdout
    shown = live.json("show", "web", "s2")["memory"]
    assert shown["kind"] == "live" and shown["backend"] == "qemu" and shown["size"] == os.path.getsize(shown["file"])
    assert os.stat(shown["file"]).st_mode & 0o777 == 0o600
    assert [s["memory"] for s in live.json("list", "web")] == ["paused", "live"]
    assert "+memory(paused)" in live.run("list", "web").stdout

    revert(live, qemu, "s1")
    assert status(qemu) == "running"
    assert marks(qemu) == {"ram": "AAAAAA", "vda": "AAAAAA", "vdb": "AAAAAA"}
    mark(qemu, "DDDDDD")  # a second branch from s1
    live.run("create", "web", "s3", "--memory", "live")
    revert(live, qemu, "s2", "--paused")
    assert status(qemu) == "paused"
    qemu.qmp("cont")
    assert marks(qemu) == {"ram": "BBBBBB", "vda": "BBBBBB", "vdb": "BBBBBB"}
    revert(live, qemu, "s3")
    assert marks(qemu) == {"ram": "DDDDDD", "vda": "DDDDDD", "vdb": "DDDDDD"}
    revert(live, qemu, "s1")
    assert marks(qemu) == {"ram": "AAAAAA", "vda": "AAAAAA", "vdb": "AAAAAA"}
    assert memory_files(live) == ["web.s1.memory", "web.s2.memory", "web.s3.memory"]


@pytest.mark.parametrize("fault", ["prepare:1:kill", "prepare:2:kill", "prepare:1:raise"])
def test_killed_inside_a_memory_snapshot_then_repair_leaves_the_guest_running(booted, fault):
    """prepare: [save memory (guest paused at pre-switchover), the disks' transaction, complete + resume,
    define]: killed with the guest paused and the migration open; repair resumes it, removes the image."""
    qemu, live = booted
    before = memory_files(live)
    listed = live.json("list", "web")
    r = live.run("create", "web", "k", "--memory", "live", env={"SNAPFW_FAULT": fault}, check=False)
    assert r.returncode != 0
    if fault.endswith("kill"):
        assert status(qemu) in ("paused", "finish-migrate")
        assert "rolled back create" in live.run("check", "web", "--repair").stdout
    assert status(qemu) == "running"
    assert memory_files(live) == before and live.json("list", "web") == listed
    with QMP(qemu.sock) as q:
        caps = {c["capability"]: c["state"] for c in q.execute("query-migrate-capabilities")}
        assert not caps["pause-before-switchover"]  # put back: a later migration must not hang there
    qemu.sh("true")  # the guest answers
    assert "No problems found" in live.run("check", "web").stdout


def test_memory_with_quiesce_is_refused_before_any_change(booted):
    """The image would hold the guest with its filesystems frozen: a revert resumed it frozen."""
    qemu, live = booted
    listed = live.json("list", "web")
    for quiesce in ("--quiesce", "--quiesce=try"):
        r = live.run("create", "web", "q", "--memory", "live", quiesce, check=False)
        assert r.returncode == 2 and "--quiesce with --memory live" in r.stderr, r.stderr
    assert live.json("list", "web") == listed and "q" not in memory_files(live) and status(qemu) == "running"


def test_kill_at_the_commit_of_a_memory_snapshot_leaves_the_guest_where_it_was(booted):
    """The booted guest's own view: after the kill and repair it still has its RAM (never restarted) and
    what it wrote; no image is left."""
    qemu, live = booted
    mark(qemu, "KKKKKK")
    before, listed = memory_files(live), live.json("list", "web")
    r = live.run("create", "web", "k", "--memory", "live", env={"SNAPFW_FAULT": "commit:0:kill"}, check=False)
    assert r.returncode == -9
    assert "rolled back create" in live.run("check", "web", "--repair").stdout
    assert status(qemu) == "running" and memory_files(live) == before and live.json("list", "web") == listed
    assert marks(qemu) == {"ram": "KKKKKK", "vda": "KKKKKK", "vdb": "KKKKKK"}


def test_a_shut_off_domain_resumes_at_a_memory_snapshot_and_delete_removes_the_image(booted):
    """Runs last: QEMU is shut down, so qcow2 internal snapshots can be deleted (offline)."""
    qemu, live = booted
    qemu.quit()
    live.run("delete", "web", "s3")
    assert memory_files(live) == ["web.s1.memory", "web.s2.memory"]
    live.assert_consistent()
    listed = live.json("list", "web")
    r = live.run("revert", "web", "s2", "--keep-config", check=False)
    assert r.returncode == 1 and "--keep-config would start it with today's configuration" in r.stderr
    image = live.json("show", "web", "s1")["memory"]["file"]
    os.rename(image, image + ".whole")
    with open(image + ".whole", "rb") as whole, open(image, "wb") as cut:
        cut.write(whole.read(4096))
    r = live.run("revert", "web", "s1", check=False)
    assert r.returncode == 1 and "has 4096 bytes" in r.stderr and "--stopped" in r.stderr
    os.replace(image + ".whole", image)
    assert live.json("list", "web") == listed and not qemu.reattach()  # nothing changed, nothing started
    # a system checkpoint resumes its guest by default; killed just before loading the image, the
    # revert is committed and `check --repair` finishes it
    steps = live.json("revert", "web", "s2", "--dry-run")["plan"]["steps"]
    finish = [s["describe"] for s in steps if s["phase"] == "finish"]
    at = next(i for i, d in enumerate(finish) if d.startswith("start web from its memory image"))
    r = live.run("revert", "web", "s2", env={"SNAPFW_FAULT": f"finish:{at}:kill"}, check=False)
    assert r.returncode == -9 and not qemu.reattach()
    assert "finished revert" in live.run("check", "web", "--repair").stdout
    assert qemu.reattach() and status(qemu) == "running"
    assert marks(qemu) == {"ram": "BBBBBB", "vda": "BBBBBB", "vdb": "BBBBBB"}


@pytest.fixture
def small_fs(tmp_path):
    """A 200 MiB tmpfs of its own, to run out of space on."""
    folder = tmp_path / "small"
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(folder)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield str(folder)
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_no_room_for_the_memory_image_is_refused_first_and_enospc_while_writing_changes_nothing(small_fs, tmp_path):
    """A firmware-only guest (64 MiB) whose disks are on a small filesystem: too little room is refused
    before any change; a filesystem that fills up while the image is written (after the check) resumes
    the guest, removes the partial image and leaves disks and catalog as they were."""
    from snapfw import lifecycle, plugins
    from snapfw.api import SnapfwError, hookimpl

    qemu = Qemu(small_fs, disks=(("vda", "qcow2"), ("vdb", "raw"))).start()
    try:
        live = LiveEnv(small_fs, qemu)
        live.state_dir = str(tmp_path / "state")
        filler = os.path.join(small_fs, "filler")
        subprocess.run(["fallocate", "-l", "100m", filler], check=True)
        before = sorted(os.listdir(small_fs))
        disks = [n for n in before if n != "filler"]
        r = live.run("create", "web", "s1", "--memory", "paused", check=False)
        assert r.returncode == 1 and "not enough free space" in r.stderr and "memory image of web" in r.stderr
        assert sorted(os.listdir(small_fs)) == before and status(qemu) == "running"
        os.unlink(filler)

        class FillUp:  # after the free-space check, just before the plan runs
            @hookimpl
            def snapfw_pre_snapshot(self, domain, name):
                free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
                subprocess.run(["fallocate", "-l", str(free - 64 * 1024), filler], check=True)

        plugins.get_plugin_manager().register(FillUp(), "fill-up")
        try:
            session = lifecycle.Session(live.uri, live.state_dir)
            with pytest.raises(SnapfwError, match="QMP migrate failed: .*No space left"):
                lifecycle.create(session, "web", "s1", memory="paused")
            session.driver.qmp.close()
        finally:
            plugins.reset()
        os.unlink(filler)
        assert sorted(os.listdir(small_fs)) == disks and status(qemu) == "running"
        assert live.json("list", "web") == []
    finally:
        qemu.kill()


# --- SIGKILL at every step boundary (firmware-only guest: 64 MiB, migrates in well under a second) --------
@pytest.fixture
def firmware(tmp_path):
    """A firmware-only guest as a qmp domain with a launch spec, and snapfw on it."""
    qemu = Qemu(str(tmp_path))
    qemu.write_spec()
    qemu.start()
    yield qemu, LiveEnv(tmp_path, qemu)
    qemu.kill()


def migration_settings(qemu: Qemu) -> tuple:
    """What a memory save changes for its migration and must put back: the bandwidth cap and the
    capabilities (the switchover pause, events)."""
    with QMP(qemu.sock) as q:
        caps = {c["capability"]: c["state"] for c in q.execute("query-migrate-capabilities")}
        return q.execute("query-migrate-parameters")["max-bandwidth"], caps


def after_repair(live: LiveEnv, qemu: Qemu, fault: str, settings: tuple):
    """What must hold after any kill and `check --repair`: QEMU runs (not paused) on the chain the catalog
    records, as its launch spec says; the only memory images are those the catalog records; the migration
    settings are QEMU's own again, and no migration is left open."""
    assert qemu.reattach() and status(qemu) == "running", fault
    assert qemu_chains(qemu) == live_chains(live) and qemu.spec()["disks"] == spec_disks(live), fault
    recorded = {s["memory"]["file"] for s in (live.json("show", "web", n) for n in live.snapshot_names())
                if s.get("memory")}
    assert {os.path.join(live.dir, n) for n in memory_files(live)} == recorded, fault
    assert migration_settings(qemu) == settings, fault
    assert qemu.qmp("query-migrate").get("status") in (None, "completed", "cancelled"), fault


@pytest.mark.parametrize("kind", ["paused", "live"])
def test_kill_at_every_step_boundary_of_a_memory_snapshot_then_repair(firmware, kind):
    """create --memory: [save memory (the guest stays paused), the disks' transaction, complete + resume,
    define], killed before each step and at the commit: repair rolls it all back with the guest running."""
    qemu, live = firmware
    settings = migration_settings(qemu)
    gen(live, 1)
    faults = boundaries(live, "create", "web", "c", "--memory", kind)
    assert len(faults) == 5, faults
    for k, fault in enumerate(faults):
        kill_then_repair(live, fault, "create", "web", f"c{k}", "--memory", kind)
        after_repair(live, qemu, fault, settings)
        assert live.snapshot_names() == [], fault
        gen(live, k + 2)
    live.run("create", "web", "whole", "--memory", kind)  # and a whole one still works after all that
    after_repair(live, qemu, "none", settings)
    quit_then_read(live, range(1, len(faults) + 2))
    live.assert_consistent()


def test_kill_at_every_step_boundary_of_a_memory_revert_then_repair(firmware):
    """revert to a memory snapshot: [stop, revert the tag, new overlay, define] then [drop the kept tag,
    remove the old overlay, start QEMU from the image]; reverting to the snapshot just taken, so nothing
    written is discarded. Rolled back: QEMU runs again from its definition; finished: from the image."""
    qemu, live = firmware
    settings = migration_settings(qemu)
    gen(live, 1)
    live.run("create", "web", "r0", "--memory", "paused")
    faults = boundaries(live, "revert", "web", "r0")  # the same plan's shape every round
    assert len(faults) == 8 and sum(f.startswith("finish") for f in faults) == 3, faults
    for k, fault in enumerate(faults):
        if k:
            gen(live, k + 1)
            live.run("create", "web", f"r{k}", "--memory", "live" if k % 2 else "paused")
        was = qemu.pid
        kill_then_repair(live, fault, "revert", "web", f"r{k}")
        after_repair(live, qemu, fault, settings)
        assert (qemu.pid == was) == (fault == "prepare:0:kill"), fault  # killed before the stop: untouched
        loaded = qemu.qmp("query-migrate").get("status") == "completed"  # its incoming migration, done
        assert loaded == (fault.startswith("finish") or fault == "prepare:0:kill"), fault
    quit_then_read(live, range(1, len(faults) + 1))
    live.assert_consistent()


def test_killed_once_the_memory_image_is_whole_then_repair_resumes_the_guest_first(firmware):
    """Killed inside 'complete the memory image', after QEMU finished the migration and before it let
    the guest run: QEMU is then in postmigrate, its images handed over (inactive, read-only), so the
    disks' transaction can only be undone once the guest runs again. Made exact here by killing before
    that step and finishing the migration as the step would."""
    qemu, live = firmware
    settings = migration_settings(qemu)
    gen(live, 1)
    r = live.run("create", "web", "c", "--memory", "paused", env={"SNAPFW_FAULT": "prepare:2:kill"}, check=False)
    assert r.returncode == -9
    with QMP(qemu.sock) as q:
        q.execute("migrate-continue", {"state": "pre-switchover"})
        q.migration(time.monotonic() + 60)
        deadline = time.monotonic() + 10  # QEMU says "completed" a moment before it leaves finish-migrate
        while (state := q.execute("query-status")["status"]) == "finish-migrate" and time.monotonic() < deadline:
            q.wait_events(0.01)
        assert state == "postmigrate"
    assert live.run("check", "web", "--repair").stdout.splitlines() == ["web: rolled back create of web"]
    after_repair(live, qemu, "postmigrate", settings)
    assert live.snapshot_names() == []
    gen(live, 2)
    quit_then_read(live, (1, 2))
    live.assert_consistent()
