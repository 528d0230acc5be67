"""`create --quiesce` and `--memory` through the libvirt driver on a booted Linux guest: the TCG guest
(tests/guest.py) defined in the real libvirtd as a ``type='qemu'`` domain with direct kernel boot and a
guest agent channel. Its mounted ext2 filesystem is frozen with libvirt's fsFreeze around the disk
snapshot and thawed afterwards; a silent agent is a deadline, not a hang. A memory snapshot brings back
a marker in the guest's RAM (a tmpfs file) and its disk of that instant.

libvirt holds the agent's channel itself (one client at a time), so the test reaches the agent only
through libvirt too (``virDomainQemuAgentCommand``: ``guest-exec``, ``guest-fsfreeze-status``). One guest
boots per module (TCG is slow here); the silent-agent test stops its agent, so it runs last.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import pytest
from guest import BOOT_SECONDS, MEMORY_MB, READY
from test_libvirt import Guest, LibvirtEnv, conn, virsh, virsh_names  # noqa: F401 (conn: libvirtd, a fixture)
from test_memory import small_fs  # noqa: F401 (a fixture)
from test_quiesce import MOUNT, guest_file

from snapfw.live import AGENT_SECONDS


class BootedGuest(Guest):
    """The TCG guest as a libvirt domain: ``vda`` qcow2 (serial vda), 256 MiB, its serial console in a
    file (for the boot's READY marker) and libvirt's guest agent channel."""

    def __init__(self, conn, folder: str, system: tuple[str, str]):  # noqa: F811
        Guest.count += 1
        self.conn, self.dir = conn, folder
        self.name = f"snapfw-lvmem-{os.getpid()}-{Guest.count}"
        path = os.path.join(folder, f"{self.name}-vda.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"], check=True)
        self.images = {"vda": (path, "qcow2")}
        self.console = os.path.join(folder, "console", "serial.log")  # apart: Env.files() lists the folder
        os.makedirs(os.path.dirname(self.console))
        kernel, initrd = system
        xml = (f"<domain type='qemu'><name>{self.name}</name><memory unit='MiB'>{MEMORY_MB}</memory>"
               "<os><type arch='x86_64' machine='q35'>hvm</type>"
               f"<kernel>{kernel}</kernel><initrd>{initrd}</initrd>"
               "<cmdline>console=ttyS0 quiet panic=-1</cmdline></os><cpu mode='maximum'/>"
               "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel><devices>"
               f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{path}'/>"
               "<target dev='vda' bus='virtio'/><serial>vda</serial></disk>"
               f"<serial type='file'><source path='{self.console}'/><target port='0'/></serial>"
               "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
               "</devices></domain>")
        self.dom = conn.defineXML(xml)

    def boot(self):
        self.dom.create()
        deadline = time.monotonic() + BOOT_SECONDS
        while READY.encode() not in _read(self.console):
            assert time.monotonic() < deadline, f"the guest did not boot: {_read(self.console)[-600:]!r}"
            time.sleep(0.2)
        self.wait_agent(deadline)

    def wait_agent(self, deadline: float):
        """Until the agent answers through libvirt (after a boot, qemu-ga starts just after the marker;
        after a restore, libvirt connects to it again)."""
        import libvirt

        while True:
            try:
                self.agent("guest-ping")
                return
            except libvirt.libvirtError:
                assert time.monotonic() < deadline, "the guest agent does not answer through libvirt"
                time.sleep(0.5)

    def agent(self, command: str, args: dict | None = None, seconds: int = 10):
        import libvirt_qemu

        request = {"execute": command, **({"arguments": args} if args else {})}
        return json.loads(libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(request), seconds, 0))["return"]

    def sh(self, script: str) -> str:
        """Run ``script`` with the guest's busybox sh (``guest-exec``); its stdout; asserts it exited 0."""
        pid = self.agent("guest-exec", {"path": "sh", "arg": ["-c", script], "capture-output": True})["pid"]
        deadline = time.monotonic() + 60
        while not (status := self.agent("guest-exec-status", {"pid": pid}))["exited"]:
            assert time.monotonic() < deadline, f"guest: {script!r} still runs"
            time.sleep(0.05)
        out = base64.b64decode(status.get("out-data", "")).decode()
        err = base64.b64decode(status.get("err-data", "")).decode()
        assert status.get("exitcode") == 0, f"guest: {script!r} exited {status.get('exitcode')}: {err}{out}"
        return out


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


@pytest.fixture(scope="module")
def booted(conn, tmp_path_factory, guest_system):  # noqa: F811
    folder = tmp_path_factory.mktemp("libvirt-guest")
    g = BootedGuest(conn, str(folder), guest_system)
    try:
        g.boot()
        g.sh(f"mke2fs -q /dev/disk/by-serial/vda && mkdir -p {MOUNT} && mount /dev/disk/by-serial/vda {MOUNT}")
        yield LibvirtEnv(folder, g)
    finally:
        g.remove()


def test_quiesce_freezes_the_guest_filesystems_through_libvirt(booted, tmp_path):
    lv, g = booted, booted.guest
    g.sh(f"echo one > {MOUNT}/file")  # no sync: only in the guest's page cache until the freeze
    plan = lv.json("create", g.name, "q1", "--quiesce", "--disk", "vda=external")["plan"]
    steps = [s["describe"] for s in plan["steps"]]  # the new overlay is made before the freeze
    assert steps[0].startswith("create overlay ") and steps[1].startswith(f"freeze the filesystems of {g.name}")
    assert steps[3] == f"thaw the filesystems of {g.name}", steps
    assert g.agent("guest-fsfreeze-status") == "thawed" and g.dom.state()[0] == 1  # VIR_DOMAIN_RUNNING
    held = lv.json("show", g.name, "q1")["config"]["window"]
    assert held["quiesced"] and held["frozen_filesystems"] == 1 and 0 < held["frozen_seconds"] < 10, held
    assert held["paused_seconds"] is None
    frozen = lv.json("show", g.name, "q1")["disks"][0]["file"]
    assert guest_file(frozen, str(tmp_path)) == "one\n"  # the snapshot holds what the guest had written
    g.sh(f"echo two > {MOUNT}/file")  # the guest writes again
    lv.run("create", g.name, "q2")
    assert "Quiesced:     no, crash-consistent" in lv.run("show", g.name, "q2").stdout
    assert "No problems found" in lv.run("check", g.name).stdout


def test_kill_inside_the_freeze_then_repair_thaws_the_guest(booted):
    lv, g = booted, booted.guest
    names = lv.snapshot_names(g.name)
    # prepare: [the new overlay, freeze, the snapshot, thaw, define]: killed before the snapshot
    r = lv.run("create", g.name, "q3", "--quiesce", env={"SNAPFW_FAULT": "prepare:2:kill"}, check=False)
    assert r.returncode == -9 and g.agent("guest-fsfreeze-status") == "frozen"
    assert "rolled back create" in lv.run("check", g.name, "--repair").stdout
    assert g.agent("guest-fsfreeze-status") == "thawed" and lv.snapshot_names(g.name) == names


def reverts_bring_back(lv, g, *expected):
    """Revert to each (snapshot, RAM marker, file content) in turn: the guest runs with those."""
    for name, marker, data in expected:
        lv.run("revert", g.name, name)
        g.wait_agent(time.monotonic() + 60)
        assert g.dom.state()[0] == 1
        assert g.sh(f"cat /run/marker {MOUNT}/file").split() == [marker, data], name
        assert "No problems found" in lv.run("check", g.name).stdout


def test_memory_snapshots_bring_back_the_guest_ram_and_disks_of_their_instant(booted):
    lv, g = booted, booted.guest
    g.sh(f"echo first > /run/marker && echo d1 > {MOUNT}/file && sync")
    before, listed = lv.files(), lv.json("list", g.name)
    r = lv.run("create", g.name, "m1", "--memory", "live", "--disk", "vda=qcow2", check=False)
    assert r.returncode == 1 and "--memory live through memory backend libvirt: libvirt's live memory snapshot " \
        "takes the disks in the same call, and only as external overlays; disk vda would get an internal " \
        "snapshot" in r.stderr, r.stderr
    assert lv.files() == before and lv.json("list", g.name) == listed
    plan = lv.json("create", g.name, "m1", "--memory", "paused", "--disk", "vda=external")["plan"]
    assert [s["describe"].split(" ", 1)[0] for s in plan["steps"] if s["phase"] == "prepare"][:4] == \
        ["create", "save", "snapshot", "complete"], plan
    shown = lv.json("show", g.name, "m1")
    m, held = shown["memory"], shown["config"]["window"]
    assert m["kind"] == "paused" and m["backend"] == "libvirt" and m["size"] > 0, m
    assert 0 < held["paused_seconds"] < 30, held
    assert os.stat(m["file"]).st_mode & 0o777 == 0o600 and g.dom.state()[0] == 1  # running again
    g.sh(f"echo second > /run/marker && echo d2 > {MOUNT}/file && sync")
    lv.run("create", g.name, "m2", "--memory", "paused", "--disk", "vda=qcow2")  # internal: a tag in the qcow2
    g.sh(f"echo third > /run/marker && echo d3 > {MOUNT}/file && sync")
    reverts_bring_back(lv, g, ("m1", "first", "d1"), ("m2", "second", "d2"), ("m1", "first", "d1"))
    # live, on a branch from m1: libvirt copies the memory while the guest runs, and takes the disk in
    # the same call
    g.sh(f"echo fourth > /run/marker && echo d4 > {MOUNT}/file && sync")
    plan = lv.json("create", g.name, "m3", "--memory", "live", "--disk", "vda=external")["plan"]
    prepare = [s["describe"] for s in plan["steps"] if s["phase"] == "prepare"]
    assert prepare[0].startswith("create overlay "), prepare
    assert "and snapshot its disks at that instant, in the same call: vda: freeze" in prepare[1], prepare
    assert prepare[2].startswith("complete the memory image"), prepare
    shown = lv.json("show", g.name, "m3")
    m, held = shown["memory"], shown["config"]["window"]
    assert m["kind"] == "live" and m["size"] == os.path.getsize(m["file"]) > 0, m
    assert 0 < held["paused_seconds"] < 10, held  # from libvirt's suspended and resumed events
    assert "Paused:       yes, " in lv.run("show", g.name, "m3").stdout
    assert os.stat(m["file"]).st_mode & 0o777 == 0o600 and g.dom.state()[0] == 1
    assert "No problems found" in lv.run("check", g.name).stdout
    g.sh(f"echo fifth > /run/marker && echo d5 > {MOUNT}/file && sync")
    reverts_bring_back(lv, g, ("m3", "fourth", "d4"), ("m2", "second", "d2"), ("m3", "fourth", "d4"))
    # killed just before loading the image: the revert is committed, `check --repair` restores it
    steps = lv.json("revert", g.name, "m2", "--dry-run")["plan"]["steps"]
    finish = [st["describe"] for st in steps if st["phase"] == "finish"]
    at = next(i for i, d in enumerate(finish) if d.startswith(f"start {g.name} from its memory image"))
    r = lv.run("revert", g.name, "m2", env={"SNAPFW_FAULT": f"finish:{at}:kill"}, check=False)
    assert r.returncode == -9 and not g.dom.isActive()
    assert "finished revert" in lv.run("check", g.name, "--repair").stdout
    g.wait_agent(time.monotonic() + 60)
    assert g.sh(f"cat /run/marker {MOUNT}/file").split() == ["second", "d2"]
    lv.run("revert", g.name, "m2", "--paused")
    assert g.dom.state()[0] == 3  # VIR_DOMAIN_PAUSED: restored, not resumed
    g.dom.resume()
    g.wait_agent(time.monotonic() + 60)
    assert g.sh("cat /run/marker").strip() == "second"


@pytest.mark.parametrize("fault", ["prepare:2:kill", "prepare:3:kill", "prepare:4:kill", "prepare:3:raise"])
def test_killed_inside_a_memory_snapshot_then_repair_leaves_the_guest_running(booted, fault):
    """prepare: [the new overlay, pause, the disks' snapshot, write the memory image and resume, define]:
    killed with the guest paused (or, at 4, the image written and the guest running); repair undoes the
    disks' snapshot, resumes the guest and removes the image and the overlay."""
    lv, g = booted, booted.guest
    images = sorted(n for n in os.listdir(lv.dir) if n.endswith(".memory"))
    listed = lv.json("list", g.name)
    r = lv.run("create", g.name, "k", "--memory", "paused", "--disk", "vda=external", env={"SNAPFW_FAULT": fault},
               check=False)
    assert r.returncode != 0
    if fault.endswith("kill"):
        assert g.dom.state()[0] == (1 if fault == "prepare:4:kill" else 3)  # running / VIR_DOMAIN_PAUSED
        assert "rolled back create" in lv.run("check", g.name, "--repair").stdout
    assert g.dom.state()[0] == 1
    assert sorted(n for n in os.listdir(lv.dir) if n.endswith(".memory")) == images
    assert lv.json("list", g.name) == listed
    g.sh("true")  # the guest answers
    assert "No problems found" in lv.run("check", g.name).stdout


@pytest.mark.parametrize("when", ["in libvirt's job", "prepare:2:kill", "prepare:1:raise"])
def test_killed_inside_a_live_memory_snapshot_then_repair_leaves_the_guest_running(booted, when):
    """prepare: [the new overlay, memory and disks in libvirt's one live call, complete, define]: killed
    while libvirtd writes the memory image (its job goes on without snapfw; repair aborts it, or undoes
    what it did), or once it took the disks (the guest runs on the new overlay; repair commits it back),
    or failed before the call, the overlay made (and removed again)."""
    lv, g = booted, booted.guest
    images = sorted(n for n in os.listdir(lv.dir) if n.endswith(".memory"))
    listed, files = lv.json("list", g.name), lv.files()
    argv = ["create", g.name, "k", "--memory", "live", "--disk", "vda=external"]
    if when.startswith("prepare"):
        r = lv.run(*argv, env={"SNAPFW_FAULT": when}, check=False)
        assert r.returncode == (-9 if when.endswith("kill") else 1), r.stderr
    else:
        g.sh("dd if=/dev/urandom of=/run/noise bs=1M count=96 2>/dev/null")  # RAM worth copying
        p = subprocess.Popen([sys.executable, "-m", "snapfw", "--connect", lv.uri, *argv],
                             env={**os.environ, **lv.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        image = os.path.join(lv.dir, f"{g.name}.k.memory")
        while not (os.path.exists(image) and os.path.getsize(image)):  # libvirtd writes it: its job runs
            assert p.poll() is None and time.monotonic() < deadline, "libvirt's job was not seen"
            time.sleep(0.002)
        p.kill()
        p.wait()
    if when != "prepare:1:raise":
        assert "rolled back create" in lv.run("check", g.name, "--repair").stdout
    assert g.dom.state()[0] == 1 and g.dom.jobInfo()[0] == 0
    assert sorted(n for n in os.listdir(lv.dir) if n.endswith(".memory")) == images
    assert lv.json("list", g.name) == listed and lv.files() == files  # no image, no overlay left
    g.sh("rm -f /run/noise")  # the guest answers
    assert "No problems found" in lv.run("check", g.name).stdout


def test_killed_while_libvirt_writes_the_memory_image_then_repair_undoes_the_disks(booted):
    """snapfw dies inside CompleteMemory and libvirtd finishes writing the image: QEMU is left
    postmigrate, its images inactive (a block-commit on them fails: "Block node is read-only"); repair
    still undoes the disks' snapshot, resumes the guest and removes the image."""
    import libvirt

    lv, g = booted, booted.guest
    listed = lv.json("list", g.name)
    r = lv.run("create", g.name, "k", "--memory", "paused", "--disk", "vda=external",
               env={"SNAPFW_FAULT": "prepare:3:kill"}, check=False)  # before CompleteMemory
    assert r.returncode == -9 and g.dom.state()[0] == 3
    image = next(os.path.join(lv.dir, n) for n in os.listdir(lv.dir) if n.endswith(".k.memory"))
    g.dom.snapshotCreateXML(f"<domainsnapshot><memory snapshot='external' file='{image}'/><disks><disk "
                            "name='vda' snapshot='no'/></disks></domainsnapshot>",
                            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)  # what CompleteMemory began
    assert "rolled back create" in lv.run("check", g.name, "--repair").stdout
    assert g.dom.state()[0] == 1 and not os.path.exists(image) and lv.json("list", g.name) == listed
    g.sh("true")
    assert "No problems found" in lv.run("check", g.name).stdout


def test_memory_snapshots_are_mirrored_as_checkpoints_into_libvirt(booted):
    """`--mirror` of a snapshot with memory: libvirt's record is an external checkpoint (state running,
    the memory image named), beside the disks; a record mirrored as disk-only (as snapfw did before) is
    reported and made anew by `check --repair` (libvirt redefines no record across that line)."""
    import libvirt

    lv, g = booted, booted.guest
    mirrored = set(virsh_names(g.name))
    lv.run("create", g.name, "c1", "--memory", "live", "--disk", "vda=external", "--mirror")
    lv.run("create", g.name, "c2", "--memory", "paused", "--disk", "vda=qcow2", "--mirror")
    assert set(virsh_names(g.name)) - mirrored == {"c1", "c2"}
    for name in ("c1", "c2"):
        info = virsh("snapshot-info", g.name, name)
        assert "State:          running" in info and "Location:       external" in info, info
        image = lv.json("show", g.name, name)["memory"]["file"]
        assert f"<memory snapshot='external' file='{image}'/>" in virsh("snapshot-dumpxml", g.name, name)
    assert "<disk name='vda' snapshot='internal'/>" in virsh("snapshot-dumpxml", g.name, "c2")
    assert "No problems found" in lv.run("check", g.name).stdout
    # c1 as the previous snapfw mirrored it: disk-only
    record = g.dom.snapshotLookupByName("c1")
    xml = record.getXMLDesc(libvirt.VIR_DOMAIN_SNAPSHOT_XML_SECURE)
    old = xml.replace("<state>running</state>", "<state>disk-snapshot</state>")
    old = old[:old.index("<memory ")] + "<memory snapshot='no'/>" + old[old.index("/>", old.index("<memory ")) + 2:]
    record.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    g.dom.snapshotCreateXML(old, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)
    r = lv.run("check", g.name, check=False)
    assert r.returncode == 1 and "libvirt has snapshot c1 in state disk-snapshot, the catalog running" in r.stdout
    lv.run("check", g.name, "--repair")
    assert "State:          running" in virsh("snapshot-info", g.name, "c1")
    assert virsh("snapshot-info", g.name, "c2").split("Parent:")[1].split()[0] == "c1"
    assert "No problems found" in lv.run("check", g.name).stdout
    lv.run("delete", g.name, "c2")
    lv.run("delete", g.name, "c1")
    assert set(virsh_names(g.name)) == mirrored and "No problems found" in lv.run("check", g.name).stdout


def test_a_silent_agent_is_a_deadline_and_leaves_nothing_frozen_or_paused(booted):
    lv, g = booted, booted.guest
    g.sh("(sleep 1; kill -STOP $(pidof qemu-ga)) >/dev/null 2>&1 &")
    time.sleep(3)
    names, before = lv.snapshot_names(g.name), lv.files()
    started = time.monotonic()
    r = lv.run("create", g.name, "q4", "--quiesce", check=False)
    took = time.monotonic() - started
    assert r.returncode == 1 and "cannot quiesce" in r.stderr and "did not answer within" in r.stderr, r.stderr
    assert took < AGENT_SECONDS + 15, took  # the deadline, plus starting snapfw on a loaded machine
    assert lv.snapshot_names(g.name) == names and lv.files() == before
    lv.run("create", g.name, "q4", "--quiesce=try")
    held = lv.json("show", g.name, "q4")["config"]["window"]
    assert not held["quiesced"] and "did not answer" in held["quiesce_problem"]
    assert g.dom.state()[0] == 1  # VIR_DOMAIN_RUNNING
    assert "No problems found" in lv.run("check", g.name).stdout


@pytest.mark.parametrize("kind", ["paused", "live"])
def test_enospc_while_libvirt_writes_the_memory_image_changes_nothing(conn, small_fs, tmp_path, kind):  # noqa: F811
    """A firmware-only guest whose disks are on a small filesystem that fills up after the free-space
    check (leaving room for the overlays, not for the image): libvirt's write fails, the guest runs on its
    old files, no image or overlay is left, the catalog has nothing."""
    from snapfw import lifecycle, plugins
    from snapfw.api import SnapfwError, hookimpl

    g = Guest(conn, small_fs)
    try:
        g.start()
        lv = LibvirtEnv(small_fs, g)
        lv.state_dir = str(tmp_path / "state")
        filler, before = os.path.join(small_fs, "filler"), lv.files()

        class FillUp:  # after the free-space check, just before the plan runs
            @hookimpl
            def snapfw_pre_snapshot(self, domain, name):
                st = os.statvfs(small_fs)
                subprocess.run(["fallocate", "-l", str(st.f_bavail * st.f_frsize - (512 << 10)), filler], check=True)

        plugins.get_plugin_manager().register(FillUp(), "fill-up")
        try:
            session = lifecycle.Session(lv.uri, lv.state_dir)
            with pytest.raises(SnapfwError, match="No space left|no space"):
                lifecycle.create(session, g.name, "s1", backends={"vda": "external", "vdb": "external"}, memory=kind)
        finally:
            plugins.reset()
        os.unlink(filler)
        assert lv.files() == before and g.dom.state()[0] == 1  # VIR_DOMAIN_RUNNING
        assert lv.domain() == {t: (p, f) for t, (p, f) in g.images.items()}
        assert lv.json("list", g.name) == [] and "No problems found" in lv.run("check", g.name).stdout
    finally:
        g.remove()


def test_a_paused_guest_stays_paused_through_a_live_memory_snapshot(conn, tmp_path):  # noqa: F811
    """A user paused the guest before `create --memory live`: libvirt's live call leaves it paused (snapfw
    paused nothing: the record says so), and the image resumes it where it was."""
    g = Guest(conn, str(tmp_path))
    try:
        g.start()
        g.dom.suspend()
        lv = LibvirtEnv(tmp_path, g)
        lv.run("create", g.name, "p1", "--memory", "live", "--disk", "vda=external", "--disk", "vdb=external")
        assert g.dom.state()[0] == 3  # VIR_DOMAIN_PAUSED, as the user left it
        shown = lv.json("show", g.name, "p1")
        assert shown["memory"]["kind"] == "live" and shown["memory"]["size"] > 0
        assert shown["config"]["window"]["paused_seconds"] is None
        lv.run("revert", g.name, "p1", "--paused")
        assert g.dom.state()[0] == 3 and "No problems found" in lv.run("check", g.name).stdout
    finally:
        g.remove()


def test_no_agent_channel_is_refused_before_any_change(conn, tmp_path):  # noqa: F811
    g = Guest(conn, str(tmp_path))  # firmware only, no <channel>
    try:
        g.start()
        lv = LibvirtEnv(tmp_path, g)
        before = lv.files()
        r = lv.run("create", g.name, "s1", "--quiesce", check=False)
        assert r.returncode == 1 and f"cannot quiesce {g.name}: the domain has no guest agent channel" in r.stderr
        assert lv.files() == before and lv.json("list", g.name) == []
        lv.run("create", g.name, "s1", "--quiesce=try")
        held = lv.json("show", g.name, "s1")["config"]["window"]
        assert not held["quiesced"] and "no guest agent channel" in held["quiesce_problem"]
    finally:
        g.remove()
