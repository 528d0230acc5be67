"""``python -m bench``: snapfw list/create/delete against virsh, whole processes, one run. See README.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from . import clones, domains, live, lvm, measure

# issue 21: snapfw / virsh at most this, per operation; for reads, at most LARGE_READ_RATIO from 1,000 up
READ_RATIO, LARGE_READ_RATIO, LARGE, CHANGE_RATIO = 1.5, 0.3, 1000, 1.2
# a live disk-only atomic snapshot of a running 4-disk guest: snapfw / virsh at most this, per driver
LIVE_RATIO = {"qmp": 1.0, "libvirt": 1.3}
# issue 18: a live memory+disk snapshot, snapfw / virsh at most this, and the guest paused no longer than by virsh
MEMORY_RATIO = 1.2
READS, CHANGES = ("list", "show"), ("create", "revert", "delete")
VIRSH = ["virsh", "-c", domains.LIBVIRT_URI]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _counts(text: str) -> list[int]:
    try:
        counts = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("counts must be positive")
    return counts


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--counts", type=_counts, default=[10, 100, 1000], metavar="N,N,...",
                   help="snapshot counts to list (default 10,100,1000); create/delete run at the largest")
    p.add_argument("--repeat", type=int, default=5, metavar="N",
                   help="timed runs per measurement, after one untimed warm-up run; the median is reported "
                        "(default 5)")
    p.add_argument("--snapfw-only", action="store_true",
                   help="measure snapfw alone; needs neither libvirtd nor libvirt-python")
    p.add_argument("--start-libvirtd", action="store_true",
                   help="(root) if libvirtd is not listening: make /dev/kvm root:kvm 0660, start virtlogd "
                        "and libvirtd as daemons")
    p.add_argument("--lvm", action="store_true",
                   help="also time snapfw's LV snapshot create/delete beside bare lvcreate -s / lvremove in the "
                        "test suite's TCG guest (tests/guest.py; boots it, about a minute more)")
    p.add_argument("--clones", type=int, default=clones.CLONES, metavar="N",
                   help=f"linked clones per clone round, against a bare qemu-img loop and virt-clone (default "
                        f"{clones.CLONES}; 0 skips the clone rows)")
    p.add_argument("--no-live", action="store_true",
                   help="skip the live rows (running 4-disk guests: bare QEMU, and libvirt unless --snapfw-only)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.clones < 0:
        p.error("--clones must be 0 or more")
    return args


def snapfw_argv() -> list[str]:
    """The installed console script next to this interpreter, as a user runs it."""
    script = os.path.join(os.path.dirname(sys.executable), "snapfw")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "snapfw"]


def _rows(stdout: str) -> int:
    """Data rows of a `snapfw list` / `virsh snapshot-list` table: non-empty lines after header and rule."""
    return max(0, len([line for line in stdout.splitlines() if line.strip()]) - 2)


def _check_rows(argv, expected, env=None):
    _, out = measure.run(argv, env=env, capture=True)
    if _rows(out) != expected:
        raise RuntimeError(f"{' '.join(argv)} listed {_rows(out)} snapshots, expected {expected}")


def _ratio(a, b):
    return a.seconds / b.seconds if a is not None and b is not None else None


def _measure_pair(pairs, repeat):
    """Run each (series, env) once untimed, then ``repeat`` times interleaved, so drift hits all alike."""
    for series, env in pairs:
        measure.run(series.argv, env=env)
    for _ in range(repeat):
        for series, env in pairs:
            sample, _ = measure.run(series.argv, env=env)
            series.samples.append(sample)


def max_ratio(operation: str, count: int) -> float:
    if operation in READS:
        return LARGE_READ_RATIO if count >= LARGE else READ_RATIO
    return CHANGE_RATIO


def _row(operation, count, sf, lv):
    ratio = _round(_ratio(sf, lv))
    limit = max_ratio(operation, count)
    return {"operation": operation, "count": count, "snapfw": sf.as_dict(), "virsh": lv.as_dict() if lv else None,
            "ratio": ratio, "max_ratio": limit, "pass": None if ratio is None else ratio <= limit}


def _measure_changes(sf, lv, env, repeat):
    """Repeat: snapfw create the (N+1)th, revert to the Nth, delete the (N+1)th; then virsh the same (both
    domains end each round as they began); the first round untimed."""
    new, old = domains.snapshot_name(sf.count), domains.snapshot_name(sf.count - 1)
    snapfw = snapfw_argv() + ["--connect", sf.uri]
    series = {"snapfw": [measure.Series(snapfw + ["create", sf.name, new]),
                         measure.Series(snapfw + ["revert", sf.name, old]),
                         measure.Series(snapfw + ["delete", sf.name, new])]}
    order = [(s, env) for s in series["snapfw"]]
    if lv is not None:
        series["virsh"] = [measure.Series(VIRSH + ["snapshot-create-as", "--domain", lv.name, "--name", new]),
                           measure.Series(VIRSH + ["snapshot-revert", "--domain", lv.name, "--snapshotname", old]),
                           measure.Series(VIRSH + ["snapshot-delete", "--domain", lv.name, "--snapshotname", new])]
        order += [(s, None) for s in series["virsh"]]
    for rnd in range(repeat + 1):
        for s, series_env in order:
            sample, _ = measure.run(s.argv, env=series_env)
            if rnd:
                s.samples.append(sample)
    _check_rows(snapfw + ["list", sf.name], sf.count, env)
    if lv is not None and lv.snapshot_count() != lv.count:
        raise RuntimeError(f"libvirt domain has {lv.snapshot_count()} snapshots after create/revert/delete, "
                           f"expected {lv.count}")
    return [_row(op, sf.count, s, v) for op, s, v in
            zip(CHANGES, series["snapfw"], series.get("virsh", [None] * len(CHANGES)))]


def _measure_commands(env, repeat) -> list[dict]:
    """`snapfw --help` and `snapfw plugins`: time, and what the imports cost (``python -X importtime``)."""
    rows = []
    for args in (["--help"], ["plugins"]):
        s = measure.Series(snapfw_argv() + args)
        _measure_pair([(s, env)], repeat)
        rows.append({"command": " ".join(args), "snapfw": s.as_dict(), "import_s": _import_seconds(args, env)})
    return rows


def _import_seconds(args, env) -> float:
    """The cumulative time of the top-level imports of one run, as ``-X importtime`` reports it."""
    import subprocess

    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "snapfw", *args], env=env,
                       capture_output=True, text=True, check=True)
    top = [line.split("|") for line in r.stderr.splitlines()
           if line.startswith("import time:") and not line.split("|")[2].startswith("  ")]
    return round(sum(int(cols[1]) for cols in top if cols[1].strip().isdigit()) / 1e6, 4)


def run(args) -> dict:
    started = time.perf_counter()
    # the connection and state dir come from the command line only, in this process and in every child
    for var in ("SNAPFW_CONNECT", "SNAPFW_STATE_DIR"):
        os.environ.pop(var, None)
    env = dict(os.environ)
    # snapfw as installed runs from compiled .pyc files (the untimed warm-up run writes them); with this
    # set (as in some CI shells) every timed run compiled snapfw and its plugins again: 72 ms of CPU here
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if not shutil.which("qemu-img"):
        raise RuntimeError("qemu-img not found (apt-get install qemu-utils)")
    if not measure.rss_available():
        log(f"bench: warning: {measure.TIME} is missing (apt-get install time): no peak RSS figures")
    conn = None
    if not args.snapfw_only:
        if not shutil.which("virsh"):
            raise RuntimeError("virsh not found (apt-get install libvirt-clients), or run with --snapfw-only")
        if args.start_libvirtd:
            domains.start_libvirtd(log)
        warning = domains.kvm_warning()
        if warning:
            log(f"bench: warning: {warning}")
        conn = domains.connect()
        domains.remove_stale(conn, log)

    root = tempfile.mkdtemp(prefix="snapfw-bench-")
    lv = None
    result = {"repeat": args.repeat, "counts": args.counts, "snapfw_only": args.snapfw_only,
              "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                       "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
              "snapfw_version": _version("snapfw"),
              "libvirt_version": _libvirt_version(conn), "populate_s": {"snapfw": {}, "libvirt": {}}, "rows": [],
              "live": None}
    try:
        sf = domains.SnapfwDomain(root)
        if conn is not None:
            lv = domains.LibvirtDomain(conn, root)
        for count in args.counts:
            log(f"bench: populating {count} snapshots (snapfw: in-process lifecycle.create"
                f"{', libvirt: REDEFINE' if lv else ''})")
            secs = sf.extend(count, lambda n, s: log(f"bench:   snapfw {n}/{count} in {s:.1f} s"))
            result["populate_s"]["snapfw"][str(count)] = round(secs, 3)
            if lv is not None:
                secs = lv.extend(count)
                result["populate_s"]["libvirt"][str(count)] = round(secs, 3)
                log(f"bench:   libvirt {count}/{count} in {secs:.1f} s")
                lv.take_disk(sf.disk)  # both qemu-img runs work on the same N internal snapshots
            os.sync()  # populating left dirty pages; their writeback must not land in the timed runs
            log(f"bench: timing list and show of {count}, {args.repeat} runs each")
            last = domains.snapshot_name(count - 1)
            sf_list = measure.Series(snapfw_argv() + ["--connect", sf.uri, "list", sf.name])
            sf_show = measure.Series(snapfw_argv() + ["--connect", sf.uri, "show", sf.name, last])
            _check_rows(sf_list.argv, count, env)
            pairs = [(sf_list, env), (sf_show, env)]
            lv_list = lv_show = None
            if lv is not None:
                lv_list = measure.Series(VIRSH + ["snapshot-list", lv.name])
                lv_show = measure.Series(VIRSH + ["snapshot-info", "--domain", lv.name, "--snapshotname", last])
                _check_rows(lv_list.argv, count)
                pairs += [(lv_list, None), (lv_show, None)]
            _measure_pair(pairs, args.repeat)
            result["rows"] += [_row("list", count, sf_list, lv_list), _row("show", count, sf_show, lv_show)]
            log(f"bench: timing create/revert/delete of one more snapshot at {count}, {args.repeat} runs each")
            result["rows"] += _measure_changes(sf, lv, env, args.repeat)
        if args.lvm:
            result["lvm"] = lvm.measure_lvm(root, snapfw_argv(), env, args.repeat, log)
        if args.clones:
            log(f"bench: timing {args.clones} linked clones of a two-disk domain against a bare qemu-img loop, "
                f"{args.repeat} runs each")
            result["clones"] = clones.measure_clones(root, snapfw_argv(), env, args.repeat, args.clones, conn, log)
        log(f"bench: timing --help and plugins, {args.repeat} runs each")
        result["commands"] = _measure_commands(env, args.repeat)
        if not args.no_live:
            if shutil.which("qemu-system-x86_64"):
                log(f"bench: timing live snapshots of running 4-disk guests, {args.repeat} runs each")
                result["live"] = _live_rows(live.measure_live(conn, root, snapfw_argv(), VIRSH, env, args.repeat,
                                                              log))
                log(f"bench: timing live memory+disk snapshots of running 4-disk guests, {args.repeat} runs each")
                result["live"]["memory"] = _memory_rows(live.measure_memory(conn, root, snapfw_argv(), VIRSH, env,
                                                                            args.repeat, log))
            else:
                log("bench: warning: qemu-system-x86_64 not found: no live rows")
        if lv is not None:
            rss = domains.libvirtd_rss_mib()
            result["libvirtd_rss_mib"] = None if rss is None else round(rss, 1)
        rss = domains.resident_rss_mib()
        result["resident_rss_mib"] = None if rss is None else round(rss, 1)
    finally:
        if lv is not None:
            try:
                lv.undefine()
            except Exception as e:  # report, never hide the real error
                log(f"bench: warning: could not undefine {lv.name}: {e}")
        if conn is not None:
            conn.close()
        shutil.rmtree(root, ignore_errors=True)

    checked = [r["pass"] for r in result["rows"] + _live_targets(result) if r["pass"] is not None]
    result["pass"] = all(checked) if checked else None
    result["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


def _live_rows(measured: dict) -> dict:
    """The live create series as rows against virsh's, with their targets; the deletes as measured."""
    create, virsh = measured["create"], measured["create"].get("virsh")
    rows = []
    for key, what in (("virsh", "virsh snapshot-create-as --disk-only --atomic --no-metadata"),
                      ("floor", "bare QMP transaction (stdlib client, the floor)"),
                      ("qmp", "snapfw create, qmp driver"), ("libvirt", "snapfw create, libvirt driver")):
        if key not in create:
            continue
        s = create[key]
        ratio = _round(s["median_s"] / virsh["median_s"]) if virsh else None
        limit = LIVE_RATIO.get(key)
        rows.append({"operation": what, "series": s, "ratio": ratio, "max_ratio": limit,
                     "pass": None if limit is None or ratio is None else ratio <= limit})
    return {"rows": rows, "delete": measured["delete"]}


