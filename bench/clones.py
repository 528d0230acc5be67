"""Gold images (issue 20): N linked clones of a two-disk domain in one ``snapfw clone --count N``, beside a
bare ``qemu-img create -b`` loop making the same overlays, and beside ``virt-clone`` making N full copies of
a libvirt domain with the same two disks. Wall time of each whole run, and the new data per clone: the
allocated blocks (``st_blocks``) of the files each made, before any clone is started.

Each snapfw/bare round starts from a fresh gold domain: ``images:///DIR/gold`` with ``vda`` (qcow2) and
``vdb`` (raw) holding DATA bytes each, snapshot ``gold`` taken with external records on both disks, so
every clone is two overlays on the frozen files, as in the bare loop (an internal snapshot would add one
copy of its tag to the first clone of a run).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from . import domains, measure

CLONES = 50
MAX_RATIO = 1.5          # issue 20: snapfw within 1.5 x the bare loop's time
MAX_NEW_BYTES = 1 << 20  # issue 20: under 1 MiB of new data per clone before it is started
DISK_SIZE, DATA = "64M", 8 << 20
# $1 vda base, $2 vdb base, $3 output dir, $4 count: what a user's loop does, one process per overlay
BARE_LOOP = ('i=1; while [ "$i" -le "$4" ]; do '
             'qemu-img create -q -f qcow2 -b "$1" -F qcow2 "$3/c-$i-vda.qcow2" || exit 1; '
             'qemu-img create -q -f qcow2 -b "$2" -F raw "$3/c-$i-vdb.qcow2" || exit 1; '
             'i=$((i + 1)); done')
# $1 original, $2 name prefix, $3 output dir, $4 count: virt-clone's full copies, one process per clone
VIRT_CLONE_LOOP = ('i=1; while [ "$i" -le "$4" ]; do '
                   'virt-clone -q --connect qemu:///system --original "$1" --name "$2-$i" '
                   '--file "$3/$2-$i-vda.qcow2" --file "$3/$2-$i-vdb.img" || exit 1; i=$((i + 1)); done')


def _images(folder: str) -> dict[str, str]:
    """target -> path of a two-disk gold's images in ``folder``, with DATA bytes written into each."""
    os.makedirs(folder)
    images = {}
    for target, fmt in (("vda", "qcow2"), ("vdb", "raw")):
        path = os.path.join(folder, f"gold-{target}.{'qcow2' if fmt == 'qcow2' else 'img'}")
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, DISK_SIZE], check=True)
        subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P 0x5a 0 {DATA}", path], check=True,
                       stdout=subprocess.DEVNULL)
        images[target] = path
    return images


def _gold(folder: str, snapfw: list[str], env) -> str:
    """A fresh gold domain with snapshot ``gold`` in ``folder``; returns its connection URI."""
    images = _images(folder)
    with open(os.path.join(folder, "gold.yaml"), "w") as f:
        f.write("disks:\n" + "".join(f"- {{target: {t}, path: {os.path.basename(p)}, format: "
                                     f"{'qcow2' if t == 'vda' else 'raw'}}}\n" for t, p in images.items()))
    uri = f"images://{folder}"
    measure.run(snapfw + ["--connect", uri, "create", "gold", "gold", "--disk", "vda=external",
                          "--disk", "vdb=external"], env=env)
    return uri


def _allocated(paths) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in paths)


def _stats(series: measure.Series, new_bytes: list[int], count: int) -> dict:
    return {**series.as_dict(), "new_bytes_per_clone": max(new_bytes) // count}


def measure_clones(root: str, snapfw: list[str], env, repeat: int, count: int = CLONES, conn=None, log=print) -> dict:
    """The clone rows: snapfw and the bare loop ``repeat`` rounds each after one warm-up round, alternating;
    virt-clone once (N whole copies; its own interpreter start-up per clone dominates) when ``conn`` is
    given and virt-clone is installed."""
    sf = measure.Series(snapfw + ["clone", "gold", "gold", "c-{n}", "--count", str(count)])
    bare = measure.Series(["sh", "-c", BARE_LOOP, "sh"])
    sf_new, bare_new = [], []
    for rnd in range(repeat + 1):
        folder = os.path.join(root, f"clones-{rnd}")
        uri = _gold(folder, snapfw, env)
        sample, _ = measure.run(snapfw + ["--connect", uri] + sf.argv[len(snapfw):], env=env)
        made = [os.path.join(folder, f"c-{i}-{t}.qcow2") for i in range(1, count + 1) for t in ("vda", "vdb")]
        new = _allocated(made)
        out = os.path.join(folder, "bare")
        os.mkdir(out)
        bases = [os.path.join(folder, "gold-vda.qcow2"), os.path.join(folder, "gold-vdb.img")]
        bare_sample, _ = measure.run(bare.argv + [*bases, out, str(count)], env=env)
        if rnd:
            sf.samples.append(sample)
            bare.samples.append(bare_sample)
            sf_new.append(new)
            bare_new.append(_allocated(os.path.join(out, n) for n in os.listdir(out)))
        shutil.rmtree(folder)
    ratio = sf.seconds / bare.seconds
    new_per_clone = max(sf_new) // count
    row = {"operation": "clone", "count": count, "snapfw": _stats(sf, sf_new, count),
           "bare_loop": _stats(bare, bare_new, count), "ratio": round(ratio, 3), "max_ratio": MAX_RATIO,
           "max_new_bytes_per_clone": MAX_NEW_BYTES,
           "pass": ratio <= MAX_RATIO and new_per_clone < MAX_NEW_BYTES, "virt_clone": None}
    if conn is not None and shutil.which("virt-clone"):
        log(f"bench: timing {count} virt-clone full copies (once)")
        row["virt_clone"] = _virt_clone(conn, os.path.join(root, f"{domains.NAME_PREFIX}{os.getpid()}-virt-clone"),
                                        env, count)
    return row


def _virt_clone(conn, folder: str, env, count: int) -> dict:
    """N ``virt-clone`` runs copying a shut-off libvirt domain with the gold's two disks; every clone is
    undefined again, also after an error, and so is the storage pool virt-clone defines for ``folder``."""
    import libvirt

    images = _images(folder)
    name = f"{domains.NAME_PREFIX}{os.getpid()}-gold"
    disks = "".join(f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/><source file='{p}'/>"
                    f"<target dev='{t}' bus='virtio'/></disk>"
                    for t, p, fmt in (("vda", images["vda"], "qcow2"), ("vdb", images["vdb"], "raw")))
    conn.defineXML(f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
                          f"<os><type arch='x86_64'>hvm</type></os><devices>{disks}</devices></domain>")
    series = measure.Series(["sh", "-c", VIRT_CLONE_LOOP, "sh", name, name, folder, str(count)])
    try:
        sample, _ = measure.run(series.argv, env=env)
        series.samples.append(sample)
        made = [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(f"{name}-")]
        return _stats(series, [_allocated(made)], count)
    finally:
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE):
            if dom.name() == name or dom.name().startswith(f"{name}-"):
                dom.undefine()
        for pool in conn.listAllStoragePools():
            if f"<path>{folder}</path>" in pool.XMLDesc(0):
                if pool.isActive():
                    pool.destroy()
                pool.undefine()
