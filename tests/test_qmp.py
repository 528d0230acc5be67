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


def test_a_disk_that_is_not_a_local_file_is_refused_by_name(tmp_path):
    qemu = Qemu(str(tmp_path), extra=("-blockdev", "driver=null-co,node-name=net0,size=4194304",
                                      "-device", "virtio-blk-pci,drive=net0,id=vdc")).start()
    try:
        live = LiveEnv(tmp_path, qemu)
        before = live.files()
        r = live.run("create", "web", "s1", check=False)
        assert r.returncode == 1 and "disk vdc is on 'json:{\"driver\": \"null-co\"" in r.stderr, r.stderr
        assert "not a local file" in r.stderr and live.files() == before
    finally:
        qemu.kill()


def test_revert_and_delete_of_a_running_domain_are_refused(live, qemu):
    live.run("create", "web", "s1")
    for args in (("revert", "web", "s1"), ("delete", "web", "s1")):
        r = live.run(*args, check=False)
        assert r.returncode == 1 and "live revert/delete: not yet" in r.stderr, r.stderr


# --- live create ---------------------------------------------------------------------------------------
def test_live_create_external_then_internal_plus_external(live, qemu, tmp_path):
    vda0, vdb0 = qemu.images["vda"][0], qemu.images["vdb"][0]
    gen(live, 1)
    live.run("create", "web", "s1", "--disk", "vda=external", "--disk", "vdb=external")
    after1 = live.domain()
    assert after1["vda"][0] != vda0 and after1["vdb"][0] != vdb0
    gen(live, 2)
    qemu.qmp("stop")  # a paused guest is snapshotted the same way, and stays paused
    live.run("create", "web", "s2", "--disk", "vda=qcow2", "--disk", "vdb=external")
    assert qemu.qmp("query-status")["status"] == "paused"
    qemu.qmp("cont")
    after2 = live.domain()
    assert after2["vda"] == after1["vda"] and after2["vdb"][0] != after1["vdb"][0]
    gen(live, 3)
    assert "No problems found" in live.run("check", "web").stdout  # catalog against QEMU's own view
    listed = live.json("list", "web")
    assert [(s["name"], s["parent"], s["current"]) for s in listed] == [("s1", None, False), ("s2", "s1", True)]
    assert {d["target"]: d["backend"] for d in listed[1]["disks"]} == {"vda": "qcow2", "vdb": "external"}
    shown = live.json("show", "web", "s2")
    assert {d["target"]: d["file"] for d in shown["disks"]} == {"vda": after1["vda"][0], "vdb": after1["vdb"][0]}

    qemu.quit()
    # s1: the original files, frozen after generation 1
    for target, path, fmt in (("vda", vda0, "qcow2"), ("vdb", vdb0, "raw")):
        assert reads(path, fmt, BYTES[target] + 1, KIB64)
        assert reads(path, fmt, 0, 2 * KIB64)
    # s2: vda's tag inside its first overlay, vdb's first overlay frozen
    assert tag_reads(after1["vda"][0], "s2", BYTES["vda"] + 2, 2 * KIB64, str(tmp_path))
    assert tag_reads(after1["vda"][0], "s2", BYTES["vda"] + 1, KIB64, str(tmp_path))
    assert tag_reads(after1["vda"][0], "s2", 0, 3 * KIB64, str(tmp_path))
    assert reads(after1["vdb"][0], "qcow2", BYTES["vdb"] + 2, 2 * KIB64)
    assert reads(after1["vdb"][0], "qcow2", 0, 3 * KIB64)
    # now: every generation
    for target, (path, fmt) in after2.items():
        for g in (1, 2, 3):
            assert reads(path, fmt, BYTES[target] + g, g * KIB64), (target, g)
    for path in (after1["vda"][0], after1["vdb"][0], after2["vdb"][0], vda0):
        assert check_image(path, "qcow2") in (0, 3)
    live.assert_consistent()


def test_failure_after_the_transaction_is_undone_live(live, qemu):
    original = live.domain()
    gen(live, 1)
    live.run("create", "web", "s1", "--disk", "vda=qcow2", "--disk", "vdb=external")
    gen(live, 2)
    before = set(os.listdir(live.dir))
    # prepare: [the transaction, define]: fail just before the second, after QEMU switched to the overlays
    r = live.run("create", "web", "s2", "--disk", "vda=external", "--disk", "vdb=external",
                 env={"SNAPFW_FAULT": "prepare:1"}, check=False)
    assert r.returncode == 1 and "injected fault" in r.stderr, r.stderr
    assert set(os.listdir(live.dir)) == before  # both new overlays are gone
    after = live.domain()
    assert after["vda"] == original["vda"]
    assert after["vdb"][0] != original["vdb"][0]  # s1's overlay, as before the failed create
    assert [s["name"] for s in live.json("list", "web")] == ["s1"]
    assert "No problems found" in live.run("check", "web").stdout
    gen(live, 3)
    qemu.quit()
    for target, (path, fmt) in after.items():
        for g in (1, 2, 3):
            assert reads(path, fmt, BYTES[target] + g, g * KIB64), (target, g)
    live.assert_consistent()


def test_kill_after_the_transaction_then_repair_commits_the_overlays_back(live, qemu):
    original = live.domain()
    gen(live, 1)
    before = live.files()
    r = live.run("create", "web", "s1", env={"SNAPFW_FAULT": "prepare:1:kill"}, check=False)
    assert r.returncode == -9
    assert live.domain() != original  # QEMU runs on the new overlays; the journal says to undo them
    gen(live, 2)  # the guest goes on writing into them
    assert "interrupted create" in live.run("check", "web", check=False).stdout
    live.run("check", "web", "--repair")
    assert live.domain() == original and live.files() == before
    assert live.json("list", "web") == []
    qemu.quit()
    for target, (path, fmt) in original.items():
        for g in (1, 2):
            assert reads(path, fmt, BYTES[target] + g, g * KIB64), (target, g)
