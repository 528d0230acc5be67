"""The ``qmp`` driver: a bare running QEMU reached through its QMP socket, ``qmp:///PATH/TO/SOCKET``.

The domain is the QEMU listening there, named by its ``-name``. Its disks, their chains and internal
snapshots come from QEMU's own view (``query-block``), never from a ``qemu-img`` on an image QEMU holds.
Such a QEMU has no persistent definition: its running block graph is the truth. Live snapshots of all
disks are one QMP ``transaction``; live merges are ``block-commit`` and ``block-stream`` jobs
(auto-dismiss off, so a job that outlives snapfw waits for ``check --repair``).

A revert stops QEMU and starts it again, which needs its command line: the *launch spec*, a file next to
the socket, ``SOCKET.launch.yaml``, which then is the domain's definition (``define`` rewrites its disks):

    name: web                          # QEMU's -name
    argv: [qemu-system-x86_64, -name, web, -daemonize, -qmp, "unix:SOCKET,server=on,wait=off",
           -blockdev, "driver=file,filename={vda},node-name=f0",
           -blockdev, "driver={vda.format},file=f0,node-name=d0", -device, "virtio-blk-pci,drive=d0,id=vda"]
    disks:                             # what QEMU runs on: snapfw keeps these current
      vda: {path: /srv/vms/web-vda.qcow2, format: qcow2}

``{TARGET}`` and ``{TARGET.format}`` stand for the disk's active file and its format (in an option
string, a comma of the file name is doubled; in a JSON argument, it is JSON-escaped). The argv runs with
no shell and must daemonize; snapfw adds ``-S`` and continues the guest once QEMU runs on the planned
files. Without a launch spec, create and delete work on any QEMU found by its socket; a revert is
refused before anything changes. While QEMU is down, the domain is read from the spec (shut off).

The guest agent (``create --quiesce``) is found from QEMU itself: the ``virtserialport`` named
``org.qemu.guest_agent.0``, and the unix socket its chardev serves (``-chardev socket,server=on``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import time

from snapfw.api import (
    FORMATS,
    INTERNAL,
    LIVE_CREATE,
    LIVE_DELETE,
    LIVE_REVERT,
    MEMORY_PAUSED,
    QMP,
    BadInput,
    Disk,
    Domain,
    FileError,
    GuestAgent,
    HypervisorDriver,
    Inconsistent,
    MemoryBackend,
    NotSupported,
    QMPError,
    ToolError,
    UnknownDomain,
    check_name,
    fit_file_name,
    fsync_dir,
    hookimpl,
    remove_overlay,
    run,
    yamlfiles,
)

# how long undoing an external snapshot may wait for its commit job (the data the guest wrote since)
UNDO_JOB_SECONDS = 600.0
# how long a live delete waits for one merge job; past it the job keeps running and `check --repair`
# re-attaches to it
MERGE_JOB_SECONDS = 3600.0
# keys of QEMU's ImageInfo that inspection reads (the same names qemu-img info --output=json prints)
# how long a live snapshot's transaction may take to answer (it drains the disks' in-flight I/O)
TRANSACTION_SECONDS = 30.0
# how long starting QEMU from its launch spec may take, until it has daemonized
START_SECONDS = 60.0
# the name under which a memory image's descriptor is passed to QEMU, and how long loading one may take
MEMORY_FD = "snapfw-memory"
SAVE_SECONDS = 600.0
UNCAPPED = 1 << 50  # bytes/s: no cap on a migration to a file
SWITCHOVER = "pause-before-switchover"
MIGRATION_EVENTS = "events"  # a MIGRATION event at each status: waiting for one wakes at once, not by polling
ACTIVE_MIGRATION = ("setup", "active", "pre-switchover", "device")
# the launch spec of the QEMU at SOCKET (see the module docstring)
SPEC_SUFFIX = ".launch.yaml"
PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_-]+)(\.format)?\}")
# the virtio-serial port name the QEMU guest agent listens on
AGENT_PORT = "org.qemu.guest_agent.0"
CHAIN_KEYS = ("filename", "format", "backing-filename", "full-backing-filename", "backing-filename-format",
              "snapshots", "format-specific", "virtual-size")


def _node_name(overlay: str, prefix: str) -> str:
    """A QEMU node or job name for an overlay, stable across runs (recovery finds it again), <= 31 bytes."""
    import hashlib  # here: every command loads this plugin, few name an overlay

    return f"{prefix}-{hashlib.sha256(os.fsencode(overlay)).hexdigest()[:20]}"


def _target(block: dict) -> str | None:
    """The disk's device id: ``/machine/peripheral/ID/...`` for -device id=ID, else the -drive id."""
    parts = (block.get("qdev") or "").split("/")
    if len(parts) > 3 and parts[1:3] == ["machine", "peripheral"]:
        return parts[3]
    return block.get("device") or None


