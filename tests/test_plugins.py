"""Plugin loading as a third party meets it: real entry points (a dist-info with entry_points.txt on
PYTHONPATH, what pip installs), warnings and errors that name the plugin, versions in `snapfw plugins`,
and the conformance kit catching backends that lie about their capabilities."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import snapfw

PLUGINS = {  # entry point name -> module source
    "demo": '''
from snapfw.api import hookimpl
from snapfw_external import ExternalBackend

class Demo(ExternalBackend):
    name = "demo"

@hookimpl
def snapfw_disk_backends():
    return [Demo]
''',
    "audit": '''
from snapfw.api import hookimpl

@hookimpl
def snapfw_pre_snapshot(domain, name):
    pass
''',
    "notepost": '''
import os
from snapfw.hookspecs import hookimpl

@hookimpl
def snapfw_post_snapshot(domain, snapshot):
    with open(os.environ["NOTEPOST_FILE"], "a") as f:
        f.write(snapshot.name)
''',
    "failpost": '''
from snapfw.hookspecs import hookimpl

@hookimpl
def snapfw_post_snapshot(domain, snapshot):
    raise ValueError(f"cannot notify about {snapshot.name}")
''',
    "failpre": '''
from snapfw.hookspecs import hookimpl

@hookimpl
def snapfw_pre_snapshot(domain, name):
    {}["x"]
''',
    "nocaps": '''
from snapfw.hookspecs import hookimpl
from snapfw_external import ExternalBackend

class NoCaps(ExternalBackend):
    name = "nocaps"
    capabilities = None

@hookimpl
def snapfw_disk_backends():
    return [NoCaps]
''',
    "broken": '''
import snapfw_no_such_library
''',
    "dup": '''
from snapfw.api import hookimpl
from snapfw_external import ExternalBackend

class Dup(ExternalBackend):
    pass  # name "external", already taken

@hookimpl
def snapfw_disk_backends():
    return [Dup]
''',
    "notaclass": '''
from snapfw.api import hookimpl

@hookimpl
def snapfw_disk_backends():
    return ["qcow2"]
''',
    "liars": '''
from snapfw.api import OFFLINE_CREATE, OFFLINE_DELETE, NotSupported, hookimpl
from snapfw_external import ExternalBackend

class Hides(ExternalBackend):
    name = "hides"
    capabilities = frozenset({OFFLINE_CREATE, OFFLINE_DELETE})  # yet revert works

class Claims(ExternalBackend):
    name = "claims"  # says offline.revert like its base class, then refuses

    def revert(self, op, snapshot, record):
        raise NotSupported("claims cannot revert after all")

@hookimpl
def snapfw_disk_backends():
    return [Hides, Claims]
''',
    "elsewhere": '''
from snapfw.api import hookimpl
from snapfw_images import ImagesDriver

class Elsewhere(ImagesDriver):
    scheme = "elsewhere"
    state_dir = "{path}-state"  # next to the directory, not in it

@hookimpl
def snapfw_hypervisor_drivers():
    return [Elsewhere]
''',
}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A directory holding the test plugins as one installed distribution, snapfw-testplugins 1.2.3."""
    root = tmp_path_factory.mktemp("site")
    for name, code in PLUGINS.items():
        (root / f"testplugin_{name}.py").write_text(code)
    info = root / "snapfw_testplugins-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: snapfw-testplugins\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[snapfw]\n" + "".join(f"{n} = testplugin_{n}\n" for n in PLUGINS))
    return str(root)


def plugin_env(site: str, *enabled: str, disable: str = "") -> dict:
    """Environment for a subprocess that sees the test plugins, all but ``enabled`` blocked."""
    blocked = [n for n in PLUGINS if n not in enabled] + [n for n in disable.split(",") if n]
    return {"PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])),
            "SNAPFW_DISABLE_PLUGINS": ",".join(blocked)}


def test_entry_point_plugins_are_listed_with_their_versions(env, site):
    listed = env.run("plugins", "--json", env=plugin_env(site, "demo", "audit")).stdout
    rows = {r["name"]: r for r in json.loads(listed)}
    assert (rows["demo"]["kind"], rows["demo"]["plugin"], rows["demo"]["version"]) == ("disk backend", "demo", "1.2.3")
    assert rows["qcow2"]["version"] == rows["images"]["version"] == snapfw.__version__
    assert (rows["audit"]["kind"], rows["audit"]["description"]) == ("hooks", "snapfw_pre_snapshot")
    assert "1.2.3" in env.run("plugins", env=plugin_env(site, "demo")).stdout


def test_a_plugin_that_fails_to_import_is_skipped_with_a_warning_naming_it(env, site):
    r = env.run("plugins", "--json", env=plugin_env(site, "broken", "demo"))
    assert r.stderr.startswith("snapfw: warning: snapfw plugin 'broken' (testplugin_broken) skipped: "
                               "ModuleNotFoundError"), r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert {"demo", "qcow2"} <= {row["name"] for row in json.loads(r.stdout)}


