"""Writing export files atomically: a temporary file beside the target, then a rename."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Iterator

__all__ = ["staged_path", "write_atomically"]


@contextlib.contextmanager
def staged_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A temporary path beside ``path`` to write to: renamed to ``path`` (``os.replace``) when
    the block ends without an exception, removed otherwise. A reader sees the old file or the
    whole new one; a failure leaves nothing behind.

    Raises:
      ValueError: ``path``'s folder does not exist.
    """
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"path {str(path)!r}: folder {str(path.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield pathlib.Path(tmp)
        os.replace(tmp, path)
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)


def write_atomically(path: pathlib.Path, data: bytes) -> int:
    """Writes ``data`` to ``path`` through :func:`staged_path`; returns the number of bytes
    written.

    Raises:
      ValueError: ``path``'s folder does not exist.
    """
    with staged_path(path) as tmp:
        tmp.write_bytes(data)
    return len(data)
