"""The catalog: the one truth about snapshots, in SQLite (WAL, synchronous=FULL).

Nothing outside this module writes SQL. Besides domains, snapshots and their per-disk records it keeps
the image files snapfw manages for each disk (path, format, backing file, whether snapfw made it), tags
whose deletion waits until their file has no overlays, and the plan journal, so that a plan's catalog
changes and its "committed" mark land in one transaction.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time

from .connection import fsync_dir
from .errors import CatalogError, FileError, Refused, UnknownSnapshot

TYPE_CHECKING = False  # typing costs more to import than `snapfw list` may take
if TYPE_CHECKING:
    from .model import ImageFile, Snapshot, Tree

FILENAME = "catalog.sqlite"
# SQLite errors that come from the file system, not from the database (a full disk leaves no room for
# the -shm file even to read): the catalog itself may be fine
_IO_ERRORS = ("SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN", "SQLITE_READONLY")

_MIGRATIONS = [
    # version 1
    """
    CREATE TABLE domains(
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        current_id INTEGER REFERENCES snapshots(id) ON DELETE SET NULL);
    CREATE TABLE snapshots(
        id INTEGER PRIMARY KEY,
        domain_id INTEGER NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        parent_id INTEGER REFERENCES snapshots(id),
        created REAL NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        config TEXT NOT NULL,
        UNIQUE(domain_id, name));
    CREATE INDEX snapshots_parent ON snapshots(parent_id);
    CREATE TABLE disk_records(
        snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
        target TEXT NOT NULL,
        backend TEXT NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY(snapshot_id, target));
    CREATE TABLE files(
        path TEXT PRIMARY KEY,
        domain_id INTEGER NOT NULL REFERENCES domains(id),
        target TEXT NOT NULL,
        format TEXT NOT NULL,
        backing TEXT,
        owned INTEGER NOT NULL);
    CREATE INDEX files_backing ON files(backing);
    CREATE TABLE garbage_tags(
        domain_id INTEGER NOT NULL REFERENCES domains(id),
        path TEXT NOT NULL,
        tag TEXT NOT NULL,
        PRIMARY KEY(path, tag));
    CREATE TABLE plans(
        id TEXT PRIMARY KEY,
        domain TEXT NOT NULL,
        operation TEXT NOT NULL,
        state TEXT NOT NULL,
        created REAL NOT NULL,
        steps TEXT NOT NULL);
    CREATE TABLE journal(
        plan_id TEXT NOT NULL REFERENCES plans(id) ON DELETE CASCADE,
        phase TEXT NOT NULL,
        idx INTEGER NOT NULL,
        state TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY(plan_id, phase, idx));
    """,
    # version 2: linked clones. One row per disk of a clone that reads through a shared base: the base's
    # reference count is its number of rows, written in the transaction that makes or detaches the clone
    """
    CREATE TABLE clone_bases(
        domain_id INTEGER NOT NULL REFERENCES domains(id) ON DELETE CASCADE,
        target TEXT NOT NULL,
        base TEXT NOT NULL,
        gold_domain TEXT NOT NULL,
        gold_snapshot TEXT NOT NULL,
        gold_target TEXT NOT NULL,
        PRIMARY KEY(domain_id, target));
    CREATE INDEX clone_bases_base ON clone_bases(base);
    CREATE INDEX clone_bases_gold ON clone_bases(gold_domain, gold_snapshot);
    """,
    # version 3: the domains `snapfw clone` made (linked, full, or detached since), which `clone-delete`
    # may remove whole; linked clones made before are known by their clone_bases rows
    """
    CREATE TABLE clones(
        domain_id INTEGER PRIMARY KEY REFERENCES domains(id) ON DELETE CASCADE,
        gold_domain TEXT NOT NULL,
        gold_snapshot TEXT NOT NULL,
        full INTEGER NOT NULL);
    INSERT OR IGNORE INTO clones(domain_id, gold_domain, gold_snapshot, full)
        SELECT domain_id, gold_domain, gold_snapshot, 0 FROM clone_bases;
    """,
    # version 4: memory state. A snapshot's memory image (at most one), bound to that snapshot's disk
    # records: it goes with the snapshot
    """
    CREATE TABLE memory_records(
        snapshot_id INTEGER PRIMARY KEY REFERENCES snapshots(id) ON DELETE CASCADE,
        backend TEXT NOT NULL,
        kind TEXT NOT NULL,
        file TEXT NOT NULL UNIQUE,
        size INTEGER NOT NULL,
        data TEXT NOT NULL);
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)

