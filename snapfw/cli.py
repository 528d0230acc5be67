"""The ``snapfw`` command. The plain forms of the everyday commands (``list``, ``show``, ``create``,
``revert``, ``delete`` with their common flags, and create's ``--disk`` and ``--memory`` that live
snapshots take) are read here without click: importing click takes longer
than virsh takes for a whole ``snapshot-list``, and scripts call these in loops. Anything else (help,
--version, any other command or option, a usage error) goes to click (``usage``), which declares the whole
command line and reads these forms the same way (tests/test_cli_readers.py holds the two to that).
"""

from __future__ import annotations

import os
import sys

# options before the command, taking a value: their keyword in commands.Options
_GLOBAL = {"-c": "uri", "--connect": "uri", "--state-dir": "state_dir"}
# flags: (keyword, the value it sets); several setting one keyword: the last one given wins, as in click
_COMMON = {"--json": ("as_json", True)}
_CHANGE = {**_COMMON, "--dry-run": ("dry_run", True)}
_STATES = {"--running": ("state", "running"), "--paused": ("state", "paused"), "--stopped": ("state", "shut off")}
# command -> (its function in commands, positional arguments, flags, options taking a value)
_PLAIN = {
    "list": ("list_", ("domain",), {**_COMMON, "--tree": ("tree", True)}, {}),
    "show": ("show", ("domain", "name"), _COMMON, {}),
    "create": ("create", ("domain", "name"), _CHANGE,
               {"--description": "description", "--disk": "disks", "--memory": "memory"}),
    "revert": ("revert", ("domain", "name"), {**_CHANGE, **_STATES, "--keep-config": ("keep_config", True)}, {}),
    "delete": ("delete", ("domain", "name"), {**_CHANGE, "--children": ("children", True)}, {}),
}
# options that may be given again, their values gathered in a tuple
_MULTIPLE = {"disks"}
# options whose value must be one of these: another goes to click, which names the error
_CHOICES = {"memory": ("none", "live", "paused")}
# SNAPFW_DEBUG as click reads a flag's environment variable
_TRUE, _FALSE = ("1", "true", "t", "yes", "y", "on"), ("", "0", "false", "f", "no", "n", "off")


def plain(args: list[str]) -> tuple[dict, str, dict] | None:
    """(shared options, command, its keyword arguments) if ``args`` is a plain form read here; None for
    click to read."""
    debug = os.environ.get("SNAPFW_DEBUG", "").strip().lower()
    if debug not in _TRUE + _FALSE:
        return None
    shared, i = {"debug": debug in _TRUE}, 0
    while i < len(args) and args[i].startswith("-"):
        i = _value(args, i, _GLOBAL, shared)
        if i is None:
            return None
    if i == len(args) or args[i] not in _PLAIN:
        return None
    command, (_, positional, flags, valued) = args[i], _PLAIN[args[i]]
    arguments, given, i = {}, [], i + 1
    while i < len(args):
        if args[i] in flags:
            key, value = flags[args[i]]
            arguments[key] = value
            i += 1
        elif args[i].startswith("-"):
            i = _value(args, i, valued, arguments)
            if i is None:
                return None
        else:
            given.append(args[i])
            i += 1
    if len(given) != len(positional):
        return None
    return shared, command, {**dict(zip(positional, given)), **arguments}


def _value(args: list[str], i: int, known: dict, into: dict) -> int | None:
    """Read the option at ``args[i]`` taking a value (``--opt V``, ``--opt=V``, ``-c V``) into ``into``;
    the index after it, or None if it is not one of ``known`` or its value looks like an option."""
    name, eq, value = args[i].partition("=")
    if name not in known or (eq and not name.startswith("--")):
        return None
    if not eq:
        if i + 1 == len(args):
            return None
        i, value = i + 1, args[i + 1]
    key = known[name]
    if value.startswith("-") or value not in _CHOICES.get(key, (value,)):
        return None
    into[key] = into.get(key, ()) + (value,) if key in _MULTIPLE else value
    return i + 1


def main(args: list[str] | None = None, prog_name: str = "snapfw"):
    """The ``snapfw`` command: run by the resident interpreter if there is one (snapfw.tools.resident),
    else here."""
    if args is None:
        from .tools import resident

        resident.attach(sys.argv, "snapfw.resident")
    run(sys.argv[1:] if args is None else list(args), prog_name)


def run(args: list[str], prog_name: str = "snapfw"):
    for stream in ("stdout", "stderr"):  # closed when snapfw started (`snapfw list web >&-`): as /dev/null
        if getattr(sys, stream) is None:
            setattr(sys, stream, open(os.devnull, "w"))
    parsed = plain(args)
    if parsed is None:
        from .usage import group

        return group.main(args, prog_name=prog_name)
    from . import commands

    shared, command, arguments = parsed
    o = commands.Options(**shared)
    o.command = command
    run = getattr(commands, _PLAIN[command][0])
    try:
        code = commands.guard(lambda: run(o, **arguments), o, (BrokenPipeError,))
        sys.stdout.flush()
    except BrokenPipeError:  # as click does: a closed stdout (`snapfw list web | head -1`) ends quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code)
