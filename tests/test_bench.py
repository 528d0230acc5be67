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
    r = subprocess.run([sys.executable, "-m", "bench", "--snapfw-only", "--counts", "5", "--repeat", "1", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["snapfw_only"] is True and out["counts"] == [5] and out["repeat"] == 1
    assert out["libvirt_version"] is None and out["populate_s"]["libvirt"] == {}

    [row] = out["list"]
    assert row["count"] == 5 and row["virsh"] is None and row["ratio"] is None
    _series(row["snapfw"], 1)
    assert row["snapfw"]["argv"][-2:] == ["list", "benchdom"]

    cd = out["create_delete"]
    assert cd["count"] == 5 and cd["snapshot"] == "s5"
    for op in ("create", "delete"):
        assert cd[op]["virsh"] is None and cd[op]["ratio"] is None
        _series(cd[op]["snapfw"], 1)
        assert op in cd[op]["snapfw"]["argv"]

    assert out["target"] == {"count": 1000, "max_ratio": 0.5, "ratio": None, "pass": None}
    assert out["total_s"] > 0
