"""Steps on real files: an undo never removes a file the step did not make."""

import os
import subprocess

import pytest

from conftest import require

from snapfw.steps import CreateOverlay


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
