"""CLI contract: JSON shapes, progress lines, plugin listing, and what `list` may import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import KIB64


def test_list_of_a_domain_without_snapshots_and_of_an_unknown_one(env):
    env.make_domain("web")
    assert env.json("list", "web") == []
    r = env.run("list", "nosuch", check=False)
    assert r.returncode == 2 and r.stderr.startswith("snapfw: error:") and "nosuch" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_domains_lists_each_domain_with_its_state_and_snapshots(env):
    env.make_domain("web")
    env.make_domain("db", disks=(("vda", "raw"),))
    env.run("create", "web", "s1")
    env.run("create", "web", "s2")
    env.write_domain("broken", "disks: [")
    rows = env.json("domains")
    assert rows[:2] == [{"name": "broken", "state": "unknown", "snapshots": 0, "current": None,
                         "problem": rows[0].get("problem")},
                        {"name": "db", "state": "shut off", "snapshots": 0, "current": None}]
    assert "broken" in rows[0]["problem"]
    assert rows[2] == {"name": "web", "state": "shut off", "snapshots": 2, "current": "s2"}
    lines = env.run("domains").stdout.splitlines()
    assert lines[0].split() == ["Name", "State", "Snapshots", "Current"]
    assert lines[3].split() == ["db", "shut", "off", "0", "-"] and lines[4].split() == ["web", "shut", "off", "2", "s2"]
    assert lines[5].startswith("broken: ")


def test_list_json_shape(env):
    env.make_domain("web", backends={"vda": "qcow2", "vdb": "external"})
    env.run("create", "web", "s1", "--description", "d")
    [s] = env.json("list", "web")
    assert s["name"] == "s1" and s["parent"] is None and s["current"] is True
    assert s["disks"] == [{"target": "vda", "backend": "qcow2"}, {"target": "vdb", "backend": "external"}]
    assert s["created"].endswith("+00:00")


def test_json_progress_lines_for_long_steps(env):
    env.make_domain("web", disks=(("vda", "qcow2"),), backends={"vda": "external"}, size="64M")
    env.write("web", "vda", 0x41, 0)
    env.run("create", "web", "s1")
    for i in range(8):
        env.write("web", "vda", 0x42, (i + 1) * 16 * KIB64)
    env.run("create", "web", "s2")
    r = env.run("delete", "web", "s1", "--json")
    lines = [json.loads(ln) for ln in r.stderr.splitlines()]
    assert any(ln["event"] == "step" and ("commit" in ln["step"] or "stream" in ln["step"]) for ln in lines)
    progress = [ln["percent"] for ln in lines if ln["event"] == "progress"]
    assert progress and progress[-1] == 100.0
    assert json.loads(r.stdout)["plan"]["bytes_to_copy"] > 0


def test_plugins_lists_builtin_backends_and_driver(env):
    rows = env.json("plugins")
    by_name = {r["name"]: r for r in rows}
    assert by_name["qcow2"]["kind"] == "disk backend" and "offline.revert" in by_name["qcow2"]["capabilities"]
    assert by_name["external"]["plugin"] == "snapfw_external"
    assert by_name["images"]["kind"] == "hypervisor driver"
    assert "qcow2" in env.run("plugins").stdout


def test_list_imports_nothing_heavy(env):
    """The `list` path must not pay for sh, rich, pluggy, entry points, the lifecycle, click or the model's
    dataclasses (bench target)."""
    env.make_domain("web")
    env.run("create", "web", "s1")
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "snapfw", "--connect", env.uri, "list", "web"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 0 and "s1" in r.stdout
    imported = {ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    for heavy in ("sh", "rich", "pluggy", "importlib.metadata", "snapfw.lifecycle", "snapfw.tools.run", "yaml",
                  "click", "dataclasses"):
        assert heavy not in imported, f"`snapfw list` imported {heavy}"


def test_an_unchanged_domain_file_is_not_parsed_again(env):
    """A change reads every domain file; one whose text snapfw has seen is taken from the cache without
    importing PyYAML (bench target); so is one snapfw rewrote (an external snapshot's new active file). A
    file rewritten behind snapfw's back, same size and same mtime, is read again: the cache is keyed by
    the text itself."""
    env.make_domain("web", disks=(("vda", "qcow2"),), backends={"vda": "external"})
    env.make_domain("db", disks=(("vda", "qcow2"),))
    env.run("create", "web", "s1")

    def imported(*args):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "snapfw", "--connect", env.uri, *args],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return {ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}

    assert "yaml" not in imported("list", "web") | imported("delete", "web", "s1", "--dry-run")
    env.run("create", "web", "s2")  # rewrites web.yaml (its vda is the new overlay)
    assert "yaml" not in imported("delete", "web", "s1", "--dry-run")
    path = os.path.join(env.dir, "db.yaml")
    st = os.stat(path)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:  # the same length: db's vda becomes a file that does not exist
        f.write(text.replace("db-vda.qcow2", "db-vdX.qcow2"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = env.run("create", "db", "s1", check=False)
    assert r.returncode != 0 and "db-vdX.qcow2" in r.stderr


def test_yaml_documents_sharing_a_cache_slot_are_each_read_right(tmp_path, monkeypatch):
    """The cache keeps each document in a slot of its own, by a hash of its path (a command reads only the
    slots of its files); two paths in one slot take turns in it, each read as its own text says."""
    from snapfw import yamlfiles

    monkeypatch.setattr(yamlfiles, "SLOTS", 1)
    paths = [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    for n, p in enumerate(paths):
        p.write_text(f"disks: [{{target: vd{n}}}]\n")
    for _ in range(2):  # the second time from the cache, as far as the slot holds
        for n, p in enumerate(paths):
            assert yamlfiles.load(str(p)) == {"disks": [{"target": f"vd{n}"}]}
        yamlfiles._write()
        monkeypatch.setattr(yamlfiles, "_read", {})
    held = [p for p in paths if yamlfiles._cached(str(p)) is not None]
    assert len(held) == 1 and yamlfiles._cached(str(held[0]))[0] == held[0].read_text()


def test_usage_errors_are_one_line(env):
    env.make_domain("web")
    r = env.run("create", "web", "s1", "--disk", "vda", check=False)
    assert r.returncode == 2 and "TARGET=BACKEND" in r.stderr and "Traceback" not in r.stderr


def test_check_reports_a_catalog_disagreeing_with_the_disks(env):
    env.make_domain("web", disks=(("vda", "qcow2"),), backends={"vda": "external"})
    env.run("create", "web", "s1")
    overlay, _ = env.domain()["vda"]
    frozen = env.json("show", "web", "s1")["disks"][0]["file"]
    assert env.run("check").stdout.strip() == "No problems found."
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "", overlay], check=True)
    r = env.run("check", check=False)
    assert r.returncode == 1 and "disagree" in r.stdout and overlay in r.stdout
    refused = env.run("create", "web", "s2", check=False)
    assert refused.returncode == 1 and "snapfw check" in refused.stderr
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", frozen, "-F", "qcow2", overlay], check=True)
    assert env.run("check").stdout.strip() == "No problems found."
    os.unlink(frozen)
    assert "missing on disk" in env.run("check", check=False).stdout
