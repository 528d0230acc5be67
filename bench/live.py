"""Live rows: a running 4-disk guest, snapshotted disk-only and atomically, then a middle snapshot merged away;
and a live memory+disk snapshot of such a guest, with how long the guest was paused.

Four guests, each with four 16 MiB qcow2 disks and no OS (firmware only, as the tests run them), so that no
tool ever finds a chain another tool changed: a bare QEMU for ``snapfw --connect qmp://``, a bare QEMU for
the floor (``qmp_floor.py``: one QMP ``transaction`` from a tiny stdlib client), a libvirt domain for
``snapfw --connect qemu:///system`` and one for ``virsh snapshot-create-as --disk-only --atomic
--no-metadata``. Before each round 1 MiB of a new pattern goes into every disk of the snapfw-qmp and the
virsh guests (HMP ``qemu-io``, as a guest would write), so each layer holds data a merge must copy.

The memory rows use two more guests of the same shape, each with a second QMP monitor that only listens:
QEMU's own STOP and RESUME events there time the guest's pause, whoever drives it (snapfw on the first
monitor, libvirtd on its own).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from . import domains, measure

DISKS = ("vda", "vdb", "vdc", "vdd")
MIB = 1 << 20
FLOOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qmp_floor.py")


def _disk_flags() -> list[str]:
    return [a for t in DISKS for a in ("--disk", f"{t}=external")]


class Qemu:
    """``qemu-system-x86_64 -name NAME -daemonize`` with the four disks as -blockdev, a QMP socket; with
    ``events``, a second one (``self.events``) for :class:`Events`."""

    def __init__(self, root: str, name: str, events: bool = False):
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir)
        self.name = name
        self.sock = os.path.join(self.dir, "qmp.sock")
        self.events = os.path.join(self.dir, "events.sock") if events else None
        self.pidfile = os.path.join(self.dir, "qemu.pid")
        argv = ["qemu-system-x86_64", "-machine", "q35,accel=kvm:tcg", "-m", "64", "-nodefaults", "-display",
                "none", "-qmp", f"unix:{self.sock},server=on,wait=off", "-name", name, "-daemonize",
                "-pidfile", self.pidfile]
        if events:
            argv += ["-qmp", f"unix:{self.events},server=on,wait=off"]
        for i, target in enumerate(DISKS):
            path = os.path.join(self.dir, f"{target}.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"], check=True)
            argv += ["-blockdev", f"driver=file,filename={path},node-name=file{i}",
                     "-blockdev", f"driver=qcow2,file=file{i},node-name=disk{i}",
                     "-device", f"virtio-blk-pci,drive=disk{i},id={target}"]
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
        with open(self.pidfile) as f:
            self.pid = int(f.read())

    def qmp(self, command: str, args: dict | None = None):
        from snapfw.tools.qmp import QMP

        with QMP(self.sock) as q:
            return q.execute(command, args)

    def write(self, byte: int, offset: int):
        for target in DISKS:
            cmd = f'qemu-io -d /machine/peripheral/{target}/virtio-backend "write -P {byte:#x} {offset} {MIB}"'
            self.qmp("human-monitor-command", {"command-line": cmd})

    def stop(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class LibvirtGuest:
    """A persistent libvirt domain with the four disks, running (QEMU runs as root, no relabelling); with
    ``events``, a second QMP monitor of its QEMU (``self.events``, a ``qemu:commandline`` argument) for
    :class:`Events`."""

    def __init__(self, conn, root: str, suffix: str, events: bool = False):
        self.name = f"{domains.NAME_PREFIX}{os.getpid()}-{suffix}"
        self.dir = os.path.join(root, suffix)
        os.makedirs(self.dir)
        self.events = os.path.join(self.dir, "events.sock") if events else None
        monitor = (f"<qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='unix:{self.events},server=on,"
                   "wait=off'/></qemu:commandline>") if events else ""
        disks = ""
        for target in DISKS:
            path = os.path.join(self.dir, f"{target}.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"], check=True)
            disks += (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{path}'/>"
                      f"<target dev='{target}' bus='virtio'/></disk>")
        kind = "kvm" if os.path.exists("/dev/kvm") else "qemu"
        self.dom = conn.defineXML(
            f"<domain type='{kind}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>{self.name}</name>"
            "<memory unit='MiB'>64</memory><os><type arch='x86_64' machine='q35'>hvm</type></os>"
            "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>"
            f"<devices>{disks}</devices>{monitor}</domain>")
        self.dom.create()

    def write(self, byte: int, offset: int):
        import libvirt_qemu

        for i, target in enumerate(DISKS):
            cmd = f'qemu-io -d /machine/peripheral/virtio-disk{i}/virtio-backend "write -P {byte:#x} {offset} {MIB}"'
            libvirt_qemu.qemuMonitorCommand(self.dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)

    def chain(self, target: str) -> list[str]:
        """The files of disk ``target``, active first: the active one from the live XML, the rest from the
        image headers."""
        import xml.etree.ElementTree as ET

        xml = ET.fromstring(self.dom.XMLDesc(0))
        disk = next(d for d in xml.findall("devices/disk") if d.find("target").get("dev") == target)
        out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", "-f", "qcow2",
                              disk.find("source").get("file")], check=True, capture_output=True, text=True).stdout
        return [node["filename"] for node in json.loads(out)]

    def remove(self):
        import libvirt

        if self.dom.isActive():
            self.dom.destroy()
        self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)


def _allocated(path: str) -> int:
    """Bytes ``path`` itself holds (what committing it into its backing file copies)."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", path], check=True,
                         capture_output=True, text=True).stdout
    return sum(e["length"] for e in json.loads(out) if e["depth"] == 0 and e["data"])