# The whole `snapfw list` in one query: visible snapshots with parent name, current flag, disks and the
# kind of their memory image (NULL: disks only).
_LIST_SQL = """
SELECT s.name, p.name, s.created, s.description, s.id = d.current_id,
       (SELECT group_concat(r.target || '=' || r.backend, ',') FROM disk_records r
         WHERE r.snapshot_id = s.id ORDER BY r.target), m.kind
  FROM snapshots s JOIN domains d ON d.id = s.domain_id
  LEFT JOIN snapshots p ON p.id = s.parent_id
  LEFT JOIN memory_records m ON m.snapshot_id = s.id
 WHERE d.name = ? ORDER BY s.created, s.id
"""


class Catalog:
    """One SQLite catalog in a state directory. Use :meth:`open`, then read or :meth:`write`."""

    def __init__(self, db: sqlite3.Connection, path: str):
        self._db = db
        self.path = path

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, state_dir: str, create: bool = True) -> "Catalog | None":
        """Open (and if ``create``, make or migrate) the catalog; None if absent and not creating."""
        path = os.path.join(state_dir, FILENAME)
        if not create and not os.path.exists(path):
            return None
        if create and not os.path.exists(path):
            try:
                os.makedirs(state_dir, mode=0o700, exist_ok=True)
                cls._create(path)
            except OSError as e:
                raise CatalogError(f"cannot create catalog {path}: {FileError.of(e)}") from None
        elif os.path.getsize(path) == 0:  # a catalog is born whole (see _create): empty means damaged
            raise CatalogError(f"catalog {path} is empty (truncated?); restore it from a `snapfw export` "
                               "or move it away")
        try:
            db = sqlite3.connect(path, isolation_level=None, timeout=30)
            db.execute("PRAGMA foreign_keys = ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CatalogError(
                    f"catalog {path} has schema version {version}, newer than this snapfw "
                    f"understands ({SCHEMA_VERSION}); upgrade snapfw")
            if version < SCHEMA_VERSION:
                if not create:
                    raise CatalogError(f"catalog {path} has schema version {version}; run a changing "
                                       "snapfw command to migrate it")
                cls._migrate(db, version)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("SELECT count(*) FROM domains").fetchone()
        except sqlite3.DatabaseError as e:
            if (e.sqlite_errorname or "").startswith(_IO_ERRORS):  # never advise moving a good catalog away
                raise CatalogError(f"catalog {path} cannot be opened ({e}): is its filesystem full, read-only "
                                   "or failing?") from None
            raise CatalogError(f"catalog {path} is unreadable ({e}); restore it from a "
                               "`snapfw export` or move it away") from None
        return cls(db, path)

    @classmethod
    def _create(cls, path: str):
        """Build the schema under a temporary name and link it into place, so that a catalog file that
        exists always has a schema; if another process got there first, its catalog wins."""
        tmp = f"{path}.new-{os.getpid()}"
        try:
            db = sqlite3.connect(tmp, isolation_level=None)
            cls._migrate(db, 0)
            db.close()
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            fsync_dir(os.path.dirname(path))
        except sqlite3.DatabaseError as e:
            raise CatalogError(f"cannot create catalog {path}: {e}") from None
        finally:
            for leftover in (tmp, tmp + "-journal"):
                if os.path.exists(leftover):
                    os.unlink(leftover)

    @staticmethod
    def _migrate(db, version):
        db.execute("BEGIN IMMEDIATE")
        try:
            # another process may have migrated between our first look and this lock
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CatalogError(f"catalog schema version {version} is newer than this snapfw understands "
                                   f"({SCHEMA_VERSION}); upgrade snapfw")
            for v in range(version, SCHEMA_VERSION):
                for stmt in _MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self):
        self._db.close()

    def _q(self, sql, args=()):
        try:
            return self._db.execute(sql, args)
        except sqlite3.DatabaseError as e:
            raise CatalogError(f"catalog {self.path}: {e}") from None

    # --- reading -------------------------------------------------------------------------------
    def list_rows(self, domain: str) -> list[tuple]:
        """(name, parent, created, description, current, "vda=qcow2,vdb=external", memory kind or None)
        per snapshot."""
        return self._q(_LIST_SQL, (domain,)).fetchall()

    def domains(self) -> list[str]:
        return [r[0] for r in self._q("SELECT name FROM domains ORDER BY name")]

    def has_domain(self, domain: str) -> bool:
        return self._q("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone() is not None

    def on_hosts(self, domain: str) -> bool:
        """Whether a disk record of ``domain`` names the host its disk lives on (an LV): its state is
        asked there, which reading the catalog alone cannot tell."""
        return self._q(
            "SELECT 1 FROM disk_records r JOIN snapshots s ON s.id = r.snapshot_id "
            "JOIN domains d ON d.id = s.domain_id WHERE d.name = ? AND json_type(r.data, '$.host') IS NOT NULL "
            "LIMIT 1", (domain,)).fetchone() is not None

    def tree(self, domain: str) -> Tree:
        from .model import DiskRecord, MemoryRecord, Snapshot, Tree  # not for `snapfw list`: no dataclasses

        rows = self._q(
            "SELECT s.id, s.name, p.name, s.created, s.description, s.config, s.id = d.current_id "
            "FROM snapshots s JOIN domains d ON d.id = s.domain_id "
            "LEFT JOIN snapshots p ON p.id = s.parent_id WHERE d.name = ? ORDER BY s.created, s.id",
            (domain,)).fetchall()
        snaps, by_id = [], {}
        for sid, name, parent, created, desc, config, current in rows:
            s = Snapshot(name, parent, created, desc, bool(current), [], json.loads(config))
            snaps.append(s)
            by_id[sid] = s
        for sid, target, backend, data in self._q(
                "SELECT r.snapshot_id, r.target, r.backend, r.data FROM disk_records r "
                "JOIN snapshots s ON s.id = r.snapshot_id JOIN domains d ON d.id = s.domain_id "
                "WHERE d.name = ? ORDER BY r.target", (domain,)):
            by_id[sid].disks.append(DiskRecord(target, backend, json.loads(data)))
        for sid, backend, kind, file, size, data in self._q(
                "SELECT m.snapshot_id, m.backend, m.kind, m.file, m.size, m.data FROM memory_records m "
                "JOIN snapshots s ON s.id = m.snapshot_id JOIN domains d ON d.id = s.domain_id "
                "WHERE d.name = ?", (domain,)):
            by_id[sid].memory = MemoryRecord(backend, kind, file, size, json.loads(data))
        return Tree(snaps)

    def snapshot_views(self, domain: str, name: str | None = None) -> list[dict]:
        """The snapshots of ``domain`` (only ``name``, if given; none if there is no such one), oldest
        first, as `show` and `export` print them (``created``: seconds since the epoch), each disk record
        with the chain of files from its file down. Read in five queries whatever their number, without
        building the tree, so `snapfw show` needs no dataclasses, as `list`."""
        only, args = ("AND s.name = ?", (domain, name)) if name is not None else ("", (domain,))
        mine = f"JOIN domains d ON d.id = s.domain_id WHERE d.name = ? {only}"  # s: the snapshots asked for
        views = {}
        for sid, snapshot, parent, created, description, config, current in self._q(
                "SELECT s.id, s.name, p.name, s.created, s.description, s.config, s.id = d.current_id "
                f"FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id {mine} ORDER BY s.created, s.id",
                args):
            views[sid] = {"name": snapshot, "parent": parent, "children": [], "current": bool(current),
                          "created": created, "description": description, "disks": [], "memory": None,
                          "config": json.loads(config)}
        for sid, child in self._q(f"SELECT s.id, c.name FROM snapshots c JOIN snapshots s ON s.id = c.parent_id "
                                  f"{mine} ORDER BY c.created, c.id", args):
            views[sid]["children"].append(child)
        backing = dict(self._q("SELECT f.path, f.backing FROM files f JOIN domains d ON d.id = f.domain_id "
                               "WHERE d.name = ?", (domain,)).fetchall())
        for sid, target, backend, data in self._q(
                "SELECT r.snapshot_id, r.target, r.backend, r.data FROM disk_records r "
                f"JOIN snapshots s ON s.id = r.snapshot_id {mine} ORDER BY r.target", args):
            data = json.loads(data)
            chain, path = [], data.get("file")
            while path is not None and path not in chain:
                chain.append(path)
                path = backing.get(path)
            views[sid]["disks"].append({"target": target, "backend": backend, **data, "files": chain})
        for sid, *memory in self._q("SELECT m.snapshot_id, m.kind, m.file, m.size, m.backend FROM memory_records m "
                                    f"JOIN snapshots s ON s.id = m.snapshot_id {mine}", args):
            views[sid]["memory"] = dict(zip(("kind", "file", "size", "backend"), memory))
        return list(views.values())

    def files(self, domain: str | None = None) -> dict[str, ImageFile]:
        """Managed image files by path: of one domain, or of every domain when ``domain`` is None."""
        from .model import ImageFile

        sql = "SELECT f.path, f.target, f.format, f.backing, f.owned FROM files f"
        args = ()
        if domain is not None:
            sql += " JOIN domains d ON d.id = f.domain_id WHERE d.name = ?"
            args = (domain,)
        return {r[0]: ImageFile(r[0], r[1], r[2], r[3], bool(r[4])) for r in self._q(sql, args)}

    def placements(self) -> list[tuple[str, ImageFile]]:
        """(domain, file) for every managed file of every domain: which disk each file is recorded for,
        and (its ``backing``) which files the images of each disk read through."""
        from .model import ImageFile

        return [(r[0], ImageFile(r[1], r[2], r[3], r[4], bool(r[5]))) for r in self._q(
            "SELECT d.name, f.path, f.target, f.format, f.backing, f.owned FROM files f "
            "JOIN domains d ON d.id = f.domain_id ORDER BY f.path")]

    def clone_bases(self, gold: str | None = None, clone: str | None = None) -> list[dict]:
        """The shared bases linked clones read through: of the clones made from ``gold``'s snapshots, or of
        clone ``clone``'s disks. Each: clone, target, base, gold_domain, gold_snapshot, gold_target."""
        sql = ("SELECT d.name, c.target, c.base, c.gold_domain, c.gold_snapshot, c.gold_target FROM clone_bases c "
               "JOIN domains d ON d.id = c.domain_id WHERE ")
        sql += "c.gold_domain = ?" if gold is not None else "d.name = ?"
        keys = ("clone", "target", "base", "gold_domain", "gold_snapshot", "gold_target")
        return [dict(zip(keys, r)) for r in self._q(sql + " ORDER BY d.name, c.target", (gold if gold is not None
                                                                                      else clone,))]

    def clone_origin(self, domain: str) -> dict | None:
        """For a domain `snapfw clone` made: gold_domain, gold_snapshot, full; else None."""
        row = self._q("SELECT c.gold_domain, c.gold_snapshot, c.full FROM clones c "
                      "JOIN domains d ON d.id = c.domain_id WHERE d.name = ?", (domain,)).fetchone()
        return None if row is None else {"gold_domain": row[0], "gold_snapshot": row[1], "full": bool(row[2])}

    def garbage_tags(self, domain: str) -> list[tuple[str, str]]:
        return self._q("SELECT g.path, g.tag FROM garbage_tags g JOIN domains d ON d.id = g.domain_id "
                       "WHERE d.name = ? ORDER BY g.path, g.tag", (domain,)).fetchall()

    def unfinished_plans(self, domain: str | None = None) -> list[dict]:
        sql = "SELECT id, domain, operation, state, created, steps FROM plans WHERE state IN ('running', 'committed')"
        args = ()
        if domain is not None:
            sql += " AND domain = ?"
            args = (domain,)
        out = []
        for pid, dom, op, state, created, steps in self._q(sql + " ORDER BY created", args):
            marks = {(ph, i): st for ph, i, st in self._q(
                "SELECT phase, idx, state FROM journal WHERE plan_id = ?", (pid,))}
            out.append({"id": pid, "domain": dom, "operation": op, "state": state, "created": created,
                        "steps": json.loads(steps), "marks": marks})
        return out

    # --- writing -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def write(self):
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, fsynced), yielding a :class:`Changes`."""
        self._q("BEGIN IMMEDIATE")
        try:
            yield Changes(self)
            self._q("COMMIT")
        except BaseException:
            # also after a failed COMMIT: SQLite may leave the transaction open on SQLITE_FULL or IOERR,
            # and the next write (clearing the journal after an undo) must not find it still there
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise

    # journal: each call is its own fsynced transaction (plan.execute says what it marks when)
    def begin_plan(self, plan_id: str, domain: str, operation: str, steps: dict, started=()):
        """Journal a plan; ``started``: indexes of prepare steps marked started with it, in its transaction."""
        with self.write() as changes:
            changes.add_plan(plan_id, domain, operation, steps, "running", started)

    def mark_step(self, plan_id: str, phase: str, idx: int, state: str):
        with self.write():
            self._q("INSERT OR REPLACE INTO journal(plan_id, phase, idx, state, at) VALUES (?,?,?,?,?)",
                    (plan_id, phase, idx, state, time.time()))

    def forget_plan(self, plan_id: str):
        """Drop a plan that is done or rolled back: the journal is for recovery, not history."""
        with self.write() as changes:
            changes.forget_plan(plan_id)


class Changes:
    """The writes a plan's commit makes, inside one transaction opened by :meth:`Catalog.write`."""

    def __init__(self, catalog: Catalog):
        self._c = catalog

    def _q(self, sql, args=()):
        return self._c._q(sql, args)

    def _domain_id(self, domain: str) -> int:
        row = self._q("SELECT id FROM domains WHERE name = ?", (domain,)).fetchone()
        if row:
            return row[0]
        return self._q("INSERT INTO domains(name) VALUES (?)", (domain,)).lastrowid

    def _snapshot_id(self, domain: str, name: str) -> int:
        row = self._q("SELECT s.id FROM snapshots s JOIN domains d ON d.id = s.domain_id "
                      "WHERE d.name = ? AND s.name = ?", (domain, name)).fetchone()
        if not row:
            raise UnknownSnapshot(f"domain {domain!r} has no snapshot {name!r}")
        return row[0]

    def add_plan(self, plan_id: str, domain: str, operation: str, steps: dict, state: str, started=()):
        now = time.time()
        self._q("INSERT INTO plans(id, domain, operation, state, created, steps) VALUES (?,?,?,?,?,?)",
                (plan_id, domain, operation, state, now, json.dumps(steps)))
        for idx in started:
            self._q("INSERT INTO journal(plan_id, phase, idx, state, at) VALUES (?,?,?,?,?)",
                    (plan_id, "prepare", idx, "started", now))

    def forget_plan(self, plan_id: str):
        self._q("DELETE FROM plans WHERE id = ?", (plan_id,))

    def set_plan_state(self, plan_id: str, state: str):
        self._q("UPDATE plans SET state = ? WHERE id = ?", (state, plan_id))

    def add_snapshot(self, domain: str, snap: Snapshot):
        did = self._domain_id(domain)
        parent = self._snapshot_id(domain, snap.parent) if snap.parent else None
        sid = self._q("INSERT INTO snapshots(domain_id, name, parent_id, created, description, config) "
                      "VALUES (?,?,?,?,?,?)", (did, snap.name, parent, snap.created, snap.description,
                                               json.dumps(snap.config))).lastrowid
        for r in snap.disks:
            self._q("INSERT INTO disk_records(snapshot_id, target, backend, data) VALUES (?,?,?,?)",
                    (sid, r.target, r.backend, json.dumps(r.data)))
        m = snap.memory
        if m is not None:
            self._q("INSERT INTO memory_records(snapshot_id, backend, kind, file, size, data) VALUES (?,?,?,?,?,?)",
                    (sid, m.backend, m.kind, m.file, m.size, json.dumps(m.data)))

    def remove_snapshot(self, domain: str, name: str):
        """Remove a snapshot; its children move to its parent, and current moves to its parent."""
        sid = self._snapshot_id(domain, name)
        parent = self._q("SELECT parent_id FROM snapshots WHERE id = ?", (sid,)).fetchone()[0]
        self._q("UPDATE snapshots SET parent_id = ? WHERE parent_id = ?", (parent, sid))
        self._q("UPDATE domains SET current_id = ? WHERE current_id = ?", (parent, sid))
        self._q("DELETE FROM snapshots WHERE id = ?", (sid,))

    def set_current(self, domain: str, name: str | None):
        did = self._domain_id(domain)
        sid = self._snapshot_id(domain, name) if name else None
        self._q("UPDATE domains SET current_id = ? WHERE id = ?", (sid, did))

    def set_record(self, domain: str, name: str, target: str, data: dict):
        sid = self._snapshot_id(domain, name)
        self._q("UPDATE disk_records SET data = ? WHERE snapshot_id = ? AND target = ?",
                (json.dumps(data), sid, target))

    def put_file(self, domain: str, f: ImageFile):
        """Record or update ``f`` for one disk of ``domain``. A file recorded for another domain or disk
        is never moved over: each would then miss a file its snapshots need (the plan's checks refuse
        this first; this is the last line of defence)."""
        owner = self._q("SELECT d.name, f.target FROM files f JOIN domains d ON d.id = f.domain_id "
                        "WHERE f.path = ?", (f.path,)).fetchone()
        if owner is not None and tuple(owner) != (domain, f.target):
            raise Refused(f"{f.path} is recorded for domain {owner[0]} disk {owner[1]}; the catalog does not "
                          f"move it to domain {domain} disk {f.target}")
        did = self._domain_id(domain)
        self._q("INSERT OR REPLACE INTO files(path, domain_id, target, format, backing, owned) "
                "VALUES (?,?,?,?,?,?)", (f.path, did, f.target, f.format, f.backing, int(f.owned)))

    def remove_file(self, path: str):
        self._q("DELETE FROM files WHERE path = ?", (path,))
        self._q("DELETE FROM garbage_tags WHERE path = ?", (path,))

    def add_clone_base(self, clone: str, target: str, base: str, gold: str, snapshot: str, gold_target: str):
        self._q("INSERT INTO clone_bases(domain_id, target, base, gold_domain, gold_snapshot, gold_target) "
                "VALUES (?,?,?,?,?,?)", (self._domain_id(clone), target, base, gold, snapshot, gold_target))

    def remove_clone_base(self, clone: str, target: str):
        self._q("DELETE FROM clone_bases WHERE target = ? AND domain_id = (SELECT id FROM domains WHERE name = ?)",
                (target, clone))

    def add_clone(self, clone: str, gold: str, snapshot: str, full: bool):
        self._q("INSERT INTO clones(domain_id, gold_domain, gold_snapshot, full) VALUES (?,?,?,?)",
                (self._domain_id(clone), gold, snapshot, int(full)))

    def remove_domain(self, domain: str):
        """Forget ``domain`` whole: its snapshots, files, pending tags and references on shared bases."""
        self._q("DELETE FROM files WHERE domain_id = (SELECT id FROM domains WHERE name = ?)", (domain,))
        self._q("DELETE FROM garbage_tags WHERE domain_id = (SELECT id FROM domains WHERE name = ?)", (domain,))
        self._q("UPDATE domains SET current_id = NULL WHERE name = ?", (domain,))
        self._q("DELETE FROM domains WHERE name = ?", (domain,))

    def add_garbage_tag(self, domain: str, path: str, tag: str):
        self._q("INSERT OR IGNORE INTO garbage_tags(domain_id, path, tag) VALUES (?,?,?)",
                (self._domain_id(domain), path, tag))

    def remove_garbage_tag(self, path: str, tag: str):
        self._q("DELETE FROM garbage_tags WHERE path = ? AND tag = ?", (path, tag))
