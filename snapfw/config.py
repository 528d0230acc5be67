"""The site's config file: defaults people write, in YAML (``safe_load`` only, rule 8).

``$SNAPFW_CONFIG`` names it, else ``/etc/snapfw/config.yaml``; a missing default file is an empty config,
a missing file that ``$SNAPFW_CONFIG`` names is an error (a typo must not silently drop the settings).
"""

from __future__ import annotations

import os

from .errors import BadInput

CONFIG_ENV = "SNAPFW_CONFIG"
DEFAULT_PATH = "/etc/snapfw/config.yaml"


def load() -> tuple[str, dict]:
    """The config file's path and its mapping (empty if there is no file)."""
    path = os.environ.get(CONFIG_ENV) or DEFAULT_PATH
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if os.environ.get(CONFIG_ENV):
            raise BadInput(f"config file {path} (${CONFIG_ENV}) does not exist") from None
        return path, {}
    except OSError as e:
        raise BadInput(f"cannot read config file {path}: {e.strerror}") from None
    import yaml  # only with a config file: importing PyYAML costs more than a snapshot's qemu-img

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise BadInput(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if doc is None:
        return path, {}
    if not isinstance(doc, dict):
        raise BadInput(f"config file {path} must be a mapping of settings, not a {type(doc).__name__}")
    return path, doc


def setting(name: str, kind: type, default):
    """Setting ``name`` of the config file, which must be a ``kind`` if present."""
    path, doc = load()
    value = doc.get(name, default)
    if not isinstance(value, kind):
        raise BadInput(f"config file {path}: {name!r} must be a {kind.__name__}, not {value!r}")
    return value
