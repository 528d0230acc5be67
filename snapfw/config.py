"""snapfw's configuration file: the file ``$SNAPFW_CONFIG`` names, else ``/etc/snapfw/config.yaml``.

Plain YAML read with ``safe_load``: a mapping of sections, each read by the module that uses it
(``freeze_hooks``: :mod:`snapfw.freezehooks`). No file is an empty configuration; a file that is not a
mapping is a BadInput naming it. Read only by the commands that need it (yaml is not on ``list``'s path).
"""

from __future__ import annotations

import os

from .errors import BadInput, FileError

CONFIG_ENV = "SNAPFW_CONFIG"
DEFAULT_PATH = "/etc/snapfw/config.yaml"


def load() -> tuple[str, dict]:
    """(the configuration file's path, its sections)."""
    named = os.environ.get(CONFIG_ENV)
    path = named or DEFAULT_PATH
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        if named:
            raise BadInput(f"${CONFIG_ENV} names {path}, which does not exist") from None
        return path, {}
    except OSError as e:
        raise FileError.of(e, path) from None
    except yaml.YAMLError as e:
        raise BadInput(f"config {path}: not plain YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return path, {}
    if not isinstance(data, dict):
        raise BadInput(f"config {path}: expected a mapping of sections (freeze_hooks: ...)")
    return path, data
