"""Shared fixtures: real qemu-img/qemu-io on temp files, the real `snapfw` command in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

KIB64 = 64 * 1024
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# the commands the tests run are served by a resident interpreter (snapfw.tools.resident), as a user's
# are; it goes away a minute after the last one rather than ten
os.environ.setdefault("SNAPFW_RESIDENT", "60")


def require(program: str) -> str:
    """The path of a real program the test needs; missing fails in CI and skips on a laptop."""
    path = shutil.which(program)
    if path is None:
        message = f"{program} is not installed (apt-get install qemu-utils qemu-system-x86)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def qemu_io(path: str, fmt: str, command: str) -> subprocess.CompletedProcess:
    require("qemu-io")
    return subprocess.run(["qemu-io", "-f", fmt, "-c", command, path], capture_output=True, text=True)


def write(path: str, fmt: str, byte: int, offset: int, length: int = KIB64):
    r = qemu_io(path, fmt, f"write -P {byte:#x} {offset} {length}")
    assert r.returncode == 0 and "error" not in r.stdout.lower() + r.stderr.lower(), r.stdout + r.stderr


def reads(path: str, fmt: str, byte: int, offset: int, length: int = KIB64) -> bool:
    """True if the image (through its whole backing chain) reads ``byte`` over the range."""
    r = qemu_io(path, fmt, f"read -P {byte:#x} {offset} {length}")
    out = r.stdout + r.stderr
    return r.returncode == 0 and "Pattern verification failed" not in out and "error" not in out.lower()


def info_chain(path: str, fmt: str) -> list[dict]:
    require("qemu-img")
    out = subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain", "-f", fmt, path],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def exited_within(pid: int, seconds: float) -> bool:
    """True once process ``pid`` has exited within ``seconds``; a zombie counts as exited (PID 1 here
    may never reap a daemonized QEMU or an orphaned qemu-img)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.01)
    return False


def mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


