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
from snapfw.hookspecs import hookimpl
from snapfw_external import ExternalBackend

class Demo(ExternalBackend):
    name = "demo"

@hookimpl
def snapfw_disk_backends():
    return [Demo]
''',
    "audit": '''
from snapfw.hookspecs import hookimpl

@hookimpl
def snapfw_pre_snapshot(domain, name):
    pass
''',
    "broken": '''
import snapfw_no_such_library
''',
    "dup": '''
from snapfw.hookspecs import hookimpl
from snapfw_external import ExternalBackend

class Dup(ExternalBackend):
    pass  # name "external", already taken

@hookimpl
def snapfw_disk_backends():
    return [Dup]
''',
    "notaclass": '''
from snapfw.hookspecs import hookimpl

@hookimpl
def snapfw_disk_backends():
    return ["qcow2"]
''',
    "liars": '''
from snapfw.backend import OFFLINE_CREATE, OFFLINE_DELETE
from snapfw.errors import NotSupported
from snapfw.hookspecs import hookimpl
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
    assert {row["name"] for row in json.loads(r.stdout)} == {"external", "images", "qmp", "qemu", "qemu+unix"}
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
    assert "2 failed, 1 passed, 1 skipped" in r.stdout, r.stdout
    assert ("revert worked on backend hides although 'offline.revert' is not in its capabilities: declare it, "
            "or raise snapfw.errors.NotSupported") in r.stdout
    assert "FAILED test_liars.py::TestHides::test_operations_not_declared_raise_not_supported" in r.stdout
    assert "FAILED test_liars.py::TestClaims::test_chain" in r.stdout
    assert "snapfw.errors.NotSupported: claims cannot revert after all" in r.stdout
