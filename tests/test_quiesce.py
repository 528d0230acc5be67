"""`create --quiesce` on a booted Linux guest (the TCG guest as a qmp domain, qemu-ga in it): its mounted
ext2 filesystem is frozen through the real guest agent around the disk snapshot and thawed afterwards;
a crash inside the freeze leaves it frozen until `check --repair`; a silent agent is a deadline, not a hang.

One guest boots per module (TCG is slow here); the silent-agent test stops its agent, so it runs last.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from live import LiveEnv, Qemu

from snapfw.live import AGENT_SECONDS
from snapfw.tools.qga import GuestAgent

MOUNT = "/mnt/data"


@pytest.fixture(scope="module")
def booted(tmp_path_factory, guest_system):
    folder = tmp_path_factory.mktemp("window-quiesce")
    qemu = Qemu(str(folder), disks=(("vda", "qcow2"),), size="16M", system=guest_system)
    qemu.start()
    qemu.sh(f"mke2fs -q /dev/disk/by-serial/vda && mkdir -p {MOUNT} && mount /dev/disk/by-serial/vda {MOUNT}")
    yield LiveEnv(folder, qemu)
    qemu.kill()


def guest_file(image: str, scratch: str, path: str = "/file") -> str:
    """``path`` in the ext2 filesystem of qcow2 ``image`` (a frozen file QEMU may still read), as written."""
    raw = f"{scratch}/fs.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", image, raw], check=True)
    r = subprocess.run(["debugfs", "-R", f"cat {path}", raw], capture_output=True, text=True, check=True)
    return r.stdout


def freeze_status(live) -> str:
    with GuestAgent(live.qemu.agent) as agent:
        return agent.execute("guest-fsfreeze-status")


def test_quiesce_freezes_the_guest_filesystems_around_the_snapshot(booted, tmp_path):
    live = booted
    live.qemu.sh(f"echo one > {MOUNT}/file")  # no sync: only in the guest's page cache until the freeze
    plan = live.json("create", "web", "q1", "--quiesce", "--disk", "vda=external")["plan"]
    steps = [s["describe"] for s in plan["steps"]]
    assert steps[0].startswith("freeze the filesystems of web") and steps[2] == "thaw the filesystems of web"
    assert freeze_status(live) == "thawed" and live.qemu.qmp("query-status")["status"] == "running"
    held = live.json("show", "web", "q1")["config"]["window"]
    assert held["quiesced"] and held["frozen_filesystems"] == 1 and 0 < held["frozen_seconds"] < 10, held
    assert held["paused_seconds"] is None  # every disk is QEMU's: one transaction, no pause
    assert "Quiesced:     yes, 1 filesystem(s) frozen for" in live.run("show", "web", "q1").stdout
    frozen = live.json("show", "web", "q1")["disks"][0]["file"]
    assert guest_file(frozen, str(tmp_path)) == "one\n"  # the snapshot holds what the guest had written
    live.qemu.sh(f"echo two > {MOUNT}/file")  # the guest writes again
    live.run("create", "web", "q2")
    assert "Quiesced:     no, crash-consistent" in live.run("show", "web", "q2").stdout


def test_kill_inside_the_freeze_then_repair_thaws_the_guest(booted):
    live = booted
    names = live.snapshot_names()
    # prepare: [freeze, transaction, thaw]: die just before the transaction
    r = live.run("create", "web", "q3", "--quiesce", env={"SNAPFW_FAULT": "prepare:1:kill"}, check=False)
    assert r.returncode == -9 and freeze_status(live) == "frozen"  # the freeze happened, snapfw is gone
    assert "rolled back create" in live.run("check", "web", "--repair").stdout
    assert freeze_status(live) == "thawed" and live.snapshot_names() == names
    live.qemu.sh(f"echo three > {MOUNT}/file && sync")


def test_past_the_freeze_deadline_the_guest_is_thawed_and_nothing_changes(booted, tmp_path):
    live = booted
    names, before = live.snapshot_names(), live.files()
    config = tmp_path / "config.yaml"
    config.write_text("window: {freeze_seconds: 0.001}\n")
    r = live.run("create", "web", "q6", "--quiesce", env={"SNAPFW_CONFIG": str(config)}, check=False)
    assert r.returncode == 1 and "passed its deadline of 0.001 s" in r.stderr, r.stderr
    assert freeze_status(live) == "thawed" and live.qemu.qmp("query-status")["status"] == "running"
    assert live.snapshot_names() == names and live.files() == before


def test_hooks_run_before_the_freeze_and_after_the_thaw(booted, tmp_path):
    from test_freezehooks import configure, log, script

    live, folder = booted, str(tmp_path)
    env = configure(folder, [{"phase": "pre-freeze", "run": [script(folder, "flush", "true")]},
                             {"phase": "post-thaw", "run": [script(folder, "unlock", "true")]}])
    r = live.run("create", "web", "q5", "--quiesce", "--json", env=env)
    steps = [json.loads(ln)["step"].split(" (")[0] for ln in r.stderr.splitlines() if '"event": "step"' in ln]
    assert steps[:2] == ["pre-freeze hooks of web", "freeze the filesystems of web through its guest agent"]
    assert steps[3] == "thaw the filesystems of web" and steps[-1] == "post-thaw hooks of web", steps
    assert log(folder) == ["pre-freeze web q5 flush", "post-thaw web q5 unlock"]
    assert freeze_status(live) == "thawed"


def test_no_agent_channel_is_refused_before_any_change(tmp_path):
    qemu = Qemu(str(tmp_path)).start()  # firmware only: no guest agent
    try:
        live = LiveEnv(tmp_path, qemu)
        before = live.files()
        r = live.run("create", "web", "s1", "--quiesce", check=False)
        assert r.returncode == 1 and "cannot quiesce web: the QEMU of web has no guest agent channel" in r.stderr
        assert live.files() == before and live.json("list", "web") == []
        live.run("create", "web", "s1", "--quiesce=try")
        held = live.json("show", "web", "s1")["config"]["window"]
        assert not held["quiesced"] and "no guest agent channel" in held["quiesce_problem"]
    finally:
        qemu.kill()


def test_a_silent_agent_is_a_deadline_and_leaves_nothing_frozen_or_paused(booted):
    live = booted
    live.qemu.sh("(sleep 1; kill -STOP $(pidof qemu-ga)) >/dev/null 2>&1 &")
    time.sleep(3)
    names, before = live.snapshot_names(), live.files()
    started = time.monotonic()
    r = live.run("create", "web", "q4", "--quiesce", check=False)
    took = time.monotonic() - started
    assert r.returncode == 1 and "did not answer within" in r.stderr, r.stderr
    assert took < AGENT_SECONDS + 15, took  # the deadline, plus starting snapfw on a loaded machine
    assert live.snapshot_names() == names and live.files() == before
    live.run("create", "web", "q4", "--quiesce=try")
    held = live.json("show", "web", "q4")["config"]["window"]
    assert not held["quiesced"] and "did not answer" in held["quiesce_problem"]
    assert live.qemu.qmp("query-status")["status"] == "running"
    assert "No problems found" in live.run("check", "web").stdout
