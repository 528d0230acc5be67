"""Gold images on the real libvirtd (issue 20): linked clones of a two-disk libvirt domain, each defined
with its own name, UUID and MACs, started, written, and deleted again with `snapfw clone-delete`."""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET

from test_libvirt import Guest, LibvirtEnv, conn, guest  # noqa: F401 (fixtures)

from conftest import KIB64, reads

CLONES = 3
GEN2 = {"vda": 0x12, "vdb": 0x82}  # what the gold wrote after its snapshot
NICS = "<interface type='user'><model type='virtio'/></interface>" * 2


class _Running(Guest):
    """A clone snapfw defined, written through its running QEMU like the test's own guest."""

    def __init__(self, dom):
        self.dom = dom


def _chain(path: str) -> list[str]:
    """The files of ``path``'s chain, top first, as qemu-img reads them."""
    out = subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain", "-U", path], capture_output=True,
                         text=True, check=True).stdout
    return [node["filename"] for node in json.loads(out)]


def _undefine(conn, names: list[str]):  # noqa: F811
    """Destroy and undefine the clones a test left (after a failure)."""
    import libvirt

    for n in names:
        try:
            dom = conn.lookupByName(n)
        except libvirt.libvirtError:
            continue
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


def _identity(dom) -> tuple[str, str, list[str]]:
    root = ET.fromstring(dom.XMLDesc(0))
    return root.find("name").text, root.find("uuid").text, [m.get("address") for m in root.iter("mac")]