def _chain(image: dict) -> list[dict]:
    """QEMU's nested ImageInfo (``backing-image``) as a list, top first, in qemu-img info's form."""
    out = []
    while image:
        out.append({k: image[k] for k in CHAIN_KEYS if k in image})
        image = image.get("backing-image")
    return out


def _transaction_action(a: dict, node: str) -> dict:
    """Live action ``a`` (snapfw.live) on block node ``node`` as one action of a QMP ``transaction``."""
    if a["kind"] == INTERNAL:
        return {"type": "blockdev-snapshot-internal-sync", "data": {"device": node, "name": a["tag"]}}
    return {"type": "blockdev-snapshot-sync",
            "data": {"node-name": node, "snapshot-file": a["overlay"], "format": "qcow2",
                     "snapshot-node-name": _node_name(a["overlay"], "snapfw"), "mode": "absolute-paths"}}


def _call(command: str, args: dict | None = None) -> str:
    """A QMP command as --dry-run shows it: its name and its arguments as JSON."""
    return f"{command} {json.dumps(args)}" if args else command


def _local_file_problem(name: str) -> str | None:
    if not name.startswith("/"):
        return f"is on {name[:60]!r}, not a local file (network and json: disks are not supported)"
    try:
        mode = os.stat(name).st_mode
    except OSError as e:
        return f"is on {name}, which snapfw cannot see ({e.strerror})"
    if not stat.S_ISREG(mode):
        return f"is on {name}, not a regular file (block devices are not supported yet)"
    return None


def _load_spec(path: str) -> dict | None:
    """The launch spec at ``path``, checked; None if there is none."""
    if not os.path.exists(path):
        return None
    try:
        spec = yamlfiles.load(path, "launch spec ")
    except OSError as e:
        raise FileError.of(e, path) from None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise BadInput(f"launch spec {path}: expected a mapping with name, argv and disks")
    check_name("domain", spec["name"])
    argv, disks = spec.get("argv"), spec.get("disks")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
        raise BadInput(f"launch spec {path}: argv must be a list of strings (the QEMU command line, no shell)")
    if "-daemonize" not in argv:
        raise BadInput(f"launch spec {path}: argv must include -daemonize (snapfw waits for QEMU to daemonize)")
    if not isinstance(disks, dict) or not disks:
        raise BadInput(f"launch spec {path}: disks must map each disk's target to its path and format")
    for target, d in disks.items():
        if not isinstance(d, dict) or not isinstance(d.get("path"), str) or not os.path.isabs(d["path"]):
            raise BadInput(f"launch spec {path}: disk {target} needs an absolute path")
        if d.get("format") not in FORMATS:
            raise BadInput(f"launch spec {path}: disk {target} format must be one of {', '.join(FORMATS)}")
    used = {m.group(1) for a in argv for m in PLACEHOLDER.finditer(a)}
    if used != set(disks):
        raise BadInput(f"launch spec {path}: argv must use {{TARGET}} for exactly the disks it lists "
                       f"(disks: {', '.join(sorted(disks))}; argv uses: {', '.join(sorted(used)) or 'none'})")
    return spec


def _argv(spec: dict) -> list[str]:
    """The spec's argv with each disk's active file and format in place of its placeholders."""
    def fill(arg: str) -> str:
        def value(m):
            d = spec["disks"][m.group(1)]
            text = d["format"] if m.group(2) else d["path"]
            return json.dumps(text)[1:-1] if arg.startswith("{\"") else text.replace(",", ",,")
        return PLACEHOLDER.sub(value, arg)

    return [fill(a) for a in spec["argv"]]


