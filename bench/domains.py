"""The two domains the benchmark compares: an ``images://`` domain of snapfw and a libvirt domain.

Both grow to N snapshots in a straight line (each the child of the one before, the last one current), named
``s0`` .. ``s<N-1>``.

snapfw's snapshots are real: each is one ``lifecycle.create`` in this process, i.e. one internal qcow2
snapshot (``qemu-img snapshot -c``) plus its catalog transaction, exactly what ``snapfw create`` does
minus the interpreter start-up. libvirt's are metadata only, defined with ``VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE``
(what ``virsh snapshot-list`` reads); before the create/delete comparison the libvirt domain's disk becomes
a copy of snapfw's, so both ``qemu-img`` runs work on a qcow2 file holding the same N internal snapshots.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

DISK_SIZE = "16M"
LIBVIRT_URI = "qemu:///system"
LIBVIRT_SOCKET = "/run/libvirt/libvirt-sock"
VIRTLOGD_SOCKET = "/run/libvirt/virtlogd-sock"
NAME_PREFIX = "snapfw-bench-"


def snapshot_name(i: int) -> str:
    return f"s{i}"


class SnapfwDomain:
    """``DIR/<name>.yaml`` with one qcow2 disk, on the connection ``images:///DIR``."""

    def __init__(self, root: str, name: str = "benchdom"):
        self.dir = os.path.join(root, "images")
        os.makedirs(self.dir)
        self.name = name
        self.uri = f"images://{self.dir}"
        self.disk = os.path.join(self.dir, f"{name}-vda.qcow2")
        self.count = 0
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.disk, DISK_SIZE], check=True)
        with open(os.path.join(self.dir, f"{name}.yaml"), "w") as f:
            f.write(f"disks:\n- {{target: vda, path: {os.path.basename(self.disk)}, format: qcow2}}\n")
        self._session = None

    def extend(self, n: int, progress=None) -> float:
        """Create snapshots until there are ``n``; return the seconds it took."""
        from snapfw import lifecycle

        if self._session is None:
            self._session = lifecycle.Session(self.uri)
        start = time.perf_counter()
        for i in range(self.count, n):
            lifecycle.create(self._session, self.name, snapshot_name(i))
            self.count = i + 1
            if progress is not None and (self.count % 100 == 0 or self.count == n):
                progress(self.count, time.perf_counter() - start)
        return time.perf_counter() - start


