"""The ``qmp`` driver against a real running QEMU (firmware-only guest, disks as -blockdev).

Guest data is written live through HMP qemu-io on each disk's device; every pattern is verified offline
with qemu-io once QEMU has quit; internal snapshots through a `qemu-img convert -l` copy.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading

import pytest
from live import LiveEnv, Qemu

from conftest import KIB64, check_image, reads

from snapfw.errors import BadInput, ToolError
from snapfw.tools.qmp import QMP, QMPError

BYTES = {"vda": 0x10, "vdb": 0x80}


@pytest.fixture
def qemu(tmp_path):
    q = Qemu(str(tmp_path)).start()
    yield q
    q.kill()


@pytest.fixture
def live(tmp_path, qemu):
    return LiveEnv(tmp_path, qemu)


def gen(live, g):
    for target in BYTES:
        live.write("web", target, BYTES[target] + g, g * KIB64)


def tag_reads(path: str, tag: str, byte: int, offset: int, scratch: str) -> bool:
    """Whether internal snapshot ``tag`` of qcow2 ``path`` (through its chain) reads ``byte`` there."""
    copy = os.path.join(scratch, f"tag-{tag}.raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-l", f"snapshot.name={tag}", "-O", "raw", path, copy],
                   check=True, capture_output=True)
    try:
        return reads(copy, "raw", byte, offset)
    finally:
        os.unlink(copy)


# --- the QMP client ------------------------------------------------------------------------------------
def test_qmp_client_commands_errors_and_jobs(qemu):
    with QMP(qemu.sock) as q:
        assert q.execute("query-name") == {"name": "web"}
        assert q.greeting["version"]["qemu"]["major"] >= 7
        with pytest.raises(QMPError) as e:
            q.execute("no-such-command")
        assert e.value.error_class == "CommandNotFound"
        with pytest.raises(QMPError, match="no-such-node"):
            q.execute("block-commit", {"job-id": "j", "device": "no-such-node"})


def test_qmp_socket_that_does_not_answer_is_a_timeout(tmp_path):
    path = str(tmp_path / "silent.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    try:
        with pytest.raises(ToolError, match="did not greet within 0.3 s"):
            QMP(path, timeout=0.3).connect()
    finally:
        server.close()
    with pytest.raises(BadInput, match="no QMP socket"):
        QMP(str(tmp_path / "absent.sock")).connect()


def test_qmp_socket_that_is_not_qemu(tmp_path):
    path = str(tmp_path / "chatty.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def talk():
        conn, _ = server.accept()
        conn.sendall(b"SSH-2.0-OpenSSH\r\n")
        conn.recv(100)
        conn.close()

    t = threading.Thread(target=talk)
    t.start()
    try:
        with pytest.raises(ToolError, match="not a QMP socket"):
            QMP(path, timeout=5).connect()
    finally:
        t.join()
        server.close()


# --- reading a running domain ----------------------------------------------------------------------------
def test_list_show_check_on_a_running_domain(live, qemu):
    assert live.json("list", "web") == []
    r = live.run("check", "web")
    assert "No problems found" in r.stdout
    r = live.run("list", "other", check=False)
    assert r.returncode == 2 and "is named 'web'" in r.stderr
