"""A real running QEMU for live tests: firmware-only guest, disks as -blockdev, a QMP socket.

Guest data is written while it runs through HMP ``qemu-io`` on each disk's own device backend (as the
guest would write); reads are verified offline with qemu-io once QEMU has quit (HMP qemu-io prints its
result on QEMU's side, not in the monitor reply).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from guest import AGENT_PORT, BOOT_SECONDS, MEMORY_MB, guest_sh, wait_for_agent

from conftest import KIB64, Env, exited_within, fuse_export, reads, require

from snapfw.connection import STATE_DIR_ENV
from snapfw.tools.qmp import QMP


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not: PID 1 here may never reap a daemonized QEMU)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Qemu:
    """``qemu-system-x86_64 -name NAME`` with one virtio-blk disk per ``(id, format)`` in ``disks``.

    Firmware only by default; with ``system`` (the TCG guest's ``(kernel, initramfs)``, the
    ``guest_system`` fixture) it boots that Linux with its guest agent on socket ``agent``, for tests that
    need guest-visible state (memory, a filesystem to freeze): a disk is /dev/disk/by-serial/TARGET in it.
    """

    def __init__(self, folder: str, name: str = "web", disks=(("vda", "qcow2"), ("vdb", "raw")),
                 size: str = "4M", extra: tuple[str, ...] = (), folders: dict | None = None,
                 system: tuple[str, str] | None = None):
        require("qemu-img")
        self.binary = require("qemu-system-x86_64")
        self.dir, self.name = folder, name
        self.sock = os.path.join(folder, f"{name}.qmp")
        self.pidfile = os.path.join(folder, f"{name}.pid")
        self.images = {}
        for target, fmt in disks:  # in folder, or in its own subfolder (folders: target -> name)
            where = os.path.join(folder, (folders or {}).get(target, ""))
            os.makedirs(where, exist_ok=True)
            path = os.path.join(where, f"{name}-{target}.{'qcow2' if fmt == 'qcow2' else 'img'}")
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, size], check=True)
            self.images[target] = (path, fmt)
        self.extra = list(extra)  # more QEMU arguments: devices the harness does not make
        self.system = system
        self.agent = os.path.join(folder, f"{name}.qga")
        self.console = os.path.join(folder, f"{name}.console")
        self.pid = None

    def argv(self, placeholders: bool = False, memory: int | None = None) -> list[str]:
        """The command line; with ``placeholders``, as a launch spec has it ({vda}, {vda.format})."""
        memory = memory or (MEMORY_MB if self.system else 64)
        argv = [self.binary, "-m", str(memory), "-nodefaults", "-display", "none",
                "-qmp", f"unix:{self.sock},server=on,wait=off", "-name", self.name, "-daemonize",
                "-pidfile", self.pidfile]
        if self.system:  # the guest kernel needs TCG: the KVM here cannot run it
            kernel, initrd = self.system
            argv += ["-machine", "q35", "-accel", "tcg,tb-size=64", "-cpu", "max", "-smp", "1",
                     "-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 quiet panic=-1",
                     "-serial", f"file:{self.console}",
                     "-chardev", f"socket,id=qga,path={self.agent},server=on,wait=off",
                     "-device", "virtio-serial", "-device", f"virtserialport,chardev=qga,name={AGENT_PORT}"]
        else:
            argv += ["-machine", "q35,accel=kvm:tcg"]
        for i, (target, (path, fmt)) in enumerate(self.images.items()):
            if placeholders:
                path, fmt = f"{{{target}}}", f"{{{target}.format}}"
            argv += ["-blockdev", f"driver=file,filename={path},node-name=file{i}",
                     "-blockdev", f"driver={fmt},file=file{i},node-name=disk{i}",
                     "-device", f"virtio-blk-pci,drive=disk{i},id={target},serial={target}"]
        return argv + self.extra

    @property
    def spec_path(self) -> str:
        return self.sock + ".launch.yaml"

    def write_spec(self, memory: int | None = None, disks: dict | None = None):
        """The launch spec snapfw starts this QEMU from (disks: what it runs on now, by default)."""
        import yaml

        disks = disks or {t: {"path": p, "format": f} for t, (p, f) in self.images.items()}
        with open(self.spec_path, "w") as f:
            yaml.safe_dump({"name": self.name, "argv": self.argv(True, memory), "disks": disks}, f)

    def spec(self) -> dict:
        import yaml

        with open(self.spec_path) as f:
            return yaml.safe_load(f)

    def reattach(self) -> bool:
        """Follow a QEMU that snapfw started (its -pidfile); False if none runs."""
        try:
            with open(self.pidfile) as f:
                pid = int(f.read())
        except (OSError, ValueError):
            pid = None
        self.pid = pid if pid is not None and _alive(pid) else None
        return self.pid is not None

    def start(self) -> "Qemu":
        subprocess.run(self.argv(), check=True, capture_output=True, timeout=60)
        with open(self.pidfile) as f:
            self.pid = int(f.read())
        if self.system:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = BOOT_SECONDS):
        """Wait until the booted guest's agent answers (also after snapfw started this QEMU again)."""
        wait_for_agent(self.agent, self.console, timeout)

    def sh(self, script: str, timeout: float = 120, check: bool = True) -> tuple[int, str, str]:
        """Run ``script`` in the booted guest (its busybox sh) through the guest agent."""
        return guest_sh(self.agent, script, timeout, check)

    def qmp(self, command: str, args: dict | None = None):
        """One command on a fresh connection, closed at once: QEMU's monitor serves one client at a time."""
        with QMP(self.sock) as q:
            return q.execute(command, args)

    def write(self, target: str, byte: int, offset: int, length: int = KIB64):
        """Write as the guest would, through the device's own block backend."""
        cmd = f'qemu-io -d /machine/peripheral/{target}/virtio-backend "write -P {byte:#x} {offset} {length}"'
        out = self.qmp("human-monitor-command", {"command-line": cmd})
        assert out == "", out

    def flush(self, target: str):
        """Flush the disk as a guest's filesystem would: QEMU writes its cached qcow2 metadata, which an
        advisory read (``qemu-img map -U``) sees only then."""
        cmd = f'qemu-io -d /machine/peripheral/{target}/virtio-backend "flush"'
        assert self.qmp("human-monitor-command", {"command-line": cmd}) == ""

    def active(self) -> dict:
        """target -> (active file, format), from QEMU's own view."""
        out = {}
        for b in self.qmp("query-block"):
            target = b["qdev"].split("/")[3]
            out[target] = (b["inserted"]["image"]["filename"], b["inserted"]["image"]["format"])
        return out

    def quit(self):
        """Quit QEMU and wait until it has released its images."""
        if not self.reattach():
            return
        try:
            self.qmp("quit")
        except Exception:
            os.kill(self.pid, signal.SIGKILL)
        assert exited_within(self.pid, 30), "QEMU did not exit"
        self.pid = None

    def kill(self):
        if self.reattach():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            exited_within(self.pid, 30)
            self.pid = None


