"""Writing export files atomically: a temporary file beside the target, then a rename."""

from __future__ import annotations

import os
import pathlib
import tempfile

__all__ = ["write_atomically"]


def write_atomically(path: pathlib.Path, data: bytes) -> int:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and
    ``os.replace``: a reader sees the old file or the whole new one, and a failure leaves
    nothing behind. Returns the number of bytes written.

    Raises:
      ValueError: ``path``'s folder does not exist.
    """
    if not path.parent.is_dir():
        raise ValueError(f"path {str(path)!r}: folder {str(path.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return len(data)
