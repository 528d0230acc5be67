"""YAML files people write that snapfw reads on every command (domain files, QEMU launch specs):
``safe_load`` only (rule 8), through libyaml when PyYAML has it.

Each file's document is remembered in the cache directory by its exact text, so a command whose files
did not change imports no YAML parser: importing PyYAML took longer than the qemu-img run of an internal
snapshot. Only documents JSON gives back unchanged are remembered (no dates, no integer keys).
"""

from __future__ import annotations

import json

from . import connection
from .errors import BadInput

SLOTS = 256  # cache files of one document each, by a hash of its path: every file of a directory of domains


def load(path: str, what: str = ""):
    """The document in file ``path`` (None if it is empty). OSError as ``open`` raises it, for the
    caller to word; BadInput naming the line for text that is not plain YAML (tags like !!python/...)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    entry = _cached(path)
    if entry is not None and entry[0] == text:
        return json.loads(json.dumps(entry[1]))  # the caller's own copy: it may change it
    import yaml

    try:
        document = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise BadInput(f"{what}{path}{f' line {mark.line + 1}' if mark else ''}: not plain YAML "
                       f"({getattr(e, 'problem', None) or e}); tags like !!python/... are refused") from None
    remember(path, text, document)
    return document


def remember(path: str, text: str, document) -> None:
    """Note that file ``path`` holds ``text``, which reads as ``document``: for a writer of such a file
    (a domain file a change rewrote), so the next command does not parse it again."""
    try:
        kept = json.loads(json.dumps(document))
    except (TypeError, ValueError):
        return
    if kept != document:
        return
    _read[path] = _unwritten[path] = [text, kept]
    global _exit_registered
    if not _exit_registered:  # written once, as the process ends: `clone --count N` writes N domain files
        import atexit

        atexit.register(_write)
        _exit_registered = True


def dump(document) -> str:
    """``document`` as the text of a YAML file people read (keys in their order), through libyaml when
    PyYAML has it."""
    import yaml

    return yaml.dump(document, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)


_read: dict = {}  # path -> [text, document] as this process read or wrote it; None: not in the cache
_unwritten: dict = {}  # path -> [text, document] the cache does not have yet
_exit_registered = False


def _slot(path: str) -> str:
    """The cache file of ``path``'s document; paths that share one take turns in it."""
    import zlib

    return f"yaml-{zlib.crc32(path.encode('utf-8', 'surrogateescape')) % SLOTS:02x}.json"


def _cached(path: str) -> list | None:
    """[text, document] of ``path`` from the cache, read once per process: its slot only, not every
    document remembered (a directory of many domains made one file that every command parsed whole)."""
    if path not in _read:
        entry = connection.read_cache(_slot(path))
        _read[path] = entry[1:] if isinstance(entry, list) and len(entry) == 3 and entry[0] == path else None
    return _read[path]


def _write():
    for path, entry in _unwritten.items():
        connection.write_cache(_slot(path), [path, *entry])
    _unwritten.clear()
