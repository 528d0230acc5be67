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


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_an_overlay_made_with_its_backing_size_is_the_one_qemu_img_makes_alone(tmp_path, fmt):
    """A live snapshot's overlays are made with the backing file's virtual size read from the file
    (qemu-img create -u, which then does not open the backing file a running QEMU holds): the same image."""
    import json

    from snapfw.tools import qemuimg

    require("qemu-img")
    base = str(tmp_path / f"base.{fmt}")
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, base, "3000K"], check=True)
    if fmt == "raw":  # not a whole number of sectors: QEMU counts the last one whole
        os.truncate(base, 3000 * 1024 + 100)
    size = qemuimg.virtual_size(base, fmt)
    assert size == 3000 * 1024 + (512 if fmt == "raw" else 0)
    assert qemuimg.virtual_size(str(tmp_path / "missing"), fmt) is None
    infos = []
    for name, given in (("probed.qcow2", None), ("sized.qcow2", size)):
        CreateOverlay(str(tmp_path / name), base, fmt, size=given).do(None)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(tmp_path / name)],
                                         capture_output=True, text=True, check=True).stdout)
        infos.append({k: info.get(k) for k in ("virtual-size", "backing-filename", "backing-filename-format",
                                                "format", "cluster-size")})
    assert infos[0] == infos[1] and infos[0]["virtual-size"] == size, infos


def test_tags_are_read_as_qemu_img_reads_them(tmp_path, monkeypatch):
    """qemuimg.tags reads the snapshot table itself (no qemu-img start per tag step): the same names as
    `qemu-img info`, for v2 and v3 images, odd names, a deleted tag; anything else goes to qemu-img."""
    require("qemu-img")
    from snapfw.errors import ToolError
    from snapfw.tools import qemuimg

    names = ["a", "b c", "ünïcødé", "x,y", "-dash", "l" * 200] + [str(i) for i in range(40)]
    for compat in ("1.1", "0.10"):
        path = str(tmp_path / f"{compat}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={compat}", path, "1M"], check=True)
        assert qemuimg.tags(path) == set()
        for n in names:
            subprocess.run(["qemu-img", "snapshot", "-c", n, path], check=True)
        subprocess.run(["qemu-img", "snapshot", "-d", "7", path], check=True)
        subprocess.run(["qemu-img", "snapshot", "-a", "3", path], check=True)
        subprocess.run(["qemu-img", "snapshot", "-c", "last", path], check=True)  # its table is written last
        assert os.path.getsize(path) % 8, "the table should end the file, without its last entry's padding"
        by_qemu_img = {s["name"] for s in qemuimg.info(path, "qcow2")["snapshots"]}
        with monkeypatch.context() as m:
            m.setattr(qemuimg, "info", None)  # read without it
            assert qemuimg.tags(path) == by_qemu_img == set(names) - {"7"} | {"last"}
    with open(path, "r+b") as f:  # the table past the end of the file: left to qemu-img, which refuses it
        f.seek(64)
        f.write((os.path.getsize(path) + (1 << 20)).to_bytes(8, "big"))
    with pytest.raises(ToolError):
        qemuimg.tags(path)
    with pytest.raises(ToolError):
        qemuimg.tags(str(tmp_path / "missing.qcow2"))