def test_disable_plugins_blocks_third_party_and_builtin_ones_by_name(env, site):
    r = env.run("plugins", "--json", env=plugin_env(site, "demo", "broken", disable="broken,demo,snapfw_qcow2"))
    assert {row["name"] for row in json.loads(r.stdout)} == {"external", "lvm", "images", "qmp", "qemu", "qemu+unix", "libvirt"}
    assert r.stderr == ""


def test_two_backends_with_one_name_are_an_error_naming_both_plugins(env, site):
    r = env.run("plugins", env=plugin_env(site, "dup"), check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert ("plugins 'snapfw_external' and 'dup' both provide disk backend 'external'; disable one with "
            "SNAPFW_DISABLE_PLUGINS") in r.stderr
    assert env.run("plugins", env=plugin_env(site, "dup", disable="dup")).returncode == 0


def test_a_registration_hook_returning_a_non_backend_is_an_error_naming_the_plugin(env, site):
    r = env.run("plugins", env=plugin_env(site, "notaclass"), check=False)
    assert r.returncode == 1 and "plugin 'notaclass' returned 'qcow2' from snapfw_disk_backends" in r.stderr


def test_a_post_hook_that_raises_anything_is_a_warning_after_the_change(env, site, tmp_path):
    """failpost, registered last, is called first: notepost's hook still runs after it failed."""
    env.make_domain("web")
    note = tmp_path / "note"
    r = env.run("create", "web", "s1", env={**plugin_env(site, "notepost", "failpost"), "NOTEPOST_FILE": str(note)})
    assert r.stderr == ("snapfw: warning: snapshot s1 of web was created, but the snapfw_post_snapshot hook of "
                        "plugin 'failpost' failed: ValueError: cannot notify about s1\n"), r.stderr
    assert "created" in r.stdout and env.snapshot_names() == ["s1"] and note.read_text() == "s1"
    assert env.run("check").stdout.strip() == "No problems found."


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(env, site):
    env.make_domain("web")
    before = env.state()
    r = env.run("create", "web", "s1", env=plugin_env(site, "failpre"), check=False)
    assert (r.returncode, r.stderr) == (1, "snapfw: error: internal error: KeyError: 'x' (run `snapfw check` to "
                                           "see whether anything is left to repair; --debug shows the traceback)\n")
    for debug_args, debug_env in (["--debug"], {}), ([], {"SNAPFW_DEBUG": "1"}):
        r = subprocess.run([sys.executable, "-m", "snapfw", *debug_args, "--connect", env.uri, "create", "web", "s1"],
                           capture_output=True, text=True,
                           env={**os.environ, **plugin_env(site, "failpre"), **debug_env})
        lines = r.stderr.splitlines()
        assert r.returncode == 1 and lines[0] == "Traceback (most recent call last):", r.stderr
        assert 'testplugin_failpre.py", line 6, in snapfw_pre_snapshot' in r.stderr
        assert lines[-1] == "snapfw: error: internal error: KeyError: 'x'", r.stderr
    assert env.state() == before and env.snapshot_names() == []
    r = env.run("plugins", env=plugin_env(site, "nocaps"), check=False)  # reads only: nothing to check after it
    assert (r.returncode, r.stderr) == (1, "snapfw: error: internal error: TypeError: 'NoneType' object is not "
                                           "iterable (--debug shows the traceback)\n"), r.stderr


def test_the_conformance_kit_catches_backends_lying_about_capabilities(tmp_path, site):
    """Run as a plugin author would: pytest on a module subclassing BackendConformance."""
    (tmp_path / "test_liars.py").write_text('''
import pytest
from snapfw.testing import BackendConformance

class TestHides(BackendConformance):
    @pytest.fixture
    def snapfw_backend(self):
        return "hides"

class TestClaims(BackendConformance):
    @pytest.fixture
    def snapfw_backend(self):
        return "claims"
''')
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not_declared or chain",
                        "test_liars.py"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, **plugin_env(site, "liars")})
    # test_live_chain: claims inherits external's live.create, so the live kit catches it too; hides has no live.*
    assert "3 failed, 1 passed, 2 skipped" in r.stdout, r.stdout
    assert ("revert worked on backend hides although 'offline.revert' is not in its capabilities: declare it, "
            "or raise snapfw.api.NotSupported") in r.stdout
    assert "FAILED test_liars.py::TestHides::test_operations_not_declared_raise_not_supported" in r.stdout
    assert "FAILED test_liars.py::TestClaims::test_chain" in r.stdout
    assert "FAILED test_liars.py::TestClaims::test_live_chain" in r.stdout
    assert "snapfw.errors.NotSupported: claims cannot revert after all" in r.stdout


