"""Crash-safe file writes: temp file, fsync, rename, fsync the directory.

Modelled on borg's ``SaveFile``: after a crash a reader sees either the old
file or the complete new one, never a torn write.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import BinaryIO


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def save_file(path: str, tmp_dir: str, *, durable: bool = True) -> Iterator[BinaryIO]:
    """Yield a file object whose contents replace *path* atomically on success.

    The temp file lives in *tmp_dir* (same filesystem as *path*) so an
    interrupted write leaves debris only there, where gc sweeps it.
    """
    fd, tmp = _mkstemp(tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(path))


def write_bytes(path: str, data: bytes, tmp_dir: str, *, durable: bool = True) -> None:
    with save_file(path, tmp_dir, durable=durable) as f:
        f.write(data)


def _mkstemp(tmp_dir: str) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(dir=tmp_dir, prefix="w-")
