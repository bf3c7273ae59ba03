"""Small file helpers shared by the trainer, evaluation, checkpoints and the data layer."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def atomic_write_text(text: str, path: str) -> None:
    """Writes `text` to `path` so a reader (or a crash) sees the old file or the whole new one.

    The temporary file is unique per writer, so two processes never rename each other's file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(obj: Any, path: str, *, indent: int = 2) -> None:
    """`json.dump` with the guarantees of `atomic_write_text`."""
    atomic_write_text(json.dumps(obj, indent=indent) + "\n", path)


def matches_key_prefix(key: str, patterns) -> bool:
    """True when dotted `key` equals a pattern, or starts with a pattern ending in '.'."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)