# --- libvirt ---------------------------------------------------------------------------------------------
def _listening(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def kvm_warning() -> str | None:
    """libvirtd re-probes QEMU (seconds) on every API call while the qemu user cannot open /dev/kvm."""
    import grp

    try:
        st = os.stat("/dev/kvm")
    except OSError:
        return None
    try:
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return None
    if st.st_gid != kvm_gid or not st.st_mode & 0o060:
        return ("/dev/kvm is not read-write for group kvm (no udev?): libvirtd then re-probes QEMU on "
                "every call and virsh looks seconds slower than it is; fix: chgrp kvm /dev/kvm; "
                "chmod 660 /dev/kvm (or pass --start-libvirtd, which does it)")
    return None


def start_libvirtd(log) -> None:
    """What a host without systemd/udev needs: /dev/kvm for group kvm, virtlogd, libvirtd, the socket."""
    import grp

    if os.geteuid() != 0:
        raise RuntimeError("--start-libvirtd needs root")
    if os.path.exists("/dev/kvm"):
        try:
            os.chown("/dev/kvm", -1, grp.getgrnam("kvm").gr_gid)
            os.chmod("/dev/kvm", 0o660)
            log("bench: /dev/kvm is now root:kvm 0660")
        except KeyError:
            pass
    for program, path in (("virtlogd", VIRTLOGD_SOCKET), ("libvirtd", LIBVIRT_SOCKET)):
        if _listening(path):
            continue
        if not shutil.which(program):
            raise RuntimeError(f"{program} not found (apt-get install libvirt-daemon-system)")
        subprocess.run([program, "-d"], check=True)
        log(f"bench: started {program} -d")
        deadline = time.monotonic() + 15
        while not _listening(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{program} started but {path} does not answer after 15 s")
            time.sleep(0.1)


def connect():
    """An open libvirt connection to qemu:///system, or RuntimeError saying what is missing."""
    try:
        import libvirt
    except ImportError:
        raise RuntimeError("libvirt-python is not installed: .venv/bin/pip install -e '.[bench]' "
                           "(needs libvirt-dev and pkg-config), or run with --snapfw-only") from None
    if not _listening(LIBVIRT_SOCKET):
        raise RuntimeError(f"libvirtd is not listening on {LIBVIRT_SOCKET}: start it (see bench/README.md), "
                           "pass --start-libvirtd (root), or run with --snapfw-only")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions anyway
    try:
        return libvirt.open(LIBVIRT_URI)
    except libvirt.libvirtError as e:
        raise RuntimeError(f"cannot connect to {LIBVIRT_URI}: {e}") from None


def remove_stale(conn, log) -> None:
    """Undefine (and stop) domains a killed earlier run left behind (named with the prefix and a dead pid,
    then for the live guests a suffix)."""
    import libvirt

    for dom in conn.listAllDomains(0):
        name = dom.name()
        pid = name[len(NAME_PREFIX):].split("-")[0]
        if name.startswith(NAME_PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            log(f"bench: undefined {name}, left behind by an earlier run")


class LibvirtDomain:
    """A persistent, never started domain of type qemu with one qcow2 disk; snapshots by REDEFINE."""

    def __init__(self, conn, root: str):
        import libvirt

        self.libvirt = libvirt
        self.conn = conn
        self.name = f"{NAME_PREFIX}{os.getpid()}"
        self.dir = os.path.join(root, "libvirt")
        os.makedirs(self.dir)
        os.chmod(root, 0o755)  # libvirtd's own qemu-img runs as root, but keep the path traversable anyway
        self.disk = os.path.join(self.dir, "vda.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.disk, DISK_SIZE], check=True)
        self.count = 0
        self.dom = conn.defineXML(f"""<domain type='qemu'>
  <name>{self.name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{self.disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>""")
        self.domain_xml = self.dom.XMLDesc(0)
        self.base_time = int(time.time()) - 10 ** 6

    def extend(self, n: int) -> float:
        """Redefine snapshots until there are ``n``; return the seconds it took."""
        lv = self.libvirt
        start = time.perf_counter()
        for i in range(self.count, n):
            parent = f"<parent><name>{snapshot_name(i - 1)}</name></parent>" if i else ""
            xml = (f"<domainsnapshot><name>{snapshot_name(i)}</name><state>shutoff</state>"
                   f"<creationTime>{self.base_time + i}</creationTime>{parent}<memory snapshot='no'/>"
                   f"<disks><disk name='vda' snapshot='internal'/></disks>{self.domain_xml}</domainsnapshot>")
            flags = lv.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
            if i == n - 1:
                flags |= lv.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
            self.dom.snapshotCreateXML(xml, flags)
            self.count = i + 1
        return time.perf_counter() - start

    def take_disk(self, path: str) -> None:
        """Make this domain's disk a copy of ``path`` (so it holds the same internal snapshots)."""
        shutil.copyfile(path, self.disk)
        with open(self.disk, "rb+") as f:  # write it back now, not during the timed qemu-img runs
            os.fsync(f.fileno())

    def snapshot_count(self) -> int:
        return self.dom.snapshotNum(0)

    def undefine(self) -> None:
        self.dom.undefineFlags(self.libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)


def libvirtd_rss_mib() -> float | None:
    """Resident memory of the running libvirtd (it does the work behind virsh, not counted in virsh's RSS)."""
    return _largest_rss_mib(lambda pid: _read(f"/proc/{pid}/comm").strip() == "libvirtd")


def resident_rss_mib() -> float | None:
    """Resident memory of snapfw's resident interpreter (snapfw.tools.resident: it runs the commands' workers,
    not counted in a command's RSS); the largest if there are several."""
    return _largest_rss_mib(lambda pid: "snapfw.resident" in _read(f"/proc/{pid}/cmdline"))


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _largest_rss_mib(matches) -> float | None:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if matches(pid):
                found += [int(line.split()[1]) / 1024 for line in _read(f"/proc/{pid}/status").splitlines()
                          if line.startswith("VmRSS:")]
        except OSError:
            continue
    return max(found, default=None)