class QMPDriver(HypervisorDriver):
    scheme = "qmp"
    capabilities = frozenset({LIVE_CREATE, LIVE_REVERT, LIVE_DELETE})
    description = "a running QEMU reached through its QMP socket: qmp:///PATH/TO/SOCKET"

    def __init__(self, uri: str):
        super().__init__(uri)
        rest = uri.partition("://")[2]
        if not rest.startswith("/"):
            raise BadInput(f"invalid connection URI {uri!r}: qmp:// needs the absolute path of a QMP socket")
        self.socket = os.path.normpath(rest)
        self.spec_path = self.socket + SPEC_SUFFIX
        self._qmp: QMP | None = None
        self._named: tuple[QMP, str] | None = None  # (connection, the -name QEMU gave on it)

    @property
    def qmp(self) -> QMP:
        """One connection for the whole process (QEMU's monitor serves one client at a time)."""
        if self._qmp is None:
            self._qmp = QMP(self.socket).connect()
        return self._qmp

    def _name(self) -> str:
        """QEMU's -name, asked once per connection: the QEMU at the other end cannot change it."""
        qmp = self.qmp
        if self._named is None or self._named[0] is not qmp:
            name = qmp.execute("query-name").get("name")
            if not name:
                raise NotSupported(f"the QEMU at {self.socket} has no -name; snapfw names domains by it")
            self._named = (qmp, name)
        return self._named[1]

    def _check(self, name: str):
        actual = self._name()
        if actual != name:
            raise UnknownDomain(f"no domain {name!r}: the QEMU at {self.socket} is named {actual!r}")

    def _down(self) -> dict | None:
        """The launch spec if QEMU is down and has one (the domain is then read from it), else None."""
        if self._qmp is not None or QMP.listening(self.socket):
            return None
        return _load_spec(self.spec_path)

    def list_domains(self) -> list[str]:
        spec = self._down()
        return [spec["name"]] if spec else [self._name()]

    def domain_state(self, name: str) -> str:
        spec = self._down()
        if spec is not None:
            if spec["name"] != name:
                raise UnknownDomain(f"no domain {name!r}: the launch spec {self.spec_path} is of {spec['name']!r}")
            return "shut off"
        self._check(name)
        return self._state()

    def _state(self) -> str:
        """"running", or "paused" for any other run state of QEMU (paused, prelaunch, a stopped VM)."""
        return "running" if self.qmp.execute("query-status").get("status") == "running" else "paused"

    def _blocks(self) -> dict[str, dict]:
        """target -> query-block entry, for every drive with a medium."""
        out = {}
        for b in self.qmp.execute("query-block"):
            if not b.get("inserted"):
                continue  # an empty drive (a CD-ROM without a disc) holds no image
            target = _target(b)
            if target is None:
                raise NotSupported(f"a disk of the QEMU at {self.socket} has neither a device id nor a drive "
                                   f"id (node {b['inserted'].get('node-name')}); give its -device an id=")
            out[target] = b
        return out

    def domain(self, name: str) -> Domain:
        spec = self._down()
        if spec is not None:
            if spec["name"] != name:
                raise UnknownDomain(f"no domain {name!r}: the launch spec {self.spec_path} is of {spec['name']!r}")
            disks = [Disk(t, d["path"], d["format"]) for t, d in spec["disks"].items()]
            roots = [os.path.dirname(self.spec_path), *(os.path.dirname(d.path) for d in disks)]
            return Domain(name, disks, allowed_roots=tuple(dict.fromkeys(roots)), definition={"argv": spec["argv"]})
        self._check(name)
        state = self._state()
        disks, chains, roots = [], {}, []
        for target, b in self._blocks().items():
            chain = _chain(b["inserted"]["image"])
            for node in chain:
                problem = _local_file_problem(node["filename"])
                if problem:
                    raise NotSupported(f"disk {target} {problem}; snapfw cannot snapshot it")
                roots.append(os.path.dirname(node["filename"]))
            for i, node in enumerate(chain):
                chains[node["filename"]] = chain[i:]
            fmt = chain[0]["format"]
            if fmt not in FORMATS:
                raise NotSupported(f"disk {target} is a {fmt} node, not one of {', '.join(FORMATS)}; snapfw "
                                   "cannot snapshot it")
            disks.append(Disk(target, chain[0]["filename"], fmt, node=b["inserted"]["node-name"]))
        spec = _load_spec(self.spec_path)
        if spec is not None and spec["name"] != name:
            raise BadInput(f"launch spec {self.spec_path} is of {spec['name']!r}, but the QEMU at {self.socket} is "
                           f"named {name!r}")
        if spec is not None:  # as a domain file's folder: where a backend's snapshots of it may go (subvolumes)
            roots.insert(0, os.path.dirname(self.spec_path))
        return Domain(name, disks, running=True, allowed_roots=tuple(dict.fromkeys(roots)),
                      state=state, live_chains=chains, pid=self.qmp.peer_pid(),
                      definition={"argv": spec["argv"]} if spec else {})

    def define(self, domain: dict) -> None:
        """Rewrite the launch spec's disks (and its argv, to put back a snapshot's): nothing without a spec,
        since a bare QEMU's running block graph is then the only truth."""
        spec = _load_spec(self.spec_path)
        if spec is None:
            return
        new = {**spec, "disks": {d["target"]: {"path": d["path"], "format": d["format"]} for d in domain["disks"]}}
        if "definition" in domain:
            new["argv"] = domain["definition"]["argv"]
        if new != spec:
            self._write_spec(new)

    def _write_spec(self, spec: dict) -> None:
        """Atomically: a temp file with the spec's mode, fsync, rename, fsync the directory. The temp name is
        fixed per domain (written under its lock), so a crash's leftover is written over next time."""
        import yaml

        folder = os.path.dirname(self.spec_path)
        tmp = os.path.join(folder, f".{fit_file_name(spec['name'], 255 - 12)}.launch.tmp")
        try:
            mode = stat.S_IMODE(os.stat(self.spec_path).st_mode)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.fchmod(f.fileno(), mode)
                yaml.safe_dump(spec, f, sort_keys=False, width=1 << 16)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.spec_path)
            fsync_dir(folder)
        except OSError as e:
            raise FileError.of(e, self.spec_path) from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    # --- stop and start (revert) -----------------------------------------------------------------------
    def restart_problem(self, domain: Domain) -> str | None:
        spec = _load_spec(self.spec_path)
        if spec is None:
            return (f"QEMU must be started again afterwards, and it has no launch spec ({self.spec_path}: its "
                    "argv and disks, see the README's qmp section)")
        missing = {d.target for d in domain.disks} ^ set(spec["disks"])
        if missing:
            return (f"the launch spec {self.spec_path} lists disks {', '.join(sorted(spec['disks']))}, the domain "
                    f"has {', '.join(d.target for d in domain.disks)}")
        return None

    def stop(self, domain: str) -> None:
        """Write what QEMU runs on into the launch spec (a start puts it back on exactly that), then quit it."""
        if self._qmp is None and not QMP.listening(self.socket):
            return
        self.define({"name": domain, "disks": [d.as_dict() for d in self.domain(domain).disks]})
        self.qmp.quit()
        self._qmp = None

    def start(self, domain: str, paused: bool) -> None:
        self._launch(domain)
        self._check(domain)
        if not paused and self.qmp.execute("query-status").get("status") == "prelaunch":
            self.qmp.execute("cont")

    # --- the plan window ---------------------------------------------------------------------------------
    def pause(self, domain: str) -> None:
        """QMP ``stop``: QEMU drains and flushes every disk before it returns."""
        self._check(domain)
        self.qmp.execute("stop")

    def resume(self, domain: str) -> None:
        self._check(domain)
        if self.qmp.execute("query-status").get("status") == "paused":
            self.qmp.execute("cont")

    def _agent_socket(self, domain: str) -> str | None:
        """The unix socket of the guest agent's channel, from QEMU's own view, or None if it has none."""
        self._check(domain)
        label = None
        for parent in ("/machine/peripheral", "/machine/peripheral-anon"):
            for child in self.qmp.execute("qom-list", {"path": parent}):
                if child["type"] == "child<virtserialport>":
                    port = f"{parent}/{child['name']}"
                    if self.qmp.execute("qom-get", {"path": port, "property": "name"}) == AGENT_PORT:
                        label = self.qmp.execute("qom-get", {"path": port, "property": "chardev"})
        for chardev in self.qmp.execute("query-chardev"):
            name = chardev["filename"].removeprefix("disconnected:")
            if chardev["label"] == label and name.startswith("unix:") and name.endswith(",server=on"):
                return name[len("unix:"):-len(",server=on")]
        return None

    def _guest_agent(self, domain: str, seconds: float) -> GuestAgent:
        path = self._agent_socket(domain)
        if path is None:
            raise NotSupported(f"the QEMU of {domain} has no guest agent channel (a virtserialport named "
                               f"{AGENT_PORT} on a unix socket chardev QEMU serves)")
        return GuestAgent(path, timeout=seconds).connect()

    def agent_problem(self, domain: str, seconds: float) -> str | None:
        try:
            with self._guest_agent(domain, seconds) as agent:
                if agent.execute("guest-fsfreeze-status", timeout=seconds) != "thawed":
                    return "its filesystems are frozen already (by someone else: snapfw would thaw them)"
        except (NotSupported, ToolError, BadInput) as e:
            return str(e)
        return None

    def freeze(self, domain: str, seconds: float) -> int:
        with self._guest_agent(domain, seconds) as agent:
            return agent.execute("guest-fsfreeze-freeze", timeout=seconds)

    def thaw(self, domain: str, seconds: float) -> None:
        with self._guest_agent(domain, seconds) as agent:
            if agent.execute("guest-fsfreeze-status", timeout=seconds) != "thawed":
                agent.execute("guest-fsfreeze-thaw", timeout=seconds)

    def _launch(self, domain: str, extra: tuple[str, ...] = ()) -> None:
        """Start QEMU from the launch spec, stopped (``-S``), with ``extra`` arguments, unless it runs;
        check that it runs on the files the spec names."""
        if self._qmp is not None or QMP.listening(self.socket):
            return
        spec = _load_spec(self.spec_path)
        if spec is None or spec["name"] != domain:
            raise NotSupported(f"cannot start {domain}: no launch spec for it at {self.spec_path}")
        argv = _argv(spec)
        run(argv + ([] if "-S" in argv else ["-S"]) + list(extra), timeout=START_SECONDS)
        self._check(domain)
        running = {t: b["inserted"]["image"]["filename"] for t, b in self._blocks().items()}
        planned = {t: d["path"] for t, d in spec["disks"].items()}
        if running != planned:
            self.qmp.quit()
            self._qmp = None
            raise Inconsistent(f"QEMU started from {self.spec_path} ran on {running}, not on {planned}; "
                               "stopped it again")

    # --- live snapshots --------------------------------------------------------------------------------
    def live_snapshot(self, domain: str, actions: list[dict]) -> None:
        self._check(domain)
        blocks = self._blocks()
        commands = []
        for a in actions:
            b = blocks.get(a["target"])
            active = b and b["inserted"]["image"]["filename"]
            if active != a["file"]:  # the plan was made under the lock: someone changed QEMU behind it
                raise Inconsistent(f"disk {a['target']} now runs on {active}, not {a['file']} as planned")
            commands.append(_transaction_action(a, b["inserted"]["node-name"]))
        self.qmp.execute("transaction", {"actions": commands}, timeout=TRANSACTION_SECONDS)

    # --- what the live steps will send (--dry-run) ------------------------------------------------------
    def explain(self, method: str, *args):
        return getattr(self, f"_explain_{method}")(*args)

    def _explain_live_snapshot(self, domain, actions):
        commands = [_transaction_action(a, a["node"]) for a in actions]
        return ([_call("transaction", {"actions": commands})],
                "none beyond QEMU's own: the vCPUs run on while QEMU drains the disks' in-flight I/O for the one "
                f"transaction (milliseconds; snapfw waits for its answer at most {TRANSACTION_SECONDS:g} s)")

    def _explain_block_commit(self, domain, target, top, base, job):
        inserted = self._active(target)
        active = inserted["image"]["filename"] == top
        calls = [_call("block-commit", {"job-id": job, "device": inserted["node-name"],
                                        "top-node": self._node_or_file(top), "base-node": self._node_or_file(base),
                                        "auto-dismiss": False})]
        calls += [_call("query-jobs") + f" (every 0.1 s, at most {MERGE_JOB_SECONDS:g} s)"]
        if active:
            calls += [_call("job-complete", {"id": job}) + f" (once READY: the disk pivots to {base})"]
        calls += [_call("job-dismiss", {"id": job}), _call("query-block") + " (the chain without the top file)",
                  _call("blockdev-del") + f" of any node still open on {top}"]
        pivot = "; the pivot drains the disk's I/O for an instant (QEMU's own)" if active else ""
        return calls, f"none: the guest runs on while the block job copies{pivot}"

    def _explain_block_stream(self, domain, target, path, old_backing, new_backing, job):
        args = {"job-id": job, "device": self._node_or_file(path), "auto-dismiss": False}
        if new_backing is not None:
            args["base-node"] = self._node_or_file(new_backing)
        return ([_call("block-stream", args), _call("query-jobs") + f" (every 0.1 s, at most {MERGE_JOB_SECONDS:g} s)",
                 _call("job-dismiss", {"id": job}), _call("query-block") + f" (the chain without {old_backing})",
                 _call("blockdev-del") + f" of any node still open on {old_backing}"],
                "none: the guest runs on while the block job copies")

    def _explain_stop(self, domain):
        launch = f"write what QEMU runs on into {self.spec_path}; " if os.path.exists(self.spec_path) else ""
        return [f"{launch}{_call('quit')} (then wait until QEMU has closed its images)"], None

    def _explain_start(self, domain, paused):
        calls = [f"run the argv of {self.spec_path} with -S, on the disks it then names (daemonizes within "
                 f"{START_SECONDS:g} s)", _call("query-block") + " (QEMU runs on the planned files)"]
        return calls + ([] if paused else [_call("cont")]), None

    def _node_or_file(self, path: str) -> str:
        try:
            return self._format_node(path)
        except Inconsistent:
            return f"<the node of {path}>"

    def undo_live_snapshot(self, domain: str, actions: list[dict], progress=None) -> None:
        self._check(domain)
        for a in reversed(actions):
            if a["kind"] == INTERNAL:
                self._undo_internal(a)
            else:
                self._undo_external(a, progress)

    def _active(self, target: str) -> dict:
        b = self._blocks().get(target)
        if b is None:
            raise Inconsistent(f"disk {target} is gone from the running QEMU")
        return b["inserted"]

    def _undo_internal(self, a: dict):
        inserted = self._active(a["target"])
        image = inserted["image"]
        if image["filename"] != a["file"]:
            raise Inconsistent(f"disk {a['target']} runs on {image['filename']}, not {a['file']} that holds "
                               f"internal snapshot {a['tag']!r}")
        if a["tag"] in {s["name"] for s in image.get("snapshots", [])}:
            self.qmp.execute("blockdev-snapshot-delete-internal-sync",
                             {"device": inserted["node-name"], "name": a["tag"]})

    def delete_tag(self, domain, target, path, tag):
        self._check(domain)
        self._undo_internal({"target": target, "file": path, "tag": tag})

    def _undo_external(self, a: dict, progress):
        """Commit the overlay (and what the guest wrote to it) back into the frozen file, pivot, verify
        from QEMU's view, then remove the overlay. Each part checks first whether it is already done."""
        job = _node_name(a["overlay"], "snapfw-undo")
        deadline = time.monotonic() + UNDO_JOB_SECONDS
        if self.qmp.job(job) is not None:  # a previous run died while its commit ran: finish that one
            self.qmp.run_job(job, deadline, progress, complete=True)
        inserted = self._active(a["target"])
        if inserted["image"]["filename"] == a["overlay"]:
            base = self._format_node(a["file"])
            self.qmp.execute("block-commit", {"job-id": job, "device": inserted["node-name"], "base-node": base,
                                              "auto-dismiss": False})
            self.qmp.run_job(job, deadline, progress, complete=True)
            inserted = self._active(a["target"])
        if inserted["image"]["filename"] != a["file"]:
            raise Inconsistent(f"disk {a['target']} runs on {inserted['image']['filename']}, expected "
                               f"{a['file']} after undoing its snapshot")
        self._close(a["overlay"])
        remove_overlay(a["overlay"], a["file"])

    def _close(self, path: str):
        """Make sure QEMU no longer holds ``path`` once its chain dropped it. QEMU closes the nodes it
        opened itself; nodes opened with ``-blockdev`` belong to the monitor and stay open until
        ``blockdev-del`` (format node before its protocol node)."""
        nodes = [n for n in self.qmp.execute("query-named-block-nodes", {"flat": True}) if n.get("file") == path]
        for n in sorted(nodes, key=lambda n: n.get("drv") == "file"):
            try:
                self.qmp.execute("blockdev-del", {"node-name": n["node-name"]})
            except QMPError as e:
                raise Inconsistent(f"{path} is still open in QEMU (node {n['node-name']}: {e.desc}); "
                                   "not removed") from None

    # --- live merges (delete) --------------------------------------------------------------------------
    def _files(self, target: str) -> list[str]:
        """The files of disk ``target``'s chain, active first, as QEMU runs it now."""
        return [n["filename"] for n in _chain(self._active(target)["image"])]

    def _merge(self, target: str, job: str, gone: str, done, start, progress):
        """Block job ``job`` on disk ``target``: re-attach to it if QEMU still has it, else start it with
        ``start(root_node)`` unless ``done(chain)`` already holds; wait (completing an active commit, which
        pivots), check ``done`` against QEMU's view of the chain, then close ``gone``."""
        deadline = time.monotonic() + MERGE_JOB_SECONDS
        if self.qmp.job(job) is None:
            chain = self._files(target)
            if not done(chain):
                if gone not in chain:
                    raise Inconsistent(f"disk {target} runs on {' <- '.join(chain)}, which no longer holds "
                                       f"{gone}; the planned merge cannot run")
                start(self._active(target)["node-name"])
        if self.qmp.job(job) is not None:
            self.qmp.run_job(job, deadline, progress, complete=True)
        chain = self._files(target)
        if not done(chain):
            raise Inconsistent(f"after block job {job}, disk {target} runs on {' <- '.join(chain)}, not the "
                               f"planned chain without {gone}")
        self._close(gone)

    def block_commit(self, domain, target, top, base, job, progress=None):
        self._check(domain)

        def start(root):
            self.qmp.execute("block-commit", {"job-id": job, "device": root, "top-node": self._format_node(top),
                                              "base-node": self._format_node(base), "auto-dismiss": False})

        self._merge(target, job, top, lambda chain: top not in chain and base in chain, start, progress)

    def block_stream(self, domain, target, path, old_backing, new_backing, job, progress=None):
        self._check(domain)

        def done(chain):
            below = chain[chain.index(path) + 1:] if path in chain else None
            return old_backing not in chain and below is not None and (below[:1] or [None])[0] == new_backing

        def start(root):
            args = {"job-id": job, "device": self._format_node(path), "auto-dismiss": False}
            if new_backing is not None:
                args["base-node"] = self._format_node(new_backing)
            self.qmp.execute("block-stream", args)

        self._merge(target, job, old_backing, done, start, progress)

    def _format_node(self, path: str) -> str:
        for n in self.qmp.execute("query-named-block-nodes", {"flat": True}):
            if n.get("file") == path and n.get("drv") != "file":
                return n["node-name"]
        raise Inconsistent(f"QEMU has no node for {path}")