def _settle(log, most: float = 30.0) -> None:
    """Wait until the guests just started stop using the CPUs (their firmware's start: seconds of CPU under
    TCG, and enough beside it to double every time measured then), at most ``most`` seconds: until all
    QEMU processes together use under a tenth of a CPU over half a second."""
    def cpu() -> int:
        ticks = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if "(qemu-system-" in stat:
                fields = stat[stat.rindex(")") + 2:].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks

    start, hz = time.monotonic(), os.sysconf("SC_CLK_TCK")
    while time.monotonic() - start < most:
        before = cpu()
        time.sleep(0.5)
        if (cpu() - before) / hz < 0.05:
            log(f"bench: the guests idle after {time.monotonic() - start:.1f} s")
            return
    log(f"bench: warning: the guests still use the CPU after {most:.0f} s; timing anyway")


def measure_live(conn, root: str, snapfw: list[str], virsh: list[str], env: dict, repeat: int, log) -> dict:
    """Create rounds on all four guests (interleaved, the first untimed), then ``repeat`` live deletes of a
    middle snapshot: snapfw's (qmp driver) against ``virsh blockcommit`` of a middle layer of each disk."""
    state = os.path.join(root, "live-state")  # snapfw's catalog for these guests stays in the temp dir
    series = {k: measure.Series([]) for k in ("virsh", "floor", "qmp", "libvirt")}
    q_snapfw = q_floor = lv_snapfw = lv_virsh = None
    try:
        q_snapfw, q_floor = Qemu(root, f"{domains.NAME_PREFIX}{os.getpid()}-q"), Qemu(root, f"{domains.NAME_PREFIX}{os.getpid()}-f")
        if conn is not None:
            lv_snapfw, lv_virsh = LibvirtGuest(conn, root, "lvs"), LibvirtGuest(conn, root, "lvv")
        _settle(log)
        for rnd in range(repeat + 1 + repeat):  # enough snapshots for `repeat` deletes of a middle one
            name = f"l{rnd}"
            q_snapfw.write(rnd + 1, rnd * MIB % (15 * MIB))
            runs = {"qmp": snapfw + ["--connect", f"qmp://{q_snapfw.sock}", "--state-dir", state, "create",
                                     q_snapfw.name, name, *_disk_flags()],
                    "floor": [sys.executable, FLOOR, q_floor.sock, name]}
            if lv_virsh is not None:
                lv_virsh.write(rnd + 1, rnd * MIB % (15 * MIB))
                runs["libvirt"] = snapfw + ["--connect", domains.LIBVIRT_URI, "--state-dir", state, "create",
                                            lv_snapfw.name, name, *_disk_flags()]
                runs["virsh"] = virsh + ["snapshot-create-as", "--domain", lv_virsh.name, "--name", name,
                                         "--disk-only", "--atomic", "--no-metadata"]
            for key, argv in runs.items():
                sample, _ = measure.run(argv, env=env)
                series[key].argv = argv
                if 0 < rnd <= repeat:
                    series[key].samples.append(sample)
        log(f"bench: timing {repeat} live deletes of a middle snapshot")
        deletes = _measure_deletes(q_snapfw, lv_virsh, snapfw, virsh, state, env, repeat)
    finally:
        for guest in (q_snapfw, q_floor):
            if guest is not None:
                guest.stop()
        _remove(log, lv_snapfw, lv_virsh)
    return {"create": {k: s.as_dict() for k, s in series.items() if s.samples}, "delete": deletes}


def _remove(log, *guests):
    """Undefine the libvirt guests that were made (None: not made)."""
    for guest in guests:
        if guest is not None:
            try:
                guest.remove()
            except Exception as e:  # report, never hide the real error
                log(f"bench: warning: could not remove {guest.name}: {e}")


