"""The LVM rows: ``snapfw create``/``delete`` of a classic LV snapshot beside bare ``lvcreate -s`` /
``lvremove`` in the same TCG guest (tests/guest.py: this host's kernel has no device-mapper).

Both sides reach the guest through its QEMU guest agent, as snapfw does with ``SNAPFW_HOST=qga:SOCKET``:
snapfw is the whole ``snapfw`` process on this machine (interpreter, catalog, every ``lvs``/``vgs`` it
runs, each over a new agent connection); the bare command is one ``guest-exec`` on a connection opened
before the timer starts, timed from here (the command plus the agent's status polls). Both make a 16 MiB snapshot of the same
64 MiB LV, interleaved round by round, the first round untimed.
"""

from __future__ import annotations

import os
import sys
import time

from . import measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VG, LV, LV_SIZE, SNAPSHOT_SIZE = "bench", "web", 64 << 20, 16 << 20
DOMAIN, SNAPSHOT, BARE = "lvmdom", "b", "web.bare"


def measure_lvm(root: str, snapfw: list[str], env: dict, repeat: int, log) -> list[dict]:
    """Boot the guest, make the LV and its images:// domain, time both sides; one row per operation."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))  # the test suite's guest harness, not a copy of it
    from guest import Guest, build

    from snapfw.connection import cache_home
    from snapfw.tools.qga import GuestAgent

    folder = os.path.join(root, "lvm")
    os.makedirs(folder)
    log("bench: booting the LVM guest (TCG)")
    guest = Guest(folder, build(cache_home()), {"pv0": 256 << 20}).start()
    try:
        guest.sh(f"pvcreate -q -ff -y /dev/disk/by-serial/pv0 && vgcreate -q -s 4m {VG} /dev/disk/by-serial/pv0 "
                 f"&& lvcreate -q -L {LV_SIZE}b -n {LV} {VG}")
        with open(os.path.join(folder, f"{DOMAIN}.yaml"), "w") as f:
            f.write(f"disks:\n- {{target: vda, path: /dev/{VG}/{LV}, format: raw, backend: lvm}}\n")
        env = {**env, "SNAPFW_HOST": f"qga:{guest.agent}"}
        on = snapfw + ["--connect", f"images://{folder}"]
        sides = {"create": (measure.Series(on + ["create", DOMAIN, SNAPSHOT, "--lvm-size", f"{SNAPSHOT_SIZE}b"]),
                            measure.Series(["lvcreate", "-q", "-s", "-L", f"{SNAPSHOT_SIZE}b", "-n", BARE,
                                            f"{VG}/{LV}"])),
                 "delete": (measure.Series(on + ["delete", DOMAIN, SNAPSHOT]),
                            measure.Series(["lvremove", "-q", "-y", f"{VG}/{BARE}"]))}
        log(f"bench: timing LVM create/delete, {repeat} runs each")
        for rnd in range(repeat + 1):
            for ours, bare in sides.values():
                sample, _ = measure.run(ours.argv, env=env)
                with GuestAgent(guest.agent) as agent:  # the agent serves one connection at a time
                    start = time.perf_counter()
                    code, _, err = agent.exec(bare.argv, 120)
                    seconds = time.perf_counter() - start
                if code != 0:
                    raise measure.CommandFailed(f"{' '.join(bare.argv)} exited with {code} in the guest: "
                                                f"{err.decode(errors='replace').strip()}")
                if rnd:
                    ours.samples.append(sample)
                    bare.samples.append(measure.Sample(seconds, None))
    finally:
        guest.stop()
    return [{"operation": f"lvm {op}", "snapfw": ours.as_dict(), "lvm": bare.as_dict(),
             "ratio": round(ours.seconds / bare.seconds, 3)} for op, (ours, bare) in sides.items()]
