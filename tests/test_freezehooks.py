"""Pre-freeze / post-thaw hook scripts from the configuration file, around live creates on a real running
QEMU (firmware only: the scripts run on the host, with or without --quiesce)."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from live import LiveEnv, Qemu


@pytest.fixture
def live(tmp_path):
    qemu = Qemu(str(tmp_path), name="web")
    qemu.start()
    yield LiveEnv(tmp_path, qemu)
    qemu.kill()


def script(folder, name: str, body: str) -> str:
    """An executable shell script that logs its phase, domain and snapshot, then runs ``body``."""
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\necho "$SNAPFW_PHASE $SNAPFW_DOMAIN $SNAPFW_SNAPSHOT {name}" >> {folder}/hooks.log\n'
                f"{body}\n")
    os.chmod(path, 0o755)
    return path


def configure(folder, hooks: list) -> dict:
    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"freeze_hooks": hooks}, f)
    return {"SNAPFW_CONFIG": path}


def log(folder) -> list[str]:
    try:
        with open(os.path.join(folder, "hooks.log")) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def test_hooks_run_in_order_around_the_snapshot_with_its_names(live, tmp_path):
    folder = str(tmp_path / "hooks")
    os.mkdir(folder)
    env = configure(folder, [
        {"phase": "pre-freeze", "run": [script(folder, "flush", "true")], "timeout": 5},
        {"phase": "pre-freeze", "run": script(folder, "elsewhere", "true"), "domains": ["other"]},
        {"phase": "post-thaw", "run": [script(folder, "unlock", "true")]},
    ])
    r = live.run("create", "web", "s1", "--json", env=env)
    steps = [json.loads(ln)["step"] for ln in r.stderr.splitlines() if '"event": "step"' in ln]
    assert steps[0] == "pre-freeze hooks of web (1 script(s))", steps
    assert "snapshot the disks of running web at once" in steps[1] and steps[2].startswith("point domain web")
    assert steps[3] == "post-thaw hooks of web (1 script(s))"  # the first finish step
    assert log(folder) == ["pre-freeze web s1 flush", "post-thaw web s1 unlock"]


def test_a_failing_or_late_pre_freeze_aborts_before_any_change_and_post_thaw_still_runs(live, tmp_path):
    folder = str(tmp_path / "hooks")
    os.mkdir(folder)
    before, chains = live.files(), live.qemu.active()
    for body, timeout, error in (("exit 3", 5, "exit code 3"), ("sleep 30", 1, "did not finish within 1 s")):
        env = configure(folder, [{"phase": "pre-freeze", "run": [script(folder, "flush", body)], "timeout": timeout},
                                 {"phase": "post-thaw", "run": [script(folder, "unlock", "true")]}])
        r = live.run("create", "web", "s1", env=env, check=False)
        assert r.returncode == 1 and "pre-freeze script" in r.stderr and error in r.stderr, r.stderr
        assert "snapshot s1 was not taken" in r.stderr
        assert live.files() == before and live.qemu.active() == chains and live.json("list", "web") == []
        assert log(folder)[-2:] == ["pre-freeze web s1 flush", "post-thaw web s1 unlock"]
    env = configure(folder, [{"phase": "pre-freeze", "run": [script(folder, "flush", "exit 3")],
                              "on_failure": "warn"},
                             {"phase": "post-thaw", "run": [script(folder, "unlock", "exit 4")]}])
    r = live.run("create", "web", "s1", env=env)
    assert "warning: pre-freeze script" in r.stderr and "warning: post-thaw script" in r.stderr, r.stderr
    assert live.snapshot_names() == ["s1"]


def test_kill_after_pre_freeze_then_repair_runs_post_thaw(live, tmp_path):
    folder = str(tmp_path / "hooks")
    os.mkdir(folder)
    env = configure(folder, [{"phase": "pre-freeze", "run": [script(folder, "flush", "true")]},
                             {"phase": "post-thaw", "run": [script(folder, "unlock", "true")]}])
    # prepare: [pre-freeze hooks, transaction, define]: die before the transaction
    r = live.run("create", "web", "s1", env={**env, "SNAPFW_FAULT": "prepare:1:kill"}, check=False)
    assert r.returncode == -9 and log(folder) == ["pre-freeze web s1 flush"]
    live.run("check", "web", "--repair", env=env)
    assert log(folder) == ["pre-freeze web s1 flush", "post-thaw web s1 unlock"]
    assert live.json("list", "web") == []


@pytest.mark.parametrize("hooks, error", [
    ("flush", "freeze_hooks must be a list of hooks"),
    ([{"phase": "pre-snapshot", "run": "/bin/true"}], "phase must be pre-freeze or post-thaw"),
    ([{"phase": "pre-freeze", "run": "/bin/true", "timeout": 0}], "timeout must be a positive number"),
    ([{"phase": "post-thaw", "run": "/bin/true", "on_failure": "warn"}], "on_failure must be abort or warn"),
    ([{"phase": "pre-freeze", "run": []}], "run must be a program or a list of its arguments"),
])
def test_a_bad_configuration_is_refused_before_any_change(live, tmp_path, hooks, error):
    before = live.files()
    r = live.run("create", "web", "s1", env=configure(str(tmp_path), hooks), check=False)
    assert r.returncode == 2 and "freeze_hooks" in r.stderr and error in r.stderr, r.stderr
    assert live.files() == before and live.json("list", "web") == []
