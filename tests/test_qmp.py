"""The ``qmp`` driver against a real running QEMU (firmware-only guest, disks as -blockdev).

Guest data is written live through HMP qemu-io on each disk's device; every pattern is verified offline
with qemu-io once QEMU has quit; internal snapshots through a `qemu-img convert -l` copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time

import pytest
import yaml
from live import (
    BYTES,
    LiveEnv,
    Qemu,
    boundaries,
    failing_writes,
    gen,
    immutable,
    kill_in_job,
    kill_mid_job,
    kill_then_repair,
    live_chains,
    qemu_chains,
    quit_then_read,
    spec_disks,
)

from conftest import KIB64, check_image, reads

from snapfw.errors import BadInput, ToolError
from snapfw.tools.qmp import QMP, QMPError

@pytest.fixture
def qemu(tmp_path):
    q = Qemu(str(tmp_path)).start()
    yield q
    q.kill()


@pytest.fixture
def live(tmp_path, qemu):
    return LiveEnv(tmp_path, qemu)


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


def listen(path: str, greeting: bytes | None):
    """A unix socket at ``path`` that is not QEMU's: each client gets ``greeting``, or (None) nothing at all."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    clients = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            clients.append(conn)
            with contextlib.suppress(OSError):  # snapfw's first probe only connects and closes
                conn.sendall(greeting)

    if greeting is not None:
        threading.Thread(target=serve, daemon=True).start()
    return server, clients


