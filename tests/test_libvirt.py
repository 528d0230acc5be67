"""The ``libvirt`` driver against a real libvirtd (``qemu:///system``), with domains the tests define.

Firmware-only guests (no OS), two disks (qcow2 + raw) and an empty CD-ROM. Guest data is written while
the domain runs through HMP ``qemu-io`` on each disk's device (libvirt's monitor passthrough, as `virsh
qemu-monitor-command --hmp` does) and verified offline once the guest is destroyed; internal snapshots
through a `qemu-img convert -l` copy.
"""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET

import pytest
from live import boundaries, failing_writes, immutable, kill_in_job, kill_mid_job, kill_then_repair
from test_qmp import live_chains, one_error_line, tag_reads

from conftest import IN_CI, KIB64, Env, check_image, reads, require

from snapfw.connection import STATE_DIR_ENV

URI = "qemu:///system"
PULL_JOB = 1  # virDomainBlockJobType: a block pull (stream)
BYTES = {"vda": 0x10, "vdb": 0x80}


def _unavailable(message: str):
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def conn():
    """A connection to the real libvirtd, started (with the /dev/kvm group fix) if it is not running."""
    require("qemu-img")
    try:
        import libvirt
    except ImportError:
        _unavailable("libvirt-python is not installed (pip install -e '.[test]')")
    from bench.domains import start_libvirtd

    try:
        start_libvirtd(lambda _message: None)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        _unavailable(f"libvirtd is not running and cannot be started: {e}")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    c = libvirt.open(URI)
    yield c
    c.close()


