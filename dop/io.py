"""Atomic file writes: run directories and stores are read by other stages and other jobs, so a
file is either absent or complete (written to a temporary sibling, then renamed). Files get the
mode the user's umask gives a new file (``mkstemp`` alone would make them private), so a store
shared by a lab's group is readable (and, with umask 002, writable) by the group."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique temporary name: concurrent writers of one file never share a temporary
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # on a shared cluster filesystem the rename must not outrun the data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, doc: Any, **dumps: Any) -> Path:
    """``json.dumps(doc, **dumps)`` written atomically (default: indent 1, sorted keys)."""
    return atomic_write_text(path, json.dumps(doc, **{"indent": 1, "sort_keys": True, **dumps}))


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_dir(path: str | os.PathLike) -> Path:
    """Give a directory made by ``tempfile.mkdtemp`` (mode 0700) the mode a new directory gets under the
    umask, so other users of a shared store can read it."""
    path = Path(path)
    path.chmod(0o777 & ~current_umask())
    return path