def _measure_deletes(q, lv, snapfw, virsh, state, env, repeat) -> dict:
    """Each round: snapfw deletes the middle one of the snapshots left (it picks commit or stream and
    reports the bytes it copies); virsh commits the middle layer of each disk's chain into its backing file."""
    sf, vs = measure.Series([]), measure.Series([])
    sf_bytes, vs_bytes = [], []
    base = snapfw + ["--connect", f"qmp://{q.sock}", "--state-dir", state]
    for _ in range(repeat):
        names = [s["name"] for s in json.loads(measure.run(base + ["list", q.name, "--json"], env=env,
                                                           capture=True)[1])]
        sf.argv = base + ["delete", q.name, names[len(names) // 2], "--json"]
        sample, out = measure.run(sf.argv, env=env, capture=True)
        sf.samples.append(sample)
        sf_bytes.append(json.loads(out)["plan"]["bytes_to_copy"])
        if lv is None:
            continue
        script, copied = [], 0
        for target in DISKS:
            chain = lv.chain(target)
            top, below = chain[len(chain) // 2], chain[len(chain) // 2 + 1]  # virsh's default base: the bottom
            copied += _allocated(top)
            script.append(" ".join(virsh + ["blockcommit", lv.name, target, "--top", top, "--base", below,
                                            "--wait"]))
        vs.argv = ["sh", "-c", "set -e; " + "; ".join(script)]
        sample, _ = measure.run(vs.argv, env=None)
        vs.samples.append(sample)
        vs_bytes.append(copied)
    out = {"snapfw": {**sf.as_dict(), "bytes": sf_bytes}}
    if vs.samples:
        out["virsh"] = {**vs.as_dict(), "bytes": vs_bytes}
    return out


class Events:
    """QEMU's STOP and RESUME events on a monitor of their own, by QEMU's clock: how long the guest was
    paused while a command ran. Connect before the command, read after it (QEMU keeps the events)."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        json.loads(self.file.readline())  # the greeting
        self.file.write(b'{"execute": "qmp_capabilities"}\n')
        self.file.flush()
        while "return" not in json.loads(self.file.readline()):
            pass

    def paused_seconds(self) -> float:
        """The seconds from each STOP to the next RESUME since connecting, summed; RuntimeError if the guest
        did not run again within 10 s."""
        paused, stopped = 0.0, None
        self.sock.settimeout(10)
        while True:
            try:
                line = self.file.readline()
            except TimeoutError:
                line = b""
            if not line:
                if stopped is None and paused:
                    return paused
                raise RuntimeError("the guest did not pause and run again (no STOP and RESUME events)")
            event = json.loads(line)
            at = event.get("timestamp", {}).get("seconds", 0) + event.get("timestamp", {}).get("microseconds", 0) / 1e6
            if event.get("event") == "STOP":
                stopped = at
            elif event.get("event") == "RESUME" and stopped is not None:
                paused, stopped = paused + at - stopped, None
                self.sock.settimeout(0.05)  # any later pause follows at once; then the command is done

    def close(self):
        self.file.close()
        self.sock.close()


def measure_memory(conn, root: str, snapfw: list[str], virsh: list[str], env: dict, repeat: int, log) -> dict:
    """Live memory+disk snapshots of a running 4-disk guest (external overlays, the memory image beside
    them): ``snapfw create --memory live`` (qmp and libvirt drivers) against ``virsh snapshot-create-as
    --live --memspec``, interleaved, the first round untimed; each with the guest's pause from its QEMU's
    events."""
    state = os.path.join(root, "memory-state")
    series = {k: measure.Series([]) for k in ("qmp", "libvirt", "virsh")}
    paused = {k: [] for k in series}
    q = lv = ls = None
    try:
        q = Qemu(root, f"{domains.NAME_PREFIX}{os.getpid()}-m", events=True)
        if conn is not None:
            lv = LibvirtGuest(conn, root, "lvm", events=True)
            ls = LibvirtGuest(conn, root, "lsm", events=True)
        _settle(log)
        for rnd in range(repeat + 1):
            name = f"m{rnd}"
            q.write(rnd + 1, rnd * MIB % (15 * MIB))
            runs = {"qmp": (snapfw + ["--connect", f"qmp://{q.sock}", "--state-dir", state, "create", q.name, name,
                                      "--memory", "live", *_disk_flags()], q.events, env)}
            if ls is not None:
                ls.write(rnd + 1, rnd * MIB % (15 * MIB))
                runs["libvirt"] = (snapfw + ["--connect", domains.LIBVIRT_URI, "--state-dir", state, "create",
                                             ls.name, name, "--memory", "live", *_disk_flags()], ls.events, env)
            if lv is not None:
                lv.write(rnd + 1, rnd * MIB % (15 * MIB))
                files = {t: os.path.join(lv.dir, f"{t}.{name}.qcow2") for t in DISKS}
                specs = [a for t in DISKS for a in ("--diskspec", f"{t},snapshot=external,file={files[t]}")]
                runs["virsh"] = (virsh + ["snapshot-create-as", "--domain", lv.name, "--name", name, "--live",
                                          "--memspec", f"file={lv.dir}/{name}.memory,snapshot=external", *specs,
                                          "--atomic", "--no-metadata"], lv.events, None)
            for key, (argv, monitor, run_env) in runs.items():
                events = Events(monitor)
                try:
                    sample, _ = measure.run(argv, env=run_env)
                    pause = events.paused_seconds()
                finally:
                    events.close()
                series[key].argv = argv
                if rnd:
                    series[key].samples.append(sample)
                    paused[key].append(pause)
    finally:
        if q is not None:
            q.stop()
        _remove(log, lv, ls)
    return {k: {**s.as_dict(), "paused_s": [round(p, 5) for p in paused[k]]} for k, s in series.items() if s.samples}
