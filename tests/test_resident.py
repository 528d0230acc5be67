"""The resident interpreter (snapfw.tools.resident): commands handed to an interpreter that has imported
snapfw already behave exactly as commands run in their own: same output, exit status, signals, faults and
recovery; it declines what it cannot take over (another context, an upgrade) and goes away when idle.

Each test gets a resident interpreter of its own: a PYTHON* variable is part of the context that names it.
Which process ran a command is told by a `qemu-img` wrapper first on PATH that records its ancestors (a
resident interpreter among them when a worker forked from it ran the command)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import exited_within

import snapfw.tools.resident as resident_module


TIME = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[^\s\"]*( \+0000)?")


@pytest.fixture
def own(env, tmp_path):
    """Environment for commands with a resident interpreter of this test's own, and a qemu-img wrapper."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "parents"
    wrapper = bin_dir / "qemu-img"
    wrapper.write_text(f"#!/bin/sh\np=$PPID; a=; while [ $p -gt 1 ]; do a=\"$a $p\"; p=$(ps -o ppid= -p $p); done\n"
                       f"echo $a >> {log}\n"
                       '[ -n "$SLOW_QEMU_IMG" ] && [ "$1" = snapshot ] && : > "$SLOW_QEMU_IMG" && sleep 3\n'
                       'exec /usr/bin/qemu-img "$@"\n')
    wrapper.chmod(0o755)
    variables = {"PYTHONSNAPFWTEST": str(tmp_path), "SNAPFW_RESIDENT": "30",
                 "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.make_domain("web")
    # the commands start with the signals they forward not ignored, whatever this test run was started with
    # (`cmd &` in a script ignores SIGINT and SIGQUIT, nohup SIGHUP: then so do its commands and their
    # resident interpreter, which is right for them, but not what these tests are about)
    previous = {n: signal.signal(n, signal.default_int_handler if n == signal.SIGINT else signal.SIG_DFL)
                for n in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    try:
        yield variables, log
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for pid in residents(str(tmp_path)):
            os.kill(pid, signal.SIGTERM)


def residents(marker: str) -> list[int]:
    """The resident interpreters started with PYTHONSNAPFWTEST=marker."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if not _is_resident(int(pid)):
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"PYTHONSNAPFWTEST={marker}".encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            continue
    return found


def started(env, variables) -> int:
    """Run one command (which starts the resident interpreter) and wait for it to listen."""
    env.run("list", "web", env=variables)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listening = [pid for pid in residents(variables["PYTHONSNAPFWTEST"]) if _listening(pid)]
        if listening:
            return listening[0]
        time.sleep(0.05)
    raise AssertionError("no resident interpreter started")


def _listening(pid: int) -> bool:
    """True once ``pid`` has a socket bound to a resident interpreter's address (/proc/net/unix)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            inodes.add(os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1])
        except OSError:  # closed meanwhile
            continue
    with open("/proc/net/unix") as f:
        rows = [line.split() for line in f]
    return any(len(row) == 8 and row[6] in inodes and row[7].startswith("@snapfw-resident-") for row in rows)


def ran_in(log) -> list[bool]:
    """For each qemu-img run since the last call: was it run by a worker of a resident interpreter?"""
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return [any(_is_resident(int(pid)) for pid in line.split()) for line in lines]


def _is_resident(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"snapfw.resident" in f.read()
    except OSError:
        return False


def test_a_command_runs_in_the_resident_interpreter_as_it_would_alone(env, own):
    variables, log = own
    started(env, variables)
    outcomes = {}
    for mode in ("resident", "alone"):
        extra = {**variables, "SNAPFW_RESIDENT": "0"} if mode == "alone" else variables
        runs = [env.run(*args, check=False, env=extra) for args in (
            ("create", "web", f"s-{mode}", "--description", "été, \"quoted\""),
            ("list", "web", "--json"), ("show", "web", f"s-{mode}"), ("show", "web", "nosuch"),
            ("create", "web", "bad/name"), ("list", "web", "--no-such-flag"), ("--version",),
            ("delete", "web", f"s-{mode}"))]
        outcomes[mode] = [(r.returncode, TIME.sub("TIME", r.stdout.replace(mode, "MODE")), r.stderr) for r in runs]
        served = ran_in(log)
        assert served and all(s == (mode == "resident") for s in served), (mode, served)
    assert outcomes["resident"] == outcomes["alone"]
    assert [code for code, _, _ in outcomes["resident"]] == [0, 0, 0, 2, 2, 2, 0, 0]


def test_faults_signals_and_kills_reach_the_worker(env, own):
    """SNAPFW_FAULT kill/term in the worker, SIGTERM and SIGKILL sent to the command while its qemu-img
    runs: the same exit status as a command alone, the operation undone, `check` clean."""
    variables, log = own
    started(env, variables)
    before = env.layout()
    for mode in ("resident", "alone"):
        extra = {**variables, "SNAPFW_RESIDENT": "0"} if mode == "alone" else variables
        killed = env.run("create", "web", "k", check=False, env={**extra, "SNAPFW_FAULT": "prepare:1:kill"})
        assert killed.returncode == -signal.SIGKILL, (mode, killed)
        env.run("check", "--repair", env=extra)
        termed = env.run("create", "web", "t", check=False, env={**extra, "SNAPFW_FAULT": "prepare:1:term"})
        assert termed.returncode not in (0, -signal.SIGKILL), (mode, termed)
        for sent in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
            slow = env.dir + "/../qemu-img-snapshot-started"
            proc = subprocess.Popen([sys.executable, "-m", "snapfw", "--connect", env.uri, "create", "web", "x"],
                                    env={**os.environ, **extra, "SLOW_QEMU_IMG": slow}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 20
            while not os.path.exists(slow) and time.monotonic() < deadline:  # its qemu-img snapshot: 3 s
                time.sleep(0.02)
            os.unlink(slow)
            proc.send_signal(sent)
            out, err = proc.communicate(timeout=30)
            if sent == signal.SIGKILL:
                assert proc.returncode == -signal.SIGKILL
                time.sleep(0.5)  # the worker is killed by the resident interpreter once it sees the command gone
            else:
                assert proc.returncode not in (0, -signal.SIGKILL), (mode, sent, proc.returncode, err)
            env.run("check", "--repair", env=extra)
            assert env.snapshot_names() == [], (mode, sent, err)
            assert env.layout() == before, (mode, sent)
        ran_in(log)
    env.run("check")


def test_another_context_or_an_upgrade_is_declined(env, own):
    variables, log = own
    pid = started(env, variables)
    env.run("list", "web", env=variables)
    env.run("create", "web", "a", env={**variables, "PYTHONHASHSEED": "7"})  # another context: run alone
    assert not any(ran_in(log))
    # started with SIGINT ignored (`snapfw ... &` in a script): it must keep ignoring Ctrl-C, so it runs alone
    subprocess.run([sys.executable, "-m", "snapfw", "--connect", env.uri, "delete", "web", "a"], check=True,
                   env={**os.environ, **variables}, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert not any(ran_in(log))
    env.run("create", "web", "a", env={**variables, "LC_ALL": "C"})  # another locale
    assert not any(ran_in(log))
    env.run("create", "web", "b", env=variables)
    served = ran_in(log)
    assert served and all(served)
    # an upgrade: a file it imported changes; the next command runs alone and the interpreter goes away
    path = resident_module.__file__
    st = os.stat(path)
    try:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        env.run("create", "web", "c", env=variables)
        assert not any(ran_in(log))
        assert exited_within(pid, 10)
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert env.snapshot_names() == ["a", "b", "c"]


def test_an_idle_resident_interpreter_goes_away(env, own):
    variables, _ = own
    pid = started(env, {**variables, "SNAPFW_RESIDENT": "1"})
    assert exited_within(pid, 10)
    spares = residents(variables["PYTHONSNAPFWTEST"])  # the worker it forked for the next command ends with it
    assert all(exited_within(spare, 10) for spare in spares), spares


def test_a_spare_worker_killed_is_replaced(env, own):
    """The resident interpreter forks the next command's worker before the command comes; one killed
    meanwhile costs nothing but a new fork."""
    variables, log = own
    pid = started(env, variables)
    deadline = time.monotonic() + 10
    while not (spares := [p for p in residents(variables["PYTHONSNAPFWTEST"]) if p != pid]):
        assert time.monotonic() < deadline, "no spare worker forked"
        time.sleep(0.05)
    ran_in(log)
    os.kill(spares[0], signal.SIGKILL)
    env.run("create", "web", "a", env=variables)
    served = ran_in(log)
    assert served and all(served)
    env.run("delete", "web", "a", env=variables)
    served = ran_in(log)
    assert served and all(served)
    assert env.snapshot_names() == []


def test_a_worker_imports_nothing_for_the_everyday_commands(env):
    """What the resident interpreter does before it forks (snapfw.resident.preload: its modules, LAZY, the
    built-in plugins' manager) is all that list, show, create, revert and delete import: a module one of
    them imports first in the worker costs every command that loads it (a codec alone took 1 ms)."""
    env.make_domain("web")
    program = f"""if True:
        import json, os, sys
        import snapfw.resident as preload
        preload.preload()
        found = {{}}
        for args in {[["create", "web", "s1"], ["create", "web", "s2"], ["list", "web"], ["show", "web", "s1"],
                      ["revert", "web", "s1"], ["delete", "web", "s2"]]!r}:
            r, w = os.pipe()
            if os.fork() == 0:
                before = set(sys.modules)
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                try:
                    preload.cli.run(["--connect", {env.uri!r}] + args)
                except SystemExit:
                    pass
                os.write(w, json.dumps(sorted(set(sys.modules) - before)).encode())
                os._exit(0)
            os.close(w)
            found[args[0]] = json.loads(os.read(r, 1 << 20))
            os.wait()
        print(json.dumps(found))
        """
    r = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(r.stdout) == {c: [] for c in ("create", "list", "show", "revert", "delete")}, r.stderr
