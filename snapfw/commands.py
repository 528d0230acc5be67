"""What each ``snapfw`` command does and prints, whichever parser read its command line (``cli`` reads the
plain forms of the everyday commands itself, ``usage`` declares the whole command line with click): human
text by default, ``--json`` for machines.

Imports are lazy: ``snapfw list`` loads sqlite3 and the catalog, and nothing that runs programs, draws
tables, parses options with click, scans plugin entry points or makes dataclasses.
"""

from __future__ import annotations

import sys

from .errors import BadInput, SnapfwError, UnknownSnapshot

EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
# the commands that change disks: an unexpected error in one of them may leave something for `check`
CHANGING = ("create", "revert", "delete", "clone", "detach", "clone-delete")
READING = ("list", "show")  # nothing to undo: SIGTERM may end them as it ends any program


class Options:
    """The options every command shares (before the command's name), and what to close when it ends."""

    def __init__(self, uri=None, state_dir=None, lock_timeout=30.0, debug=False):
        self.command = None  # its name, once known
        self.uri = uri
        self.state_dir = state_dir
        self.lock_timeout = lock_timeout
        self.debug = debug
        self.closing = []  # progress bars to stop, error or not

    def close(self):
        for close in self.closing:
            close()


def echo(text: str = "", err: bool = False, nl: bool = True) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(f"{text}\n" if nl else text)
    stream.flush()


def guard(run, o: Options, passthrough: tuple = ()) -> int:
    """Run a command and return its exit status. snapfw's own errors become one line on stderr and a
    status, never a traceback; warnings (a broken plugin skipped) one `snapfw: warning:` line. Any other
    exception is a bug (in snapfw or a plugin): one `internal error` line too, its traceback only with
    --debug. ``passthrough``: what the parser handles itself (click's usage errors, a closed stdout)."""
    import warnings

    warnings.showwarning = _warning_line
    if o.command not in READING:
        import signal

        # SIGTERM (systemd, kill) unwinds like Ctrl-C: an unrecorded change rolls back, a recorded one
        # says to run check --repair, and the program being run is stopped first
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        try:
            return run() or 0
        finally:
            o.close()
    except passthrough:
        raise
    except SnapfwError as e:
        echo(f"snapfw: error: {e}", err=True)
        return EXIT_BAD_INPUT if isinstance(e, BadInput) else EXIT_ERROR
    except KeyboardInterrupt:
        echo("snapfw: interrupted", err=True)
        return 130
    except Exception as e:
        line = f"snapfw: error: internal error: {type(e).__name__}: {e}"
        if o.debug:
            import traceback

            traceback.print_exc()
            echo(line, err=True)
        else:
            check = "run `snapfw check` to see whether anything is left to repair; " if o.command in CHANGING else ""
            echo(f"{line} ({check}--debug shows the traceback)", err=True)
        return EXIT_ERROR


def _warning_line(message, category, filename, lineno, file=None, line=None):
    echo(f"snapfw: warning: {message}", err=True)


def _iso(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _local(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(t))


def _emit(obj) -> None:
    import json

    echo(json.dumps(obj, indent=2))


class _Reporter:
    """Progress for the user: a rich bar on a terminal, JSON lines on stderr with --json."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.tty = sys.stderr.isatty() and not as_json
        self._bar = None
        self._task = None
        self._step = None

    def step(self, step):
        self._close()
        self._step = step.describe()
        if self.as_json:
            self._line({"event": "step", "step": self._step})

    def progress(self, percent):
        if self.as_json:
            self._line({"event": "progress", "step": self._step, "percent": percent})
        elif self.tty:
            if self._bar is None:
                from rich.progress import Progress

                self._bar = Progress(transient=True)
                self._bar.start()
                self._task = self._bar.add_task(self._step[:60], total=100)
            self._bar.update(self._task, completed=percent)

    def waiting(self, domain):
        echo(f"snapfw: waiting for lock on {domain}", err=True)

    def warn(self, message):
        echo(f"snapfw: warning: {message}", err=True)

    def _line(self, obj):
        import json

        echo(json.dumps(obj), err=True)

    def _close(self):
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    close = _close


def _catalog_of(o, domain):
    """The catalog holding DOMAIN's snapshots, found as cheaply as reading allows: no plugin (and no
    lifecycle) once snapfw has noted where the connection's catalogs live. None for a domain the driver
    knows that has no snapshots yet; UnknownDomain for one neither knows."""
    from . import connection
    from .catalog import Catalog
    from .names import check_name

    check_name("domain", domain)
    uri = connection.resolve_uri(o.uri)
    # the driver (and the plugin manager) only when snapfw has never noted where its catalogs are
    state = connection.state_override(o.state_dir) or connection.known_state_dir(uri) or _session(o).state
    catalog = Catalog.open(state, create=False)
    if catalog is not None:
        o.closing.append(catalog.close)
        if catalog.has_domain(domain):
            return catalog
    from . import lifecycle

    lifecycle.ensure_domain(_session(o), domain)
    return None


def _session(o, as_json=False):
    from .lifecycle import Session

    reporter = _Reporter(as_json)
    session = Session(o.uri, o.state_dir, o.lock_timeout, reporter)
    o.closing += [reporter.close, session.close]
    return session


def _print_plan(plan, as_json, dry_run, result=None, session=None):
    """The plan; for a dry run with ``session``, each step's hypervisor calls and guest pause too."""
    d = plan.as_dict(session if dry_run else None)
    if as_json:
        _emit({**(result or {}), "dry_run": dry_run, "plan": d})
        return
    if dry_run:
        echo(f"Plan: {d['summary']}")
        for i, s in enumerate(d["steps"], 1):
            echo(f"  {i}. [{s['phase']}] {s['describe']}")
            if s["argv"]:
                from shlex import join

                echo(f"       $ {join(s['argv'])}")
            for call in s.get("calls") or ():
                echo(f"       > {call}")
            if s.get("pause"):
                echo(f"       guest pause: {s['pause']}")
        echo(f"Bytes to copy: {d['bytes_to_copy']}")
    for note in d["notes"]:
        echo(f"Note: {note}")
    if dry_run:
        echo("Nothing was changed (--dry-run).")


