"""Steps on real files: an undo never removes a file the step did not make."""

import json
import os
import subprocess

import pytest

from conftest import require

from snapfw.steps import CreateOverlay, DeleteTag


def test_overlay_undo_removes_its_own_file_only(tmp_path):
    require("qemu-img")
    base, overlay = str(tmp_path / "base.qcow2"), str(tmp_path / "over.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "1M"], check=True)
    step = CreateOverlay(overlay, base, "qcow2")
    step.do(None)
    step.undo(None)
    assert not os.path.exists(overlay)
    with open(overlay, "w") as f:
        f.write("somebody else's file")
    taken = CreateOverlay(overlay, base, "qcow2")
    with pytest.raises(FileExistsError):
        taken.do(None)
    taken.undo(None)
    with open(overlay) as f:
        assert f.read() == "somebody else's file"


def _tag_deleted_with_leaks(tmp_path) -> str:
    """A qcow2 file whose `qemu-img snapshot -d t` was cut short as a power cut does: the tag is gone from
    the snapshot table, the clusters only it used are still counted (qemu-img check exit 3)."""
    require("qemu-img"), require("qemu-io")
    path = str(tmp_path / "leaky.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", path], check=True, capture_output=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "t", path], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 2 0 1M", path], check=True, capture_output=True)
    # blkdebug fails the freeing of the snapshot's clusters, after the table without the tag is written
    cut = subprocess.run(["qemu-img", "snapshot", "--image-opts", "-d", "t",
                          f"driver=qcow2,file.driver=blkdebug,file.image.filename={path},"
                          "file.inject-error.0.event=cluster_free"], capture_output=True)
    assert cut.returncode != 0 and "t" not in _tags(path) and _check(path) == 3
    return path


def _tags(path):
    out = subprocess.run(["qemu-img", "info", "--output=json", path], check=True, capture_output=True, text=True)
    return {s["name"] for s in json.loads(out.stdout).get("snapshots", [])}


def _check(path) -> int:
    return subprocess.run(["qemu-img", "check", "-q", path], capture_output=True).returncode


def test_delete_tag_cut_short_is_finished_and_its_leaks_released_on_repair(tmp_path):
    """A first run of DeleteTag is one `qemu-img snapshot -d`; `check --repair`, finishing a plan whose
    DeleteTag had started, also releases what a cut left counted (recover calls ``resume``)."""
    from snapfw.catalog import Catalog
    from snapfw.plan import recover

    path = _tag_deleted_with_leaks(tmp_path)
    step = DeleteTag(path, "t")
    step.do(None)  # the tag is already gone: done, not an error
    assert _check(path) == 3, "a first run pays for no leak check"
    catalog = Catalog.open(str(tmp_path / "state"))
    catalog.begin_plan("p1", "web", "delete", {"format": 1, "prepare": [], "finish": [step.to_json()]})
    with catalog.write() as changes:
        changes.set_plan_state("p1", "committed")
    catalog.mark_step("p1", "finish", 0, "started")

    class Ctx:
        def step(self, step):
            pass

    assert recover(catalog, Ctx(), catalog.unfinished_plans()[0]) == "finished delete of web"
    assert _check(path) == 0 and not catalog.unfinished_plans()