def test_snapfw_on_a_socket_that_is_not_qemu_or_never_greets(tmp_path):
    live = LiveEnv(tmp_path, Qemu(str(tmp_path)))  # never started: the socket is the test's
    server, clients = listen(live.qemu.sock, b"SSH-2.0-OpenSSH_9.6\r\n")
    try:
        r = live.run("create", "web", "s1", check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"{live.qemu.sock} is not a QMP socket: it sent b'SSH-2.0-OpenSSH_9.6\\r'" in r.stderr, r.stderr
    finally:
        server.close()
        for c in clients:
            c.close()
    os.unlink(live.qemu.sock)
    server, _ = listen(live.qemu.sock, None)  # accepts (the backlog) but never greets: a timeout, not a hang
    try:
        for args in (("create", "web", "s1"), ("domains",)):
            t0 = time.monotonic()
            r = live.run(*args, check=False, timeout=30)
            assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
            assert f"QMP socket {live.qemu.sock} did not greet within 5 s (not QEMU's, hung, or another client " \
                "holds the monitor)" in r.stderr, r.stderr
            assert 5 <= time.monotonic() - t0 < 15
    finally:
        server.close()
    assert live.files() == {"web.qmp", "web-vda.qcow2", "web-vdb.img"}


# --- reading a running domain ----------------------------------------------------------------------------
def test_list_show_check_on_a_running_domain(live, qemu):
    assert live.json("list", "web") == []
    assert live.json("domains") == [{"name": "web", "state": "running", "snapshots": 0, "current": None}]
    qemu.qmp("stop")
    assert live.json("domains")[0]["state"] == "paused"
    qemu.qmp("cont")
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


def test_a_running_disk_on_a_file_the_catalog_does_not_record_is_refused(live, qemu):
    gen(live, 1)
    live.run("create", "web", "s1", "--disk", "vda=external", "--disk", "vdb=external")
    qemu.write_spec()
    recorded = live.domain()["vdb"][0]
    drifted = os.path.join(live.dir, "by-hand.qcow2")  # a snapshot taken behind snapfw's back
    qemu.qmp("blockdev-snapshot-sync", {"node-name": qemu.qmp("query-block")[1]["inserted"]["node-name"],
                                        "snapshot-file": drifted, "format": "qcow2", "snapshot-node-name": "byhand"})
    before = (live.files(), qemu_chains(qemu), live.export())
    for args in (("create", "web", "s2"), ("revert", "web", "s1"), ("delete", "web", "s1")):
        r = live.run(*args, check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"disk vdb now runs on {drifted}, a file the catalog does not know for it; run `snapfw check`" \
            in r.stderr, r.stderr
    assert (live.files(), qemu_chains(qemu), live.export()) == before and status(qemu) == "running"
    r = live.run("check", "web", check=False)
    assert r.returncode == 1 and f"disk vdb now runs on {drifted}" in r.stdout, r.stdout
    assert qemu_chains(qemu)["vdb"][1] == recorded


def test_a_file_another_qemu_holds_is_never_written(live, qemu, tmp_path):
    orig = {t: p for t, (p, _f) in live.domain().items()}
    gen(live, 1)
    live.run("create", "web", "s1", "--disk", "vda=external", "--disk", "vdb=external")
    gen(live, 2)
    # a second QEMU, unknown to snapfw, reads the original vda image (QEMU's locks let two readers share it)
    other = Qemu(str(tmp_path), name="lux-other", disks=())
    other.extra = ["-blockdev", f"driver=file,filename={orig['vda']},node-name=f0,read-only=on",
                   "-blockdev", "driver=qcow2,file=f0,node-name=d0,read-only=on",
                   "-device", "virtio-blk-pci,drive=d0,id=vda"]
    other.start()
    try:
        before = (live.files(), qemu_chains(qemu), live.export())
        # deleting s1 commits vda's overlay into that image (the user's own: it takes the data)
        r = live.run("delete", "web", "s1", check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"{orig['vda']} is open in another QEMU (pid {other.pid}, qemu-system-x86" in r.stderr, r.stderr
        assert (live.files(), qemu_chains(qemu), live.export()) == before and qemu.qmp("query-jobs") == []
        live.run("create", "web", "s2")  # a snapshot writes only the active files: allowed
    finally:
        other.kill()
    live.run("delete", "web", "s1")  # once it is gone, the same delete works
    qemu.quit()
    for target, (path, fmt) in live.domain().items():
        assert reads(path, fmt, BYTES[target] + 1, KIB64) and reads(path, fmt, BYTES[target] + 2, 2 * KIB64)
    live.assert_consistent()


def test_revert_without_a_launch_spec_is_refused(live, qemu):
    live.run("create", "web", "s1")  # vda: an internal snapshot, vdb: external
    before = (live.files(), qemu_chains(qemu))
    r = live.run("revert", "web", "s1", check=False)
    assert r.returncode == 1 and f"cannot revert web to s1 live: QEMU must be started again afterwards, and it " \
        f"has no launch spec ({qemu.spec_path}" in r.stderr, r.stderr
    assert qemu.qmp("query-status")["status"] == "running"
    qemu.write_spec()
    spec = qemu.spec()
    spec["argv"].remove("-daemonize")
    with open(qemu.spec_path, "w") as f:
        yaml.safe_dump(spec, f)
    r = live.run("revert", "web", "s1", check=False)
    assert r.returncode == 2 and f"launch spec {qemu.spec_path}: argv must include -daemonize" in r.stderr, r.stderr
    assert (live.files(), qemu_chains(qemu)) == before and live.snapshot_names() == ["s1"]


# --- live create ---------------------------------------------------------------------------------------
def test_live_create_external_then_internal_plus_external(live, qemu, tmp_path):
    vda0, vdb0 = qemu.images["vda"][0], qemu.images["vdb"][0]
    gen(live, 1)
    live.run("create", "web", "s1", "--disk", "vda=external", "--disk", "vdb=external")
    after1 = live.domain()
    assert after1["vda"][0] != vda0 and after1["vdb"][0] != vdb0
    gen(live, 2)
    r = live.run("create", "web", "s2", "--disk", "vda=qcow2", "--disk", "vdb=external", "--dry-run")
    nodes = {b["qdev"].split("/")[3]: b["inserted"]["node-name"] for b in qemu.qmp("query-block")}
    assert f'> transaction {{"actions": [{{"type": "blockdev-snapshot-internal-sync", "data": {{"device": ' \
        f'"{nodes["vda"]}", "name": "s2"}}}}, {{"type": "blockdev-snapshot-sync", "data": {{"node-name": ' \
        f'"{nodes["vdb"]}", "snapshot-file": ' in r.stdout, r.stdout
    assert "guest pause: none beyond QEMU's own" in r.stdout and live.domain() == after1
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


def one_error_line(r) -> str:
    """A clean failure: exit 1, no traceback, one `snapfw: error:` line (beside warnings); returns it."""
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("snapfw: warning:")]
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("snapfw: error:"), r.stderr
    return lines[0]


@pytest.mark.parametrize("vda", ["external", "qcow2"])
def test_a_failure_in_the_second_disks_part_of_a_live_create_leaves_the_first_as_it_was(tmp_path, vda):
    """vdb lives in its own folder, which then accepts no new file: QEMU fails vdb's part of the one
    transaction, after it made vda's overlay file (or while it would take vda's tag)."""
    qemu = Qemu(str(tmp_path), folders={"vdb": "vdb"}).start()
    try:
        live = LiveEnv(tmp_path, qemu)
        gen(live, 1)
        live.run("create", "web", "s1", "--disk", "vda=external", "--disk", "vdb=external")
        gen(live, 2)
        before = (live.files(), os.listdir(tmp_path / "vdb"), live.export(), qemu_chains(qemu), tags(qemu, "vda"))
        with immutable(str(tmp_path / "vdb")):
            r = live.run("create", "web", "s2", "--disk", f"vda={vda}", "--disk", "vdb=external", check=False)
            assert "Operation not permitted" in one_error_line(r)
        assert (live.files(), os.listdir(tmp_path / "vdb"), live.export(), qemu_chains(qemu),
                tags(qemu, "vda")) == before  # no stray overlay for vda, no tag
        assert "No problems found" in live.run("check", "web").stdout
        gen(live, 3)
        quit_then_read(live, (1, 2, 3))
        live.assert_consistent()
    finally:
        qemu.kill()


def test_eio_during_a_live_commit_leaves_a_valid_chain_and_a_clear_error(tmp_path):
    """vdb is a raw file on a FUSE export whose writes at 128 KiB fail (blkdebug): the guest writes
    there only after s1, so deleting s1 commits that into it and the commit job fails with EIO."""
    qemu = Qemu(str(tmp_path))
    with failing_writes(qemu.images["vdb"][0], 2 * KIB64):
        try:
            qemu.start()
            live = LiveEnv(tmp_path, qemu)
            gen(live, 1)
            live.run("create", "web", "s1", "--disk", "vda=external", "--disk", "vdb=external")
            gen(live, 2)
            overlay = live.domain()["vdb"][0]
            r = live.run("delete", "web", "s1", check=False)
            line = one_error_line(r)
            assert f"live commit {overlay} into {qemu.images['vdb'][0]}" in line and "Input/output error" in line
            assert "run `snapfw check --repair`" in line
            chains = qemu_chains(qemu)
            assert chains["vdb"] == [overlay, qemu.images["vdb"][0]] and os.path.exists(overlay)  # nothing removed
            assert chains["vda"] == [qemu.images["vda"][0]]  # vda's commit, before vdb's, is done
            assert qemu.qmp("query-jobs") == []
            assert "interrupted delete" in live.run("check", "web", check=False).stdout
            r = live.run("check", "web", "--repair", check=False)  # the disk still fails: so does the repair
            assert "Input/output error" in one_error_line(r) and qemu_chains(qemu) == chains
            gen(live, 3)
            quit_then_read(live, (1, 2, 3))
            assert check_image(overlay, "qcow2") in (0, 3)
        finally:
            qemu.kill()


# --- live delete ---------------------------------------------------------------------------------------
def spread(live, target, byte, first, count):
    """``count`` 64 KiB ranges from ``first`` * 64 KiB: allocated bytes that tip commit against stream."""
    for i in range(count):
        live.write("web", target, byte, (first + i) * KIB64)
    live.qemu.flush(target)  # pricing reads the active file's allocation with -U: what QEMU has written


def test_live_delete_commits_and_streams_middle_and_newest(live, qemu):
    orig = {t: p for t, (p, _f) in live.domain().items()}
    gen(live, 1)
    live.run("create", "web", "s1", "--disk", "vda=external", "--disk", "vdb=external")
    o1 = {t: p for t, (p, _f) in live.domain().items()}  # s2's files, once s2 is taken
    gen(live, 2)
    spread(live, "vda", 0x42, 20, 4)  # s2's vda file outweighs s3's: commit s3's into it
    live.run("create", "web", "s2")
    o2 = {t: p for t, (p, _f) in live.domain().items()}  # s3's files
    gen(live, 3)
    spread(live, "vdb", 0x93, 30, 4)  # s3's vdb file outweighs s2's: stream s2's into it
    live.run("create", "web", "s3")
    o3 = {t: p for t, (p, _f) in live.domain().items()}  # the active files
    gen(live, 4)
    spread(live, "vdb", 0x94, 40, 8)  # the active vdb file outweighs s3's: stream s3's into it

    plan = live.json("delete", "web", "s2", "--dry-run")["plan"]
    jobs = [d["describe"] for d in plan["steps"] if d["describe"].startswith("live")]
    assert len(jobs) == 2 and jobs[0].startswith(f"live commit {o2['vda']} into {o1['vda']}"), jobs
    assert jobs[1].startswith(f"live stream {o1['vdb']} into {o2['vdb']} onto {orig['vdb']}"), jobs
    commit, stream = (d for d in plan["steps"] if d["describe"].startswith("live"))
    nodes = {n["file"]: n["node-name"] for n in qemu.qmp("query-named-block-nodes", {"flat": True})
             if n["drv"] != "file"}
    assert commit["calls"][0].startswith('block-commit {"job-id": "snapfw-') and \
        f'"top-node": "{nodes[o2["vda"]]}", "base-node": "{nodes[o1["vda"]]}"' in commit["calls"][0], commit
    assert not any(c.startswith("job-complete") for c in commit["calls"])  # below the active file: no pivot
    assert stream["calls"][0].startswith("block-stream") and f'"device": "{nodes[o2["vdb"]]}"' in stream["calls"][0]
    assert commit["bytes_to_copy"] == stream["bytes_to_copy"] == KIB64 == plan["bytes_to_copy"] / 2  # a generation each
    assert commit["pause"] == stream["pause"] == "none: the guest runs on while the block job copies"
    live.run("delete", "web", "s2")
    assert qemu_chains(qemu) == {"vda": [o3["vda"], o1["vda"], orig["vda"]],
                                 "vdb": [o3["vdb"], o2["vdb"], orig["vdb"]]}
    assert qemu_chains(qemu) == live_chains(live)
    assert not os.path.exists(o2["vda"]) and not os.path.exists(o1["vdb"])
    assert "No problems found" in live.run("check", "web").stdout

    r = live.run("delete", "web", "s3", "--dry-run")  # the active vda file: commit, then pivot
    assert f"(once READY: the disk pivots to {o1['vda']})" in r.stdout, r.stdout
    assert "guest pause: none: the guest runs on while the block job copies; the pivot drains" in r.stdout
    r = live.run("delete", "web", "s3", "--json")
    steps = [json.loads(line)["step"] for line in r.stderr.splitlines() if '"event": "step"' in line]
    assert any(s.startswith(f"live commit {o3['vda']} into {o1['vda']}") for s in steps), steps
    assert any(s.startswith(f"live stream {o2['vdb']} into {o3['vdb']}") for s in steps), steps
    assert qemu_chains(qemu) == {"vda": [o1["vda"], orig["vda"]], "vdb": [o3["vdb"], orig["vdb"]]}  # vda pivoted
    assert qemu_chains(qemu) == live_chains(live)
    assert not os.path.exists(o3["vda"]) and not os.path.exists(o2["vdb"])
    assert live.snapshot_names() == ["s1"]
    assert "No problems found" in live.run("check", "web").stdout
    gen(live, 5)  # the guest writes on into the merged chain

    qemu.quit()
    for target, (path, fmt) in live.domain().items():
        for g in (1, 2, 3, 4, 5):
            assert reads(path, fmt, BYTES[target] + g, g * KIB64), (target, g)
    assert reads(o1["vda"], "qcow2", 0x42, 23 * KIB64)
    assert reads(o3["vdb"], "qcow2", 0x93, 33 * KIB64) and reads(o3["vdb"], "qcow2", 0x94, 47 * KIB64)
    for target, path in orig.items():  # s1
        fmt = qemu.images[target][1]
        assert reads(path, fmt, BYTES[target] + 1, KIB64) and reads(path, fmt, 0, 2 * KIB64)
    live.assert_consistent()


def test_live_delete_children_then_the_root_into_the_users_own_image(live, qemu):
    orig = {t: p for t, (p, _f) in live.domain().items()}
    gen(live, 1)
    live.run("create", "web", "s1", "--disk", "vda=external", "--disk", "vdb=external")
    gen(live, 2)
    live.run("create", "web", "s2")
    gen(live, 3)
    live.run("create", "web", "s3")
    gen(live, 4)
    before = qemu_chains(qemu)
    live.run("delete", "web", "s2", "--children")
    assert live.snapshot_names() == ["s1"] and qemu_chains(qemu) == before == live_chains(live)
    live.run("delete", "web", "s1")  # the user's own image takes the data of the file above it
    after = qemu_chains(qemu)  # the catalog forgets a domain's files with its last snapshot
    assert live.export("web")["files"] == []
    assert {t: c[-1] for t, c in after.items()} == orig and all(len(c) == 3 for c in after.values())
    assert [n["file"] for n in qemu.qmp("query-named-block-nodes", {"flat": True})
            if n["file"] in {c[-2] for c in before.values()}] == []  # the merged files are closed
    assert live.snapshot_names() == [] and "No problems found" in live.run("check", "web").stdout
    gen(live, 5)
    qemu.quit()
    for target, (path, fmt) in live.domain().items():
        for g in (1, 2, 3, 4, 5):
            assert reads(path, fmt, BYTES[target] + g, g * KIB64), (target, g)
    for target, path in orig.items():
        assert reads(path, qemu.images[target][1], BYTES[target] + 2, 2 * KIB64)
    live.assert_consistent()


def test_kill_during_a_live_commit_then_repair_reattaches_to_the_job(tmp_path):
    qemu = Qemu(str(tmp_path), size="640M").start()
    try:
        live = LiveEnv(tmp_path, qemu)
        orig = {t: p for t, (p, _f) in live.domain().items()}
        gen(live, 1)
        live.run("create", "web", "s1", "--disk", "vda=external", "--disk", "vdb=external")
        top = live.domain()["vda"][0]
        # enough for the commit to report progress between two polls of it (0.1 s) on a fast machine
        qemu.qmp("human-monitor-command", {"command-line": 'qemu-io -d /machine/peripheral/vda/virtio-backend '
                                                          '"write -P 0x5a 64M 512M"'})
        gen(live, 2)
        seen = kill_mid_job(live, "delete", "web", "s1")
        assert seen and seen["step"].startswith(f"live commit {top}"), seen
        jobs = qemu.qmp("query-jobs")
        assert len(jobs) == 1 and jobs[0]["type"] == "commit", jobs  # the job outlived snapfw
        assert "interrupted delete" in live.run("check", "web", check=False).stdout
        r = live.run("check", "web", "--repair")
        assert "finished delete" in r.stdout, r.stdout
        assert qemu.qmp("query-jobs") == []
        assert qemu_chains(qemu) == {t: [p] for t, p in orig.items()}
        assert live.snapshot_names() == [] and live.export("web")["files"] == []
        assert not os.path.exists(top)
        gen(live, 3)
        qemu.quit()
        path = orig["vda"]
        assert reads(path, "qcow2", 0x5a, 64 << 20) and reads(path, "qcow2", 0x5a, (576 << 20) - KIB64)
        for target, p in orig.items():
            for g in (1, 2, 3):
                assert reads(p, qemu.images[target][1], BYTES[target] + g, g * KIB64), (target, g)
        live.assert_consistent()
    finally:
        qemu.kill()


def tags(qemu, target: str) -> list[str]:
    """The internal snapshots of disk ``target``'s active file, as QEMU sees them."""
    block = next(b for b in qemu.qmp("query-block") if b["qdev"].split("/")[3] == target)
    return [t["name"] for t in block["inserted"]["image"].get("snapshots", [])]


def test_live_delete_of_internal_snapshots_and_of_one_whose_parent_is_internal(live, qemu, tmp_path):
    vda0 = qemu.images["vda"][0]
    gen(live, 1)
    live.run("create", "web", "s1")  # vda: a tag in its own file; vdb: external
    gen(live, 2)
    live.run("create", "web", "s2")
    gen(live, 3)
    assert tags(qemu, "vda") == ["s1", "s2"]
    plan = live.json("delete", "web", "s2", "--dry-run")["plan"]["steps"]
    assert any(d["describe"] == f"delete internal snapshot 's2' from {vda0} (disk vda) through running web"
               for d in plan), plan
    live.run("delete", "web", "s2")  # the tag through QEMU (its file is open read-write), vdb merged
    assert tags(qemu, "vda") == ["s1"] and qemu_chains(qemu) == live_chains(live)
    live.run("create", "web", "s3", "--disk", "vda=external", "--disk", "vdb=external")  # child of s1
    v3 = live.domain()["vda"][0]
    gen(live, 4)
    live.run("create", "web", "s4", "--disk", "vda=external", "--disk", "vdb=external")
    gen(live, 5)
    live.run("delete", "web", "s3")  # s3's vda file is the one holding s1's tag: committed into, tag kept
    assert qemu_chains(qemu) == live_chains(live) and v3 not in qemu_chains(qemu)["vda"]
    assert live.snapshot_names() == ["s1", "s4"]
    assert "No problems found" in live.run("check", "web").stdout
    gen(live, 6)
    qemu.quit()
    for target, (path, fmt) in live.domain().items():
        for g in range(1, 7):
            assert reads(path, fmt, BYTES[target] + g, g * KIB64), (target, g)
    assert tag_reads(vda0, "s1", BYTES["vda"] + 1, KIB64, str(tmp_path))
    assert tag_reads(vda0, "s1", 0, 2 * KIB64, str(tmp_path))
    assert "s2" not in subprocess.run(["qemu-img", "snapshot", "-l", vda0], capture_output=True, text=True).stdout
    live.assert_consistent()  # every qcow2 file checks 0 or 3


def test_kill_during_a_live_stream_then_repair_reattaches_to_the_job(tmp_path):
    """A second QMP monitor (the test's) throttles the stream job as soon as it appears, so snapfw is
    killed while it runs; unthrottled, `check --repair` re-attaches to it by its journaled id. The layer
    streamed holds 192 MiB: with 32 MiB the job sometimes ended between two polls (page cache speed)."""
    side = str(tmp_path / "side.qmp")
    qemu = Qemu(str(tmp_path), size="512M", extra=("-qmp", f"unix:{side},server=on,wait=off")).start()
    try:
        live = LiveEnv(tmp_path, qemu)
        live.run("create", "web", "s0", "--disk", "vda=external", "--disk", "vdb=external")
        gen(live, 1)
        qemu.write("vda", 0x5a, 32 << 20, 192 << 20)  # into s1's file: streamed into the file above
        live.run("create", "web", "s1", "--disk", "vda=external", "--disk", "vdb=external")
        frozen, active = qemu_chains(qemu)["vda"][1], qemu_chains(qemu)["vda"][0]
        qemu.write("vda", 0x6b, 224 << 20, 256 << 20)  # the file above outweighs it: stream, not commit
        qemu.flush("vda")
        gen(live, 2)
        with QMP(side) as monitor:
            def caught():
                jobs = [j for j in monitor.execute("query-jobs") if j["type"] == "stream" and j["status"] == "running"]
                for j in jobs:
                    monitor.execute("block-job-set-speed", {"device": j["id"], "speed": 1})
                return bool(jobs)

            kill_in_job(live, caught, "delete", "web", "s1")
            jobs = monitor.execute("query-jobs")
            assert len(jobs) == 1 and jobs[0]["status"] == "running", jobs  # the job outlived snapfw
            assert "interrupted delete" in live.run("check", "web", check=False).stdout
            monitor.execute("block-job-set-speed", {"device": jobs[0]["id"], "speed": 0})
        r = live.run("check", "web", "--repair")
        assert r.stdout.splitlines() == ["web: finished delete of web"], r.stdout
        assert qemu.qmp("query-jobs") == [] and frozen not in qemu_chains(qemu)["vda"]
        assert qemu_chains(qemu) == live_chains(live) and qemu_chains(qemu)["vda"][0] == active
        assert live.snapshot_names() == ["s0"] and not os.path.exists(frozen)
        gen(live, 3)
        qemu.quit()
        assert reads(active, "qcow2", 0x5a, 32 << 20) and reads(active, "qcow2", 0x5a, (224 << 20) - KIB64)
        assert reads(active, "qcow2", 0x6b, 224 << 20)
        for target, (path, fmt) in live.domain().items():
            for g in (1, 2, 3):
                assert reads(path, fmt, BYTES[target] + g, g * KIB64), (target, g)
        live.assert_consistent()
    finally:
        qemu.kill()


# --- live revert ---------------------------------------------------------------------------------------
def status(qemu) -> str:
    return qemu.qmp("query-status")["status"]


def memory(qemu) -> int:
    """QEMU's -m, in MiB: which launch argv it was started from."""
    return qemu.qmp("query-memory-size-summary")["base-memory"] >> 20


def test_live_revert_restarts_qemu_from_its_launch_spec(live, qemu):
    qemu.write_spec(memory=64)
    gen(live, 1)
    live.run("create", "web", "s1", "--disk", "vda=external", "--disk", "vdb=external")  # keeps -m 64
    gen(live, 2)
    qemu.write_spec(memory=80, disks=qemu.spec()["disks"])  # the user edits the argv for the next start
    live.run("create", "web", "s2", "--disk", "vda=qcow2", "--disk", "vdb=external")  # keeps -m 80
    gen(live, 3)

    plan = live.json("revert", "web", "s1", "--dry-run")["plan"]["steps"]
    assert plan[0]["describe"] == "stop web (its running state is discarded)" and plan[-1]["describe"] == "start web"
    assert plan[0]["calls"][0].endswith("quit (then wait until QEMU has closed its images)"), plan[0]
    assert plan[0]["pause"].startswith("the guest is down from here") and plan[-1]["calls"][-1] == "cont"
    live.run("revert", "web", "s1")  # stopped, reverted offline, started again from s1's argv: running
    assert status(qemu) == "running" and memory(qemu) == 64
    assert qemu_chains(qemu) == live_chains(live) and qemu.spec()["disks"] == spec_disks(live)
    gen(live, 4)
    live.run("revert", "web", "s2", "--paused")  # vda's tag, a new overlay on vdb's frozen file
    assert status(qemu) != "running" and memory(qemu) == 80
    assert qemu_chains(qemu) == live_chains(live) and qemu.spec()["disks"] == spec_disks(live)
    qemu.qmp("cont")
    gen(live, 5)
    live.run("revert", "web", "s1", "--stopped", "--keep-config")
    assert not qemu.reattach() and "80" in qemu.spec()["argv"]  # s2's argv stays
    assert live.json("domains") == [{"name": "web", "state": "shut off", "snapshots": 2, "current": "s1"}]
    for target, (path, fmt) in live.domain().items():  # s1, read offline
        assert reads(path, fmt, BYTES[target] + 1, KIB64) and reads(path, fmt, 0, 2 * KIB64), target
    assert "No problems found" in live.run("check", "web").stdout  # a QEMU that is down: read from its spec
    live.run("revert", "web", "s2", "--running")  # started from shut off
    assert status(qemu) == "running" and memory(qemu) == 80
    assert qemu_chains(qemu) == live_chains(live)
    gen(live, 6)

    qemu.quit()
    for target, (path, fmt) in live.domain().items():
        for g in (1, 2, 6):
            assert reads(path, fmt, BYTES[target] + g, g * KIB64), (target, g)
        for g in (3, 4, 5):
            assert reads(path, fmt, 0, g * KIB64), (target, g)
    live.assert_consistent()


def test_kill_during_a_live_revert_then_repair_starts_qemu_on_the_right_chain(live, qemu):
    qemu.write_spec()
    gen(live, 1)
    live.run("create", "web", "s1", "--disk", "vda=external", "--disk", "vdb=external")
    gen(live, 2)
    before = qemu_chains(qemu)
    # prepare: [stop, an overlay per disk, define]: killed once QEMU is stopped
    r = live.run("revert", "web", "s1", env={"SNAPFW_FAULT": "prepare:1:kill"}, check=False)
    assert r.returncode == -9 and not qemu.reattach()
    assert "rolled back revert" in live.run("check", "web", "--repair").stdout
    assert status(qemu) == "running" and qemu_chains(qemu) == before  # the old chain, as it was
    gen(live, 3)
    r = live.run("revert", "web", "s1", env={"SNAPFW_FAULT": "finish:0:kill"}, check=False)  # after the commit
    assert r.returncode == -9 and not qemu.reattach()
    assert "finished revert" in live.run("check", "web", "--repair").stdout
    assert status(qemu) == "running" and qemu_chains(qemu) == live_chains(live) != before
    gen(live, 4)
    qemu.quit()
    for target, (path, fmt) in live.domain().items():
        assert reads(path, fmt, BYTES[target] + 1, KIB64) and reads(path, fmt, BYTES[target] + 4, 4 * KIB64)
        assert reads(path, fmt, 0, 2 * KIB64) and reads(path, fmt, 0, 3 * KIB64)
    live.assert_consistent()


# --- a booted Linux guest as a qmp domain -------------------------------------------------------------------
def test_kill_at_every_step_boundary_of_a_one_disk_live_revert_then_repair(tmp_path):
    """One qcow2 disk reverted live to its tag: QEMU stopped, the revert recorded, the tag applied after
    the commit (one qemu-img), QEMU started again. Killed at each boundary, then `check --repair`: QEMU
    runs on the chain the catalog records, and the disk holds every generation snapshotted."""
    qemu = Qemu(str(tmp_path), disks=(("vda", "qcow2"),)).start()
    try:
        live = LiveEnv(tmp_path, qemu)
        qemu.write_spec()
        live.write("web", "vda", BYTES["vda"], 0)
        live.run("create", "web", "r0")
        steps = live.json("revert", "web", "r0", "--dry-run")["plan"]["steps"]
        assert [(s["phase"], s["describe"].split(" ")[0]) for s in steps] == [
            ("prepare", "stop"), ("finish", "revert"), ("finish", "start")], steps
        faults = boundaries(live, "revert", "web", "r0")
        for k, fault in enumerate(faults):
            if k:
                live.write("web", "vda", BYTES["vda"] + k, k * KIB64)
                live.run("create", "web", f"r{k}")
            kill_then_repair(live, fault, "revert", "web", f"r{k}")
            assert qemu.reattach() and status(qemu) == "running", fault
            assert qemu_chains(qemu) == live_chains(live), fault
        active = live.domain()["vda"]
        qemu.quit()
        for k in range(len(faults)):
            assert reads(*active, BYTES["vda"] + k, k * KIB64), k
        assert check_image(*active) == 0
        live.assert_consistent()
    finally:
        qemu.kill()


def test_booted_guest_disk_only_revert_discards_its_memory(tmp_path, guest_system):
    """The TCG guest (real kernel, guest agent) as a qmp domain with a launch spec: a disk-only snapshot
    keeps the disks, not the running state; a revert starts QEMU again from the spec and the guest boots
    afresh (a tmpfs file written before the snapshot is gone, a disk write before it reads back)."""
    qemu = Qemu(str(tmp_path), disks=(("vda", "qcow2"),), size="16M", system=guest_system)
    qemu.write_spec()
    qemu.start()
    try:
        live = LiveEnv(tmp_path, qemu)
        qemu.sh("echo before > /run/marker; printf disk-before | dd of=/dev/disk/by-serial/vda conv=fsync "
                "2>/dev/null")
        live.run("create", "web", "s1")
        qemu.sh("echo after > /run/marker; printf disk-after! | dd of=/dev/disk/by-serial/vda conv=fsync "
                "2>/dev/null")
        live.run("revert", "web", "s1")
        qemu.reattach()
        qemu.wait_ready()
        assert qemu.sh("cat /run/marker", check=False)[0] != 0
        assert qemu.sh("dd if=/dev/disk/by-serial/vda bs=11 count=1 2>/dev/null")[1] == "disk-before"
    finally:
        qemu.kill()


# --- SIGKILL at every step boundary ----------------------------------------------------------------------
def test_kill_at_every_step_boundary_of_a_live_create_then_repair(live, qemu):
    qemu.write_spec()  # the plan defines the new chain into it too
    gen(live, 1)
    faults = boundaries(live, "create", "web", "c")  # vda: a tag, vdb: an overlay, in one transaction
    for k, fault in enumerate(faults):
        kill_then_repair(live, fault, "create", "web", f"c{k}")
        assert status(qemu) == "running" and qemu_chains(qemu) == live_chains(live)
        assert qemu.spec()["disks"] == spec_disks(live)
        assert (f"c{k}" in live.snapshot_names()) == fault.startswith("finish"), fault
        gen(live, k + 2)
    quit_then_read(live, range(1, len(faults) + 2))
    live.assert_consistent()


def test_kill_at_every_step_boundary_of_a_live_delete_then_repair(live, qemu):
    """Deleting a middle snapshot: vda's file below it is committed into, vdb's streamed into the file
    above (QEMU block jobs), then the merged files removed."""
    live.run("create", "web", "s0", "--disk", "vda=external", "--disk", "vdb=external")  # snapfw's own files

    def middle(k):  # snapshot a{k} between its parent and b{k}, each disk with three generations
        spread(live, "vda", 0x40 + k, 48, 2)  # into a's vda file: committing b's into it copies less
        gen(live, 3 * k + 1)
        live.run("create", "web", f"a{k}", "--disk", "vda=external", "--disk", "vdb=external")
        spread(live, "vdb", 0x60 + k, 48, 2)  # into b's vdb file: streaming a's into it copies less
        gen(live, 3 * k + 2)
        live.run("create", "web", f"b{k}", "--disk", "vda=external", "--disk", "vdb=external")
        gen(live, 3 * k + 3)

    middle(0)
    steps = [s["describe"] for s in live.json("delete", "web", "a0", "--dry-run")["plan"]["steps"]]
    assert any(s.startswith("live commit") for s in steps) and any(s.startswith("live stream") for s in steps)
    faults = boundaries(live, "delete", "web", "a0")  # the same plan's shape every round
    for k, fault in enumerate(faults):
        if k:
            middle(k)
        before = qemu_chains(qemu)
        kill_then_repair(live, fault, "delete", "web", f"a{k}")
        assert status(qemu) == "running" and qemu_chains(qemu) == live_chains(live)
        merged = fault.startswith("finish")  # rolled back before the commit, else finished
        assert all(len(qemu_chains(qemu)[t]) == len(before[t]) - merged for t in BYTES), fault
    quit_then_read(live, range(1, 3 * len(faults) + 1))
    live.assert_consistent()


def test_kill_at_every_step_boundary_of_a_live_revert_then_repair(live, qemu):
    """Reverting to the snapshot just taken (vda: a tag, vdb: an overlay), so nothing written is
    discarded: QEMU is stopped, the disks reverted offline, QEMU started again from its launch spec."""
    qemu.write_spec()
    gen(live, 1)
    live.run("create", "web", "r0")
    faults = boundaries(live, "revert", "web", "r0")  # the same plan's shape every round
    for k, fault in enumerate(faults):
        if k:
            gen(live, k + 1)
            live.run("create", "web", f"r{k}")
        kill_then_repair(live, fault, "revert", "web", f"r{k}")
        assert qemu.reattach() and status(qemu) == "running", fault  # as it was, or started again
        assert qemu_chains(qemu) == live_chains(live) and qemu.spec()["disks"] == spec_disks(live)
    quit_then_read(live, range(1, len(faults) + 1))
    live.assert_consistent()
