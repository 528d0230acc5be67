"""``python -m bench``: snapfw list/create/delete against virsh, whole processes, one run. See README.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

from . import domains, measure

TARGET_COUNT = 1000
TARGET_RATIO = 0.5
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
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
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


def _measure_create_delete(sf, lv, env, repeat):
    """Repeat: snapfw create the (N+1)th, snapfw delete it, then virsh the same; the first round untimed."""
    name = domains.snapshot_name(sf.count)
    sf_c = measure.Series(snapfw_argv() + ["--connect", sf.uri, "create", sf.name, name])
    sf_d = measure.Series(snapfw_argv() + ["--connect", sf.uri, "delete", sf.name, name])
    lv_c = lv_d = None
    if lv is not None:
        lv_c = measure.Series(VIRSH + ["snapshot-create-as", "--domain", lv.name, "--name", name])
        lv_d = measure.Series(VIRSH + ["snapshot-delete", "--domain", lv.name, "--snapshotname", name])
    order = [(sf_c, env), (sf_d, env)] + ([(lv_c, None), (lv_d, None)] if lv is not None else [])
    for rnd in range(repeat + 1):
        for series, series_env in order:
            sample, _ = measure.run(series.argv, env=series_env)
            if rnd:
                series.samples.append(sample)
    _check_rows(snapfw_argv() + ["--connect", sf.uri, "list", sf.name], sf.count, env)
    if lv is not None and lv.snapshot_count() != lv.count:
        raise RuntimeError(f"libvirt domain has {lv.snapshot_count()} snapshots after create/delete, "
                           f"expected {lv.count}")
    return name, (sf_c, lv_c), (sf_d, lv_d)


def run(args) -> dict:
    started = time.perf_counter()
    # the connection and state dir come from the command line only, in this process and in every child
    for var in ("SNAPFW_CONNECT", "SNAPFW_STATE_DIR"):
        os.environ.pop(var, None)
    env = dict(os.environ)
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
              "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
              "snapfw_version": _version("snapfw"),
              "libvirt_version": _libvirt_version(conn), "populate_s": {"snapfw": {}, "libvirt": {}}}
    try:
        sf = domains.SnapfwDomain(root)
        if conn is not None:
            lv = domains.LibvirtDomain(conn, root)
        list_rows = []
        for count in args.counts:
            log(f"bench: populating {count} snapshots (snapfw: in-process lifecycle.create"
                f"{', libvirt: REDEFINE' if lv else ''})")
            secs = sf.extend(count, lambda n, s: log(f"bench:   snapfw {n}/{count} in {s:.1f} s"))
            result["populate_s"]["snapfw"][str(count)] = round(secs, 3)
            if lv is not None:
                secs = lv.extend(count)
                result["populate_s"]["libvirt"][str(count)] = round(secs, 3)
                log(f"bench:   libvirt {count}/{count} in {secs:.1f} s")
            os.sync()  # populating left dirty pages; their writeback must not land in the timed runs
            log(f"bench: timing list of {count}, {args.repeat} runs each")
            sf_list = measure.Series(snapfw_argv() + ["--connect", sf.uri, "list", sf.name])
            _check_rows(sf_list.argv, count, env)
            pairs = [(sf_list, env)]
            lv_list = None
            if lv is not None:
                lv_list = measure.Series(VIRSH + ["snapshot-list", lv.name])
                _check_rows(lv_list.argv, count)
                pairs.append((lv_list, None))
            _measure_pair(pairs, args.repeat)
            list_rows.append({"count": count, "snapfw": sf_list.as_dict(),
                              "virsh": lv_list.as_dict() if lv_list else None,
                              "ratio": _round(_ratio(sf_list, lv_list))})
        result["list"] = list_rows

        log(f"bench: timing create/delete of one more snapshot at {sf.count}, {args.repeat} runs each")
        if lv is not None:
            lv.take_disk(sf.disk)
        os.sync()
        name, creates, deletes = _measure_create_delete(sf, lv, env, args.repeat)
        result["create_delete"] = {"count": sf.count, "snapshot": name}
        for op, (s, v) in (("create", creates), ("delete", deletes)):
            result["create_delete"][op] = {"snapfw": s.as_dict(), "virsh": v.as_dict() if v else None,
                                           "ratio": _round(_ratio(s, v))}
        if lv is not None:
            rss = domains.libvirtd_rss_mib()
            result["libvirtd_rss_mib"] = None if rss is None else round(rss, 1)
    finally:
        if lv is not None:
            try:
                lv.undefine()
            except Exception as e:  # report, never hide the real error
                log(f"bench: warning: could not undefine {lv.name}: {e}")
        if conn is not None:
            conn.close()
        shutil.rmtree(root, ignore_errors=True)

    target = next((r for r in result["list"] if r["count"] == TARGET_COUNT), None)
    ratio = target["ratio"] if target else None
    result["target"] = {"count": TARGET_COUNT, "max_ratio": TARGET_RATIO, "ratio": ratio,
                        "pass": None if ratio is None else ratio <= TARGET_RATIO}
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


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
    out = [f"snapfw {result['snapfw_version']} vs virsh (libvirt {result['libvirt_version'] or 'not measured'}); "
           f"median of {result['repeat']} runs after 1 warm-up; whole-process wall time, peak RSS "
           f"from /usr/bin/time; {result['host']['cpus']} CPUs", ""]
    header = ["count", "snapfw list s", "virsh list s", "ratio", "snapfw peak MiB", "virsh peak MiB"]
    rows = []
    for r in result["list"]:
        sf, lv = r["snapfw"], r["virsh"] or {}
        rows.append([r["count"], _fmt(sf["median_s"], ".3f"), _fmt(lv.get("median_s"), ".3f"),
                     _fmt(r["ratio"], ".2f"), _fmt(sf["peak_rss_mib"], ".1f"), _fmt(lv.get("peak_rss_mib"), ".1f")])
    out.append(_table(header, rows))
    cd = result["create_delete"]
    out += ["", f"one more snapshot ({cd['snapshot']}) on a domain with {cd['count']}: "
                "snapfw create/delete vs virsh snapshot-create-as/snapshot-delete"]
    header = ["operation", "snapfw s", "virsh s", "ratio", "snapfw peak MiB", "virsh peak MiB"]
    rows = []
    for op in ("create", "delete"):
        sf, lv = cd[op]["snapfw"], cd[op]["virsh"] or {}
        rows.append([op, _fmt(sf["median_s"], ".3f"), _fmt(lv.get("median_s"), ".3f"), _fmt(cd[op]["ratio"], ".2f"),
                     _fmt(sf["peak_rss_mib"], ".1f"), _fmt(lv.get("peak_rss_mib"), ".1f")])
    out.append(_table(header, rows))
    if result.get("libvirtd_rss_mib") is not None:
        out.append(f"(virsh is a client: libvirtd does the work and was {result['libvirtd_rss_mib']:.1f} MiB "
                   "resident at the end, not counted above)")
    pop = result["populate_s"]
    out += ["", "populating: snapfw " + ", ".join(f"{c}: {s:.1f} s" for c, s in pop["snapfw"].items())
            + ("; libvirt " + ", ".join(f"{c}: {s:.1f} s" for c, s in pop["libvirt"].items()) if pop["libvirt"]
               else "") + " (each: growing from the previous count to this one, in this process)"]
    t = result["target"]
    if t["pass"] is None:
        out.append(f"TARGET not checked: needs --counts including {t['count']} and virsh (not --snapfw-only)")
    else:
        out.append(f"{'PASS' if t['pass'] else 'FAIL'}: snapfw list of {t['count']} takes {t['ratio']:.2f} x "
                   f"virsh's time (target <= {t['max_ratio']})")
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
