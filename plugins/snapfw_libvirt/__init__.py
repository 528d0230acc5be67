"""The ``libvirt`` driver: the domains of a local libvirt QEMU connection, ``qemu:///system`` (libvirt-python).

A domain's disks come from its domain XML: the live XML while it runs (with libvirt's ``<backingStore>``
chain, which inspection reads instead of having qemu-img open an image the guest holds; each file's
internal snapshots from its own snapshot table, an advisory read as rule 1 allows), the persistent XML
when shut off. ``define`` rewrites the persistent XML's disk sources. Live snapshots: external disks through one
``snapshotCreateXML`` (DISK_ONLY | ATOMIC | NO_METADATA | REUSE_EXT: the plan made the new overlays before
it, ``reuses_overlays``); internal ones through QEMU's own
``blockdev-snapshot-internal-sync``, for which libvirt has no API, sent through libvirt's monitor
passthrough (``virDomainQemuMonitorCommand``) in one ``transaction``; a domain with both kinds is paused
around the two calls so every disk is snapshotted at the same instant. Live merges (delete) are libvirt
block jobs, ``blockCommit`` and ``blockRebase``, named by their disk; block pull writes only a disk's
active file, so the Domain says it cannot stream below it (``stream_below_active``). Mirrored snapshots
(``create --mirror``) are redefined into libvirt's own records (REDEFINE), each marked as snapfw's in its
domain's ``<metadata>``; only marked records are ever changed or removed (METADATA_ONLY).

Only local connections: snapfw runs ``qemu-img`` on the image paths the XML names, which are the
hypervisor's files only on the hypervisor's own host.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import time
import xml.etree.ElementTree as ET

from snapfw.api import (
    EXTERNAL,
    FORMATS,
    INTERNAL,
    LIVE_CREATE,
    LIVE_DELETE,
    LIVE_REVERT,
    MEMORY_LIVE,
    MEMORY_PAUSED,
    MIRROR,
    Disk,
    Domain,
    HypervisorDriver,
    Inconsistent,
    MemoryBackend,
    NotSupported,
    QMPError,
    Refused,
    ToolError,
    UnknownDomain,
    check_name,
    hookimpl,
    qemuimg,
    remove_overlay,
)

# local transports only (see the module docstring); qemu:///session is the same scheme
SCHEMES = ("qemu", "qemu+unix")
# how long undoing an external snapshot may wait for its commit job (the data the guest wrote since)
UNDO_JOB_SECONDS = 600.0
# how long a live delete waits for one merge job; past it the job keeps running and `check --repair`
# re-attaches to it
MERGE_JOB_SECONDS = 3600.0
# libvirt's virDomainBlockJobType: a block pull (stream), a commit below the active file, an active commit
PULL_JOB, COMMIT_JOB, ACTIVE_COMMIT_JOB = 1, 3, 4
# the namespace of the mark snapfw puts into the <domain><metadata> of every libvirt snapshot record it
# mirrors: what proves a record is snapfw's, so that only those are ever redefined or removed
MIRROR_NS = "https://snapfw.org/xmlns/libvirt-mirror/1"
# how long the lifecycle event that ends a pause may take to arrive once libvirt's call returned
EVENT_SECONDS = 1.0
# the virtio-serial port name the QEMU guest agent listens on (libvirt's channel target name)
AGENT_PORT = "org.qemu.guest_agent.0"
# namespaces of the domain XML that keep their prefixes when snapfw writes the XML back
NAMESPACES = {"qemu": "http://libvirt.org/schemas/domain/qemu/1.0", "snapfw": MIRROR_NS}


def _libvirt():
    """libvirt-python, imported on first use: every snapfw command loads this plugin, few use libvirt."""
    try:
        import libvirt
    except ImportError:
        raise NotSupported("the libvirt driver needs libvirt-python: pip install 'snapfw[libvirt]' "
                           "(it builds against libvirt-dev and pkg-config)") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions anyway
    return libvirt


@contextlib.contextmanager
def _calls(what: str):
    """libvirt errors as snapfw's one-line ToolError naming the call."""
    libvirt = _libvirt()
    try:
        yield
    except libvirt.libvirtError as e:
        raise ToolError(f"libvirt {what} failed: {e.get_error_message()}", ["libvirt", what], e.get_error_code(),
                        e.get_error_message()) from None


def _source(disk: ET.Element) -> str:
    """A disk's source in words, for errors."""
    s = disk.find("source")
    if s is None:
        return "no source"
    name = s.get("file") or s.get("dev") or s.get("name") or s.get("volume") or "?"
    return f"{s.get('protocol')}:{name}" if s.get("protocol") else name


def _chain(disk: ET.Element, fmt: str, target: str) -> list[dict]:
    """The live XML's ``<source>`` + nested ``<backingStore>`` as a list, top first, in qemu-img info's form."""
    out, node = [], disk
    while True:
        entry = {"filename": node.find("source").get("file"), "format": fmt}
        below = node.find("backingStore")
        if below is None or below.find("source") is None:
            out.append(entry)
            return out
        if below.get("type", "file") != "file" or not below.find("source").get("file"):
            raise NotSupported(f"disk {target}'s backing chain reaches {below.get('type')} {_source(below)}, not "
                               "a file; snapfw cannot snapshot it")
        fmt = below.find("format").get("type") if below.find("format") is not None else None
        path = below.find("source").get("file")
        entry.update({"backing-filename": path, "full-backing-filename": path})
        if fmt:
            entry["backing-filename-format"] = fmt
        out.append(entry)
        node = below