class Guest:
    """A libvirt domain defined by the test: ``vda`` qcow2, ``vdb`` raw, an empty CD-ROM ``sda``."""

    count = 0

    def __init__(self, conn, folder: str, disks=None, persistent: bool = True, size: str = "4M",
                 folders: dict | None = None):
        Guest.count += 1
        self.conn, self.dir = conn, folder
        self.name = f"snapfw-test-{os.getpid()}-{Guest.count}"
        self.images = {}
        for target, fmt in (("vda", "qcow2"), ("vdb", "raw")):  # in folder, or its subfolder folders[target]
            where = os.path.join(folder, (folders or {}).get(target, ""))
            os.makedirs(where, exist_ok=True)
            path = os.path.join(where, f"{self.name}-{target}.{'qcow2' if fmt == 'qcow2' else 'img'}")
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, size], check=True)
            self.images[target] = (path, fmt)
        if disks is None:
            disks = "".join(f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
                            f"<source file='{path}'/><target dev='{target}' bus='virtio'/></disk>"
                            for target, (path, fmt) in self.images.items())
            disks += "<disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>"
        kind = "kvm" if os.path.exists("/dev/kvm") else "qemu"
        # QEMU runs as root without relabelling: the images live in pytest's private temp dir
        xml = (f"<domain type='{kind}'><name>{self.name}</name><memory unit='MiB'>64</memory>"
               "<os><type arch='x86_64' machine='q35'>hvm</type></os>"
               "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>"
               f"<devices>{disks}</devices></domain>")
        self.dom = conn.defineXML(xml) if persistent else conn.createXML(xml, 0)

    def start(self):
        self.dom.create()

    def destroy(self):
        if self.dom.isActive():
            self.dom.destroy()

    def remove(self):
        persistent = self.dom.isPersistent()
        self.destroy()  # a transient domain is gone with it
        if persistent:
            import libvirt

            self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)

    def disks(self, live: bool) -> dict:
        """target -> (source file, format, alias) from the live or the persistent XML; asserts that the
        persistent XML keeps no stale <backingStore>."""
        import libvirt

        root = ET.fromstring(self.dom.XMLDesc(0 if live else libvirt.VIR_DOMAIN_XML_INACTIVE))
        out = {}
        for el in root.findall("devices/disk[@device='disk']"):
            if not live:
                assert el.find("backingStore") is None, ET.tostring(el)
            alias = el.find("alias")
            out[el.find("target").get("dev")] = (el.find("source").get("file"), el.find("driver").get("type"),
                                                 alias.get("name") if alias is not None else None)
        return out

    def write(self, target: str, byte: int, offset: int, length: int = KIB64):
        """Write as the guest would, through the device's own block backend (HMP qemu-io)."""
        self.qemu_io(target, f"write -P {byte:#x} {offset} {length}")

    def qemu_io(self, target: str, command: str):
        import libvirt_qemu

        alias = self.disks(live=True)[target][2]
        cmd = f'qemu-io -d /machine/peripheral/{alias}/virtio-backend "{command}"'
        out = libvirt_qemu.qemuMonitorCommand(self.dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        assert out == "", out


class LibvirtEnv(Env):
    """The `snapfw` command on qemu:///system, its catalog in the temp dir, on one :class:`Guest`."""

    def __init__(self, root, guest: Guest):
        super().__init__(root)
        self.guest = guest
        self.uri = URI
        self.state_dir = os.path.join(self.dir, ".snapfw")
        self.env = {STATE_DIR_ENV: self.state_dir}  # every run's environment

    def run(self, *args, check: bool = True, env: dict | None = None, timeout: float = 120):
        return super().run(*args, check=check, env={**self.env, **(env or {})}, timeout=timeout)

    def domain(self, name=None) -> dict:
        """target -> (active file, format): the live XML while it runs, else the persistent XML."""
        running = bool(self.guest.dom.isActive())
        persistent = self.guest.disks(live=False)
        if not running:
            return {t: (p, f) for t, (p, f, _) in persistent.items()}
        live = self.guest.disks(live=True)
        assert {t: p for t, (p, _, _) in live.items()} == {t: p for t, (p, _, _) in persistent.items()}
        return {t: (p, f) for t, (p, f, _) in live.items()}

    def write(self, domain, target, byte, offset):
        if self.guest.dom.isActive():
            self.guest.write(target, byte, offset)
        else:
            super().write(domain, target, byte, offset)

    def gen(self, g: int):
        """Generation ``g``'s pattern on every disk: its own byte at its own offset."""
        for target, byte in BYTES.items():
            self.write(self.guest.name, target, byte + g, g * KIB64)

    def all_read(self, generations, where: dict | None = None) -> bool:
        where = where or self.domain()
        return all(reads(path, fmt, BYTES[t] + g, g * KIB64) for t, (path, fmt) in where.items()
                   for g in generations)


@pytest.fixture
def guest(conn, tmp_path):
    g = Guest(conn, str(tmp_path))
    yield g
    g.remove()


@pytest.fixture
def lv(tmp_path, guest):
    return LibvirtEnv(tmp_path, guest)


def same_disk_files(name: str):
    """What every change reads of the other domains (disk_files, from the XML alone) is what the domain
    itself reads as (domain), shut off and running."""
    from snapfw_libvirt import LibvirtDriver

    driver = LibvirtDriver(URI)
    assert driver.disk_files(name) == [(d.target, d.path) for d in driver.domain(name).disks]


def test_offline_then_live_create_on_a_libvirt_domain(lv, guest, tmp_path):
    name = guest.name
    original = lv.domain()
    # --- shut off: qemu-img steps, then the persistent XML names the new chain
    lv.gen(1)
    r = lv.run("create", name, "s1")
    assert "disk sda (cdrom, no source) is read-only: snapfw leaves it out" in r.stdout
    same_disk_files(name)
    after1 = lv.domain()
    assert after1["vda"] == original["vda"] and after1["vdb"][0] != original["vdb"][0]
    lv.gen(2)
    lv.run("create", name, "s2")
    lv.gen(3)
    lv.run("revert", name, "s1")
    assert lv.all_read([1]) and not reads(*lv.domain()["vdb"], BYTES["vdb"] + 2, 2 * KIB64)
    lv.run("delete", name, "s2")
    assert [s["name"] for s in lv.json("list", name)] == ["s1"]
    lv.assert_consistent(name)

    # --- running: libvirt starts on the chain snapfw defined; live snapshots of both kinds
    guest.start()
    frozen1 = lv.domain()  # the chain snapfw defined offline, as libvirt runs it
    same_disk_files(name)
    lv.gen(4)
    lv.run("create", name, "l1", "--disk", "vda=external", "--disk", "vdb=external")  # one snapshotCreateXML
    after_l1 = lv.domain()
    assert all(after_l1[t][0] != frozen1[t][0] for t in BYTES)
    lv.gen(5)
    plan = lv.json("create", name, "l2", "--disk", "vda=qcow2", "--disk", "vdb=external", "--dry-run")["plan"]
    # the overlay first, by qemu-img, outside the pause; libvirt takes it as it is (REUSE_EXT)
    made = plan["steps"][0]
    assert made["describe"].startswith("create overlay ") and not made.get("calls"), made
    calls, pause = plan["steps"][1]["calls"], plan["steps"][1]["pause"]
    assert calls[0] == "suspend" and calls[1].startswith('qemuMonitorCommand {"execute": "transaction"'), calls
    assert calls[2].startswith("snapshotCreateXML <domainsnapshot><disks><disk name='vdb' snapshot='external'>")
    assert "flags=DISK_ONLY|ATOMIC|NO_METADATA|REUSE_EXT" in calls[2] and calls[3].startswith("resume"), calls
    assert pause.startswith("paused from suspend to resume") and lv.domain() == after_l1
    lv.run("create", name, "l2", "--disk", "vda=qcow2", "--disk", "vdb=external")  # a tag and an overlay at once
    assert guest.dom.state()[0] == 1  # VIR_DOMAIN_RUNNING: the short pause ended
    after_l2 = lv.domain()
    assert after_l2["vda"] == after_l1["vda"] and after_l2["vdb"][0] != after_l1["vdb"][0]
    lv.gen(6)
    assert "No problems found" in lv.run("check", name).stdout  # catalog against libvirt's live XML
    assert [(s["name"], s["current"]) for s in lv.json("list", name)] == [("s1", False), ("l1", False),
                                                                           ("l2", True)]
    guest.destroy()

    assert lv.all_read([1, 4], frozen1) and not lv.all_read([5], frozen1)  # l1
    assert tag_reads(after_l1["vda"][0], "l2", BYTES["vda"] + 5, 5 * KIB64, str(tmp_path))  # l2
    assert not tag_reads(after_l1["vda"][0], "l2", BYTES["vda"] + 6, 6 * KIB64, str(tmp_path))
    assert reads(*after_l1["vdb"], BYTES["vdb"] + 5, 5 * KIB64)
    assert not reads(*after_l1["vdb"], BYTES["vdb"] + 6, 6 * KIB64)
    assert lv.all_read([1, 4, 5, 6])  # now
    for path, fmt in (after_l1["vda"], after_l1["vdb"], after_l2["vdb"]):
        assert check_image(path, fmt) in (0, 3)
    lv.assert_consistent(name)


def qemu_tags(guest, target: str) -> list[str]:
    """The internal snapshots of disk ``target``'s active file, as QEMU sees them (monitor passthrough)."""
    import libvirt_qemu

    alias = guest.disks(live=True)[target][2]
    blocks = json.loads(libvirt_qemu.qemuMonitorCommand(guest.dom, '{"execute": "query-block"}', 0))["return"]
    image = next(b for b in blocks if b["qdev"].split("/")[3] == alias)["inserted"]["image"]
    return [t["name"] for t in image.get("snapshots", [])]


def test_live_delete_of_internal_snapshots_and_of_one_whose_parent_is_internal(lv, guest, tmp_path):
    name = guest.name
    vda0 = guest.images["vda"][0]
    guest.start()
    lv.gen(1)
    lv.run("create", name, "s1")  # vda: a tag through the monitor passthrough; vdb: external
    lv.gen(2)
    lv.run("create", name, "s2")
    lv.gen(3)
    assert qemu_tags(guest, "vda") == ["s1", "s2"]
    lv.run("delete", name, "s2")  # the tag through the passthrough too (QEMU holds the file read-write)
    assert qemu_tags(guest, "vda") == ["s1"] and xml_chains(guest) == live_chains(lv, name)
    lv.run("create", name, "s3", "--disk", "vda=external", "--disk", "vdb=external")  # a child of s1
    v3 = lv.domain()["vda"][0]
    lv.gen(4)
    lv.run("create", name, "s4", "--disk", "vda=external", "--disk", "vdb=external")
    lv.gen(5)
    lv.run("delete", name, "s3")  # committed into the file holding s1's tag, which stays
    assert xml_chains(guest) == live_chains(lv, name) and v3 not in xml_chains(guest)["vda"]
    assert [s["name"] for s in lv.json("list", name)] == ["s1", "s4"]
    assert "No problems found" in lv.run("check", name).stdout
    lv.gen(6)
    guest.destroy()
    assert lv.all_read(range(1, 7))
    assert tag_reads(vda0, "s1", BYTES["vda"] + 1, KIB64, str(tmp_path))
    assert tag_reads(vda0, "s1", 0, 2 * KIB64, str(tmp_path))
    lv.assert_consistent(name)


def test_failure_after_the_live_step_is_undone(lv, guest):
    name = guest.name
    guest.start()
    original = lv.domain()
    lv.gen(1)
    files = lv.files()
    # prepare: [vdb's new overlay, the live snapshot, define]: fail just before the third, after libvirt
    # switched disks
    r = lv.run("create", name, "s1", env={"SNAPFW_FAULT": "prepare:2"}, check=False)
    assert r.returncode == 1 and "injected fault" in r.stderr, r.stderr
    assert lv.domain() == original and lv.files() == files
    lv.gen(2)
    r = lv.run("create", name, "s1", env={"SNAPFW_FAULT": "prepare:2:kill"}, check=False)
    assert r.returncode == -9 and lv.domain() != original
    lv.gen(3)  # into the new overlay and after the new tag: the repair keeps it
    lv.run("check", name, "--repair")
    assert lv.domain() == original and lv.files() == files and lv.json("list", name) == []
    guest.destroy()
    assert lv.all_read([1, 2, 3])
    require("qemu-img")
    tags = subprocess.run(["qemu-img", "snapshot", "-l", original["vda"][0]], capture_output=True, text=True)
    assert "s1" not in tags.stdout


@pytest.mark.parametrize("vda", ["external", "qcow2"])
def test_a_failure_in_the_second_disks_part_of_a_live_create_leaves_the_first_as_it_was(conn, tmp_path, vda):
    """vdb lives in its own folder, which then accepts no new file: making vdb's new overlay fails (the
    overlays are made before libvirt's snapshotCreateXML, which takes them as they are), after vda's was
    made beside it (external, then removed), before vda's tag (qcow2: none is made)."""
    guest = Guest(conn, str(tmp_path), folders={"vdb": "vdb"})
    try:
        lv = LibvirtEnv(tmp_path, guest)
        name = start_then_s1(lv)
        before = (lv.files(), os.listdir(tmp_path / "vdb"), lv.export(name), xml_chains(guest),
                  qemu_tags(guest, "vda"), lv.domain())
        with immutable(str(tmp_path / "vdb")):
            r = lv.run("create", name, "s2", "--disk", f"vda={vda}", "--disk", "vdb=external", check=False)
            error = one_error_line(r)
            assert error.startswith("snapfw: error: create overlay ") and "Operation not permitted" in error
        assert (lv.files(), os.listdir(tmp_path / "vdb"), lv.export(name), xml_chains(guest),
                qemu_tags(guest, "vda"), lv.domain()) == before  # no stray overlay, no tag; XML as it was
        assert guest.dom.state()[0] == 1  # running: the pause around the two calls ended
        assert "No problems found" in lv.run("check", name).stdout
        lv.gen(3)
        guest.destroy()
        assert lv.all_read([1, 2, 3])
        lv.assert_consistent(name)
    finally:
        guest.remove()


def test_eio_during_a_live_commit_leaves_a_valid_chain_and_a_clear_error(conn, tmp_path):
    """vdb is a raw file on a FUSE export whose writes at 128 KiB fail (blkdebug): the guest writes there
    only after s1, so deleting s1 commits that into it and libvirt's commit job fails."""
    guest = Guest(conn, str(tmp_path))
    vdb = guest.images["vdb"][0]
    with failing_writes(vdb, 2 * KIB64):
        try:
            lv = LibvirtEnv(tmp_path, guest)
            name = start_then_s1(lv)
            overlay = lv.domain()["vdb"][0]
            r = lv.run("delete", name, "s1", check=False)
            line = one_error_line(r)
            assert f"live commit {overlay} into {vdb}" in line and "the job failed" in line, line
            assert "run `snapfw check --repair`" in line
            chains = xml_chains(guest)
            assert chains["vdb"] == [overlay, vdb] and os.path.exists(overlay)  # nothing removed
            assert chains["vda"] == [guest.images["vda"][0]]  # vda's commit, before vdb's, is done
            assert guest.dom.blockJobInfo("vdb", 0) == {}
            assert "interrupted delete" in lv.run("check", name, check=False).stdout
            r = lv.run("check", name, "--repair", check=False)  # the disk still fails: so does the repair
            assert "the job failed" in one_error_line(r) and xml_chains(guest) == chains
            lv.gen(3)
            active = lv.domain()
            guest.destroy()
            assert lv.all_read([1, 2, 3], active)
            assert check_image(overlay, "qcow2") in (0, 3)
        finally:
            guest.remove()


def start_then_s1(lv) -> str:
    """Start the guest, write generation 1, snapshot s1 (external on both disks), write generation 2;
    returns the domain's name."""
    lv.guest.start()
    lv.gen(1)
    lv.run("create", lv.guest.name, "s1", "--disk", "vda=external", "--disk", "vdb=external")
    lv.gen(2)
    return lv.guest.name


def xml_chains(guest) -> dict:
    """target -> the files of the disk's chain in libvirt's live XML, active first."""
    out = {}
    for el in ET.fromstring(guest.dom.XMLDesc(0)).findall("devices/disk[@device='disk']"):
        chain, node = [], el
        while node is not None and node.find("source") is not None:
            chain.append(node.find("source").get("file"))
            node = node.find("backingStore")
        out[el.find("target").get("dev")] = chain
    return out


def spread(lv, target, byte, first, count):
    """``count`` 64 KiB ranges from ``first`` * 64 KiB: allocated bytes that tip commit against stream."""
    for i in range(count):
        lv.guest.write(target, byte, (first + i) * KIB64)
    lv.guest.qemu_io(target, "flush")  # pricing reads the active file's allocation with -U


def test_live_delete_commits_pivots_and_streams(lv, guest):
    name = guest.name
    guest.start()
    orig = {t: p for t, (p, _f) in lv.domain().items()}
    lv.gen(1)
    lv.run("create", name, "s1", "--disk", "vda=external", "--disk", "vdb=external")
    o1 = {t: p for t, (p, _f) in lv.domain().items()}
    lv.gen(2)
    spread(lv, "vda", 0x42, 20, 4)  # s2's vda file outweighs s3's: commit s3's into it
    lv.run("create", name, "s2")
    o2 = {t: p for t, (p, _f) in lv.domain().items()}
    lv.gen(3)
    spread(lv, "vdb", 0x93, 30, 4)  # s3's vdb file outweighs s2's, but lies below the active file: still commit
    lv.run("create", name, "s3")
    o3 = {t: p for t, (p, _f) in lv.domain().items()}
    lv.gen(4)
    spread(lv, "vdb", 0x94, 40, 8)  # the active vdb file outweighs the one below: stream that into it

    plan = lv.json("delete", name, "s2", "--dry-run")["plan"]
    jobs = [d["describe"] for d in plan["steps"] if d["describe"].startswith("live")]
    assert len(jobs) == 2 and all(j.startswith(f"live commit {o2[t]} into {o1[t]}") for t, j in zip(BYTES, jobs)), jobs
    lv.run("delete", name, "s2")  # two commits below the active file
    assert xml_chains(guest) == {t: [o3[t], o1[t], orig[t]] for t in BYTES} == live_chains(lv, name)
    assert not any(os.path.exists(o2[t]) for t in BYTES)
    assert "No problems found" in lv.run("check", name).stdout

    plan = lv.json("delete", name, "s3", "--dry-run")["plan"]
    calls = [c for step in plan["steps"] for c in step.get("calls", [])]
    assert f"blockCommit(disk=vda, base={o1['vda']}, top={o3['vda']}, bandwidth=0, flags=ACTIVE)" in calls, calls
    assert f"blockRebase(disk=vdb, base={orig['vdb']}, bandwidth=0, flags=0)" in calls, calls
    r = lv.run("delete", name, "s3", "--json")
    steps = [json.loads(line)["step"] for line in r.stderr.splitlines() if '"event": "step"' in line]
    assert any(s.startswith(f"live commit {o3['vda']} into {o1['vda']}") for s in steps), steps  # active: pivot
    assert any(s.startswith(f"live stream {o1['vdb']} into {o3['vdb']} onto {orig['vdb']}") for s in steps), steps
    assert xml_chains(guest) == {"vda": [o1["vda"], orig["vda"]], "vdb": [o3["vdb"], orig["vdb"]]}
    assert xml_chains(guest) == live_chains(lv, name)  # lv.domain(): the persistent XML names the pivoted file too
    assert not os.path.exists(o3["vda"]) and not os.path.exists(o1["vdb"])
    assert "No problems found" in lv.run("check", name).stdout
    lv.gen(5)  # the guest writes on into the merged chains

    lv.run("create", name, "s4")
    lv.gen(6)
    lv.run("create", name, "s5")
    lv.gen(7)
    before = xml_chains(guest)
    lv.run("delete", name, "s4", "--children")
    assert [s["name"] for s in lv.json("list", name)] == ["s1"]
    assert xml_chains(guest) == before == live_chains(lv, name)
    assert "No problems found" in lv.run("check", name).stdout
    guest.destroy()

    assert lv.all_read(range(1, 8))
    assert reads(o1["vda"], "qcow2", 0x42, 23 * KIB64)
    assert reads(o3["vdb"], "qcow2", 0x93, 33 * KIB64) and reads(o3["vdb"], "qcow2", 0x94, 47 * KIB64)
    assert lv.all_read([1], guest.images) and not lv.all_read([2], guest.images)  # s1
    for path in [*before["vda"], *before["vdb"][:-1]]:  # every qcow2 file left
        assert check_image(path, "qcow2") in (0, 3)
    lv.assert_consistent(name)


def test_live_delete_needing_a_stream_below_the_active_file_is_refused(lv, guest):
    name = guest.name
    # offline: the original files get two children, s2's branch and the revert's
    lv.run("create", name, "s1", "--disk", "vda=external")
    lv.run("create", name, "s2")
    lv.run("revert", name, "s1")
    lv.run("create", name, "s3")  # the revert's overlay is frozen below the active file
    guest.start()
    before = (lv.state(), xml_chains(guest))
    r = lv.run("delete", name, "s1", check=False)
    assert r.returncode == 1 and f"snapshot s1 of disk vda cannot be deleted while domain {name} runs" in r.stderr
    assert "below the active file, which this driver cannot do live" in r.stderr, r.stderr
    assert (lv.state(), xml_chains(guest)) == before and "No problems found" in lv.run("check", name).stdout


def test_kill_during_a_live_commit_then_repair_finishes_it(conn, tmp_path):
    guest = Guest(conn, str(tmp_path), size="320M")
    try:
        lv = LibvirtEnv(tmp_path, guest)
        name = guest.name
        guest.start()
        orig = {t: p for t, (p, _f) in lv.domain().items()}
        lv.gen(1)
        lv.run("create", name, "s1", "--disk", "vda=external", "--disk", "vdb=external")
        top = lv.domain()["vda"][0]
        guest.write("vda", 0x5a, 64 << 20, 256 << 20)
        lv.gen(2)
        seen = kill_mid_job(lv, "delete", name, "s1")
        assert seen and seen["step"].startswith(f"live commit {top}"), seen
        assert guest.dom.blockJobInfo("vda", 0)["type"] == 4  # the active commit outlived snapfw
        assert "interrupted delete" in lv.run("check", name, check=False).stdout
        r = lv.run("check", name, "--repair")
        assert "finished delete" in r.stdout, r.stdout
        assert guest.dom.blockJobInfo("vda", 0) == {}
        assert xml_chains(guest) == {t: [p] for t, p in orig.items()}
        assert lv.json("list", name) == [] and lv.export(name)["files"] == []
        assert not os.path.exists(top)
        lv.gen(3)
        guest.destroy()
        assert lv.domain() == {t: (p, guest.images[t][1]) for t, p in orig.items()}
        assert reads(orig["vda"], "qcow2", 0x5a, 64 << 20) and reads(orig["vda"], "qcow2", 0x5a, (320 << 20) - KIB64)
        assert lv.all_read([1, 2, 3])
        assert check_image(orig["vda"], "qcow2") in (0, 3)
        lv.assert_consistent(name)
    finally:
        guest.remove()


def test_kill_during_a_live_stream_then_repair_finishes_it(conn, tmp_path):
    """The test throttles libvirt's block pull as soon as it appears, so snapfw is killed while it runs;
    unthrottled, `check --repair` finds it with blockJobInfo and waits for it. The layer pulled holds
    192 MiB: with 32 MiB the job could end between two polls."""
    import libvirt

    guest = Guest(conn, str(tmp_path), size="512M")
    try:
        lv = LibvirtEnv(tmp_path, guest)
        name = guest.name
        guest.start()
        lv.run("create", name, "s0", "--disk", "vda=external", "--disk", "vdb=external")
        lv.gen(1)
        guest.write("vda", 0x5a, 32 << 20, 192 << 20)  # into s1's file: streamed into the active file
        lv.run("create", name, "s1", "--disk", "vda=external", "--disk", "vdb=external")
        active, frozen = xml_chains(guest)["vda"][:2]
        guest.write("vda", 0x6b, 224 << 20, 256 << 20)  # the active file outweighs it: stream, not commit
        guest.qemu_io("vda", "flush")
        lv.gen(2)
        bytes_per_second = libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES

        def caught():
            if guest.dom.blockJobInfo("vda", 0).get("type") != PULL_JOB:
                return False
            guest.dom.blockJobSetSpeed("vda", 1, bytes_per_second)
            return True

        kill_in_job(lv, caught, "delete", name, "s1")
        assert guest.dom.blockJobInfo("vda", 0)["type"] == PULL_JOB  # the job outlived snapfw
        assert "interrupted delete" in lv.run("check", name, check=False).stdout
        guest.dom.blockJobSetSpeed("vda", 0, bytes_per_second)
        r = lv.run("check", name, "--repair")
        assert r.stdout.splitlines() == [f"{name}: finished delete of {name}"], r.stdout
        assert guest.dom.blockJobInfo("vda", 0) == {} and frozen not in xml_chains(guest)["vda"]
        assert xml_chains(guest) == live_chains(lv, name) and xml_chains(guest)["vda"][0] == active
        assert [s["name"] for s in lv.json("list", name)] == ["s0"] and not os.path.exists(frozen)
        lv.gen(3)
        guest.destroy()
        assert reads(active, "qcow2", 0x5a, 32 << 20) and reads(active, "qcow2", 0x5a, (224 << 20) - KIB64)
        assert reads(active, "qcow2", 0x6b, 224 << 20)
        assert lv.all_read([1, 2, 3])
        lv.assert_consistent(name)
    finally:
        guest.remove()


def test_transient_domain_libvirt_metadata_and_network_disk_are_refused(conn, tmp_path):
    transient = Guest(conn, str(tmp_path), persistent=False)
    try:
        lv = LibvirtEnv(tmp_path, transient)
        r = lv.run("create", transient.name, "s1", check=False)
        assert r.returncode == 1 and f"domain {transient.name} is transient" in r.stderr, r.stderr
        # `domains` tells its state all the same (libvirt lists every domain of the connection)
        rows = {row["name"]: row for row in lv.json("domains")}
        assert rows[transient.name] == {"name": transient.name, "state": "running", "snapshots": 0, "current": None}
    finally:
        transient.remove()
    guest = Guest(conn, str(tmp_path))
    try:  # libvirt's own snapshot metadata (made as virsh snapshot-create would record it)
        import libvirt

        xml = ("<domainsnapshot><name>old</name><state>shutoff</state><creationTime>1</creationTime>"
               "<memory snapshot='no'/><disks><disk name='vda' snapshot='internal'/></disks>"
               f"{guest.dom.XMLDesc(0)}</domainsnapshot>")
        guest.dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)
        lv = LibvirtEnv(tmp_path, guest)
        before = lv.state()
        r = lv.run("create", guest.name, "s1", check=False)
        assert r.returncode == 1 and "has 1 libvirt snapshot(s)" in r.stderr, r.stderr
        assert lv.state() == before
    finally:
        guest.remove()
    nbd = ("<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
           "<source protocol='nbd' name='export'><host name='localhost' port='10809'/></source>"
           "<target dev='vdc' bus='virtio'/></disk>")
    guest = Guest(conn, str(tmp_path), disks=nbd)
    try:
        lv = LibvirtEnv(tmp_path, guest)
        r = lv.run("create", guest.name, "s1", check=False)
        assert r.returncode == 1 and "disk vdc is a network disk (nbd:export), not a file" in r.stderr, r.stderr
        r = lv.run("create", "no-such-domain", "s1", check=False)
        assert r.returncode == 2 and "no domain 'no-such-domain'" in r.stderr
    finally:
        guest.remove()


