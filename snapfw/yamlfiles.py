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
    documents = _documents()
    entry = documents.get(path)
    if isinstance(entry, list) and len(entry) == 2 and entry[0] == text:
        return entry[1]
    import yaml

    try:
        document = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise BadInput(f"{what}{path}{f' line {mark.line + 1}' if mark else ''}: not plain YAML "
                       f"({getattr(e, 'problem', None) or e}); tags like !!python/... are refused") from None
    remember(path, text, document, documents)
    return document


def remember(path: str, text: str, document, documents: dict | None = None) -> None:
    """Note that file ``path`` holds ``text``, which reads as ``document``: for a writer of such a file
    (a domain file a change rewrote), so the next command does not parse it again."""
    try:
        if json.loads(json.dumps(document)) != document:
            return
    except (TypeError, ValueError):
        return
    others = [(p, e) for p, e in (_documents() if documents is None else documents).items() if p != path]
    connection.write_cache(CACHE, {"documents": dict([(path, [text, document]), *others[:CACHED - 1]])})


def _documents() -> dict:
    cached = connection.read_cache(CACHE)
    documents = cached.get("documents") if isinstance(cached, dict) else None
    return documents if isinstance(documents, dict) else {}