def test_a_driver_says_where_its_catalog_lives_and_list_finds_it_without_loading_plugins(env, site):
    """The core knows no driver's state directory: it takes the driver's ``state_dir``, and `list` reads
    the note a session made of it instead of loading pluggy and the plugins."""
    env.make_domain("web")

    def snapfw(*args):
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                           env={**os.environ, **plugin_env(site, "elsewhere")})
        assert r.returncode == 0, r.stderr
        return r

    snapfw("-m", "snapfw", "--connect", f"elsewhere://{env.dir}", "create", "web", "s1")
    assert os.path.exists(f"{env.dir}-state/catalog.sqlite") and not os.path.exists(f"{env.dir}/.snapfw")
    r = snapfw("-X", "importtime", "-m", "snapfw", "--connect", f"elsewhere://{env.dir}", "list", "web")
    assert "s1" in r.stdout
    assert "pluggy" not in {ln.split("|")[-1].strip() for ln in r.stderr.splitlines()}


def test_entry_points_found_once_are_found_again_after_pip_changes_the_site(env, tmp_path):
    """The entry-point scan is cached, keyed by the installed distributions: installing, upgrading or
    removing one in a directory already on the path shows at once, and an unchanged site imports no
    importlib.metadata (the scan's cost)."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "testplugin_demo.py").write_text(PLUGINS["demo"])

    def install(version):
        info = root / f"snapfw_testplugins-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: snapfw-testplugins\nVersion: {version}\n")
        (info / "entry_points.txt").write_text("[snapfw]\ndemo = testplugin_demo\n")
        return info

    def demo_version(*python_args, cwd=None):
        r = subprocess.run([sys.executable, *python_args, "-m", "snapfw", "plugins", "--json"], capture_output=True,
                           text=True, env={**os.environ, **plugin_env(str(root), "demo")}, cwd=cwd)
        assert r.returncode == 0, r.stderr
        return {row["name"]: row["version"] for row in json.loads(r.stdout)}.get("demo"), r.stderr

    assert demo_version()[0] is None
    old = install("1.0")
    assert demo_version()[0] == "1.0"
    version, imports = demo_version("-X", "importtime")
    assert version == "1.0" and "importlib.metadata" not in {ln.split("|")[-1].strip() for ln in imports.splitlines()}
    elsewhere = tmp_path / "elsewhere"  # `python -m` there: another sys.path[0], so another key, scanned once
    elsewhere.mkdir()
    assert demo_version(cwd=elsewhere)[0] == "1.0"
    version, imports = demo_version("-X", "importtime")  # and the first key's scan is still cached
    assert version == "1.0" and "importlib.metadata" not in {ln.split("|")[-1].strip() for ln in imports.splitlines()}
    for f in old.iterdir():  # pip's upgrade: the old dist-info goes, the new one comes
        f.unlink()
    old.rmdir()
    install("2.0")
    assert demo_version()[0] == "2.0"
    new = root / "snapfw_testplugins-2.0.dist-info"
    (new / "entry_points.txt").write_text("[snapfw]\n")  # rewritten in place: the plugin is gone
    assert demo_version()[0] is None


def test_a_stale_note_of_where_catalogs_live_never_decides_where_a_change_goes(env, site):
    """Reading commands trust the note of each driver's ``state_dir`` (no plugin loaded); a change asks the
    driver itself, corrects the note, and makes its catalog only where the driver says."""
    from snapfw import connection

    env.make_domain("web")
    noted = connection.read_cache(connection.KNOWN_STATE_DIRS) or {}
    connection.write_cache(connection.KNOWN_STATE_DIRS, {**noted, "elsewhere": "{path}-old"})
    uri = f"elsewhere://{env.dir}"
    env.run("--connect", uri, "create", "web", "s1", env=plugin_env(site, "elsewhere"))
    assert os.path.exists(f"{env.dir}-state/catalog.sqlite") and not os.path.exists(f"{env.dir}-old")
    assert connection.known_state_dir(uri) == f"{env.dir}-state"
    listed = env.run("--connect", uri, "list", "web", "--json", env=plugin_env(site, "elsewhere")).stdout
    assert [s["name"] for s in json.loads(listed)] == ["s1"]


def test_the_built_in_plugins_are_registered_once_for_every_command(monkeypatch):
    """The resident interpreter makes the manager with the built-in plugins before it forks a worker per
    command (snapfw.resident); a command that disables none takes that one, and a third party's entry
    points join it there."""
    from snapfw import plugins, resident

    monkeypatch.delenv(plugins.DISABLE_ENV, raising=False)
    plugins.reset()
    try:
        resident.preload()  # what the resident interpreter does before it forks
        assert plugins.with_builtins.cache_info().currsize == 1
        plugins.get_plugin_manager()  # what a worker's command does: no second manager
        assert plugins.with_builtins.cache_info()[:4] == (1, 1, None, 1)  # hits, misses, maxsize, currsize
        assert {name for name, _ in plugins.loaded()} >= set(plugins.BUILTIN)
    finally:
        plugins.reset()
