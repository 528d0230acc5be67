"""A small TCG guest with real LVM2, device-mapper and the QEMU guest agent, for storage that is not a file here.

This host's kernel has no device-mapper, so tests of the lvm backend run the lvm commands in a guest:
Debian's cloud kernel (``apt-get download`` + ``dpkg-deb -x``) and an initramfs made from this host's own
binaries (busybox-static, lvm2, thin-provisioning-tools, qemu-guest-agent) with their ``ldd`` libraries,
booted with ``-accel tcg`` (the KVM here cannot run a guest kernel). The host reaches it through the real
guest agent on a virtio-serial port (``guest-exec``), as snapfw's guest runner does. The built kernel and
initramfs are cached under ``~/.cache/snapfw/guest/<key>``, the key naming every package version.
(../shared/TESTING.md, "Guest harness", records how each part was found to work.)
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time

from snapfw.tools.qga import GuestAgent

PACKAGES = ("busybox-static", "lvm2", "thin-provisioning-tools", "qemu-guest-agent")
KERNEL_META = "linux-image-cloud-amd64"  # depends on the current linux-image-6.1.0-N-cloud-amd64
BUSYBOX = "/bin/busybox"
BINARIES = ("/usr/sbin/lvm", "/usr/sbin/pdata_tools", "/usr/sbin/qemu-ga")
LVM_COMMANDS = ("lvs", "vgs", "pvs", "lvcreate", "lvremove", "lvconvert", "lvchange", "lvextend", "vgcreate",
                "vgremove", "pvcreate", "pvremove", "vgchange", "lvrename", "lvdisplay")
THIN_TOOLS = ("thin_check", "thin_repair", "thin_restore", "thin_dump")
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "dm-snapshot", "dm-thin-pool")
LVM_CONF = """devices { obtain_device_list_from_udev = 0 external_device_info_source = "none" }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
global { use_lvmpolld = 0 event_activation = 0 }
"""
READY = "SNAPFW-GUEST-READY"
AGENT_PORT = "org.qemu.guest_agent.0"
INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/sbin:/usr/bin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs run /run
mkdir -p /run/lock /tmp /dev/disk/by-serial
for m in $(cat /modules/order); do insmod /modules/$m.ko || echo "snapfw-guest: insmod $m failed"; done
for i in $(seq 50); do
    for p in /sys/class/virtio-ports/*; do [ "$(cat $p/name 2>/dev/null)" = {AGENT_PORT} ] && port=/dev/${{p##*/}}; done
    [ -n "$port" ] && [ -e "$port" ] && break; sleep 0.1
done
for b in /sys/block/vd*; do ln -s /dev/${{b##*/}} /dev/disk/by-serial/$(cat $b/serial); done
qemu-ga -m virtio-serial -p $port -t /run &
echo {READY}
while :; do sleep 3600; done
"""
MEMORY_MB = 256
BOOT_SECONDS = 120  # TCG on a loaded 2-core machine; about 5 s when idle


class GuestUnavailable(Exception):
    """A part the guest needs is missing (a package, the Debian archive)."""


def _out(argv) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise GuestUnavailable(f"{' '.join(argv)} failed: {r.stderr.strip()[-300:]}")
    return r.stdout