def test_linked_clones_of_a_libvirt_domain(conn, guest, tmp_path):  # noqa: F811
    import libvirt

    root = ET.fromstring(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    root.find("devices").extend(ET.fromstring(f"<x>{NICS}</x>"))
    guest.dom = conn.defineXML(ET.tostring(root, encoding="unicode"))  # libvirt gives the NICs their MACs
    lv = LibvirtEnv(tmp_path, guest)
    lv.gen(1)
    lv.run("create", guest.name, "gold")
    lv.gen(2)  # after the snapshot: no clone may read it
    names = [f"{guest.name}-c{n}" for n in range(1, CLONES + 1)]
    os.mkdir(tmp_path / "other")
    other = Guest(conn, str(tmp_path / "other"))  # a libvirt domain the catalog does not know
    try:
        ours = lambda: sorted(n for n in conn.listDefinedDomains() if n.startswith(guest.name))  # noqa: E731
        before = sorted(os.listdir(tmp_path)), ours()
        for args, words in [((other.name,), f"domain {other.name} exists"),
                            ((f"{guest.name}-c{{n}}", "--count", "0"), "--count 0"),
                            ((f"{guest.name}-c", "--count", "2"), "{n}")]:
            r = lv.run("clone", guest.name, "gold", *args, check=False)
            assert r.returncode == 2 and words in r.stderr, (args, r.stderr)
        r = lv.run("clone", other.name, "gold", "x", check=False)  # a snapshot of another domain
        assert r.returncode == 2 and "no snapshot 'gold'" in r.stderr, r.stderr
        assert (sorted(os.listdir(tmp_path)), ours()) == before
    finally:
        other.remove()
    try:
        out = lv.json("clone", guest.name, "gold", f"{guest.name}-c{{n}}", "--count", str(CLONES), "--start")
        assert out["clones"] == names
        doms = [conn.lookupByName(n) for n in names]
        assert all(d.isActive() for d in doms)
        ids = [_identity(d) for d in [guest.dom] + doms]
        assert [i[0] for i in ids[1:]] == names
        assert len({i[1] for i in ids}) == CLONES + 1  # a UUID each
        macs = [m for i in ids for m in i[2]]
        assert len(macs) == 2 * (CLONES + 1) == len(set(macs))  # two NICs each, no MAC twice
        sda = [el for el in ET.fromstring(doms[0].XMLDesc(0)).iter("disk") if el.get("device") == "cdrom"]
        assert len(sda) == 1  # the read-only CD-ROM stays
        files = {n: _Running(d).disks(live=False) for n, d in zip(names, doms)}
        for n in names:
            assert {t: f for t, (_, f, _) in files[n].items()} == {"vda": "qcow2", "vdb": "qcow2"}
            assert all(p.endswith(f"{n}-{t}.qcow2") for t, (p, _, _) in files[n].items())
        # the guest of clone 1 writes; clones 2 and 3 and the gold snapshot do not see it
        for target, byte in (("vda", 0x31), ("vdb", 0x32)):
            _Running(doms[0]).write(target, byte, KIB64)
        for d in doms:
            d.destroy()
        for target, byte in (("vda", 0x31), ("vdb", 0x32)):
            assert reads(files[names[0]][target][0], "qcow2", byte, KIB64)
            for n in names[1:]:
                path = files[n][target][0]
                assert reads(path, "qcow2", {"vda": 0x11, "vdb": 0x81}[target], KIB64)
                assert not reads(path, "qcow2", byte, KIB64) and not reads(path, "qcow2", GEN2[target], 2 * KIB64)
        r = lv.run("delete", guest.name, "gold", check=False)
        assert r.returncode == 1 and all(f"{n} (snapshot gold)" in r.stderr for n in names), r.stderr
        lv.run("revert", guest.name, "gold")
        gold = lv.domain()
        assert lv.all_read([1], gold)
        assert not any(reads(*gold[t], b, KIB64) or reads(*gold[t], GEN2[t], 2 * KIB64)
                       for t, b in (("vda", 0x31), ("vdb", 0x32)))
        doms[1].create()
        r = lv.run("clone-delete", names[1], check=False)
        assert r.returncode == 1 and "running" in r.stderr
        doms[1].destroy()
        lv.run("detach", names[0])
        for n in names:
            lv.run("clone-delete", n)
        assert not set(names) & set(conn.listDefinedDomains())
        assert not [p for n in names for p, _, _ in files[n].values() if os.path.exists(p)]
        lv.run("delete", guest.name, "gold")
        assert "No problems found" in lv.run("check", guest.name).stdout
    finally:
        _undefine(conn, names)


def test_fifty_linked_clones_of_a_libvirt_domain_in_one_command(conn, guest, tmp_path):  # noqa: F811
    """50 clones of a two-disk libvirt domain with two NICs in one `snapfw clone`: each defined with its own
    name, UUID and MACs, on overlays of its own over the one shared base of the gold snapshot; the first, a
    middle and the last start (test_linked_clones_of_a_libvirt_domain starts every clone of its run of 3);
    then `clone-delete` removes them all and the gold snapshot can go."""
    import libvirt

    root = ET.fromstring(guest.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    root.find("devices").extend(ET.fromstring(f"<x>{NICS}</x>"))
    guest.dom = conn.defineXML(ET.tostring(root, encoding="unicode"))
    lv = LibvirtEnv(tmp_path, guest)
    lv.gen(1)
    lv.run("create", guest.name, "gold")
    names = [f"{guest.name}-f{n}" for n in range(1, 51)]
    try:
        assert lv.json("clone", guest.name, "gold", f"{guest.name}-f{{n}}", "--count", "50")["clones"] == names
        doms = [conn.lookupByName(n) for n in names]
        ids = [_identity(d) for d in [guest.dom] + doms]
        assert [i[0] for i in ids[1:]] == names and len({i[1] for i in ids}) == 51  # a UUID each
        macs = [m for i in ids for m in i[2]]
        assert len(macs) == 2 * 51 == len(set(macs))  # two NICs each, no MAC twice
        seen, bases = set(), {"vda": set(), "vdb": set()}
        for n, d in zip(names, doms):
            disks = _Running(d).disks(live=False)
            for target, (path, fmt, _) in disks.items():
                assert fmt == "qcow2" and path.endswith(f"{n}-{target}.qcow2") and path not in seen
                top, base = _chain(path)  # its own overlay on the one shared base of the gold snapshot
                assert top == path and base not in seen
                bases[target].add(base)
                seen.add(path)
        for d in (doms[0], doms[24], doms[-1]):  # a start costs 2 s here: the first, a middle one, the last
            d.create()
            assert d.isActive()
            d.destroy()
        for n in names:
            lv.run("clone-delete", n)
        assert not set(names) & set(conn.listDefinedDomains()) and not [p for p in seen if os.path.exists(p)]
        assert [len(b) for b in bases.values()] == [1, 1]
        lv.run("delete", guest.name, "gold")
        assert "No problems found" in lv.run("check", guest.name).stdout
    finally:
        _undefine(conn, names)