def _live_targets(result) -> list[dict]:
    """The live rows that have a target: disk-only creates, then memory+disk creates."""
    return (result["live"] or {}).get("rows", []) + (result["live"] or {}).get("memory", [])


def _memory_rows(measured: dict) -> list[dict]:
    """The live memory+disk series as rows: snapfw's time against virsh's, its median pause against virsh's."""
    virsh = measured.get("virsh")
    rows = []
    for key, what in (("virsh", "virsh snapshot-create-as --live --memspec --atomic --no-metadata"),
                      ("qmp", "snapfw create --memory live, qmp driver"),
                      ("libvirt", "snapfw create --memory live, libvirt driver")):
        if key not in measured:
            continue
        s = measured[key]
        pause = statistics.median(s["paused_s"])
        limit = MEMORY_RATIO if key != "virsh" else None
        ratio = _round(s["median_s"] / virsh["median_s"]) if virsh else None
        max_pause = _round(statistics.median(virsh["paused_s"]), 5) if virsh and limit else None
        rows.append({"operation": what, "series": s, "ratio": ratio, "max_ratio": limit,
                     "paused_median_s": _round(pause, 5), "max_paused_s": max_pause,
                     "pass": None if limit is None or ratio is None else ratio <= limit and pause <= max_pause})
    return rows