@contextlib.contextmanager
def fuse_export(blockdevs: list[str], node: str, mountpoint: str):
    """qemu-storage-daemon with ``blockdevs`` (--blockdev values), exporting ``node`` writable as the
    file ``mountpoint`` through FUSE, for the length of the block."""
    proc = subprocess.Popen(
        [require("qemu-storage-daemon"), *(a for b in blockdevs for a in ("--blockdev", b)),
         "--export", f"type=fuse,id=fuse,node-name={node},mountpoint={mountpoint},writable=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not mounted(mountpoint):
            assert proc.poll() is None, f"qemu-storage-daemon failed: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the FUSE export did not appear"
            time.sleep(0.02)
        yield
    finally:
        proc.terminate()
        proc.wait(10)
        if mounted(mountpoint):
            subprocess.run(["umount", mountpoint], check=True)


def check_image(path: str, fmt: str) -> int:
    return subprocess.run(["qemu-img", "check", "-q", "-f", fmt, path], capture_output=True).returncode


class Env:
    """An ``images:///DIR`` connection in a temp dir, with helpers to make domains and run snapfw."""

    def __init__(self, root):
        self.dir = str(root)
        self.uri = f"images://{self.dir}"

    def make_domain(self, name: str = "web", disks=(("vda", "qcow2"), ("vdb", "raw")), size: str = "4M",
                    backends: dict | None = None) -> dict:
        require("qemu-img")
        entries = []
        for target, fmt in disks:
            path = os.path.join(self.dir, f"{name}-{target}.{'qcow2' if fmt == 'qcow2' else 'img'}")
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, size], check=True)
            entry = {"target": target, "path": os.path.basename(path), "format": fmt}
            if backends and target in backends:
                entry["backend"] = backends[target]
            entries.append(entry)
        self.write_domain(name, {"disks": entries})
        return self.domain(name)

    def write_domain(self, name: str, data) -> None:
        with open(os.path.join(self.dir, f"{name}.yaml"), "w") as f:
            f.write(data if isinstance(data, str) else yaml.safe_dump(data))

    def domain(self, name: str = "web") -> dict:
        """target -> (absolute active path, format), as the domain file says now."""
        with open(os.path.join(self.dir, f"{name}.yaml")) as f:
            data = yaml.safe_load(f)
        return {d["target"]: (os.path.join(self.dir, d["path"]), d["format"]) for d in data["disks"]}

    def write(self, domain: str, target: str, byte: int, offset: int):
        path, fmt = self.domain(domain)[target]
        write(path, fmt, byte, offset)

    def reads(self, domain: str, target: str, byte: int, offset: int) -> bool:
        path, fmt = self.domain(domain)[target]
        return reads(path, fmt, byte, offset)

    def run(self, *args, check: bool = True, env: dict | None = None, timeout: float = 120):
        """Run the real `snapfw` command on this connection; returns the CompletedProcess."""
        r = subprocess.run([sys.executable, "-m", "snapfw", "--connect", self.uri, *args],
                           capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
        if check:
            assert r.returncode == 0, f"snapfw {' '.join(args)} failed ({r.returncode}):\n{r.stderr}{r.stdout}"
        return r

    def json(self, *args):
        return json.loads(self.run(*args, "--json").stdout)

    def snapshot_names(self, domain: str = "web") -> list[str]:
        return [s["name"] for s in self.json("list", domain)]

    def files(self) -> set[str]:
        """Every file in the connection directory except the domain files and the state dir."""
        return {n for n in os.listdir(self.dir) if not n.endswith(".yaml") and not n.startswith(".")}

    def state(self):
        """Everything a failed operation must leave unchanged: files with content hashes, catalog export."""
        import hashlib

        out = {}
        for n in sorted(os.listdir(self.dir)):
            p = os.path.join(self.dir, n)
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    out[n] = hashlib.sha256(f.read()).hexdigest()
        return out

    def layout(self) -> dict:
        """What a rolled-back operation must restore: raw files and domain files byte for byte, qcow2
        files by backing file and tag names (undoing a tag moves qcow2 metadata, not data)."""
        out = {}
        for name, digest in self.state().items():
            path = os.path.join(self.dir, name)
            with open(path, "rb") as f:
                is_qcow2 = f.read(4) == b"QFI\xfb" and not name.endswith((".img", ".raw"))
            if is_qcow2:
                top = info_chain(path, "qcow2")[0]
                out[name] = (top.get("backing-filename"), sorted(t["name"] for t in top.get("snapshots", [])))
            else:
                out[name] = digest
        return out

    def export(self, domain: str = "web") -> dict:
        return yaml.safe_load(self.run("export", domain).stdout)

    def assert_consistent(self, domain: str = "web", exported: dict | None = None):
        """Catalog matches the disks: every managed file exists with the recorded format and backing,
        every snapshot's files exist, every qcow2 checks clean (0) or with leaks only (3). ``exported``:
        the catalog's export, if the caller has it already."""
        exported = exported or self.export(domain)
        for f in exported["files"]:
            assert os.path.exists(f["path"]), f"catalog names missing file {f['path']}"
            top = info_chain(f["path"], f["format"])[0]
            real = top.get("full-backing-filename")
            real = os.path.normpath(os.path.join(os.path.dirname(f["path"]), real)) if real else None
            assert real == f["backing"], f"{f['path']}: catalog backing {f['backing']}, real {real}"
            if f["format"] == "qcow2":
                assert check_image(f["path"], "qcow2") in (0, 3), f"qemu-img check failed on {f['path']}"
        known = {f["path"] for f in exported["files"]}
        for path, _fmt in self.domain(domain).values():
            assert path in known or not exported["snapshots"], f"active {path} not in the catalog"
        for s in exported["snapshots"]:
            for d in s["disks"]:
                assert d["file"] in known, f"snapshot {s['name']} disk {d['target']} file not in catalog"
                if "tag" in d:
                    tags = [t["name"] for t in info_chain(d["file"], "qcow2")[0].get("snapshots", [])]
                    assert d["tag"] in tags, f"tag {d['tag']} missing from {d['file']}"


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "vms"
    root.mkdir()
    return Env(root)


def _guest_part(make):
    """``make()``, a part of the TCG guest (tests/guest.py): its failure fails in CI and skips elsewhere."""
    from guest import GuestUnavailable

    require("qemu-system-x86_64")
    try:
        return make()
    except GuestUnavailable as e:
        if IN_CI:
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def guest_system():
    """The TCG guest's (kernel, initramfs), built once and cached, for a QEMU that boots a real Linux
    with its guest agent (tests/live.py ``Qemu(system=...)``)."""
    from guest import build

    from snapfw.connection import cache_home

    return _guest_part(lambda: build(cache_home()))


@pytest.fixture(scope="session")
def guest(tmp_path_factory, guest_system):
    """One TCG guest per session with real LVM2 and device-mapper (tests/guest.py), reached through its
    guest agent; its PV disk is /dev/disk/by-serial/pv0. A missing part fails in CI and skips elsewhere."""
    from guest import Guest

    g = _guest_part(lambda: Guest(str(tmp_path_factory.mktemp("guest")), guest_system, {"pv0": 1 << 30}).start())
    yield g
    g.stop()