class LibvirtDriver(HypervisorDriver):
    scheme = "qemu"
    capabilities = frozenset({LIVE_CREATE, LIVE_DELETE, LIVE_REVERT, MIRROR})
    # libvirt would make each new overlay itself (blockdev-create jobs, one after the other) inside the
    # snapshot, with a memory snapshot's guest paused: 25 ms of its pause for four disks here
    reuses_overlays = True
    description = "libvirt's QEMU/KVM domains on this host: qemu:///system (libvirt-python)"

    def __init__(self, uri: str):
        super().__init__(uri)
        self._conn = None
        self._domains = {}  # name -> virDomain: one lookup per domain in a command, not one per call

    @property
    def conn(self):
        if self._conn is None:
            _run_event_loop()
            with _calls(f"connect to {self.uri}"):
                self._conn = _libvirt().open(self.uri)
        return self._conn

    def _lookup(self, name: str):
        if name in self._domains:
            return self._domains[name]
        check_name("domain", name)
        libvirt = _libvirt()
        try:
            dom = self._domains[name] = self.conn.lookupByName(name)
            return dom
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise UnknownDomain(f"no domain {name!r} on {self.uri}") from None
            raise ToolError(f"libvirt lookup of {name} failed: {e.get_error_message()}", ["libvirt"]) from None

    def list_domains(self) -> list[str]:
        with _calls("listAllDomains"):
            found = {d.name(): d for d in self.conn.listAllDomains()}
        self._domains.update(found)
        return sorted(found)

    def domain_state(self, name: str) -> str:
        return _state(self._lookup(name))

    def _xml(self, dom, live: bool) -> ET.Element:
        libvirt = _libvirt()
        flags = 0 if live else libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        with _calls("XMLDesc"):
            return ET.fromstring(dom.XMLDesc(flags))

    def _monitor(self, dom, command: str, args: dict | None = None):
        """A QMP command through libvirt's monitor passthrough (what libvirt has no API for)."""
        import libvirt_qemu

        request = {"execute": command, **({"arguments": args} if args else {})}
        with _calls(f"qemuMonitorCommand {command}"):
            reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(request), 0))
        if "error" in reply:
            raise QMPError(command, reply["error"].get("class", ""), reply["error"].get("desc", ""))
        return reply["return"]

    def _blocks(self, dom) -> dict[str, dict]:
        """device alias (virtio-disk0) -> QEMU's query-block ``inserted``: node names and internal snapshots."""
        out = {}
        for b in self._monitor(dom, "query-block"):
            parts = (b.get("qdev") or "").split("/")
            if b.get("inserted") and len(parts) > 3 and parts[1:3] == ["machine", "peripheral"]:
                out[parts[3]] = b["inserted"]
        return out

    def domain(self, name: str) -> Domain:
        libvirt = _libvirt()
        dom = self._lookup(name)
        with _calls("domain state"):
            if not dom.isPersistent():
                raise NotSupported(f"domain {name} is transient (no persistent definition): snapfw keeps the "
                                   "domain's new chain in its definition; `virsh define` it first")
            foreign = [n for n, el in self._records(dom).items() if not _ours(el)] if dom.snapshotNum(0) else []
        state = _state(dom)
        running = state != "shut off"
        if foreign:  # libvirt's records would name files snapfw merges or removes
            raise NotSupported(f"domain {name} has {len(foreign)} libvirt snapshot(s) (virsh snapshot-list) that "
                               "snapfw did not make: snapfw does not take over libvirt's snapshot metadata; keep "
                               "using virsh for this domain, or drop that metadata first (virsh snapshot-delete "
                               "--metadata)")
        disks, chains, roots, notes = [], {}, [], []
        for el, target, path, fmt in _file_disks(self._xml(dom, live=running), notes):
            if running:
                chain = _chain(el, fmt, target)
                for i, entry in enumerate(chain):
                    # each file's snapshot table as QEMU wrote it (it writes it at once, and only for the
                    # snapshot commands snapfw sends under the domain's lock): libvirt's XML lists no tags,
                    # and its monitor passthrough costs more than the headers
                    if entry["format"] == "qcow2" and (tags := qemuimg.snapshots(entry["filename"], shared=True)):
                        entry["snapshots"] = tags
                    chains[entry["filename"]] = chain[i:]
                    roots.append(os.path.dirname(entry["filename"]))
            roots.append(os.path.dirname(path))
            for store in el.iter("backingStore"):  # a persistent XML may name a chain too
                if store.find("source") is not None and store.find("source").get("file"):
                    roots.append(os.path.dirname(store.find("source").get("file")))
            disks.append(Disk(target, path, fmt))
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        with _calls("XMLDesc"):
            definition = {"xml": dom.XMLDesc(flags)}  # kept with each snapshot, put back by a revert
        return Domain(name, disks, running=running, allowed_roots=tuple(dict.fromkeys(roots)),
                      state=state, live_chains=chains, pid=self._pid(name) if running else None,
                      notes=notes, stream_below_active=False, definition=definition)

    def disk_files(self, name: str) -> list[tuple[str, str]]:
        """From the domain XML alone (the live one while it runs): no snapshot records, no image headers.
        libvirt's XML without flags is that, and the persistent one of a domain that is shut off: no need
        to ask its state first (one call less for each domain of the connection, in every change)."""
        return [(target, path) for _el, target, path, _fmt in _file_disks(self._xml(self._lookup(name), live=True))]

    def _pid(self, name: str) -> int | None:
        """The QEMU process of running domain ``name``, from the pid file libvirt keeps in its run
        directory (libvirt has no API for it); None if snapfw cannot read it."""
        folder = ("/run/libvirt/qemu" if self.uri.partition("://")[2].startswith("/system") else
                  os.path.join(os.environ.get("XDG_RUNTIME_DIR", ""), "libvirt", "qemu", "run"))
        try:
            with open(os.path.join(folder, f"{name}.pid"), "rb") as f:  # bytes: no codec to load in a worker
                return int(f.read())
        except (OSError, ValueError):
            return None

    def define(self, domain: dict) -> None:
        """Point the persistent XML's disks at the new files; with ``definition``, in that XML (a snapshot's)."""
        dom = self._lookup(domain["name"])
        base = ET.fromstring(domain["definition"]["xml"]) if "definition" in domain else None
        self._set_sources(dom, {d["target"]: (d["path"], d["format"]) for d in domain["disks"]}, base)

    def _set_sources(self, dom, sources: dict[str, tuple[str, str]], base: ET.Element | None = None) -> None:
        """Point the persistent XML's disks (or those of XML ``base``, which then replaces it) at
        ``sources`` (target -> (file, format)), dropping the ``<backingStore>`` libvirt recorded for the old
        file (libvirt would use it instead of the image's own header); nothing is written when the XML
        already says so."""
        xml = self._xml(dom, live=False)
        changed = False
        if base is not None and ET.tostring(base) != ET.tostring(xml):
            xml, changed = base, True
        for el in xml.findall("devices/disk"):
            target = el.find("target").get("dev")
            if target not in sources:
                continue
            path, fmt = sources[target]
            source, driver = el.find("source"), el.find("driver")
            stale = el.find("backingStore")
            if source.get("file") == path and driver.get("type") == fmt and stale is None:
                continue
            source.set("file", path)
            driver.set("type", fmt)
            if stale is not None:
                el.remove(stale)
            changed = True
        if changed:
            self._define(xml)

    def _define(self, xml: ET.Element) -> None:
        for prefix, uri in NAMESPACES.items():
            ET.register_namespace(prefix, uri)
        with _calls("defineXML"):
            self.conn.defineXML(ET.tostring(xml, encoding="unicode"))

    # --- clones ----------------------------------------------------------------------------------------
    def define_clone(self, source: str, clone: dict) -> None:
        """``source``'s persistent XML under the clone's name, without what makes it that domain: no
        ``<uuid>``, no interface ``<mac>`` (libvirt draws new ones, as for any XML without them), no
        ``<nvram>`` file (libvirt makes the clone its own from the firmware's template on first start);
        each disk of ``clone["disks"]`` on its new file, the source's other writable disks left out,
        read-only ones (CD-ROMs) kept. ``defineXML`` refuses a name that exists (its UUID differs)."""
        xml = self._xml(self._lookup(source), live=False)
        xml.find("name").text = check_name("domain", clone["name"])
        for el in xml.findall("uuid"):
            xml.remove(el)
        for iface in xml.findall("devices/interface"):
            for el in iface.findall("mac"):
                iface.remove(el)
        for nvram in xml.findall("os/nvram"):
            nvram.text = None
            if not nvram.attrib:
                xml.find("os").remove(nvram)
        wanted = {d["target"]: d for d in clone["disks"]}
        devices = xml.find("devices")
        for el in devices.findall("disk"):
            d = wanted.get(el.find("target").get("dev"))
            if d is None:
                if not _read_only(el):
                    devices.remove(el)
                continue
            el.find("source").set("file", d["path"])
            el.find("driver").set("type", d["format"])
            for stale in el.findall("backingStore"):
                el.remove(stale)
        self._define(xml)

    def undefine_clone(self, clone: dict) -> None:
        """Undefine ``clone["name"]`` while its writable disks are exactly ``clone["disks"]``'s files (with
        the NVRAM file and managed-save image libvirt made for it); a domain that runs is refused."""
        libvirt = _libvirt()
        try:
            dom = self._lookup(clone["name"])
        except UnknownDomain:
            return
        disks = {el.find("target").get("dev"): el.find("source").get("file")
                 for el in self._xml(dom, live=False).findall("devices/disk")
                 if not _read_only(el) and el.find("source") is not None}
        if disks != {d["target"]: d["path"] for d in clone["disks"]}:
            return
        with _calls("undefine"):
            if dom.isActive():
                raise Refused(f"domain {clone['name']} is running; shut it down before it is undefined")
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
        del self._domains[clone["name"]]

    # --- mirroring snapfw's snapshots into libvirt's own records ------------------------------------------
    def _records(self, dom) -> dict[str, ET.Element]:
        """libvirt's snapshot records of ``dom``: name -> its XML."""
        with _calls("listAllSnapshots"):
            return {s.getName(): ET.fromstring(s.getXMLDesc(0)) for s in dom.listAllSnapshots(0)}

    def _redefine(self, dom, xml: str, current: bool = False):
        libvirt = _libvirt()
        flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
        name = ET.fromstring(xml).findtext("name")
        with _calls(f"snapshotCreateXML of {name} (redefine)"):
            dom.snapshotCreateXML(xml, flags | (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT if current else 0))

    def _forget(self, dom, name: str):
        libvirt = _libvirt()
        with _calls(f"snapshotDelete of {name} (metadata only)"):
            dom.snapshotLookupByName(name, 0).delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)

    def _recreate(self, dom, name: str, xml: str):
        self._forget(dom, name)
        self._redefine(dom, xml)

    def mirror(self, domain: str, snapshots: list[dict], current: str | None, repair: bool) -> list[str]:
        """Records are redefined (REDEFINE) from the catalog and removed with METADATA_ONLY, which never
        touches a disk; a record without snapfw's mark is only ever reported. A record libvirt refuses
        does not stop the others; the refusals are raised together at the end."""
        dom = self._lookup(domain)
        records = self._records(dom)
        wanted = {e["name"]: e for e in snapshots}
        now = self._xml(dom, live=False)
        out, failed = [], []

        def fix(line: str, done: str, change):
            if repair:
                try:
                    change()
                except ToolError as e:
                    failed.append(str(e))
                    return
                line += f": {done}"
            out.append(line)

        for name, el in sorted(records.items()):
            if name in wanted and not _ours(el):
                out.append(f"libvirt's snapshot {name} has the name of a mirrored snapshot, but snapfw did not make "
                           "it: left as it is, and snapfw's is not mirrored")
            elif name not in wanted and not _ours(el):
                out.append(f"libvirt has snapshot {name}, which snapfw did not make (left as it is)")
            elif name not in wanted:
                fix(f"libvirt still has snapshot {name}, which snapfw mirrored, but the catalog has no such snapshot",
                    "removed from libvirt's records", functools.partial(self._forget, dom, name))
        for e in snapshots:
            el = records.get(e["name"])
            if el is not None and not _ours(el):
                continue
            xml = _mirror_record_xml(e, now)
            has, wants = (None, None) if el is None else (_summary(el), _summary(ET.fromstring(xml)))
            change, anew = functools.partial(self._redefine, dom, xml), False
            if el is None:
                line = f"snapshot {e['name']} is mirrored in the catalog but missing from libvirt's records"
            elif has == wants:
                continue
            elif has[0] != e["parent"]:
                line = (f"libvirt has {has[0] or 'no snapshot'} as snapshot {e['name']}'s parent, the catalog "
                        f"{e['parent'] or 'none'}")
            elif has[3] != wants[3]:  # libvirt redefines no record from disk-only to checkpoint: made anew
                line = f"libvirt has snapshot {e['name']} in state {has[3]}, the catalog {wants[3]} (memory or not)"
                change, anew = functools.partial(self._recreate, dom, e["name"], xml), True
            else:
                line = (f"libvirt's record of snapshot {e['name']} differs from the catalog's (description, time, "
                        "disks or memory)")
            fix(line, "mirrored again", change)
            if repair and anew:  # removing it moved its children in libvirt's records
                records = self._records(dom)
        with _calls("snapshotCurrent"):
            has = dom.snapshotCurrent(0).getName() if dom.hasCurrentSnapshot(0) else None
        if current is not None and has != current and not (current in records and not _ours(records[current])):
            fix(f"libvirt's current snapshot is {has or 'none'}, the catalog's {current}", "set again",
                functools.partial(self._redefine, dom, _mirror_record_xml(wanted[current], now), current=True))
        if failed:
            raise ToolError("; ".join(failed), ["libvirt", "snapshotCreateXML"])
        return out

    # --- stop and start (revert) -----------------------------------------------------------------------
    def restart_problem(self, domain: Domain) -> str | None:
        return None  # domain() refuses transient domains: a persistent definition to start from is there

    def stop(self, domain: str) -> None:
        """``destroy``: the guest's state since the current snapshot is discarded anyway (as ``virsh
        snapshot-revert`` does); libvirt returns once QEMU is gone."""
        dom = self._lookup(domain)
        with _calls("destroy"):
            if dom.isActive():
                dom.destroy()

    def start(self, domain: str, paused: bool) -> None:
        libvirt = _libvirt()
        dom = self._lookup(domain)
        with _calls("create"):
            if not dom.isActive():
                dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)

    # --- the plan window ---------------------------------------------------------------------------------
    def pause(self, domain: str) -> None:
        with _calls("suspend"):
            self._lookup(domain).suspend()

    def resume(self, domain: str) -> None:
        dom = self._lookup(domain)
        with _calls("resume"):
            if dom.state()[0] == _libvirt().VIR_DOMAIN_PAUSED:
                dom.resume()

    # --- the guest agent (create --quiesce) --------------------------------------------------------------
    # libvirt holds the agent's channel (the virtio port org.qemu.guest_agent.0) itself: snapfw reaches
    # the agent only through libvirt. The probe is a raw agent command with snapfw's own deadline
    # (libvirt has no API that says whether the guest is frozen); freeze and thaw are libvirt's fsFreeze
    # and fsThaw, bounded by libvirt's agent timeout for the domain (5 s unless `virsh guest-agent-timeout`
    # changed it): libvirt's API takes no per-call deadline.
    def _agent(self, dom, command: str, seconds: float):
        """Agent command ``command`` through libvirt (``virDomainQemuAgentCommand``) within ``seconds``."""
        import libvirt_qemu

        libvirt = _libvirt()
        request = json.dumps({"execute": command})
        try:
            reply = json.loads(libvirt_qemu.qemuAgentCommand(dom, request, max(1, math.ceil(seconds)), 0))
        except libvirt.libvirtError as e:
            raise _agent_error(e, command, seconds) from None
        return reply["return"]

    def agent_problem(self, domain: str, seconds: float) -> str | None:
        try:
            if self._agent(self._lookup(domain), "guest-fsfreeze-status", seconds) != "thawed":
                return "its filesystems are frozen already (by someone else: snapfw would thaw them)"
        except (NotSupported, ToolError) as e:
            return str(e)
        return None

    def freeze(self, domain: str, seconds: float) -> int:
        libvirt, dom = _libvirt(), self._lookup(domain)
        try:
            return dom.fsFreeze()
        except libvirt.libvirtError as e:
            raise _agent_error(e, "fsFreeze", seconds) from None

    def thaw(self, domain: str, seconds: float) -> None:
        """``fsThaw``: the agent thaws nothing on a guest that is not frozen, so no status call first."""
        libvirt, dom = _libvirt(), self._lookup(domain)
        try:
            dom.fsThaw()
        except libvirt.libvirtError as e:
            raise _agent_error(e, "fsThaw", seconds) from None

    # --- live snapshots --------------------------------------------------------------------------------
    def _live_sources(self, dom) -> dict[str, str]:
        """target -> the file the running domain writes to, from libvirt's live XML."""
        return {el.find("target").get("dev"): el.find("source").get("file")
                for el in self._xml(dom, live=True).findall("devices/disk")
                if el.find("source") is not None and el.find("source").get("file")}

    def _inserted(self, dom) -> dict[str, dict]:
        """target -> QEMU's query-block ``inserted`` of each disk of running ``dom``, by its libvirt alias."""
        nodes = self._blocks(dom)
        aliases = {el.find("target").get("dev"): el.find("alias").get("name")
                   for el in self._xml(dom, live=True).findall("devices/disk")}
        return {t: nodes[alias] for t, alias in aliases.items() if alias in nodes}

    def _node(self, dom, target: str) -> dict:
        inserted = self._inserted(dom).get(target)
        if inserted is None:
            raise Inconsistent(f"disk {target} is gone from the running domain")
        return inserted

    def _node_names(self, dom) -> dict[str, str]:
        """target -> QEMU's node name of each disk of running ``dom`` (what its internal snapshots name)."""
        return {t: inserted["node-name"] for t, inserted in self._inserted(dom).items()}

    def live_snapshot(self, domain: str, actions: list[dict], memory: str | None = None) -> None:
        """With ``memory`` (LibvirtMemory's live kind, external actions only): libvirt's live external
        snapshot, which copies the memory into that file while the guest runs, pauses it for the last pass
        and the disks, and resumes it."""
        libvirt = _libvirt()
        dom = self._lookup(domain)
        active = self._live_sources(dom)
        for a in actions:
            if active.get(a["target"]) != a["file"]:  # the plan was made under the lock: changed behind it
                raise Inconsistent(f"disk {a['target']} now runs on {active.get(a['target'])}, not {a['file']} "
                                   "as planned")
        internal = [a for a in actions if a["kind"] == INTERNAL]
        external = [a for a in actions if a["kind"] == EXTERNAL]
        with _calls("domain state"):
            pause = bool(internal and external) and dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED
        if pause:  # two calls: the guest must not write between them, or the disks disagree in time
            with _calls("suspend"):
                dom.suspend()
        try:
            if internal:  # first: undoing a tag is cheap, undoing an overlay is a commit
                self._monitor(dom, "transaction", _internal_transaction(internal, self._node_names(dom)))
            if external or memory:
                flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                         | (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT if external else 0)  # made by the plan
                         | (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_LIVE if memory
                            else libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY))
                with _calls("snapshotCreateXML" + (" (memory and disks, live)" if memory else "")):
                    dom.snapshotCreateXML(_snapshot_xml(external, active, memory), flags)
        finally:
            if pause:
                with _calls("resume"):
                    dom.resume()
        # libvirt writes the new overlays into the persistent XML of a persistent domain, with a
        # <backingStore> that a later merge would leave stale: written again at once, without it
        self._set_sources(dom, {a["target"]: (a["overlay"], "qcow2") for a in external})

    # --- what the live steps will call (--dry-run) ------------------------------------------------------
    def explain(self, method: str, *args):
        return getattr(self, f"_explain_{method}")(*args)

    def _explain_live_snapshot(self, domain, actions):
        internal = [a for a in actions if a["kind"] == INTERNAL]
        external = [a for a in actions if a["kind"] == EXTERNAL]
        calls = []
        if internal:
            commands = _internal_transaction(internal, self._node_names(self._lookup(domain)))
            calls.append(f"qemuMonitorCommand {json.dumps({'execute': 'transaction', 'arguments': commands})}")
        if external:
            active = self._live_sources(self._lookup(domain))
            calls.append(f"snapshotCreateXML {_snapshot_xml(external, active)} "
                         "flags=DISK_ONLY|ATOMIC|NO_METADATA|REUSE_EXT (the overlays the plan made before)")
            calls.append("defineXML, only if the persistent XML does not name the new overlays alone")
        if internal and external:
            return (["suspend", *calls[:2], "resume (in finally: also when a call fails)", *calls[2:]],
                    "paused from suspend to resume: as long as the two calls take (milliseconds here); "
                    "resumed in finally, also when one fails")
        return calls, ("none beyond QEMU's own: the vCPUs run on while QEMU drains the disks' in-flight I/O "
                       "for the one transaction (milliseconds)")

    def _explain_block_commit(self, domain, target, top, base, job):
        active = self._live_sources(self._lookup(domain)).get(target) == top
        calls = [f"blockCommit(disk={target}, base={base}, top={top}, bandwidth=0, flags={'ACTIVE' if active else 0})",
                 f"blockJobInfo(disk={target}) (every 0.02 s, at most {MERGE_JOB_SECONDS:g} s)"]
        if active:
            calls += [f"blockJobAbort(disk={target}, flags=PIVOT) (once caught up: the disk pivots to {base})",
                      f"defineXML, only if the persistent XML does not name {base}"]
        calls += ["XMLDesc (the live chain without the top file)",
                  f"qemuMonitorCommand query-named-block-nodes (no node still open on {top})"]
        pivot = "; the pivot drains the disk's I/O for an instant (QEMU's own)" if active else ""
        return calls, f"none: the guest runs on while the block job copies{pivot}"

    def _explain_block_stream(self, domain, target, path, old_backing, new_backing, job):
        return ([f"blockRebase(disk={target}, base={new_backing}, bandwidth=0, flags=0)",
                 f"blockJobInfo(disk={target}) (every 0.02 s, at most {MERGE_JOB_SECONDS:g} s)",
                 f"XMLDesc (the live chain without {old_backing})",
                 f"qemuMonitorCommand query-named-block-nodes (no node still open on {old_backing})"],
                "none: the guest runs on while the block job copies")

    def _explain_stop(self, domain):
        return ["destroy"], None

    def _explain_start(self, domain, paused):
        return [f"createWithFlags({'START_PAUSED' if paused else 0})"], None

    def undo_live_snapshot(self, domain: str, actions: list[dict], progress=None) -> None:
        """Also after a memory image was written behind the snapshot (snapfw died while libvirt wrote it,
        see LibvirtMemory): QEMU is then ``postmigrate``, its images inactive, and no block job runs on
        them; the guest runs while they are undone (``cont`` makes them active) and is paused again."""
        dom = self._lookup(domain)
        inactive = dom.isActive() and self._monitor(dom, "query-status")["status"] == "postmigrate"
        if inactive:
            self.resume(domain)
        for a in reversed(actions):
            if a["kind"] == INTERNAL:
                self._undo_internal(dom, a)
            else:
                self._undo_external(dom, a, progress)
        self._set_sources(dom, {a["target"]: (a["file"], a["format"]) for a in actions if a["kind"] == EXTERNAL})
        if inactive:
            self.pause(domain)

    def _undo_internal(self, dom, a: dict):
        inserted = self._node(dom, a["target"])
        if inserted["image"]["filename"] != a["file"]:
            raise Inconsistent(f"disk {a['target']} runs on {inserted['image']['filename']}, not {a['file']} "
                               f"that holds internal snapshot {a['tag']!r}")
        if a["tag"] in {s["name"] for s in inserted["image"].get("snapshots", [])}:
            self._monitor(dom, "blockdev-snapshot-delete-internal-sync",
                          {"device": inserted["node-name"], "name": a["tag"]})

    def delete_tag(self, domain, target, path, tag):
        """QEMU's ``blockdev-snapshot-delete-internal-sync`` through the monitor passthrough, as for create."""
        self._undo_internal(self._lookup(domain), {"target": target, "file": path, "tag": tag})

    def _undo_external(self, dom, a: dict, progress):
        """Commit the overlay (with what the guest wrote since) back into the frozen file, pivot, verify in
        the live XML, then remove the overlay. Each part checks first whether it is already done."""
        libvirt = _libvirt()
        target = a["target"]
        deadline = time.monotonic() + UNDO_JOB_SECONDS
        with _calls("blockJobInfo"):
            job = dom.blockJobInfo(target, 0)
        if job and job.get("type") != ACTIVE_COMMIT_JOB:
            raise Inconsistent(f"disk {target} has another block job running (type {job.get('type')}); "
                               f"not undoing its snapshot onto {a['overlay']}")
        if not job and self._live_sources(dom).get(target) == a["overlay"]:
            with _calls("blockCommit"):
                dom.blockCommit(target, a["file"], a["overlay"], 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
            job = True
        if job:  # ours, or a previous run's that died while it ran: wait for it and pivot
            self._wait_job(dom, target, deadline, progress, pivot=True)
        active = self._live_sources(dom).get(target)
        if active != a["file"]:
            raise Inconsistent(f"disk {target} runs on {active}, expected {a['file']} after undoing its snapshot")
        if any(s.get("file") == a["overlay"] for s in self._xml(dom, live=True).iter("source")):
            raise Inconsistent(f"{a['overlay']} is still in disk {target}'s live chain after the pivot; not removed")
        remove_overlay(a["overlay"], a["file"])

    def _wait_job(self, dom, target: str, deadline: float, progress, pivot: bool):
        """Wait until the block job on ``target`` has ended (``pivot``: an active commit, pivoted to its
        base once it has caught up). The caller checks the chain it left: libvirt forgets a job that
        failed as it forgets one that succeeded."""
        libvirt = _libvirt()
        while True:
            with _calls("blockJobInfo"):
                job = dom.blockJobInfo(target, 0)
            if not job:
                return
            if progress is not None and job["end"]:
                progress(100.0 * job["cur"] / job["end"])
            if pivot and job["end"] and job["cur"] == job["end"]:
                try:
                    dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
                    return
                except libvirt.libvirtError as e:  # caught up but not yet READY: try again
                    if e.get_error_code() != libvirt.VIR_ERR_BLOCK_COPY_ACTIVE:
                        raise ToolError(f"libvirt pivot of disk {target} failed: {e.get_error_message()}",
                                        ["libvirt"]) from None
            if time.monotonic() > deadline:
                raise ToolError(f"the block job on disk {target} did not finish by its deadline", ["libvirt"])
            time.sleep(0.02)

    # --- live merges (delete) --------------------------------------------------------------------------
    # libvirt names a block job by its disk (one at a time per disk), not by an id: the job id the
    # LiveCommit/LiveStream steps journal is not used; a job of the step's kind on the step's disk, found
    # by ``blockJobInfo``, is the step's own (snapfw holds the domain's lock while it plans and runs).
    def _live_chain(self, dom, target: str) -> list[dict]:
        """Disk ``target``'s chain, active first, as libvirt's live XML has it (``_chain``'s form)."""
        for el in self._xml(dom, live=True).findall("devices/disk"):
            if el.find("target").get("dev") == target and el.find("source") is not None:
                return _chain(el, el.find("driver").get("type"), target)
        raise Inconsistent(f"disk {target} is gone from the running domain")

    def _merge(self, dom, target: str, kinds: tuple[int, ...], gone: str, done, start, progress) -> dict:
        """The block job on disk ``target``: re-attach to it if libvirt still has one of ``kinds``, else
        start it with ``start(files)`` unless ``done(files)`` already holds (``files``: the chain's, active
        first); wait for it (pivoting an active commit), check ``done`` against the live XML and that QEMU
        no longer holds ``gone``. Returns the disk's active file as the live XML has it."""
        deadline = time.monotonic() + MERGE_JOB_SECONDS
        with _calls("blockJobInfo"):
            job = dom.blockJobInfo(target, 0)
        if job and job["type"] not in kinds:
            raise Inconsistent(f"disk {target} has another kind of block job running (libvirt type {job['type']}); "
                               f"not merging {gone} now")
        if not job:
            chain = [e["filename"] for e in self._live_chain(dom, target)]
            if not done(chain):
                if gone not in chain:
                    raise Inconsistent(f"disk {target} runs on {' <- '.join(chain)}, which no longer holds {gone}; "
                                       "the planned merge cannot run")
                start(chain)
                with _calls("blockJobInfo"):
                    job = dom.blockJobInfo(target, 0)
        if job:
            self._wait_job(dom, target, deadline, progress, pivot=job["type"] == ACTIVE_COMMIT_JOB)
        live = self._live_chain(dom, target)
        chain = [e["filename"] for e in live]
        if not done(chain):
            raise Inconsistent(f"after its block job, disk {target} runs on {' <- '.join(chain)}, not the planned "
                               f"chain without {gone} (the job failed or was cancelled: libvirtd's log says why)")
        held = [n["node-name"] for n in self._monitor(dom, "query-named-block-nodes", {"flat": True})
                if n.get("file") == gone]
        if held:
            raise Inconsistent(f"{gone} is still open in QEMU (node {held[0]}) after its merge; not removed")
        return live[0]

    def block_commit(self, domain, target, top, base, job, progress=None):
        libvirt = _libvirt()
        dom = self._lookup(domain)

        def start(chain):
            flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE if chain[0] == top else 0
            with _calls("blockCommit"):
                dom.blockCommit(target, base, top, 0, flags)

        active = self._merge(dom, target, (COMMIT_JOB, ACTIVE_COMMIT_JOB), top,
                             lambda chain: top not in chain and base in chain, start, progress)
        if active["filename"] == base:  # an active commit pivoted: the next start must use base too
            self._set_sources(dom, {target: (base, active["format"])})

    def block_stream(self, domain, target, path, old_backing, new_backing, job, progress=None):
        dom = self._lookup(domain)

        def done(chain):
            below = chain[chain.index(path) + 1:] if path in chain else None
            return old_backing not in chain and below is not None and (below[:1] or [None])[0] == new_backing

        def start(chain):
            if chain[0] != path:  # planned only into active files (stream_below_active)
                raise NotSupported(f"libvirt streams only into disk {target}'s active file {chain[0]}, not {path}")
            with _calls("blockRebase"):
                dom.blockRebase(target, new_backing, 0, 0)

        self._merge(dom, target, (PULL_JOB,), old_backing, done, start, progress)


class LibvirtMemory(MemoryBackend):
    """Memory state of a libvirt domain: libvirt's external memory snapshot, memory only
    (``snapshotCreateXML`` with ``<memory snapshot='external' file=...>``, every disk ``snapshot='no'``,
    NO_METADATA), which writes libvirt's save image (its header with the domain XML, then QEMU's
    migration stream) into the file snapfw made; a revert loads it with ``restoreFlags(file, xml)``, the
    XML being the persistent one the revert defined (the snapshot's, on the reverted disks).

    libvirt cannot pass snapfw's own file descriptor to QEMU's ``migrate`` (the qemu backend's way), and
    its managed save and ``saveFlags`` stop the domain, while the disks' live snapshot needs QEMU running.
    Paused: ``save`` pauses the guest, the disks' snapshot runs, and ``complete`` writes the image
    while the guest is still paused (the same instant), then resumes it. The image comes after the disks
    because once QEMU's migration has completed its images are inactive: a failed disk snapshot could not
    be undone (``block-commit``: "Block node is read-only") before the guest runs again.

    Live: libvirt's LIVE memory snapshot resumes the guest itself once the memory is written, so it must
    take the disks too (``with_disks``): one ``snapshotCreateXML`` with the memory image and an external
    diskspec per disk (LIVE | ATOMIC | NO_METADATA | REUSE_EXT), as ``virsh snapshot-create-as --live
    --memspec``, which lets libvirt make the overlays inside the pause.
    libvirt does not mix internal disk snapshots with a memory image, so every disk must be external."""

    name = "libvirt"
    description = ("libvirt external memory snapshot (a save image): paused, or live with the disks in the same "
                   "call; restored with restoreFlags")
    drivers = frozenset(SCHEMES)
    kinds = frozenset({MEMORY_PAUSED, MEMORY_LIVE})
    with_disks = frozenset({MEMORY_LIVE})

    def image_size(self, driver, domain):
        with _calls("info"):
            return driver._lookup(domain).info()[1] * 1024  # the guest's maximum memory, KiB (not a balloon's)

    def save(self, driver, domain, path, kind, settings, deadline):
        """Only the pause: the image is written by :meth:`complete`, after the disks' snapshot."""
        if _state(driver._lookup(domain)) != "paused":
            driver.pause(domain)

    def disks_problem(self, kind, actions):
        internal = [a["target"] for a in actions if a["kind"] == INTERNAL]
        if internal:
            return (f"libvirt's live memory snapshot takes the disks in the same call, and only as external "
                    f"overlays; disk {internal[0]} would get an internal snapshot (use --disk "
                    f"{internal[0]}=external, or --memory paused)")
        return None

    def save_with_disks(self, driver, domain, path, kind, settings, actions, deadline):
        """libvirt's call runs until the image is written and takes no deadline (``deadline`` is not
        kept); a crash leaves the job running in libvirtd, which :meth:`abort` ends. The pause is timed by
        the domain's lifecycle events (suspended, then resumed), as libvirtd relays QEMU's STOP and RESUME."""
        with _lifecycle_events(driver.conn, driver._lookup(domain)) as events:
            driver.live_snapshot(domain, actions, memory=path)
        return _paused_seconds(events)

    def complete(self, driver, domain, path, settings, resume, deadline):
        """The memory-only snapshot of the still paused guest, then resume; nothing but the resume if
        the image is written already (the live kind wrote it with the disks). libvirt's call runs until the
        image is written and takes no deadline (``deadline`` is not kept): once it returned, the image
        is whole, and failing then would only leave a rollback on inactive images."""
        libvirt, dom = _libvirt(), driver._lookup(domain)
        if not os.path.getsize(path):
            active = {el.find("target").get("dev"): "" for el in driver._xml(dom, live=True).findall("devices/disk")}
            with _calls("snapshotCreateXML (memory only)"):
                dom.snapshotCreateXML(_snapshot_xml([], active, path),
                                      libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
        if resume:
            driver.resume(domain)

    def abort(self, driver, domain, settings, resume):
        """Abort libvirt's memory job if it still runs (a crash left it), then resume. abortJob comes
        first: asking libvirt whether a job runs (jobInfo) waits until its snapshot job has ended."""
        libvirt, dom = _libvirt(), driver._lookup(domain)
        with _calls("abortJob"):
            if not dom.isActive():
                return
            try:
                dom.abortJob()
            except libvirt.libvirtError as e:  # no job, or past the part that can be aborted: it ends soon
                if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                    raise
            deadline = time.monotonic() + UNDO_JOB_SECONDS
            while dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                if time.monotonic() > deadline:
                    raise Inconsistent(f"libvirt's job on {domain} did not end after abortJob")
                time.sleep(0.02)
        if resume:
            driver.resume(domain)

    def restore(self, driver, domain, path, paused):
        """``restoreFlags`` with the persistent XML; once the domain runs (a restore a crash interrupted
        finished in libvirtd), only ``resume`` is left."""
        libvirt, dom = _libvirt(), driver._lookup(domain)
        with _calls("restoreFlags"):
            if not dom.isActive():
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
                driver.conn.restoreFlags(path, xml, libvirt.VIR_DOMAIN_SAVE_PAUSED if paused
                                         else libvirt.VIR_DOMAIN_SAVE_RUNNING)
        if not paused:
            driver.resume(domain)


_event_loop = None  # the thread that runs libvirt's default event loop, once started


def _run_event_loop() -> None:
    """Register libvirt's default event loop and run it in a thread, once per process, before the first
    connection opens: libvirt delivers events (they time a memory snapshot's pause) only to connections
    opened after it was registered, and the running loop also answers libvirtd's keepalive."""
    global _event_loop
    if _event_loop is not None:
        return
    import threading

    libvirt = _libvirt()
    libvirt.virEventRegisterDefaultImpl()

    def loop():
        while True:
            libvirt.virEventRunDefaultImpl()

    _event_loop = threading.Thread(target=loop, name="libvirt events", daemon=True)
    _event_loop.start()


@contextlib.contextmanager
def _lifecycle_events(conn, dom):
    """The lifecycle events of domain ``dom`` while the block runs, as [(event, monotonic time received)],
    on the driver's connection ``conn``."""
    libvirt = _libvirt()
    events = []
    with _calls("domainEventRegisterAny"):
        callback = conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                               lambda c, d, event, detail, o: events.append((event, time.monotonic())),
                                               None)
    try:
        yield events
        deadline = time.monotonic() + EVENT_SECONDS  # the last event may still be on its way
        while any(e == libvirt.VIR_DOMAIN_EVENT_SUSPENDED for e, _ in events) and _paused_seconds(events) is None \
                and time.monotonic() < deadline:
            time.sleep(0.002)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.domainEventDeregisterAny(callback)


def _paused_seconds(events: list) -> float | None:
    """From the first suspended event to the resumed event after it, or None."""
    libvirt = _libvirt()
    paused = next((t for e, t in events if e == libvirt.VIR_DOMAIN_EVENT_SUSPENDED), None)
    resumed = next((t for e, t in events if e == libvirt.VIR_DOMAIN_EVENT_RESUMED and paused is not None
                    and t >= paused), None)
    return None if resumed is None else resumed - paused


def _ours(record: ET.Element) -> bool:
    """Whether libvirt snapshot record ``record`` carries snapfw's mark (snapfw mirrored it)."""
    return record.find(f"domain/metadata/{{{MIRROR_NS}}}snapshot") is not None


def _mirror_record_xml(entry: dict, now: ET.Element) -> str:
    """The libvirt snapshot record of mirrored snapshot ``entry`` (see HypervisorDriver.mirror), as libvirt
    itself would have written it: a disk-only snapshot (or, with a memory image, an external checkpoint in
    the state the domain was in), external disks naming the overlay that began there, the domain's
    definition at that instant (``now``'s, the persistent one, if the snapshot kept none)
    with snapfw's mark in its metadata."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = entry["name"]
    if entry["description"]:
        ET.SubElement(root, "description").text = entry["description"]
    memory = entry.get("memory")
    ET.SubElement(root, "state").text = ("shutoff" if entry["state"] == "shut off" else entry["state"] if memory
                                         else "disk-snapshot")
    ET.SubElement(root, "creationTime").text = str(int(entry["created"]))
    if entry["parent"]:
        ET.SubElement(ET.SubElement(root, "parent"), "name").text = entry["parent"]
    if memory:
        ET.SubElement(root, "memory", snapshot="external", file=memory)
    else:
        ET.SubElement(root, "memory", snapshot="no")
    disks = ET.SubElement(root, "disks")
    domain = ET.fromstring(entry["definition"]["xml"]) if entry["definition"].get("xml") else copy.deepcopy(now)
    recorded = {d["target"]: d for d in entry["disks"]}
    for el in domain.findall("devices/disk"):
        d = recorded.get(el.find("target").get("dev"))
        if d is None:
            ET.SubElement(disks, "disk", name=el.find("target").get("dev"), snapshot="no")
        elif "tag" in d:
            ET.SubElement(disks, "disk", name=d["target"], snapshot="internal")
        else:
            spec = ET.SubElement(disks, "disk", name=d["target"], snapshot="external", type="file")
            ET.SubElement(spec, "driver", type="qcow2")
            ET.SubElement(spec, "source", file=d["active"] or d["file"])
    metadata = domain.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(domain, "metadata")
    if metadata.find(f"{{{MIRROR_NS}}}snapshot") is None:
        ET.SubElement(metadata, f"{{{MIRROR_NS}}}snapshot")
    root.append(domain)
    for prefix, uri in NAMESPACES.items():
        ET.register_namespace(prefix, uri)
    return ET.tostring(root, encoding="unicode")


def _summary(record: ET.Element) -> tuple:
    """What a mirror check compares of a libvirt snapshot record: parent, description, time, state and
    the disks it snapshots (libvirt adds defaults to the rest)."""
    parent = record.find("parent/name")
    disks = sorted((d.get("name"), d.get("snapshot"), d.find("source").get("file") if d.find("source") is not None
                    else None) for d in record.findall("disks/disk") if d.get("snapshot") != "no")
    memory = record.find("memory")
    return (parent.text if parent is not None else None, record.findtext("description") or "",
            record.findtext("creationTime"), record.findtext("state"), disks,
            None if memory is None else (memory.get("snapshot"), memory.get("file")))


def _agent_error(e, call: str, seconds: float) -> Exception:
    """libvirt's error from guest agent call ``call`` as snapfw's: no agent channel in the domain
    (NotSupported), an agent that did not answer in time or is not connected, or another failure."""
    libvirt = _libvirt()
    code, message = e.get_error_code(), e.get_error_message()
    if code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED:
        return NotSupported(f"the domain has no guest agent channel (a <channel> with target name "
                            f"{AGENT_PORT}): {message}")
    if code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE:
        return ToolError(f"the guest agent did not answer within {seconds:g} s ({call}: {message})",
                         ["libvirt", call], code, message)
    return ToolError(f"libvirt {call} failed: {message}", ["libvirt", call], code, message)


def _state(dom) -> str:
    """libvirt's state of ``dom`` as snapfw's: paused; running for any other state while QEMU runs (blocked,
    being shut down, suspended by the guest: QEMU holds the images); else shut off (also crashed)."""
    libvirt = _libvirt()
    with _calls("domain state"):
        state, active = dom.state()[0], dom.isActive()
    if active:
        return "paused" if state == libvirt.VIR_DOMAIN_PAUSED else "running"
    return "shut off"


def _internal_transaction(actions: list[dict], nodes: dict[str, str]) -> dict:
    """The QMP ``transaction`` arguments for internal live actions; ``nodes``: target -> QEMU node name."""
    return {"actions": [{"type": "blockdev-snapshot-internal-sync",
                         "data": {"device": nodes[a["target"]], "name": a["tag"]}} for a in actions]}


def _snapshot_xml(external: list[dict], active: dict[str, str], memory: str | None = None) -> str:
    """snapshotCreateXML's document: an external diskspec per action, ``snapshot='no'`` for every other
    disk of ``active`` (target -> file), and an external memory image ``memory`` if given."""
    specs = "".join(f"<disk name='{a['target']}' snapshot='external'><driver type='qcow2'/>"
                    f"<source file={_attr(a['overlay'])}/></disk>" for a in external)
    others = "".join(f"<disk name='{t}' snapshot='no'/>" for t in active if t not in {a["target"] for a in external})
    state = f"<memory snapshot='external' file={_attr(memory)}/>" if memory else ""
    return f"<domainsnapshot>{state}<disks>{specs}{others}</disks></domainsnapshot>"


def _file_disks(xml: ET.Element, notes: list[str] | None = None):
    """(element, target, file, format) of each disk of domain XML ``xml`` but read-only ones (said in
    ``notes``); NotSupported for one snapfw cannot snapshot (not a file, or of a format it does not know)."""
    for el in xml.findall("devices/disk"):
        target = el.find("target").get("dev")
        device, kind = el.get("device", "disk"), el.get("type", "file")
        if _read_only(el):
            if notes is not None:
                notes.append(f"disk {target} ({device}, {_source(el)}) is read-only: snapfw leaves it out")
            continue
        if device != "disk" or kind != "file" or el.find("source") is None or not el.find("source").get("file"):
            raise NotSupported(f"disk {target} is a {kind} {device} ({_source(el)}), not a file; snapfw "
                               "cannot snapshot it")
        driver = el.find("driver")
        fmt = driver.get("type") if driver is not None else None
        if fmt not in FORMATS:
            raise NotSupported(f"disk {target} is {fmt or 'of no declared format'}, not one of "
                               f"{', '.join(FORMATS)}; snapfw cannot snapshot it")
        yield el, target, el.find("source").get("file"), fmt


def _read_only(disk: ET.Element) -> bool:
    """A CD-ROM, floppy or ``<readonly/>`` disk: never snapshotted, shared as it is by clones."""
    return disk.get("device", "disk") in ("cdrom", "floppy") or disk.find("readonly") is not None


# what a double-quoted XML attribute value must escape (whitespace controls too, or XML folds them)
_ATTRIBUTE = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "\n": "&#10;", "\r": "&#13;",
                            "\t": "&#9;"})


def _attr(value: str) -> str:
    """``value`` as a quoted XML attribute (xml.sax.saxutils would cost every live create 40 ms of imports)."""
    return f'"{value.translate(_ATTRIBUTE)}"'


# one driver class per URI scheme it serves
DRIVERS = [type(f"LibvirtDriver_{s.replace('+', '_')}", (LibvirtDriver,), {"scheme": s}) for s in SCHEMES]


@hookimpl
def snapfw_hypervisor_drivers():
    return DRIVERS


@hookimpl
def snapfw_memory_backends():
    return [LibvirtMemory]