def _round(x, digits=3):
    return None if x is None else round(x, digits)


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _libvirt_version(conn):
    if conn is None:
        return None
    v = conn.getLibVersion()
    return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _table(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def render(result) -> str:
    host = result["host"]
    out = [f"snapfw {result['snapfw_version']} vs virsh (libvirt {result['libvirt_version'] or 'not measured'}); "
           f"median of {result['repeat']} runs after 1 warm-up; whole-process wall time, peak RSS "
           f"from /usr/bin/time; {host['cpus']} CPUs, load average {host['loadavg_start'][0]:.1f} at the start, "
           f"{host['loadavg_end'][0]:.1f} at the end", ""]
    header = ["count", "operation", "snapfw s", "(min)", "virsh s", "(min)", "ratio", "target", "",
              "snapfw MiB", "virsh MiB"]
    rows = []
    for r in result["rows"]:
        sf, lv = r["snapfw"], r["virsh"] or {}
        verdict = "-" if r["pass"] is None else "PASS" if r["pass"] else "FAIL"
        rows.append([r["count"], r["operation"], _fmt(sf["median_s"], ".3f"), _fmt(sf["min_s"], ".3f"),
                     _fmt(lv.get("median_s"), ".3f"), _fmt(lv.get("min_s"), ".3f"), _fmt(r["ratio"], ".2f"),
                     f"<= {r['max_ratio']}", verdict, _fmt(sf["peak_rss_mib"], ".1f"),
                     _fmt(lv.get("peak_rss_mib"), ".1f")])
    out.append(_table(header, rows))
    c = result.get("clones")
    if c:
        out += ["", f"{c['count']} linked clones of a two-disk domain in one `snapfw clone --count`, beside a bare "
                    f"`qemu-img create -b` loop and {c['count']} `virt-clone` full copies (new data: allocated "
                    "bytes per clone, before it is started)"]
        sides = (("snapfw clone", c["snapfw"]), ("qemu-img create -b loop", c["bare_loop"]),
                 ("virt-clone (full copies, 1 run)", c["virt_clone"]))
        rows = [[name, _fmt(s["median_s"], ".3f"), _fmt(s["min_s"], ".3f"),
                 _fmt(s["new_bytes_per_clone"] / 1024, ".0f")] for name, s in sides if s]
        out.append(_table(["clones", "s", "(min)", "KiB/clone"], rows))
        verdict = "PASS" if c["pass"] else "FAIL"
        out.append(f"clone: snapfw / bare loop {c['ratio']:.2f} (target <= {c['max_ratio']}), "
                   f"{c['snapfw']['new_bytes_per_clone'] / 1024:.0f} KiB new per clone (target < "
                   f"{c['max_new_bytes_per_clone'] // 1024} KiB): {verdict}")
    out += ["", "snapfw alone (no virsh counterpart): import time is the sum of the top-level imports of one "
                "`python -X importtime -m snapfw` run"]
    rows = [[c["command"], _fmt(c["snapfw"]["median_s"], ".3f"), _fmt(c["snapfw"]["min_s"], ".3f"),
             _fmt(c["import_s"], ".3f"), _fmt(c["snapfw"]["peak_rss_mib"], ".1f")] for c in result["commands"]]
    out.append(_table(["command", "snapfw s", "(min)", "imports s", "snapfw MiB"], rows))
    if result.get("lvm"):
        out += ["", "LVM in the test guest (TCG), both through its guest agent: snapfw's whole process beside the "
                    "bare lvm command"]
        rows = [[r["operation"], _fmt(r["snapfw"]["median_s"], ".3f"), _fmt(r["snapfw"]["min_s"], ".3f"),
                 _fmt(r["lvm"]["median_s"], ".3f"), _fmt(r["lvm"]["min_s"], ".3f"), _fmt(r["ratio"], ".2f")]
                for r in result["lvm"]]
        out.append(_table(["operation", "snapfw s", "(min)", "lvm s", "(min)", "ratio"], rows))
    if result.get("live"):
        out += ["", f"live, running guests with {len(live.DISKS)} qcow2 disks: one disk-only atomic snapshot of all "
                    "disks (external overlays)"]
        rows = [[r["operation"], _fmt(r["series"]["median_s"], ".3f"), _fmt(r["series"]["min_s"], ".3f"),
                 _fmt(r["ratio"], ".2f"), f"<= {r['max_ratio']}" if r["max_ratio"] else "",
                 "-" if r["pass"] is None else "PASS" if r["pass"] else "FAIL",
                 _fmt(r["series"]["peak_rss_mib"], ".1f")] for r in result["live"]["rows"]]
        out.append(_table(["live create", "s", "(min)", "x virsh", "target", "", "MiB"], rows))
        rows = []
        for key, what in (("snapfw", "snapfw delete of a middle snapshot, qmp driver"),
                          ("virsh", f"virsh blockcommit --base --wait of a middle layer, {len(live.DISKS)} disks")):
            d = result["live"]["delete"].get(key)
            if d:
                rows.append([what, _fmt(d["median_s"], ".3f"), _fmt(d["min_s"], ".3f"),
                             _fmt(sorted(d["bytes"])[len(d["bytes"]) // 2] / 2**20, ".1f"),
                             _fmt(d["peak_rss_mib"], ".1f")])
        out += ["", _table(["live delete", "s", "(min)", "MiB copied", "MiB"], rows)]
        if result["live"].get("memory"):
            out += ["", ("live memory+disk snapshot of such a guest (memory image and external overlays); the pause "
                         "from its QEMU's STOP and RESUME events")]
            rows = [[r["operation"], _fmt(r["series"]["median_s"], ".3f"), _fmt(r["series"]["min_s"], ".3f"),
                     _fmt(r["ratio"], ".2f"), f"<= {r['max_ratio']}" if r["max_ratio"] else "",
                     _fmt(r["paused_median_s"] * 1000, ".1f"), _fmt(max(r["series"]["paused_s"]) * 1000, ".1f"),
                     "" if r["max_paused_s"] is None else f"<= {r['max_paused_s'] * 1000:.1f}",
                     "-" if r["pass"] is None else "PASS" if r["pass"] else "FAIL",
                     _fmt(r["series"]["peak_rss_mib"], ".1f")] for r in result["live"]["memory"]]
            out.append(_table(["live memory create", "s", "(min)", "x virsh", "target", "pause ms", "(max)",
                               "target", "", "MiB"], rows))
    if result.get("libvirtd_rss_mib") is not None:
        out.append(f"(virsh is a client: libvirtd does the work and was {result['libvirtd_rss_mib']:.1f} MiB "
                   "resident at the end, not counted above)")
    if result.get("resident_rss_mib") is not None:
        out.append(f"(snapfw's commands were run by its resident interpreter, {result['resident_rss_mib']:.1f} MiB "
                   "resident at the end, not counted above; SNAPFW_RESIDENT=0 times them without it)")
    pop = result["populate_s"]
    out += ["", "populating: snapfw " + ", ".join(f"{c}: {s:.1f} s" for c, s in pop["snapfw"].items())
            + ("; libvirt " + ", ".join(f"{c}: {s:.1f} s" for c, s in pop["libvirt"].items()) if pop["libvirt"]
               else "") + " (each: growing from the previous count to this one, in this process)"]
    if result["pass"] is None:
        out.append("TARGETS not checked: needs virsh (not --snapfw-only)")
    else:
        failed = [f"{r['operation']} at {r['count']}" for r in result["rows"] if r["pass"] is False]
        failed += [r["operation"] for r in _live_targets(result) if r["pass"] is False]
        out.append("PASS: every row meets its target" if not failed else f"FAIL: {', '.join(failed)}")
    out.append(f"bench total: {result['total_s']:.1f} s")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (RuntimeError, OSError, measure.CommandFailed) as e:
        log(f"bench: error: {e}")
        return 1
    except Exception as e:
        if type(e).__name__ != "libvirtError":
            raise
        log(f"bench: error: libvirt: {e}")
        return 1
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0
