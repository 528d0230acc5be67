"""Smoke test of the benchmark runner: `python -m bench --snapfw-only` on 5 snapshots, JSON shape only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERIES_KEYS = {"argv", "median_s", "min_s", "max_s", "peak_rss_mib", "samples_s", "samples_peak_rss_kib"}


def _series(s, runs):
    assert set(s) == SERIES_KEYS
    assert len(s["samples_s"]) == len(s["samples_peak_rss_kib"]) == runs
    assert 0 < s["min_s"] <= s["median_s"] <= s["max_s"]
    assert s["peak_rss_mib"] is None or s["peak_rss_mib"] > 1


def test_bench_snapfw_only_json():
    require("qemu-img")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFW_")}
    r = subprocess.run([sys.executable, "-m", "bench", "--snapfw-only", "--no-live", "--counts", "5", "--repeat", "1",
                        "--clones", "2", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["snapfw_only"] is True and out["counts"] == [5] and out["repeat"] == 1
    assert out["libvirt_version"] is None and out["populate_s"]["libvirt"] == {} and out["live"] is None

    rows = {r["operation"]: r for r in out["rows"]}
    assert list(rows) == ["list", "show", "create", "revert", "delete"]
    for op, row in rows.items():
        assert row["count"] == 5 and row["virsh"] is None and row["ratio"] is None and row["pass"] is None
        _series(row["snapfw"], 1)
        assert op in row["snapfw"]["argv"]
    assert rows["list"]["snapfw"]["argv"][-2:] == ["list", "benchdom"]
    assert rows["create"]["snapfw"]["argv"][-1] == rows["delete"]["snapfw"]["argv"][-1] == "s5"
    assert rows["revert"]["snapfw"]["argv"][-1] == "s4"
    assert [r["max_ratio"] for r in rows.values()] == [1.5, 1.5, 1.2, 1.2, 1.2]

    c = out["clones"]
    assert c["count"] == 2 and c["virt_clone"] is None and c["max_ratio"] == 1.5 and c["ratio"] > 0
    for side in ("snapfw", "bare_loop"):
        assert len(c[side]["samples_s"]) == 1 and 0 < c[side]["new_bytes_per_clone"] < c["max_new_bytes_per_clone"]
    assert c["snapfw"]["argv"][-3:] == ["c-{n}", "--count", "2"]

    assert [c["command"] for c in out["commands"]] == ["--help", "plugins"]
    for c in out["commands"]:
        _series(c["snapfw"], 1)
        assert c["import_s"] > 0
    assert out["pass"] is None and out["total_s"] > 0


def test_bench_live_rows_without_libvirt():
    """The live rows on bare QEMUs alone: snapfw's qmp driver and the floor (qmp_floor.py) each snapshot a
    running 4-disk guest; snapfw deletes a middle snapshot and reports the bytes it copied; snapfw takes a
    memory+disk snapshot, with the guest's pause."""
    require("qemu-img"), require("qemu-system-x86_64")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPFW_")}
    r = subprocess.run([sys.executable, "-m", "bench", "--snapfw-only", "--counts", "2", "--repeat", "1", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    live = json.loads(r.stdout)["live"]
    rows = {row["operation"]: row for row in live["rows"]}
    assert list(rows) == ["bare QMP transaction (stdlib client, the floor)", "snapfw create, qmp driver"]
    for row in rows.values():
        _series(row["series"], 1)
        assert row["ratio"] is None and row["pass"] is None
    assert rows["snapfw create, qmp driver"]["max_ratio"] == 1.0
    delete = live["delete"]["snapfw"]
    assert delete["argv"][-4] == "delete" and len(delete["bytes"]) == 1 and delete["bytes"][0] >= 0
    assert "virsh" not in live["delete"]
    [memory] = live["memory"]  # a live memory+disk snapshot, its pause timed by QEMU's STOP/RESUME events
    assert memory["operation"] == "snapfw create --memory live, qmp driver" and memory["max_ratio"] == 1.2
    paused = memory["series"].pop("paused_s")
    _series(memory["series"], 1)
    assert "--memory" in memory["series"]["argv"] and memory["ratio"] is None and memory["pass"] is None
    assert len(paused) == 1 and 0 < memory["paused_median_s"] == paused[0] < memory["series"]["median_s"]
