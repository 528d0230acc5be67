"""The ``images`` driver: no hypervisor, a domain is ``DIR/<name>.yaml`` listing its image files.

    name: web                 # optional; must match the file name
    disks:
      - target: vda
        path: web-vda.qcow2   # relative to DIR, or absolute
        format: qcow2         # qcow2 or raw: never probed
        backend: external     # optional: which disk backend snapshots it

Like libvirt's domain XML this file is the truth about what the guest runs on: snapfw rewrites ``path``
(atomically) when a snapshot or revert changes the active file. Images may live in DIR, in the
directories the file names, or under ``allowed_roots:`` it lists.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import stat

from snapfw.api import (
    FORMATS,
    BadInput,
    Disk,
    Domain,
    FileError,
    HypervisorDriver,
    UnknownDomain,
    check_name,
    fit_file_name,
    fsync_dir,
    hookimpl,
    uri_path,
    yamlfiles,
)

class ImagesDriver(HypervisorDriver):
    scheme = "images"
    description = "plain image files described by DIR/<domain>.yaml; no hypervisor"
    state_dir = "{path}/.snapfw"  # the catalog travels with the directory

    def __init__(self, uri: str):
        super().__init__(uri)
        self.dir = uri_path(uri)

    def _file(self, name: str) -> str:
        return os.path.join(self.dir, f"{check_name('domain', name)}.yaml")

    def list_domains(self) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".yaml") and not n.startswith("."))

    def _load(self, name: str) -> dict:
        path = self._file(name)
        try:
            data = yamlfiles.load(path)  # every change reads every domain file of the directory (sharing check)
        except FileNotFoundError:
            raise UnknownDomain(f"no domain {name!r} (no {path})") from None
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                raise UnknownDomain(f"no domain {name!r} ({e.strerror}: {path})") from None
            raise BadInput(f"cannot read {path}: {e.strerror}") from None
        if not isinstance(data, dict):
            raise BadInput(f"{path}: expected a mapping with 'disks'")
        if data.get("name", name) != name:
            raise BadInput(f"{path}: names domain {data['name']!r}, not {name!r}")
        return data

    def domain(self, name: str) -> Domain:
        data = self._load(name)
        path = self._file(name)
        disks = data.get("disks")
        if not isinstance(disks, list) or not disks:
            raise BadInput(f"{path}: 'disks' must be a non-empty list")
        out, roots = [], [self.dir]
        for i, d in enumerate(disks):
            if not isinstance(d, dict):
                raise BadInput(f"{path}: disk {i + 1} is not a mapping")
            try:
                target = check_name("disk target", d["target"])
                image = d["path"]
                fmt = d["format"]
            except KeyError as e:
                raise BadInput(f"{path}: disk {i + 1} has no {e.args[0]!r}") from None
            if fmt not in FORMATS:
                raise BadInput(f"{path}: disk {target} format {fmt!r} is not one of {', '.join(FORMATS)}")
            if not isinstance(image, str) or not image or "\0" in image:
                raise BadInput(f"{path}: disk {target} has an invalid path")
            backend = d.get("backend")
            if backend is not None and not isinstance(backend, str):
                raise BadInput(f"{path}: disk {target} backend must be a name")
            image = os.path.normpath(os.path.join(self.dir, image))
            roots.append(os.path.dirname(image))
            out.append(Disk(target, image, fmt, backend))
        if len({d.target for d in out}) != len(out):
            raise BadInput(f"{path}: two disks share a target")
        extra = data.get("allowed_roots", [])
        if not isinstance(extra, list) or not all(isinstance(r, str) for r in extra):
            raise BadInput(f"{path}: allowed_roots must be a list of directories")
        roots += [os.path.join(self.dir, r) for r in extra]
        return Domain(name, out, running=False, allowed_roots=tuple(dict.fromkeys(roots)))

    def define(self, domain: dict) -> None:
        """Rewrite the domain file with the new disk paths: a temp file with the file's mode and owner,
        fsync, rename, fsync the directory.

        The temp file has one fixed name per domain, written only under the domain's lock, so a copy left
        by a crash is this driver's own: the next define writes over it or removes it, and `check --repair`
        runs a define a crash cut short again. A file that already says what is asked is left as it is:
        undoing a define that failed on a full disk must not need the room it did not get.
        """
        name = domain["name"]
        data = self._load(name)
        old = copy.deepcopy(data)
        by_target = {d["target"]: d for d in domain["disks"]}
        for d in data["disks"]:
            new = by_target[d["target"]]
            path = new["path"]
            d["path"] = self._relative(path)
            d["format"] = new["format"]
        target = self._file(name)
        tmp = self._tmp(name)
        try:
            if data != old:
                st = os.stat(target)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    with contextlib.suppress(PermissionError):  # needs root; a user rewriting another's file owns it
                        os.fchown(f.fileno(), st.st_uid, st.st_gid)
                    os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
                    text = yamlfiles.dump(data)
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
                fsync_dir(self.dir)
                yamlfiles.remember(target, text, data)
        except OSError as e:
            raise FileError.of(e, target) from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def define_clone(self, source: str, clone: dict) -> None:
        """Write ``DIR/<clone>.yaml``: the source's file with the clone's disks, under a hidden name first,
        then linked into place (a link never replaces a file; the name was free when the plan was made)."""
        data = self._load(source)
        # the clone reads through the source's images: their directories are allowed roots of the clone too
        roots = [os.path.join(self.dir, r) for r in data.get("allowed_roots", [])]
        roots += [os.path.dirname(os.path.join(self.dir, d["path"])) for d in data["disks"]]
        by_target = {d["target"]: d for d in clone["disks"]}
        data["name"] = clone["name"]
        data["disks"] = [{**d, "path": self._relative(by_target[d["target"]]["path"]),
                          "format": by_target[d["target"]]["format"]}
                         for d in data["disks"] if d["target"] in by_target]
        roots = sorted({os.path.normpath(r) for r in roots} - {self.dir})
        if roots:
            data["allowed_roots"] = roots
        target, tmp = self._file(clone["name"]), self._tmp(clone["name"])
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.fchmod(f.fileno(), stat.S_IMODE(os.stat(self._file(source)).st_mode))  # as the source's
                text = yamlfiles.dump(data)
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, target)
            os.unlink(tmp)
            fsync_dir(self.dir)
            yamlfiles.remember(target, text, data)
        except OSError as e:
            raise FileError.of(e, target) from e

    def undefine_clone(self, clone: dict) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp(clone["name"]))
        try:
            mine = {(d.target, d.path) for d in self.domain(clone["name"]).disks}
        except UnknownDomain:
            return
        if mine == {(d["target"], os.path.normpath(d["path"])) for d in clone["disks"]}:
            os.unlink(self._file(clone["name"]))
            fsync_dir(self.dir)

    def _relative(self, path: str) -> str:
        rel = os.path.relpath(path, self.dir)
        return path if rel.startswith("..") else rel

    def _tmp(self, name: str) -> str:
        """The one temporary name a domain file is written under (see :meth:`define`)."""
        return os.path.join(self.dir, f".{fit_file_name(name, 255 - 12)}.snapfw.tmp")


@hookimpl
def snapfw_hypervisor_drivers():
    return [ImagesDriver]
