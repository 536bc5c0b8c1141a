"""Mountpoints a RUN step needs but its image lacks, and removing them after.

A bind or tmpfs needs a file or directory to mount on. Created in the
step's rootfs, it would land in the step's upper dir and so in its layer:
an empty ``/run/secrets/cacert`` or ``/etc/hosts`` nobody asked for.
BuildKit's ``executor.MountStubsCleaner`` removes such stubs after the
command; this does the same: every missing path (and missing parent) is
recorded before the run, and afterwards removed if it is still an empty
directory or an empty regular file -- the rule commit applies too
(:func:`layerfs.runtime.rootpath.is_unused_mountpoint`). The directory the first missing path
was made in gets its timestamps back when the command did not touch it
(moby/buildkit#3148), so the step's layer does not depend on when it ran.

Paths are kept relative to the rootfs and resolved again with
``secure_join`` at cleanup: the command may have swapped a component for a
symlink meanwhile.

Making a stub copies its parent directories up into the upper dir; once
the stub is gone they are empty copies of what is below.
:func:`prune_unchanged_dirs` drops such directories from the upper (after
unmount), which changes nothing in the union, so the layer holds only what
the command changed.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from layerfs.runtime.rootpath import is_unused_mountpoint, make_mountpoint, secure_join
from layerfs.store import manifest as mf
from layerfs.store.overlay_xattrs import OPAQUE_XATTR
from layerfs.store.scan import read_xattrs
from layerfs.store.tree import MergedTree

__all__ = ["MountStubs", "prune_unchanged_dirs"]


@dataclass
class MountStubs:
    """Stubs made in ``rootfs``; :meth:`remove` undoes them."""

    rootfs: str
    created: list[str] = field(default_factory=list)  # rootfs-relative, children first
    anchors: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # rel -> atime, mtime before, after

    @classmethod
    def make(cls, rootfs: str, targets: Iterable[tuple[str, bool]]) -> MountStubs:
        """Create each (container path, is a directory) that is missing."""
        stubs = cls(rootfs)
        for path, directory in targets:
            stubs._make(path, directory)
        return stubs

    def _rel(self, host: str) -> str:
        rel = os.path.relpath(host, self.rootfs)
        return "" if rel == "." else rel

    def _make(self, path: str, directory: bool) -> None:
        host = secure_join(self.rootfs, path)
        missing = []
        while host != self.rootfs and not os.path.lexists(host):
            missing.append(self._rel(host))
            host = os.path.dirname(host)
        if not missing:
            return
        anchor = self._rel(host)
        before = os.lstat(host)
        make_mountpoint(self.rootfs, path, directory)
        after = os.lstat(host)
        first = self.anchors.get(anchor, (before.st_atime_ns, before.st_mtime_ns, 0))
        self.anchors[anchor] = (first[0], first[1], after.st_mtime_ns)
        self.created.extend(m for m in missing if m not in self.created)

    def remove(self) -> None:
        """Remove the stubs that are still empty; restore their anchors' times."""
        seen = {a: os.lstat(secure_join(self.rootfs, "/" + a)).st_mtime_ns
                for a in self.anchors if _exists(self.rootfs, a)}
        for rel in sorted(self.created, key=lambda r: -r.count("/")):
            host = secure_join(self.rootfs, "/" + rel)
            if host == self.rootfs:
                continue
            if not is_unused_mountpoint(host):
                continue  # written, filled or gone: the command's, kept
            try:
                remove = os.rmdir if stat.S_ISDIR(os.lstat(host).st_mode) else os.unlink
                _keeping_parent_times(host, remove)
            except OSError:
                continue  # changed under us: leave it as it is
        for anchor, (atime, mtime_before, mtime_after) in self.anchors.items():
            if seen.get(anchor) == mtime_after:  # the command did not touch it
                try:
                    os.utime(secure_join(self.rootfs, "/" + anchor), ns=(atime, mtime_before),
                             follow_symlinks=False)
                except OSError:
                    pass


def _exists(rootfs: str, rel: str) -> bool:
    return os.path.lexists(secure_join(rootfs, "/" + rel))


def _keeping_parent_times(path: str, remove: object) -> None:
    parent = posixpath.dirname(path)
    st = os.lstat(parent)
    remove(path)  # type: ignore[operator]
    os.utime(parent, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def prune_unchanged_dirs(upper: str, below: MergedTree) -> None:
    """Remove, bottom-up, each empty non-opaque directory of the overlay
    ``upper`` whose metadata equals the directory below it."""
    for dirpath, _dirs, _files in os.walk(upper, topdown=False):
        rel = os.path.relpath(dirpath, upper).replace(os.sep, "/")
        ent = below.entries.get(rel)
        if rel == "." or ent is None or ent.kind != mf.DIR or os.listdir(dirpath):
            continue
        st = os.lstat(dirpath)
        try:
            opaque = os.getxattr(dirpath, OPAQUE_XATTR, follow_symlinks=False) == b"y"
        except OSError:
            opaque = False
        if opaque or (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) != \
                (ent.mode, ent.uid, ent.gid, ent.mtime_ns):
            continue
        if read_xattrs(dirpath, True) == tuple(sorted(ent.xattrs)):
            os.rmdir(dirpath)