def _table(table: list[tuple[str, ...]]) -> list[str]:
    """A heading row, a rule and the rows, in padded columns (the last one unpadded: it may be long)."""
    n = len(table[0]) - 1
    widths = [max(len(r[i]) for r in table) for i in range(n)]
    out = []
    for i, r in enumerate(table):
        out.append(" " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[n])
        if i == 0:
            out.append("-" * (sum(widths) + 2 * n + 1 + len(r[n])))
    return out


def _print_tree(rows):
    children, roots = {}, []
    current = None
    for n, p, *_rest in rows:
        (children.setdefault(p, []) if p else roots).append(n)
        if _rest[2]:
            current = n
    out = []

    def walk(name, prefix, last, top):
        mark = " (current)" if name == current else ""
        out.append(f"{name}{mark}" if top else f"{prefix}{'└── ' if last else '├── '}{name}{mark}")
        kids = children.get(name, [])
        inner = "" if top else prefix + ("    " if last else "│   ")
        for i, k in enumerate(kids):
            walk(k, inner, i == len(kids) - 1, False)

    for r in roots:
        walk(r, "", True, True)
    if out:
        echo("\n".join(out))


def create(o, domain, name, description="", disks=(), mirror=None, lvm_size=None, quiesce=None, memory="none",
           as_json=False, dry_run=False):
    """Snapshot every disk of DOMAIN as NAME."""
    from . import lifecycle

    backends = {}
    for spec in disks:
        target, sep, backend = spec.partition("=")
        if not sep or not target or not backend:
            raise BadInput(f"--disk {spec!r}: expected TARGET=BACKEND, e.g. vda=external")
        if target in backends:
            raise BadInput(f"--disk names {target} twice")
        backends[target] = backend
    options = {"lvm-size": lvm_size} if lvm_size else {}
    session = _session(o, as_json)
    plan = lifecycle.create(session, domain, name, description, backends, dry_run, mirror, options, quiesce, memory)
    _print_plan(plan, as_json, dry_run, {"domain": domain, "snapshot": name, "operation": "create"}, session)
    if not dry_run and not as_json:
        echo(f"Snapshot {name} of {domain} created.")


def revert(o, domain, name, state=None, keep_config=False, as_json=False, dry_run=False):
    """Revert DOMAIN to snapshot NAME (the state since the current snapshot is discarded; a running
    DOMAIN is stopped and started again)."""
    from . import lifecycle

    session = _session(o, as_json)
    plan = lifecycle.revert(session, domain, name, dry_run, state, keep_config)
    _print_plan(plan, as_json, dry_run, {"domain": domain, "snapshot": name, "operation": "revert"}, session)
    if not dry_run and not as_json:
        echo(f"Domain {domain} reverted to snapshot {name}.")


def delete(o, domain, name, children=False, as_json=False, dry_run=False):
    """Delete snapshot NAME of DOMAIN, merging its data into its neighbours."""
    from . import lifecycle

    session = _session(o, as_json)
    plan = lifecycle.delete(session, domain, name, children, dry_run)
    _print_plan(plan, as_json, dry_run, {"domain": domain, "snapshot": name, "operation": "delete"}, session)
    if not dry_run and not as_json:
        echo(f"Snapshot {name} of {domain} deleted{' with its descendants' if children else ''}.")