def test_chains_are_read_as_qemu_img_reads_them(tmp_path, monkeypatch):
    """qemuimg.chain reads ordinary qcow2 and raw chains from their headers (each change inspects its disks
    first): the same nodes as `qemu-img info --backing-chain`, key for key; everything else (a lock, a data
    file, encryption, a loop, a missing file, no backing format) goes to qemu-img, which answers or refuses
    as it always did."""
    import fcntl
    import signal
    import struct

    require("qemu-img")
    from snapfw.errors import ImageInUse, ToolError
    from snapfw.tools import qemuimg

    def img(*args):
        r = subprocess.run(["qemu-img", *args], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    (tmp_path / "sub").mkdir()
    img("create", "-q", "-f", "raw", "base.raw", "3M")
    img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.raw", "-F", "raw", "mid.qcow2")
    for name in ("one", "twö", "x" * 250):
        img("snapshot", "-c", name, "mid.qcow2")
    img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,compression_type=zstd,cluster_size=2M",
        "-b", "../mid.qcow2", "-F", "qcow2", "sub/top.qcow2", "5M")
    img("bitmap", "--add", "sub/top.qcow2", "dirty")
    img("create", "-q", "-f", "qcow2", "-b", str(tmp_path / "sub/top.qcow2"), "-F", "qcow2", "abs.qcow2")
    img("snapshot", "-c", "t", "abs.qcow2")
    calls = []
    real_info = qemuimg.info
    monkeypatch.setattr(qemuimg, "info", lambda *a, **k: calls.append(a) or real_info(*a, **k))
    monkeypatch.chdir(tmp_path)
    read = []
    for path, fmt in [("abs.qcow2", "qcow2"), (str(tmp_path / "abs.qcow2"), "qcow2"), ("sub/top.qcow2", "qcow2"),
                      ("./sub/../mid.qcow2", "qcow2"), ("base.raw", "raw"), ("mid.qcow2", "raw")]:
        ours = qemuimg.chain(path, fmt)
        assert not calls, path
        theirs = real_info(path, fmt, chain=True)
        assert [n["filename"] for n in ours] == [n["filename"] for n in theirs], path
        for mine, qemu in zip(ours, theirs):
            assert mine == {k: qemu[k] for k in mine}, path
            assert set(qemu) - set(mine) <= {"actual-size", "format-specific", "dirty-flag", "children"}, path
        read.append(len(ours))
    assert read == [4, 4, 3, 2, 1, 1]
    assert {s["name"] for s in qemuimg.chain("mid.qcow2", "qcow2")[0]["snapshots"]} == {"one", "twö", "x" * 250}

    def left_to_qemu_img(path, fmt="qcow2"):
        calls.clear()
        try:
            return qemuimg.chain(path, fmt)
        finally:
            assert calls, path

    img("create", "-q", "-f", "raw", "data.raw", "1M")
    img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "data.qcow2", "1M")
    assert left_to_qemu_img("data.qcow2")[0]["format-specific"]["data"]["data-file"] == "data.raw"
    # (AES, not LUKS: LUKS times its key derivation, which fails on a loaded machine)
    img("create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=x", "-o", "encrypt.format=aes,"
        "encrypt.key-secret=s", "aes.qcow2", "1M")
    assert left_to_qemu_img("aes.qcow2")[0]["encrypted"]
    img("create", "-q", "-f", "qcow2", "a.qcow2", "1M")
    img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2")
    img("rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2")
    with pytest.raises(ToolError):
        left_to_qemu_img("b.qcow2")  # a loop
    with pytest.raises(ToolError):
        left_to_qemu_img("missing.qcow2")
    os.mkfifo("pipe.qcow2")  # left to qemu-img (and its time limit) without blocking on the open

    def refused(path, fmt, **_):
        calls.append(path)
        raise ToolError("qemu-img, not run here", ["qemu-img"])

    class Blocked(BaseException):  # not an OSError, which the reader would take for a reason to fall back
        pass

    def blocked(*_):
        raise Blocked("the read blocked on the FIFO")

    with monkeypatch.context() as m:
        m.setattr(qemuimg, "info", refused)
        calls.clear()
        previous = signal.signal(signal.SIGALRM, blocked)
        signal.alarm(5)
        try:
            for read in (lambda: qemuimg.chain("pipe.qcow2", "qcow2"), lambda: qemuimg.tags("pipe.qcow2")):
                with pytest.raises(ToolError, match="not run here"):
                    read()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        assert calls == ["pipe.qcow2", "pipe.qcow2"]
    img("create", "-q", "-f", "qcow2", "short.qcow2", "1M")
    with open("short.qcow2", "r+b") as f:  # a v3 header that says it is shorter than v3's fields
        f.seek(100)
        f.write((72).to_bytes(4, "big"))
    with pytest.raises(ToolError):
        left_to_qemu_img("short.qcow2")
    with pytest.raises(ToolError):
        left_to_qemu_img("nbd:localhost:1", "raw")
    with open("sub/top.qcow2", "rb") as held:  # a QEMU that reads the middle file: qemu-img reads on
        lock = struct.pack("@hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 100, 1, 0)
        fcntl.fcntl(held, fcntl.F_OFD_SETLK, lock)
        assert len(left_to_qemu_img("abs.qcow2")) == 4
        fcntl.fcntl(held, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 101, 1, 0))
        with pytest.raises(ImageInUse):  # one that writes it: refused, as before
            left_to_qemu_img("abs.qcow2")


def test_a_program_run_gets_its_limits_and_dies_with_snapfw(tmp_path):
    """run(): an untrusted image's program gets the CPU and address-space limits (rule 9), and any program
    gets SIGTERM when the process that ran it dies, even by SIGKILL (no orphan holding an image lock)."""
    import signal
    import sys
    import time

    from conftest import exited_within

    from snapfw.tools.run import LIMIT_ADDRESS_SPACE, LIMIT_CPU_SECONDS, run

    assert run(["sh", "-c", "ulimit -t; ulimit -v"], limited=True).split() == [
        str(LIMIT_CPU_SECONDS), str(LIMIT_ADDRESS_SPACE // 1024)]
    assert run(["sh", "-c", "ulimit -t"]).split() == ["unlimited"]
    pidfile = tmp_path / "pid"
    runner = subprocess.Popen([sys.executable, "-c", "from snapfw.tools.run import run; "
                               f"run(['sh', '-c', 'echo $$ > {pidfile}; exec sleep 60'])"])
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    program = int(pidfile.read_text())
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    assert exited_within(program, 5), "the program outlived the process that ran it"
