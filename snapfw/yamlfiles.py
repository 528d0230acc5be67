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

CACHE = "yaml-documents.json"  # in connection.cache_home()
CACHED = 256  # documents remembered: every file of a directory of domains, and then some


def load(path: str, what: str = ""):
    """The document in file ``path`` (None if it is empty). OSError as ``open`` raises it, for the
    caller to word; BadInput naming the line for text that is not plain YAML (tags like !!python/...)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    entry = _documents().get(path)
    if isinstance(entry, list) and len(entry) == 2 and entry[0] == text:
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
    others = [(p, e) for p, e in _documents().items() if p != path]
    _read.clear()
    _read.update([(path, [text, kept]), *others[:CACHED - 1]])
    global _unwritten
    if not _unwritten:  # written once, as the process ends: `clone --count N` writes N domain files
        import atexit

        atexit.register(_write)
        _unwritten = True


def dump(document) -> str:
    """``document`` as the text of a YAML file people read (keys in their order), through libyaml when
    PyYAML has it."""
    import yaml

    return yaml.dump(document, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)


_read: dict = {}  # the cache as this process knows it: read once, kept as written
_unwritten = False  # whether _read has documents the cache file has not


def _write():
    global _unwritten
    connection.write_cache(CACHE, {"documents": _read})
    _unwritten = False


def _documents() -> dict:
    if not _read:
        cached = connection.read_cache(CACHE)
        documents = cached.get("documents") if isinstance(cached, dict) else None
        _read.update(documents if isinstance(documents, dict) else {})
    return _read