def clone(o, domain, snapshot, newname, count=1, full=False, start=False, as_json=False, dry_run=False):
    """Make new domains NEWNAME whose disks read as SNAPSHOT of DOMAIN (linked clones unless --full)."""
    from . import clone

    clones = clone.clone(_session(o, as_json), domain, snapshot, newname, count, full, start, dry_run)
    files = [{"clone": c.name, "path": p, "bytes": b} for c in clones for p, b in c.files]
    if as_json:
        _emit({"domain": domain, "snapshot": snapshot, "operation": "clone", "dry_run": dry_run, "full": full,
               "clones": [c.name for c in clones], "files": files, "bytes": sum(f["bytes"] for f in files),
               "plans": [c.plan.as_dict() for c in clones]})
        return
    if dry_run:
        for c in clones:
            echo(f"Plan: {c.plan.summary}")
            for i, s in enumerate(c.plan.as_dict()["steps"], 1):
                echo(f"  {i}. [{s['phase']}] {s['describe']}")
        for f in files:
            echo(f"File: {f['path']} ({f['bytes']} bytes)")
        echo(f"Bytes to write: {sum(f['bytes'] for f in files)}")
    for note in dict.fromkeys(n for c in clones for n in c.plan.notes):
        echo(f"Note: {note}")
    if dry_run:
        echo("Nothing was changed (--dry-run).")
        return
    kind = "full" if full else "linked"
    echo(f"{len(clones)} {kind} clone(s) of {domain} snapshot {snapshot} made: {', '.join(c.name for c in clones)}.")


def detach(o, clone, as_json=False, dry_run=False):
    """Make linked clone CLONE standalone: copy its shared bases into it and drop their references."""
    from . import clone as clones

    plan = clones.detach(_session(o, as_json), clone, dry_run)
    _print_plan(plan, as_json, dry_run, {"domain": clone, "operation": "detach"})
    if not dry_run and not as_json:
        echo(f"Clone {clone} detached: it reads through no shared base any more.")


def clone_delete(o, clone, snapshots=False, as_json=False, dry_run=False):
    """Remove CLONE, a domain `snapfw clone` made: its definition, the files snapfw made for it, its catalog
    entries and its references on shared bases (like `virsh undefine --remove-all-storage`, limited to those)."""
    from . import clone as clones

    plan = clones.delete_clone(_session(o, as_json), clone, snapshots, dry_run)
    _print_plan(plan, as_json, dry_run, {"domain": clone, "operation": "clone-delete"})
    if not dry_run and not as_json:
        echo(f"Clone {clone} deleted with its files.")


def list_(o, domain, tree=False, as_json=False):
    """List the snapshots of DOMAIN, oldest first."""
    catalog = _catalog_of(o, domain)
    rows = catalog.list_rows(domain) if catalog is not None else []
    states = {}
    if rows and catalog.on_hosts(domain):
        from . import lifecycle  # records of disks on the connection's host (LVs): their state is asked there

        states = lifecycle.statuses(_session(o), domain)

    def disk(n, d):
        target, backend = d.split("=", 1)
        state = states.get(n, {}).get(target)
        return {"target": target, "backend": backend, **({"status": state} if state else {})}

    listed = [(n, p, t, desc, cur, [disk(n, d) for d in (disks or "").split(",") if d], mem)
              for n, p, t, desc, cur, disks, mem in rows]
    if as_json:
        _emit([{"name": n, "parent": p, "current": bool(cur), "created": _iso(t), "description": desc,
                "disks": disks, "memory": mem} for n, p, t, desc, cur, disks, mem in listed])
        return
    if tree:
        _print_tree(rows)
        return
    table = [("Name", "Creation Time", "Parent", "Current", "Disks")]
    table += [(n, _local(t), p or "-", "*" if cur else "",
               ",".join(f"{d['target']}={d['backend']}" + (f" ({d['status']})" if d.get("status", "valid") != "valid"
                                                          else "") for d in disks)
               + (f" +memory({mem})" if mem else ""))
              for n, p, t, _, cur, disks, mem in listed]
    echo("\n".join(_table(table)))


def domains(o, as_json=False):
    """List the domains of the connection: state, snapshot count and current snapshot."""
    from . import lifecycle

    rows = lifecycle.domains(_session(o, as_json))
    if as_json:
        _emit(rows)
        return
    table = [("Name", "State", "Snapshots", "Current")]
    out = _table(table + [(r["name"], r["state"], str(r["snapshots"]), r["current"] or "-") for r in rows])
    for r in rows:
        if "problem" in r:
            out.append(f"{r['name']}: {r['problem']}")
    echo("\n".join(out))


