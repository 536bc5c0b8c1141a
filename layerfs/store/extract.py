"""Write entries out as a real directory tree, never outside its root.

Every path is created relative to a directory fd reached by walking the
entry's parents with ``O_NOFOLLOW``, so a symlink in the tree (or planted
by a hostile layer) can never redirect a write outside the target.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable

from layerfs.errors import Conflict, InvalidInput
from layerfs.store import manifest as mf
from layerfs.store.manifest import Entry
from layerfs.store.overlay_xattrs import escape_overlay_xattr

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Writes the content of one object into an open fd.
ContentWriter = Callable[[str, int], int]


class DirWalker:
    """Keeps fds of the current chain of ancestor dirs (bounded by depth)."""

    def __init__(self, root: str) -> None:
        self.stack: list[tuple[str, int]] = [("", os.open(root, _DIR_FLAGS))]

    def parent_fd(self, path: str) -> int:
        parent = mf.parent_of(path)
        while self.stack[-1][0] != parent and not _is_under(parent, self.stack[-1][0]):
            os.close(self.stack.pop()[1])
        cur, fd = self.stack[-1]
        rest = parent[len(cur):].lstrip("/") if cur else parent
        for part in filter(None, rest.split("/")):
            try:
                fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise InvalidInput(f"cannot enter {parent!r}: {exc.strerror}") from None
            cur = f"{cur}/{part}" if cur else part
            self.stack.append((cur, fd))
        return fd

    @property
    def root_fd(self) -> int:
        return self.stack[0][1]

    def close(self) -> None:
        while self.stack:
            os.close(self.stack.pop()[1])


def _is_under(path: str, anc: str) -> bool:
    return anc == "" or path.startswith(anc + "/")


def extract(entries: Iterable[Entry], dest: str, write_content: ContentWriter,
            overlay: bool = False) -> None:
    """Create *entries* (sorted, parents first) under the empty dir *dest*.

    With *overlay*, whiteouts become 0/0 char devices and opaque dirs get
    ``trusted.overlay.opaque=y`` (an overlayfs upper dir); otherwise
    whiteouts are an error (a flattened tree has none).
    """
    os.makedirs(dest, exist_ok=True)
    if os.listdir(dest):
        raise Conflict(f"{dest} is not empty")
    walker = DirWalker(dest)
    dirs: list[Entry] = []
    try:
        for e in sorted(entries, key=lambda x: mf.sort_key(x.path)):
            if e.path == "":
                dirs.append(e)
                continue
            pfd = walker.parent_fd(e.path)
            _create(e, pfd, walker.root_fd, write_content, overlay)
            if e.kind == mf.DIR:
                dirs.append(e)
        for e in reversed(dirs):
            pfd = walker.root_fd if e.path == "" else walker.parent_fd(e.path)
            _finish_dir(e, pfd, overlay)
    finally:
        walker.close()


def _name(path: str) -> str:
    return path.rpartition("/")[2]


def _create(e: Entry, pfd: int, root_fd: int, write_content: ContentWriter, overlay: bool) -> None:
    name = _name(e.path)
    if e.kind == mf.DIR:
        os.mkdir(name, 0o700, dir_fd=pfd)
        return
    if e.kind == mf.HARDLINK:
        walker_fd = _open_parent(root_fd, e.target)
        try:
            os.link(_name(e.target), name, src_dir_fd=walker_fd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(walker_fd)
        return
    if e.kind == mf.FILE:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
        try:
            _write_file(e, fd, write_content)
            _set_meta(e, overlay, fd=fd)
        finally:
            os.close(fd)
        return
    if e.kind == mf.SYMLINK:
        os.symlink(e.target, name, dir_fd=pfd)
    elif e.kind == mf.WHITEOUT:
        if not overlay:
            raise InvalidInput(f"whiteout {e.path!r} in a flattened tree")
        os.mknod(name, stat.S_IFCHR | 0o000, 0, dir_fd=pfd)
        return
    else:
        os.mknod(name, e.st_mode, e.rdev, dir_fd=pfd)
    _set_meta(e, overlay, pfd=pfd, name=name)


def _open_parent(root_fd: int, path: str) -> int:
    fd = os.dup(root_fd)
    for part in filter(None, mf.parent_of(path).split("/")):
        nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def _write_file(e: Entry, fd: int, write_content: ContentWriter) -> None:
    if e.size:
        write_content(e.digest, fd)
        os.ftruncate(fd, e.size)


def _set_meta(e: Entry, overlay: bool, fd: int | None = None, pfd: int | None = None, name: str = "") -> None:
    """Owner, xattrs, mode, times, in that order: chown clears setuid bits
    and some xattrs (security.capability), so it must come first. In an
    overlay-format dir an image's own ``trusted.overlay.*`` xattrs are
    written escaped (``trusted.overlay.overlay.*``, as overlayfs does), so
    they stay content and never act as markers; ``scan`` reads them back."""
    target = fd if fd is not None else f"/proc/self/fd/{pfd}/{name}"
    follow = fd is not None
    if fd is not None:
        os.fchown(fd, e.uid, e.gid)
    else:
        os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
    for key, value in e.xattrs:
        if overlay:
            key = escape_overlay_xattr(key)
        try:
            os.setxattr(target, key, value, follow_symlinks=follow)
        except OSError as exc:
            raise InvalidInput(f"{e.path!r}: cannot set xattr {key}: {exc.strerror}") from None
    if e.kind != mf.SYMLINK:
        if fd is not None:
            os.fchmod(fd, e.mode)
        else:
            os.chmod(name, e.mode, dir_fd=pfd)
    times = (e.mtime_ns, e.mtime_ns)
    if fd is not None:
        os.utime(fd, ns=times)
    else:
        os.utime(name, ns=times, dir_fd=pfd, follow_symlinks=False)


def _finish_dir(e: Entry, pfd: int, overlay: bool) -> None:
    if e.path == "":
        fd = os.dup(pfd)
    else:
        fd = os.open(_name(e.path), _DIR_FLAGS, dir_fd=pfd)
    try:
        _set_meta(e, overlay, fd=fd)
        if overlay and e.opaque:
            os.setxattr(fd, "trusted.overlay.opaque", b"y")
    finally:
        os.close(fd)
