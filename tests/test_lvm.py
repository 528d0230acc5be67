"""The lvm backend through the real `snapfw` command, against real LVM2 and device-mapper in the TCG guest
(tests/guest.py), reached through its guest agent (SNAPFW_HOST=qga:SOCKET). The domain file lives here; its
disk is /dev/VG/LV in the guest. Each test gets a fresh volume group; data is a 64 KiB pattern per
generation written with dd in the guest and read back with O_DIRECT."""

from __future__ import annotations

import hashlib
import itertools
import json

import pytest
from conftest import Env

SIZE = 16 << 20
KIB64 = 64 * 1024
_vgs = itertools.count()


class LVM:
    """A fresh volume group in the guest and the images:// domain on it."""

    def __init__(self, guest, env: Env):
        self.guest, self.env = guest, env
        self.vg = f"t{next(_vgs)}"
        self.host = {"SNAPFW_HOST": f"qga:{guest.agent}"}
        guest.sh("vgremove -q -ff $(vgs --noheadings -o vg_name) 2>/dev/null; "
                 "pvcreate -q -ff -y /dev/disk/by-serial/pv0 && "
                 f"vgcreate -q -s 4m {self.vg} /dev/disk/by-serial/pv0")

    def domain(self, thin: bool = False, size: int = SIZE, name: str = "web"):
        if thin:
            self.guest.sh(f"lvcreate -q -T -L 128m {self.vg}/pool && "
                          f"lvcreate -q -T -V {size}b -n {name} {self.vg}/pool")
        else:
            self.guest.sh(f"lvcreate -q -L {size}b -n {name} {self.vg}")
        self.env.write_domain(name, {"disks": [{"target": "vda", "path": f"/dev/{self.vg}/{name}",
                                                "format": "raw", "backend": "lvm"}]})

    def run(self, *args, check=True, env=None):
        return self.env.run(*args, check=check, env={**self.host, **(env or {})})

    def write(self, byte: int, offset: int, lv: str = "web", length: int = KIB64):
        self.guest.sh(f"dd if=/dev/zero bs={length} count=1 2>/dev/null | tr '\\000' '\\{byte:03o}' | "
                      f"dd of=/dev/{self.vg}/{lv} bs={length} seek={offset // length} conv=notrunc,fsync 2>/dev/null")

    def reads(self, byte: int, offset: int, lv: str = "web") -> bool:
        _, out, _ = self.guest.sh(f"dd if=/dev/{self.vg}/{lv} bs={KIB64} skip={offset // KIB64} count=1 "
                                  "iflag=direct 2>/dev/null | md5sum")
        return out.split()[0] == hashlib.md5(bytes([byte]) * KIB64).hexdigest()

    def lvs(self) -> dict[str, dict]:
        _, out, _ = self.guest.sh(f"lvs -a --reportformat json -o lv_name,lv_attr,origin,lv_tags {self.vg}")
        return {r["lv_name"]: r for r in json.loads(out)["report"][0]["lv"]}

    def snapshot_lvs(self) -> set[str]:
        """The LVs snapfw made, but the origin (a thin revert swaps a fresh snapshot in under its name)."""
        return {n for n, r in self.lvs().items() if "snapfw" in r["lv_tags"] and n != "web"}

    def check(self):
        out = self.run("check", "web").stdout
        assert out.strip() == "No problems found.", out


@pytest.fixture
def lvm(guest, env):
    return LVM(guest, env)


@pytest.mark.parametrize("thin", [False, True], ids=["classic", "thin"])
def test_create_revert_delete_with_data(lvm, thin):
    lvm.domain(thin)
    lvm.write(0x41, 0)
    lvm.run("create", "web", "s1")
    lvm.write(0x42, 0)
    lvm.write(0x43, KIB64)
    lvm.run("create", "web", "s 2")  # a name LVM cannot hold as it is
    lvm.write(0x44, 0)
    assert lvm.snapshot_lvs() == {"web.s1", "web.s-2.97054dcf"}
    lvm.run("revert", "web", "s1")
    assert lvm.reads(0x41, 0) and lvm.reads(0x00, KIB64)
    if thin:  # a branch: a snapshot taken after the revert
        lvm.write(0x45, 0)
        lvm.run("create", "web", "s3")
    lvm.run("revert", "web", "s 2")  # the recorded snapshot survived the revert to s1 (and the branch)
    assert lvm.reads(0x42, 0) and lvm.reads(0x43, KIB64)
    lvm.run("delete", "web", "s1")
    assert "web.s1" not in lvm.lvs() and "web" in lvm.lvs()
    if thin:
        lvm.run("revert", "web", "s3")
        assert lvm.reads(0x45, 0)
    assert [s["name"] for s in lvm.env.json("list", "web")] == ["s 2"] + (["s3"] if thin else [])
    lvm.check()


def test_an_overflowed_classic_snapshot_is_shown_and_its_revert_refused(lvm):
    lvm.domain()
    lvm.write(0x41, 0)
    lvm.run("create", "web", "s1", env={"SNAPFW_LVM_SIZE": "4M"})
    lvm.guest.sh(f"dd if=/dev/zero of=/dev/{lvm.vg}/web bs=1M count=8 oflag=direct 2>/dev/null")
    r = lvm.run("revert", "web", "s1", check=False)
    assert r.returncode != 0 and "invalid" in r.stderr and "overflowed" in r.stderr, r.stderr
    assert "s1" in lvm.run("check", "web", check=False).stdout + lvm.run("check", "web", check=False).stderr
    lvm.run("delete", "web", "s1")
    assert lvm.snapshot_lvs() == set()


def test_not_enough_free_extents_is_refused_before_any_change(lvm):
    lvm.domain(size=900 << 20)
    before = lvm.lvs()
    r = lvm.run("create", "web", "s1", check=False)
    assert r.returncode != 0 and "free" in r.stderr and "volume group" in r.stderr, r.stderr
    assert lvm.lvs() == before and lvm.env.json("list", "web") == []


@pytest.mark.parametrize("op, fault", [("create", "commit:0"), ("revert", "finish:1"), ("delete", "finish:0")])
def test_sigkill_then_repair(lvm, op, fault):
    """Killed at a step boundary: `check --repair` rolls back or finishes; no stray snapshot LV, data kept."""
    lvm.domain()
    lvm.write(0x41, 0)
    if op != "create":
        lvm.run("create", "web", "s1")
        lvm.write(0x42, 0)
    args = {"create": ("create", "web", "s1"), "revert": ("revert", "web", "s1"), "delete": ("delete", "web", "s1")}
    r = lvm.run(*args[op], check=False, env={"SNAPFW_FAULT": f"{fault}:kill"})
    assert r.returncode == -9, r.stderr
    lvm.run("check", "--repair")
    lvm.check()
    want = {"create": set(), "revert": {"web.s1"}, "delete": set()}[op]
    assert lvm.snapshot_lvs() == want
    assert lvm.reads(0x41 if op == "revert" else (0x41 if op == "create" else 0x42), 0)