def show(o, domain, name, as_json=False):
    """Show one snapshot: its place in the tree and each disk's files."""
    from .names import check_name

    check_name("snapshot", name)
    catalog = _catalog_of(o, domain)
    views = catalog.snapshot_views(domain, name) if catalog is not None else []
    if not views:
        raise UnknownSnapshot.of(domain, name)
    d = views[0]
    if any("host" in disk for disk in d["disks"]):
        from . import lifecycle  # records of disks on the connection's host (LVs): their state is asked there

        states = lifecycle.statuses(_session(o), domain).get(name, {})
        for disk in d["disks"]:
            if disk["target"] in states:
                disk["status"] = states[disk["target"]]
    created, d["created"] = d["created"], _iso(d["created"])
    if as_json:
        _emit(d)
        return
    echo(f"Name:         {d['name']}\nDomain:       {domain}\nCreated:      {_local(created)}\n"
         f"Parent:       {d['parent'] or '-'}\nChildren:     {', '.join(d['children']) or '-'}\n"
         f"Current:      {'yes' if d['current'] else 'no'}\nDescription:  {d['description'] or '-'}")
    held = d["config"].get("window")
    if held is not None:  # taken from a running guest
        paused, frozen = held.get("paused_seconds"), held.get("frozen_seconds")
        echo(f"Paused:       {'no' if paused is None else f'yes, {paused:.3f} s'}")
        if held.get("quiesced"):
            quiesced = f"yes, {held.get('frozen_filesystems')} filesystem(s) frozen for {frozen:.3f} s"
        else:
            why = held.get("quiesce_problem")
            quiesced = f"no, crash-consistent ({why})" if why else "no, crash-consistent"
        echo(f"Quiesced:     {quiesced}")
    for disk in d["disks"]:
        tag = f" tag {disk['tag']}" if "tag" in disk else ""
        state = f" ({disk['status']})" if "status" in disk else ""
        echo(f"Disk {disk['target']}:     {disk['backend']}{tag}: {' <- '.join(disk['files'])}{state}")
    m = d["memory"]
    echo(f"Memory:       {m['kind']}: {m['file']} ({m['size']} bytes)" if m else "Memory:       none (disks only)")


def export(o, domain):
    """Print DOMAIN's catalog as YAML (for people, and as a backup of the metadata)."""
    import yaml

    from . import lifecycle

    session = _session(o)
    tree = lifecycle.snapshots(session, domain)
    files = session.catalog.files(domain) if len(tree) else {}
    snapshots = session.catalog.snapshot_views(domain) if len(tree) else []
    for s in snapshots:
        s["created"] = _iso(s["created"])
    doc = {"domain": domain, "current": tree.current, "snapshots": snapshots,
           "files": [{"path": f.path, "target": f.target, "format": f.format, "backing": f.backing,
                      "owned": f.owned} for f in files.values()]}
    echo(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), nl=False)


def check(o, domain=None, repair=False, as_json=False):
    """Report (and with --repair, fix) interrupted operations and where the hypervisor's own snapshot
    records differ from the mirrored snapshots."""
    from . import lifecycle

    findings = lifecycle.check(_session(o, as_json), domain, repair)
    if as_json:
        _emit({"findings": findings, "repaired": repair})
    else:
        echo("\n".join(findings) if findings else "No problems found.")
    if findings and not repair:
        return EXIT_ERROR


def plugins_(o, as_json=False):
    """List loaded plugins with their versions, their backends and drivers, and what each can do."""
    from . import plugins

    rows = []
    for name, (cls, plugin) in sorted(plugins.disk_backends().items()):
        rows.append({"kind": "disk backend", "name": name, "plugin": plugin, "version": plugins.version(plugin),
                     "description": cls.description, "capabilities": sorted(cls.capabilities), "cost": cls.cost})
    for scheme, (cls, plugin) in sorted(plugins.hypervisor_drivers().items()):
        rows.append({"kind": "hypervisor driver", "name": scheme, "plugin": plugin,
                     "version": plugins.version(plugin), "description": cls.description,
                     "capabilities": sorted(cls.capabilities),
                     "cost": {}})
    for name, (cls, plugin) in sorted(plugins.memory_backends().items()):
        rows.append({"kind": "memory backend", "name": name, "plugin": plugin, "version": plugins.version(plugin),
                     "description": f"{cls.description} (drivers: {', '.join(sorted(cls.drivers))})",
                     "capabilities": sorted(f"memory.{k}" for k in cls.kinds), "cost": {}})
    listed = {r["plugin"] for r in rows}
    for plugin, hooks in plugins.loaded():
        if plugin not in listed:  # a plugin acting around operations only
            rows.append({"kind": "hooks", "name": plugin, "plugin": plugin, "version": plugins.version(plugin),
                         "description": ", ".join(hooks), "capabilities": [], "cost": {}})
    if as_json:
        _emit(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("Kind", "Name", "Plugin", "Version", "Capabilities", "Description")
    for r in rows:
        table.add_row(r["kind"], r["name"], r["plugin"], r["version"] or "-", ", ".join(r["capabilities"]) or "-",
                      r["description"])
    Console().print(table)
