"""Resolve paths inside a rootfs as the container would see them.

An image's rootfs is untrusted: ``/etc`` may be a symlink to ``/`` or to
``../../../host``. Before the runtime reads a file from it or mounts onto a
path in it (as host root, before pivot_root), the path is resolved here with
every symlink interpreted relative to the rootfs, the way
filepath-securejoin does for runc. The result never leaves the rootfs.

Weakness, shared with runc's pre-openat2 code: this is check-then-use. A
process already running in the same rootfs could swap a component for a
symlink between the check and the mount. Nothing runs in a rootfs before its
container starts, so this matters only for rootfs directories shared by
running containers.
"""

from __future__ import annotations

import os
import posixpath
import stat

from layerfs.errors import InvalidInput
from layerfs.store.resolve import resolve_in_root


def secure_join(root: str, path: str) -> str:
    """Return the host path of ``path`` inside ``root``, symlinks scoped to root.

    Missing trailing components are joined lexically, so the result is also
    the place to create them.
    """

    def readlink(rel: str) -> str | None:
        host = os.path.join(root, rel)
        try:
            mode = os.lstat(host).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        return os.readlink(host) if stat.S_ISLNK(mode) else None

    current = resolve_in_root(path, readlink)
    return os.path.join(root, current) if current else root


def make_mountpoint(root: str, path: str, directory: bool) -> str:
    """Resolve ``path`` in ``root`` and create it (dir or empty file) if missing.

    Returns the host path to mount on. An existing entry of the wrong kind is
    left alone: mount(2) then reports the mismatch with a clear errno.
    """
    target = secure_join(root, path)
    if target == root:
        raise InvalidInput(f"mount target {path!r} resolves to the container's /")
    if not os.path.lexists(target):
        # Resolved only when needed: on a layerfs rootfs every lookup is a
        # round trip to the FUSE daemon, and most mountpoints exist.
        parent = secure_join(root, posixpath.dirname(path.rstrip("/")) or "/")
        os.makedirs(parent, mode=0o755, exist_ok=True)
        if directory:
            os.makedirs(target, mode=0o755, exist_ok=True)
        else:
            fd = os.open(target, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            os.close(fd)
    return target


def is_unused_mountpoint(path: str) -> bool:
    """Whether ``path`` is still what :func:`make_mountpoint` makes: an
    empty regular file or an empty directory (a link is never one).

    The one rule for leaving the runtime's stubs out of a layer: commit and
    diff apply it to the runtime's paths the image lacks, a RUN step to the
    paths it made before the command. Anything the command wrote or filled
    is kept.
    """
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            return st.st_size == 0
        return stat.S_ISDIR(st.st_mode) and not os.listdir(path)
    except OSError:
        return False


def read_root_file(root: str, path: str, limit: int = 1 << 20) -> str | None:
    """Read a small text file from the rootfs; None if it does not exist."""
    target = secure_join(root, path)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise InvalidInput(f"{path} in the rootfs is not a regular file")
        return handle.read(limit).decode("utf-8", errors="replace")
