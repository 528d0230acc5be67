"""The command line's two readers agree: ``cli`` reads the plain forms of the everyday commands without
click (issue 21: importing click costs more than virsh's whole command), ``usage`` declares everything
with click. Every form either reader accepts must call the same command with the same arguments."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

from snapfw import cli, commands, usage

FORMS = [
    ["list", "web"],
    ["list", "web", "--tree"],
    ["list", "--json", "web", "--tree"],
    ["-c", "images:///srv/vms", "list", "web"],
    ["--connect", "images:///srv/vms", "--state-dir", "/tmp/st", "list", "web"],
    ["--connect=images:///a", "--connect", "images:///b", "show", "web", "s1"],
    ["--state-dir=/x", "show", "web", "s1", "--json"],
    ["create", "web", "s1"],
    ["create", "web", "s1", "--description", "before the upgrade", "--json"],
    ["create", "web", "s1", "--description=a=b", "--dry-run"],
    ["create", "web", "s1", "--description", ""],
    ["create", "web", ""],
    ["create", "web", "ünïcødé name"],
    ["create", "web", "s1", "--disk", "vda=external", "--disk=vdb=qcow2", "--memory", "live"],
    ["create", "web", "s1", "--memory=paused", "--memory", "none", "--disk", "vda"],
    ["revert", "web", "s1", "--keep-config"],
    ["revert", "web", "s1", "--running"],
    ["revert", "web", "s1", "--paused", "--stopped", "--json"],
    ["revert", "web", "s1", "--dry-run", "--json"],
    ["delete", "web", "s1", "--children", "--children"],
    ["delete", "--dry-run", "web", "s1"],
    ["-c", "", "delete", "web", "s1"],
]
# forms left to click: what cli reads must not go further than these
CLICK_ONLY = [
    [], ["--help"], ["list", "--help"], ["-h"], ["--version"], ["--debug", "list", "web"],
    ["--lock-timeout", "5", "create", "web", "s1"], ["create", "web", "s1", "--memory", "asleep"],
    ["create", "web", "s1", "--memory"], ["create", "web", "s1", "--disk", "--json"],
    ["create", "web", "s1", "--quiesce"], ["revert", "web", "s1", "--runnin"], ["list", "web", "extra"], ["list"], ["list", "web", "--tre"],
    ["list", "web", "--tree=1"], ["-c=images:///x", "list", "web"], ["-cimages:///x", "list", "web"],
    ["list", "--", "-web"], ["list", "-web"], ["create", "web", "s1", "--description", "-x"],
    ["--connect"], ["list", "web", "--connect", "images:///x"], ["create", "web", "s1", "--description"],
    ["check"], ["plugins"], ["domains"], ["export", "web"], ["clone", "web", "s1", "c1"],
]


BODIES = {name: getattr(commands, name) for name in ("list_", "show", "create", "revert", "delete")}


def _calls(monkeypatch, read):
    """What each reader calls for one command line: (command, shared options, arguments), with the
    command's own defaults filled in."""
    calls = []
    for name, real in BODIES.items():
        def record(o, *args, real=real, **kwargs):
            bound = inspect.signature(real).bind(o, *args, **kwargs)
            bound.apply_defaults()
            shared = {k: getattr(o, k) for k in ("uri", "state_dir", "lock_timeout", "debug", "command")}
            calls.append((real.__name__, shared, dict(list(bound.arguments.items())[1:])))

        monkeypatch.setattr(commands, name, record)

    def run(args):
        calls.clear()
        with pytest.raises(SystemExit) as exited:
            read(args)
        return exited.value.code, list(calls)
    return run


@pytest.mark.parametrize("args", FORMS, ids=" ".join)
def test_plain_forms_are_read_as_click_reads_them(monkeypatch, args):
    monkeypatch.delenv("SNAPFW_DEBUG", raising=False)
    assert cli.plain(args) is not None, "cli should read this form itself"
    by_cli = _calls(monkeypatch, cli.main)(args)
    by_click = _calls(monkeypatch, lambda a: usage.group.main(a, prog_name="snapfw"))(args)
    assert by_cli == by_click
    assert by_cli[0] == 0 and len(by_cli[1]) == 1


@pytest.mark.parametrize("args", CLICK_ONLY, ids=lambda a: " ".join(a) or "(none)")
def test_other_forms_go_to_click(monkeypatch, args):
    monkeypatch.delenv("SNAPFW_DEBUG", raising=False)
    assert cli.plain(args) is None


@pytest.mark.parametrize("value", ["1", "yes", "ON", " true ", "0", "off", "", "n"])
def test_snapfw_debug_is_read_as_click_reads_it(monkeypatch, value):
    monkeypatch.setenv("SNAPFW_DEBUG", value)
    args = ["list", "web"]
    assert _calls(monkeypatch, cli.main)(args) == _calls(monkeypatch, lambda a: usage.group.main(a))(args)


def test_an_invalid_snapfw_debug_gets_clicks_error(monkeypatch):
    monkeypatch.setenv("SNAPFW_DEBUG", "maybe")
    assert cli.plain(["list", "web"]) is None


def test_closed_stdout_ends_quietly_on_both_readers(env):
    """`snapfw list web | head -1` when head has gone: exit 1, nothing on stderr, on both readers."""
    env.make_domain("web")
    env.run("create", "web", "a")
    for extra in ([], ["--lock-timeout", "5"]):  # the plain form, then one click reads
        read, write = os.pipe()
        os.close(read)
        p = subprocess.run([sys.executable, "-m", "snapfw", *extra, "--connect", env.uri, "list", "web"],
                           stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
        os.close(write)
        assert (p.returncode, p.stderr) == (1, "")


def test_a_stream_closed_at_start_is_as_dev_null_on_both_readers(env):
    """`snapfw create web b >&-`: the command runs, its output goes nowhere, its status is its own (it was
    an internal error); an error still goes to stderr, if that is open."""
    env.make_domain("web")
    for extra, name in (([], "b"), (["--lock-timeout", "5"], "c")):  # the plain form, then one click reads
        p = subprocess.run([sys.executable, "-m", "snapfw", *extra, "--connect", env.uri, "create", "web", name],
                           stderr=subprocess.PIPE, text=True, timeout=60, preexec_fn=lambda: os.close(1))
        assert (p.returncode, p.stderr) == (0, "")
        p = subprocess.run([sys.executable, "-m", "snapfw", *extra, "--connect", env.uri, "show", "web", "nosuch"],
                           stderr=subprocess.PIPE, text=True, timeout=60, preexec_fn=lambda: os.close(1))
        assert p.returncode == 2 and "no snapshot 'nosuch'" in p.stderr
    assert env.snapshot_names() == ["b", "c"]