def test_a_running_disk_on_a_file_the_catalog_does_not_record_is_refused(lv, guest):
    import libvirt

    name = guest.name
    guest.start()
    lv.gen(1)
    lv.run("create", name, "s1", "--disk", "vda=external", "--disk", "vdb=external")
    drifted = os.path.join(lv.dir, "by-hand.qcow2")  # virsh snapshot-create-as --disk-only behind snapfw's back
    guest.dom.snapshotCreateXML(f"<domainsnapshot><disks><disk name='vdb' snapshot='external'><source file='{drifted}'/>"
                                "</disk><disk name='vda' snapshot='no'/></disks></domainsnapshot>",
                                libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
    before = (lv.files(), xml_chains(guest), lv.export(name))
    assert os.path.exists(f"/run/libvirt/qemu/{name}.pid")  # the driver's Domain.pid: its QEMU may hold its files
    for args in (("create", name, "s2"), ("revert", name, "s1"), ("delete", name, "s1")):
        r = lv.run(*args, check=False)  # (warnings about other tests' domains on the shared libvirtd aside)
        assert r.returncode == 1 and r.stderr.count("snapfw: error:") == 1, r.stderr
        assert f"disk vdb now runs on {drifted}, a file the catalog does not know for it; run `snapfw check`" \
            in r.stderr, r.stderr
    assert (lv.files(), xml_chains(guest), lv.export(name)) == before and guest.dom.isActive()
    r = lv.run("check", name, check=False)
    assert r.returncode == 1 and f"disk vdb now runs on {drifted}" in r.stdout, r.stdout


def memory(guest, live: bool) -> int:
    """The domain XML's <memory>, in MiB: which configuration it was defined or started from."""
    import libvirt

    xml = ET.fromstring(guest.dom.XMLDesc(0 if live else libvirt.VIR_DOMAIN_XML_INACTIVE))
    return int(xml.find("memory").text) >> 10


def set_memory(guest, mib: int):
    """Change the persistent definition, as `virsh edit` would (for the next start)."""
    import libvirt

    xml = ET.fromstring(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    for tag in ("memory", "currentMemory"):
        if xml.find(tag) is not None:
            xml.find(tag).text, xml.find(tag).attrib = str(mib << 10), {"unit": "KiB"}
    guest.conn.defineXML(ET.tostring(xml, encoding="unicode"))


def test_live_revert_of_a_libvirt_domain(lv, guest):
    import libvirt

    name = guest.name
    guest.start()
    lv.gen(1)
    lv.run("create", name, "l1", "--disk", "vda=external", "--disk", "vdb=external")  # keeps <memory> 64
    lv.gen(2)
    set_memory(guest, 80)
    lv.run("create", name, "l2", "--disk", "vda=qcow2", "--disk", "vdb=external")  # keeps <memory> 80
    lv.gen(3)
    on_l2 = lv.domain()

    lv.run("revert", name, "l1")  # destroyed, reverted offline, l1's XML defined, started again
    assert guest.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING and memory(guest, live=True) == 64
    lv.gen(4)
    # killed once the guest is destroyed (prepare: [stop, an overlay per disk, define]): repair starts it
    before = lv.domain()
    r = lv.run("revert", name, "l2", env={"SNAPFW_FAULT": "prepare:1:kill"}, check=False)
    assert r.returncode == -9 and not guest.dom.isActive()
    assert "rolled back revert" in lv.run("check", name, "--repair").stdout
    assert guest.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING and lv.domain() == before
    lv.run("revert", name, "l2", "--paused")
    assert guest.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED and memory(guest, live=True) == 80
    assert lv.domain()["vda"] == on_l2["vda"]  # the tag applied in place
    guest.dom.resume()
    lv.gen(5)
    lv.run("revert", name, "l1", "--stopped", "--keep-config")
    assert not guest.dom.isActive() and memory(guest, live=False) == 80  # l2's XML stays
    rows = {row["name"]: row for row in lv.json("domains")}
    assert rows[name] == {"name": name, "state": "shut off", "snapshots": 2, "current": "l1"}
    assert lv.all_read([1]) and not lv.all_read([2])
    # killed after the commit: repair finishes the revert and starts the guest on the new chain
    r = lv.run("revert", name, "l2", "--running", env={"SNAPFW_FAULT": "finish:0:kill"}, check=False)
    assert r.returncode == -9 and not guest.dom.isActive()
    assert "finished revert" in lv.run("check", name, "--repair").stdout
    assert guest.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING and lv.domain()["vda"] == on_l2["vda"]
    lv.gen(6)
    assert "No problems found" in lv.run("check", name).stdout
    guest.destroy()
    assert lv.all_read([1, 2, 6])
    for g in (3, 4, 5):
        assert all(reads(path, fmt, 0, g * KIB64) for path, fmt in lv.domain().values()), g
    lv.assert_consistent(name)


def virsh(*args, check: bool = True) -> str:
    """The real `virsh` on qemu:///system: what users (and virt-manager's list) see."""
    require("virsh")
    r = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 or not check, r.stderr
    return r.stdout


def virsh_names(name) -> list[str]:
    return sorted(virsh("snapshot-list", name, "--name").split())


def virsh_parent(name, snapshot) -> str | None:
    info = dict(line.split(":", 1) for line in virsh("snapshot-info", name, snapshot).splitlines() if ":" in line)
    parent = info["Parent"].strip()
    return None if parent == "-" else parent


def test_mirror_into_libvirts_snapshot_records(lv, guest):
    import libvirt

    name = guest.name
    lv.gen(1)
    r = lv.run("create", name, "s1", "--mirror", "--dry-run")
    assert "snapshot s1 is mirrored into the qemu driver's own snapshot records" in r.stdout, r.stdout
    assert virsh_names(name) == [] and lv.json("list", name) == []
    lv.run("create", name, "s1", "--mirror", "--description", "first one")  # offline: vda a tag, vdb an overlay
    lv.gen(2)
    lv.run("create", name, "s2", "--mirror")
    assert virsh_names(name) == ["s1", "s2"] and virsh_parent(name, "s2") == "s1" and virsh_parent(name, "s1") is None
    xml = ET.fromstring(virsh("snapshot-dumpxml", name, "s1"))
    assert xml.findtext("description") == "first one" and xml.findtext("state") == "shutoff"
    disks = {d.get("name"): d for d in xml.findall("disks/disk")}
    assert disks["vda"].get("snapshot") == "internal" and disks["vdb"].get("snapshot") == "external"
    s1 = lv.json("show", name, "s1")
    assert disks["vdb"].find("source").get("file") == lv.json("show", name, "s2")["disks"][1]["file"]  # s1's overlay
    assert {d.find("target").get("dev"): d.find("source").get("file")
            for d in xml.findall("domain/devices/disk[@device='disk']")} \
        == {d["target"]: d["file"] for d in s1["disks"]}  # the definition of that instant: its frozen files

    # --- running: a live mirrored snapshot, one that is not mirrored, then another mirrored one
    guest.start()
    lv.gen(3)
    lv.run("create", name, "l1", "--mirror", "--disk", "vda=external", "--disk", "vdb=external")
    lv.gen(4)
    lv.run("create", name, "l2", "--no-mirror")
    lv.gen(5)
    lv.run("create", name, "l3", "--mirror")
    assert virsh_names(name) == ["l1", "l3", "s1", "s2"]
    assert virsh_parent(name, "l1") == "s2" and virsh_parent(name, "l3") == "l1"  # l2 is not mirrored
    assert ET.fromstring(virsh("snapshot-dumpxml", name, "l1")).findtext("state") == "disk-snapshot"
    assert virsh("snapshot-current", name, "--name").strip() == "l3"
    assert "No problems found" in lv.run("check", name).stdout

    # libvirt 9.0 tracks these external snapshots now: snapfw's live merges still run
    lv.run("delete", name, "l1")  # blockCommit below the active file
    lv.run("delete", name, "l3")  # an active blockCommit and pivot
    assert virsh_names(name) == ["s1", "s2"] and lv.snapshot_names(name) == ["s1", "s2", "l2"]
    lv.gen(6)
    lv.run("create", name, "l4", "--mirror")
    assert virsh_parent(name, "l4") == "s2"
    assert "No problems found" in lv.run("check", name).stdout

    # --- drift, made behind snapfw's back, is reported in words, and repaired
    virsh("snapshot-delete", name, "s2", "--metadata")  # libvirt reparents l4 onto s1
    l4 = guest.dom.snapshotLookupByName("l4", 0).getXMLDesc(0)
    ghost = l4.replace("<name>l4</name>", "<name>ghost</name>")
    guest.dom.snapshotCreateXML(ghost, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)  # carries snapfw's mark
    r = lv.run("check", name, check=False)
    assert r.returncode == 1
    assert f"{name}: snapshot s2 is mirrored in the catalog but missing from libvirt's records" in r.stdout, r.stdout
    assert f"{name}: libvirt has s1 as snapshot l4's parent, the catalog s2" in r.stdout
    assert f"{name}: libvirt still has snapshot ghost, which snapfw mirrored, but the catalog has no such" in r.stdout
    r = lv.run("check", name, "--repair")
    assert "mirrored again" in r.stdout and "removed from libvirt's records" in r.stdout, r.stdout
    assert virsh_names(name) == ["l4", "s1", "s2"] and virsh_parent(name, "l4") == "s2"
    assert "No problems found" in lv.run("check", name).stdout

    # --- revert moves libvirt's current snapshot; delete --children removes the subtree there
    lv.run("create", name, "l5", "--mirror")
    assert virsh("snapshot-current", name, "--name").strip() == "l5"
    lv.run("revert", name, "l4")  # the guest is restarted on fresh overlays
    assert virsh("snapshot-current", name, "--name").strip() == "l4" and guest.dom.isActive()
    lv.gen(7)
    guest.destroy()  # s2's vda part is a tag: deleted offline
    lv.run("delete", name, "s2", "--children")
    assert virsh_names(name) == ["s1"] and lv.snapshot_names(name) == ["s1"]
    assert virsh("snapshot-current", name, "--name").strip() == "s1"
    assert "No problems found" in lv.run("check", name).stdout
    assert lv.all_read(range(1, 8))
    lv.assert_consistent(name)
    lv.run("delete", name, "s1")
    assert virsh_names(name) == [] and guest.dom.snapshotNum(0) == 0


@pytest.mark.parametrize("scenario", ["create", "delete"])
def test_every_live_operation_runs_while_libvirt_tracks_the_snapshots(lv, guest, tmp_path, scenario):
    """libvirt 9.0 refuses some operations on external snapshots it tracks: snapfw's own live snapshots
    (both kinds), commits, pivots, streams and deletes still run with every snapshot mirrored."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "config.yaml").write_text("mirror: true\n")
    lv.env["SNAPFW_CONFIG"] = str(tmp_path / "etc" / "config.yaml")
    if scenario == "create":
        test_offline_then_live_create_on_a_libvirt_domain(lv, guest, tmp_path)
    else:
        test_live_delete_commits_pivots_and_streams(lv, guest)
    assert virsh_names(guest.name) == sorted(lv.snapshot_names(guest.name)) != []


def test_mirror_default_from_the_config_file(lv, guest, tmp_path):
    name = guest.name
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "config.yaml"
    config.write_text("mirror: true\n")
    lv.run("create", name, "s1", env={"SNAPFW_CONFIG": str(config)})
    lv.run("create", name, "s2", "--no-mirror", env={"SNAPFW_CONFIG": str(config)})
    assert virsh_names(name) == ["s1"]
    for text, problem in (("mirror: yes please\n", "'mirror' must be a bool"),
                          ("!!python/object/apply:os.system ['true']\n", "is not valid YAML")):
        config.write_text(text)
        before = lv.state()
        r = lv.run("create", name, "s3", env={"SNAPFW_CONFIG": str(config)}, check=False)
        assert r.returncode == 2 and problem in r.stderr, r.stderr
        assert lv.state() == before and virsh_names(name) == ["s1"]
    # a driver without snapshot records of its own: --mirror is refused before any change, the default ignored
    (tmp_path / "images").mkdir()
    env = Env(tmp_path / "images")
    env.make_domain("web")
    before = env.state()
    r = env.run("create", "web", "s1", "--mirror", check=False)
    assert r.returncode == 1 and "--mirror: the images driver keeps no snapshot records of its own" in r.stderr
    assert env.state() == before
    config.write_text("mirror: true\n")
    env.run("create", "web", "s1", env={"SNAPFW_CONFIG": str(config)})


def test_a_failing_mirror_is_a_warning_and_loses_nothing(lv, guest):
    name = guest.name
    long = "m" * 253  # a valid snapfw name; libvirt's record file <name>.xml would exceed NAME_MAX
    lv.gen(1)
    r = lv.run("create", name, long, "--mirror")
    assert f"snapshot {long} of {name} was created, but mirroring its snapshots into the qemu driver's records " \
        f"failed (libvirt snapshotCreateXML of {long} (redefine) failed" in r.stderr, r.stderr
    assert "`snapfw check --repair` mirrors them again" in r.stderr
    assert lv.snapshot_names(name) == [long] and virsh_names(name) == []
    lv.gen(2)
    r = lv.run("create", name, "s2", "--mirror")  # libvirt has not its parent: held back too
    assert f"parent {long} for moment s2 not found" in r.stderr, r.stderr
    r = lv.run("check", name, check=False)
    assert r.returncode == 1 and f"{name}: snapshot {long} is mirrored in the catalog but missing from libvirt's" \
        in r.stdout and f"{name}: snapshot s2 is mirrored in the catalog but missing" in r.stdout, r.stdout
    lv.run("revert", name, long)
    assert lv.all_read([1]) and not lv.all_read([2])
    lv.run("delete", name, long)  # s2 becomes a root: now libvirt takes it
    assert virsh_names(name) == ["s2"] and virsh_parent(name, "s2") is None
    assert "No problems found" in lv.run("check", name).stdout


# --- SIGKILL at every step boundary ----------------------------------------------------------------------
RUNNING = 1  # VIR_DOMAIN_RUNNING


def test_kill_at_every_step_boundary_of_a_live_create_then_repair(lv, guest):
    name = guest.name
    guest.start()
    lv.gen(1)
    faults = boundaries(lv, "create", name, "c")  # vda: a tag (passthrough), vdb: snapshotCreateXML, paused around
    for k, fault in enumerate(faults):
        kill_then_repair(lv, fault, "create", name, f"c{k}")
        assert guest.dom.state()[0] == RUNNING and xml_chains(guest) == live_chains(lv, name), fault
        assert (f"c{k}" in [s["name"] for s in lv.json("list", name)]) == fault.startswith("finish"), fault
        lv.gen(k + 2)
    guest.destroy()
    assert lv.all_read(range(1, len(faults) + 2))
    lv.assert_consistent(name)


def test_kill_at_every_step_boundary_of_a_live_delete_then_repair(lv, guest):
    """Deleting the newest snapshot: vda's active file is committed into the file below (pivot), vdb's
    file below is streamed into the active one (block pull), then the merged files removed."""
    name = guest.name
    guest.start()
    lv.run("create", name, "s0", "--disk", "vda=external", "--disk", "vdb=external")

    def newest(k):  # snapshot b{k} on top, each disk with two generations
        spread(lv, "vda", 0x40 + k, 48, 2)  # below b's overlay: committing the active file into it copies less
        lv.gen(2 * k + 1)
        lv.run("create", name, f"b{k}", "--disk", "vda=external", "--disk", "vdb=external")
        spread(lv, "vdb", 0x60 + k, 48, 2)  # into the active file: streaming the one below copies less
        lv.gen(2 * k + 2)

    newest(0)
    steps = [s["describe"] for s in lv.json("delete", name, "b0", "--dry-run")["plan"]["steps"]]
    assert any(s.startswith("live commit") for s in steps) and any(s.startswith("live stream") for s in steps)
    faults = boundaries(lv, "delete", name, "b0")  # the same plan's shape every round
    for k, fault in enumerate(faults):
        if k:
            newest(k)
        before = xml_chains(guest)
        kill_then_repair(lv, fault, "delete", name, f"b{k}")
        assert guest.dom.state()[0] == RUNNING and xml_chains(guest) == live_chains(lv, name), fault
        merged = fault.startswith("finish")  # rolled back before the commit, else finished
        assert all(len(xml_chains(guest)[t]) == len(before[t]) - merged for t in BYTES), fault
    guest.destroy()
    assert lv.all_read(range(1, 2 * len(faults) + 1))
    lv.assert_consistent(name)


def test_kill_at_every_step_boundary_of_a_live_revert_then_repair(lv, guest):
    """Reverting to the snapshot just taken (vda: a tag, vdb: an overlay), so nothing written is discarded:
    destroyed, reverted offline, the stored XML defined, started again."""
    name = guest.name
    guest.start()
    lv.gen(1)
    lv.run("create", name, "r0")
    faults = boundaries(lv, "revert", name, "r0")  # the same plan's shape every round
    for k, fault in enumerate(faults):
        if k:
            lv.gen(k + 1)
            lv.run("create", name, f"r{k}")
        kill_then_repair(lv, fault, "revert", name, f"r{k}")
        assert guest.dom.state()[0] == RUNNING and xml_chains(guest) == live_chains(lv, name), fault
    guest.destroy()
    assert lv.all_read(range(1, len(faults) + 1))
    lv.assert_consistent(name)