class LiveEnv(Env):
    """The `snapfw` command on ``qmp:///SOCK`` of a running :class:`Qemu`, with its catalog in the temp dir.

    ``domain()`` is what QEMU runs on while it runs, and once it has quit what its launch spec names (what
    it last ran on without one).
    """

    def __init__(self, root, qemu: Qemu):
        super().__init__(root)
        self.qemu = qemu
        self.uri = f"qmp://{qemu.sock}"
        self.state_dir = os.path.join(self.dir, ".snapfw")
        self.last_active = dict(qemu.images)

    def run(self, *args, check: bool = True, env: dict | None = None, timeout: float = 120):
        return super().run(*args, check=check, env={STATE_DIR_ENV: self.state_dir, **(env or {})},
                           timeout=timeout)

    def domain(self, name: str = "web") -> dict:
        if self.qemu.reattach():
            self.last_active = self.qemu.active()
        elif os.path.exists(self.qemu.spec_path):
            self.last_active = {t: (d["path"], d["format"]) for t, d in self.qemu.spec()["disks"].items()}
        return dict(self.last_active)

    def write(self, domain: str, target: str, byte: int, offset: int):
        self.qemu.write(target, byte, offset)


# --- guest data and chains, for the live tests of every driver on QEMU ------------------------------------
BYTES = {"vda": 0x10, "vdb": 0x80}


def gen(live, g):
    """Generation ``g`` of guest data: a 64 KiB pattern of its own at ``g`` * 64 KiB on each disk."""
    for target in BYTES:
        live.write("web", target, BYTES[target] + g, g * KIB64)


def quit_then_read(live, generations):
    """Quit QEMU, then check that each disk's active file reads every generation's pattern."""
    active = live.domain()
    live.qemu.quit()
    for target, (path, fmt) in active.items():
        for g in generations:
            assert reads(path, fmt, BYTES[target] + g, g * KIB64), (target, g)


def live_chains(live, domain: str = "web") -> dict:
    """target -> the files of the chain the catalog records as active, active first."""
    files = {f["path"]: f for f in live.export(domain)["files"]}
    out = {}
    for target, (path, _fmt) in live.domain(domain).items():
        chain = [path]
        while chain[-1] in files and files[chain[-1]]["backing"]:  # a disk not yet in the catalog: its file
            chain.append(files[chain[-1]]["backing"])
        out[target] = chain
    return out


