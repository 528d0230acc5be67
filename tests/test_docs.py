"""The documentation stays true: every hook has a PLUGINS.md section, the examples run, the README's
commands are the ones CI runs, and the quick start works."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

from conftest import reads, require

from snapfw import hookspecs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_every_hook_is_documented_and_every_section_is_a_hook():
    hooks = {n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("snapfw_")}
    assert all(inspect.getdoc(getattr(hookspecs, h)) for h in hooks), "a hookspec has no docstring"
    sections = set(re.findall(r"^### (snapfw_\w+)\s*$", _read("PLUGINS.md"), re.M))
    assert hooks - sections == set(), f"hooks without a PLUGINS.md section: {hooks - sections}"
    assert sections - hooks == set(), f"PLUGINS.md sections for hooks that do not exist: {sections - hooks}"


def test_plugins_md_backend_example_works(env, tmp_path):
    """The minimal backend in PLUGINS.md, registered like a third-party plugin, runs create/revert/delete."""
    code = re.search(r'```python\n("""snapfw_mybackend.*?)```', _read("PLUGINS.md"), re.S).group(1)
    (tmp_path / "snapfw_mybackend.py").write_text(code)
    env.make_domain("web", disks=(("vda", "qcow2"),))
    script = (
        "import sys, snapfw_mybackend\n"
        "from snapfw import plugins\n"
        "plugins.get_plugin_manager().register(snapfw_mybackend, 'mybackend')\n"
        "from snapfw.cli import main\n"
        "main(sys.argv[1:], prog_name='snapfw')\n")
    pypath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])

    def snapfw(*args):
        r = subprocess.run([sys.executable, "-c", script, "--connect", env.uri, *args], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": pypath})
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert "mybackend" in snapfw("plugins", "--json")
    env.write("web", "vda", 0x31, 0)
    snapfw("create", "web", "a", "--disk", "vda=mybackend")
    env.write("web", "vda", 0x32, 65536)
    snapfw("create", "web", "b", "--disk", "vda=mybackend")
    snapfw("revert", "web", "a")
    assert env.reads("web", "vda", 0x31, 0) and env.reads("web", "vda", 0, 65536)
    snapfw("delete", "web", "a")
    assert env.reads("web", "vda", 0x31, 0)
    env.assert_consistent()


def test_readme_test_command_is_what_ci_runs():
    readme = _read("README.md")
    commands = re.findall(r"^# (\d)\. .*\n(.+)$", readme, re.M)
    assert [n for n, _ in commands] == ["1", "2"]
    ci_last = [ln for ln in _read(".ci/run").splitlines() if ln.strip() and not ln.startswith("#")][-1]
    assert ci_last.strip() == commands[1][1].strip()


def test_readme_install_command_installs_what_ci_installs():
    """A fresh machine that ran command 1 has every program the suite needs (command 2 then skips nothing)."""
    install = re.findall(r"^# 1\. .*\n(.+)$", _read("README.md"), re.M)[0]
    ci = re.search(r"^for p in (.+); do$", _read(".ci/run"), re.M).group(1).split()
    assert set(ci) <= set(install.split()), f"README command 1 lacks {sorted(set(ci) - set(install.split()))}"


def test_quickstart_runs_and_shows_what_the_readme_says(tmp_path):
    require("qemu-img")
    bindir = os.path.dirname(sys.executable)
    r = subprocess.run(["sh", os.path.join(ROOT, "contrib", "quickstart.sh"), str(tmp_path)], capture_output=True,
                       text=True, env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    assert "└── experiment (current)" in r.stdout
    assert "Snapshot after-upgrade of demo deleted." in r.stdout
    assert reads(str(tmp_path / "demo-vda.qcow2"), "qcow2", 0x11, 0)