class QemuMemory(MemoryBackend):
    """Memory state of a qmp domain: QEMU's migration stream, to a file descriptor snapfw opened itself
    (``getfd`` + ``migrate fd:NAME``), so QEMU needs no access of its own to the image.

    The migration runs with ``pause-before-switchover``: it stops at ``pre-switchover`` once the guest is
    stopped and its disks flushed, before the last pass. The disks' transaction runs there; then
    ``migrate-continue`` writes the rest. With the ``events`` capability on, each status change wakes the
    wait for it at once (the guest's pause then holds no polling interval). Both are put back. (Once a
    migration has completed, QEMU has handed the images over, inactive, and QEMU 7.2 then refuses internal
    snapshots on them.) A revert starts QEMU from the launch spec with ``-incoming defer`` and loads the
    image the same way.
    """

    name = "qemu"
    description = "QEMU migration stream to a file, live or paused"
    drivers = frozenset({"qmp"})

    def image_size(self, driver, domain):
        driver._check(domain)
        sizes = driver.qmp.execute("query-memory-size-summary")
        return sizes.get("base-memory", 0) + sizes.get("plugged-memory", 0)

    def settings(self, driver, domain):
        driver._check(domain)
        caps = driver.qmp.execute("query-migrate-capabilities")
        return {"max-bandwidth": driver.qmp.execute("query-migrate-parameters").get("max-bandwidth"),
                **{cap: any(c["capability"] == cap and c["state"] for c in caps)
                   for cap in (SWITCHOVER, MIGRATION_EVENTS)}}

    def save(self, driver, domain, path, kind, settings, deadline):
        driver._check(domain)
        q = driver.qmp
        if kind == MEMORY_PAUSED and q.execute("query-status").get("status") == "running":
            q.execute("stop")
        # to a file, the stream is bounded by the disk, not a network: no bandwidth cap (QEMU's default
        # is 128 MiB/s); complete and abort put the settings back
        q.execute("migrate-set-parameters", {"max-bandwidth": UNCAPPED})
        q.execute("migrate-set-capabilities", {"capabilities": [{"capability": cap, "state": True}
                                                                for cap in (SWITCHOVER, MIGRATION_EVENTS)]})
        q.pass_file(MEMORY_FD, path, os.O_WRONLY | os.O_TRUNC)
        try:
            q.execute("migrate", {"uri": f"fd:{MEMORY_FD}"})
        finally:
            with contextlib.suppress(QMPError):
                q.execute("closefd", {"fdname": MEMORY_FD})  # only there if migrate did not take it
        q.migration(deadline, until="pre-switchover")

    def complete(self, driver, domain, path, settings, resume, deadline):
        driver._check(domain)
        q = driver.qmp
        if q.execute("query-migrate").get("status") == "pre-switchover":
            q.execute("migrate-continue", {"state": "pre-switchover"})
        q.migration(deadline)
        self._put_back(q, settings)
        if resume:
            self._cont(q)

    def abort(self, driver, domain, settings, resume):
        if driver._qmp is None and not QMP.listening(driver.socket):
            return  # QEMU is gone: nothing writes the image, nothing is paused
        driver._check(domain)
        q = driver.qmp
        if q.execute("query-migrate").get("status") in ACTIVE_MIGRATION:
            q.execute("migrate_cancel")
            deadline = time.monotonic() + START_SECONDS
            while q.execute("query-migrate").get("status") in ACTIVE_MIGRATION + ("cancelling",):
                if time.monotonic() > deadline:
                    raise Inconsistent(f"the migration of the QEMU at {q.path} did not stop after migrate_cancel")
                q.wait_events(0.02)
        self._put_back(q, settings)
        if resume:
            self._cont(q)

    @staticmethod
    def _put_back(q: QMP, settings: dict):
        if settings.get("max-bandwidth") is not None:
            q.execute("migrate-set-parameters", {"max-bandwidth": settings["max-bandwidth"]})
        q.execute("migrate-set-capabilities", {"capabilities": [{"capability": cap, "state": bool(settings.get(cap))}
                                                                for cap in (SWITCHOVER, MIGRATION_EVENTS)]})

    @staticmethod
    def _cont(q: QMP):
        """Let the guest run unless it runs. QEMU says a migration is completed (or cancelled) a moment before
        it leaves finish-migrate, and refuses ``cont`` until then ("Migration is not finalized yet")."""
        deadline = time.monotonic() + START_SECONDS
        while (status := q.execute("query-status").get("status")) == "finish-migrate":
            if time.monotonic() > deadline:
                raise Inconsistent(f"the QEMU at {q.path} stayed in finish-migrate after its migration ended")
            q.wait_events(0.002)
        if status in ("paused", "postmigrate"):
            q.execute("cont")

    def restore(self, driver, domain, path, paused):
        if driver._qmp is not None or QMP.listening(driver.socket):
            driver._check(domain)
            if driver.qmp.execute("query-status").get("status") in ("inmigrate", "prelaunch"):
                driver.qmp.quit()  # a crash left it before or while loading the image: start over
                driver._qmp = None
        driver._launch(domain, ("-incoming", "defer"))
        q = driver.qmp
        if q.execute("query-status").get("status") == "inmigrate":
            q.pass_file(MEMORY_FD, path, os.O_RDONLY)
            q.execute("migrate-incoming", {"uri": f"fd:{MEMORY_FD}"})
            q.migration(time.monotonic() + SAVE_SECONDS)
        if not paused and q.execute("query-status").get("status") in ("paused", "prelaunch"):
            q.execute("cont")


@hookimpl
def snapfw_hypervisor_drivers():
    return [QMPDriver]


@hookimpl
def snapfw_memory_backends():
    return [QemuMemory]