def qemu_chains(qemu) -> dict:
    """target -> the files of the chain QEMU runs the disk on, active first."""
    out = {}
    for b in qemu.qmp("query-block"):
        image, chain = b["inserted"]["image"], []
        while image:
            chain.append(image["filename"])
            image = image.get("backing-image")
        out[b["qdev"].split("/")[3]] = chain
    return out


def spec_disks(live) -> dict:
    return {t: {"path": p, "format": f} for t, (p, f) in live.domain().items()}


def kill_mid_job(env: Env, *args) -> dict:
    """Run `snapfw ARGS --json` on ``env``'s connection and SIGKILL it at its first progress strictly
    between 0 and 100 % (inside a block job, which outlives it); returns that progress event."""
    p = subprocess.Popen([sys.executable, "-m", "snapfw", "--connect", env.uri, *args, "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, STATE_DIR_ENV: env.state_dir})
    seen, said = {}, []
    for line in p.stderr:
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "progress" and 0 < event["percent"] < 100:
            seen = event
            p.send_signal(signal.SIGKILL)
            break
        said.append(line)
    p.wait()
    assert seen, f"snapfw {' '.join(args)} ended ({p.returncode}) before its job reported progress: " + \
        "".join(said)[-2000:]
    return seen



@contextlib.contextmanager
def immutable(folder: str):
    """``folder`` accepts no new files, not even from root (ext4's immutable flag): a disk there cannot
    get a new overlay. Skips where the filesystem has no such flag."""
    if subprocess.run(["chattr", "+i", folder], capture_output=True).returncode != 0:
        pytest.skip(f"chattr +i does not work on {folder}'s filesystem")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", folder], check=True)


def boundaries(env: Env, *args) -> list[str]:
    """SNAPFW_FAULT values that SIGKILL `snapfw ARGS` at each step boundary of its plan (from its
    --dry-run): before each prepare step, at the catalog commit, before each finish step."""
    steps = env.json(*args, "--dry-run")["plan"]["steps"]
    count = {phase: sum(s["phase"] == phase for s in steps) for phase in ("prepare", "finish")}
    return ([f"prepare:{i}:kill" for i in range(count["prepare"])] + ["commit:0:kill"]
            + [f"finish:{i}:kill" for i in range(count["finish"])])


def kill_then_repair(env: Env, fault: str, *args):
    """Run `snapfw ARGS` killed at ``fault``, then `check --repair`: it rolls back what was not committed
    and finishes what was (a plan with nothing to prepare, killed before its commit, changed nothing and
    left nothing to repair); afterwards the catalog matches every image and no other image is left."""
    operation, domain = args[0], args[1]
    prepares = any(s["phase"] == "prepare" for s in env.json(*args, "--dry-run")["plan"]["steps"])
    r = env.run(*args, env={"SNAPFW_FAULT": fault}, check=False)
    assert r.returncode == -9, (fault, r.stdout, r.stderr)
    done = "finished" if fault.startswith("finish") else "rolled back"
    out = env.run("check", domain, "--repair").stdout  # what it did, then any disagreement found after
    expected = f"{domain}: {done} {operation} of {domain}"
    assert out.splitlines() == [expected if prepares or done == "finished" else "No problems found."], (fault, out)
    images = {os.path.join(env.dir, n) for n in env.files() if n.endswith((".qcow2", ".img"))}
    known = {f["path"] for f in env.export(domain)["files"]} | {p for p, _f in env.domain(domain).values()}
    assert images == known, (fault, images ^ known)  # no stray overlay, nothing the catalog names missing


def kill_in_job(env: Env, caught, *args):
    """Run `snapfw ARGS` on ``env``'s connection and SIGKILL it as soon as ``caught()`` returns true:
    ``caught`` polls the hypervisor for the block job and throttles it, so it is still running then."""
    p = subprocess.Popen([sys.executable, "-m", "snapfw", "--connect", env.uri, *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, STATE_DIR_ENV: env.state_dir})
    deadline = time.monotonic() + 120
    while not caught():
        assert p.poll() is None, f"snapfw ended before its block job was caught: {p.stderr.read()}"
        assert time.monotonic() < deadline, "no block job appeared"
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()


@contextlib.contextmanager
def failing_writes(mountpoint: str, offset: int, size: str = "4M"):
    """A raw disk at ``mountpoint`` (a FUSE export of a store beside it) whose writes covering byte
    ``offset`` fail with EIO (blkdebug, armed by the raw driver's write_aio event); reads work. A running
    hypervisor sees a regular file."""
    store = mountpoint + ".store"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", store, size], check=True)
    debug = {"driver": "blkdebug", "node-name": "dbg", "image": "store",
             "inject-error": [{"event": "write_aio", "iotype": "write", "errno": 5, "sector": offset // 512}]}
    with fuse_export([f"driver=file,node-name=store,filename={store}", json.dumps(debug),
                      "driver=raw,node-name=disk,file=dbg"], "disk", mountpoint):
        yield