def _installed(package: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout:
        raise GuestUnavailable(f"{package} is not installed (apt-get install {' '.join(PACKAGES)})")
    return r.stdout


def kernel_package() -> tuple[str, str]:
    """(name, version) of the cloud kernel the archive offers now."""
    deps = re.findall(r"Depends: (linux-image-\S+-cloud-amd64)", _out(["apt-cache", "depends", KERNEL_META]))
    if not deps:
        raise GuestUnavailable(f"apt-cache knows no {KERNEL_META} (run apt-get update)")
    version = re.search(r"^Version: (\S+)", _out(["apt-cache", "show", "--no-all-versions", deps[0]]), re.M)
    return deps[0], version.group(1)


def _libraries(binary: str) -> list[str]:
    return re.findall(r"(/\S+) \(0x", _out(["ldd", binary]))


def _module_order(moddir: str) -> tuple[list[str], dict[str, str]]:
    """The modules to insmod, each after what its ``depends=`` names (built-in ones are absent), and
    the file of each module by name."""
    files = {}
    for folder, _, names in os.walk(moddir):
        for n in names:
            if n.endswith(".ko"):
                files[n[:-3].replace("-", "_")] = os.path.join(folder, n)
    order: list[str] = []

    def add(name):
        key = name.replace("-", "_")
        if key not in files or key in order:
            return
        with open(files[key], "rb") as f:
            m = re.search(rb"depends=([^\0]*)\0", f.read())
        for dep in filter(None, (m.group(1).decode().split(",") if m else [])):
            add(dep)
        order.append(key)

    for name in MODULES:
        add(name)
    return [os.path.basename(files[k])[:-3] for k in order], files


class Cpio:
    """A cpio archive in the kernel's ``newc`` format, built in memory."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs = set()

    def _entry(self, name: str, mode: int, data: bytes = b""):
        raw = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0))
        self.ino += 1
        self.buf.write(header.encode() + raw)
        self.buf.write(b"\0" * (-(110 + len(raw)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def mkdir(self, path: str):
        path = path.strip("/")
        if not path or path in self.dirs:
            return
        self.mkdir(os.path.dirname(path))
        self.dirs.add(path)
        self._entry(path, stat.S_IFDIR | 0o755)

    def file(self, path: str, data: bytes, mode: int = 0o755):
        self.mkdir(os.path.dirname(path))
        self._entry(path.strip("/"), stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str):
        self.mkdir(os.path.dirname(path))
        self._entry(path.strip("/"), stat.S_IFLNK | 0o777, target.encode())

    def copy(self, path: str):
        """A host file at the same path in the archive (symlinks followed)."""
        with open(path, "rb") as f:
            self.file(path, f.read(), stat.S_IMODE(os.stat(path).st_mode))

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue() + b"\0" * (-self.buf.tell() % 512)


def build(cache: str) -> tuple[str, str]:
    """(kernel, initramfs) paths, built once per key under ``cache``."""
    kernel, kversion = kernel_package()
    versions = [f"{p}={_installed(p)}" for p in PACKAGES] + [f"{kernel}={kversion}"]
    key = hashlib.sha256("\n".join(versions + [INIT, LVM_CONF, *MODULES]).encode()).hexdigest()[:16]
    folder = os.path.join(cache, "guest", key)
    vmlinuz, initrd = os.path.join(folder, "vmlinuz"), os.path.join(folder, "root.cpio")
    if os.path.exists(initrd):
        return vmlinuz, initrd
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(folder)) as work:
        r = subprocess.run(["apt-get", "download", f"{kernel}={kversion}"], cwd=work, capture_output=True, text=True)
        debs = [n for n in os.listdir(work) if n.endswith(".deb")]
        if r.returncode != 0 or not debs:
            raise GuestUnavailable(f"apt-get download {kernel} failed: {r.stderr.strip()[-300:]}")
        tree = os.path.join(work, "x")
        _out(["dpkg-deb", "-x", os.path.join(work, debs[0]), tree])
        boot = os.path.join(tree, "boot")
        image = next(n for n in os.listdir(boot) if n.startswith("vmlinuz-"))
        moddir = os.path.join(tree, "lib", "modules")
        order, files = _module_order(moddir)
        archive = Cpio()
        archive.file("init", INIT.encode())
        archive.copy(BUSYBOX)
        for d in ("proc", "sys", "dev", "run", "tmp", "etc/lvm", "usr/bin", "sbin"):
            archive.mkdir(d)
        archive.file("etc/lvm/lvm.conf", LVM_CONF.encode(), 0o644)
        libs = {lib for b in BINARIES for lib in _libraries(b)}
        for path in sorted(set(BINARIES) | libs):
            archive.copy(path)
        for name in LVM_COMMANDS:
            archive.symlink(f"usr/sbin/{name}", "lvm")
        for name in THIN_TOOLS:
            archive.symlink(f"usr/sbin/{name}", "pdata_tools")
        for name in order:
            with open(files[name.replace("-", "_")], "rb") as f:
                archive.file(f"modules/{name}.ko", f.read(), 0o644)
        archive.file("modules/order", "\n".join(order).encode(), 0o644)
        os.makedirs(os.path.join(work, "out"))
        shutil.copy(os.path.join(boot, image), os.path.join(work, "out", "vmlinuz"))
        with open(os.path.join(work, "out", "root.cpio"), "wb") as f:
            f.write(archive.bytes())
        os.replace(os.path.join(work, "out"), folder)
    return vmlinuz, initrd


class Guest:
    """One booted guest: ``disks`` (serial -> host image) appear as /dev/disk/by-serial/SERIAL in it;
    ``agent`` is its guest agent socket (what ``SNAPFW_HOST=qga:SOCKET`` names)."""

    def __init__(self, folder: str, system: tuple[str, str], disks: dict[str, int]):
        self.dir = folder
        self.kernel, self.initrd = system
        self.agent = os.path.join(folder, "qga.sock")
        self.disks = {}
        for serial, size in disks.items():
            path = os.path.join(folder, f"{serial}.img")
            with open(path, "wb") as f:
                f.truncate(size)
            self.disks[serial] = path
        self.proc = None
        self.console = os.path.join(folder, "console.log")

    def argv(self) -> list[str]:
        argv = ["qemu-system-x86_64", "-accel", "tcg,tb-size=64", "-cpu", "max", "-m", str(MEMORY_MB),
                "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
                "-kernel", self.kernel, "-initrd", self.initrd, "-append", "console=ttyS0 quiet panic=-1",
                "-chardev", f"socket,id=qga,path={self.agent},server=on,wait=off",
                "-device", "virtio-serial", "-device", f"virtserialport,chardev=qga,name={AGENT_PORT}"]
        for serial, path in self.disks.items():
            argv += ["-drive", f"file={path},format=raw,if=none,id={serial},cache=unsafe",
                     "-device", f"virtio-blk-pci,drive={serial},serial={serial}"]
        return argv

    def start(self) -> "Guest":
        log = open(self.console, "wb")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_agent(self.agent, self.console, BOOT_SECONDS, lambda: self.proc.poll() is None)
        except GuestUnavailable:
            self.stop()
            raise
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def sh(self, script: str, timeout: float = 120, check: bool = True) -> tuple[int, str, str]:
        return guest_sh(self.agent, script, timeout, check)


def wait_for_agent(agent: str, console: str, timeout: float, alive=lambda: True):
    """Wait until the guest booting with ``console`` (its serial output) has printed READY and its agent
    answers on socket ``agent``; GuestUnavailable (with the console's tail) if not within ``timeout``."""
    deadline = time.monotonic() + timeout

    def tail():
        with open(console, "rb") as f:
            return f.read()[-600:].decode(errors="replace")

    while True:
        try:
            with open(console, "rb") as f:
                if READY.encode() in f.read():
                    break
        except FileNotFoundError:
            pass
        if not alive() or time.monotonic() > deadline:
            raise GuestUnavailable(f"the guest did not boot: {tail()}")
        time.sleep(0.1)
    while True:  # qemu-ga starts just after the marker
        try:
            with GuestAgent(agent, timeout=2):
                return
        except Exception:
            if time.monotonic() > deadline:
                raise GuestUnavailable(f"the guest agent does not answer: {tail()}") from None
            time.sleep(0.2)


def guest_sh(agent: str, script: str, timeout: float = 120, check: bool = True) -> tuple[int, str, str]:
    """Run ``script`` with the guest's busybox sh through its agent; (exit code, stdout, stderr)."""
    with GuestAgent(agent) as agent_:
        code, out, err = agent_.exec(["sh", "-c", script], timeout)
    out, err = out.decode(errors="replace"), err.decode(errors="replace")
    if check and code != 0:
        raise AssertionError(f"guest: {script!r} exited {code}: {err}{out}")
    return code, out, err
