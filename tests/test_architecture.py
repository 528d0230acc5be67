"""The architecture holds: import-linter's contracts in pyproject.toml (layers, the core importing no plugin,
plugins importing only snapfw.api, programs run only by snapfw.tools), and one public plugin API whose
members, ``__all__`` and PLUGINS.md agree (httpx's exported-members test)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import snapfw.api
from snapfw.plugins import BUILTIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRIB = os.path.join(ROOT, "contrib")


def _contrib_packages() -> dict[str, str]:
    """Package name -> the directory to put on the path, for every contrib plugin."""
    return {pkg: os.path.join(CONTRIB, d) for d in sorted(os.listdir(CONTRIB))
            if os.path.isdir(os.path.join(CONTRIB, d))
            for pkg in os.listdir(os.path.join(CONTRIB, d))
            if os.path.isfile(os.path.join(CONTRIB, d, pkg, "__init__.py"))}


def test_import_contracts_hold():
    """`lint-imports` on this checkout's code, the contrib plugins included."""
    path = [ROOT, os.path.join(ROOT, "plugins"), *_contrib_packages().values(), os.environ.get("PYTHONPATH", "")]
    r = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
                        "--no-cache", "--no-logo", os.path.join(ROOT, "pyproject.toml")],
                       cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))})
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_contracts_name_every_plugin():
    config = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["importlinter"]
    contracts = {c["id"]: c for c in config["contracts"]}
    plugins = set(BUILTIN) | set(_contrib_packages())
    assert set(config["root_packages"]) == {"snapfw"} | plugins
    assert set(contracts["core-imports-no-plugin"]["forbidden_modules"]) == plugins
    assert {i.partition(" -> ")[0] for i in contracts["plugins-use-the-api"]["ignore_imports"]} == plugins
    assert set(contracts["programs-through-tools"]["source_modules"]) == {"snapfw"} | plugins


def test_the_public_api_exports_exactly_its_members():
    # (pytest's assertion rewriting adds names like "@py_builtins" to snapfw's modules)
    members = [n for n in vars(snapfw.api) if n.isidentifier() and not n.startswith("_")]
    assert snapfw.api.__all__ == sorted(members, key=str.casefold)


def test_plugins_md_names_the_whole_public_api():
    with open(os.path.join(ROOT, "PLUGINS.md"), encoding="utf-8") as f:
        section = re.search(r"^## The public API: `snapfw.api`\n(.*?)^## ", f.read(), re.S | re.M).group(1)
    bullets = "\n".join(ln for ln in section.splitlines() if ln.startswith(("- ", "  ")))
    assert set(re.findall(r"`(\w+)`", bullets)) == set(snapfw.api.__all__)
