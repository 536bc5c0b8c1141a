"""Describe a directory tree completely, to compare two trees bit for bit."""

from __future__ import annotations

import os
import stat


def describe(root: str, mtimes: bool = True, dir_mtimes: bool = True) -> dict:
    """path -> (type, mode, uid, gid, mtime, size, content/target, rdev, xattrs, link group)."""
    out = {}
    inode_first: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames) + ([] if dirpath != root else ["."]):
            path = os.path.normpath(os.path.join(dirpath, name))
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            fmt = stat.S_IFMT(st.st_mode)
            data = b""
            if fmt == stat.S_IFREG:
                with open(path, "rb") as f:
                    data = f.read()
            elif fmt == stat.S_IFLNK:
                data = os.fsencode(os.readlink(path))
            group = ""
            if fmt == stat.S_IFREG and st.st_nlink > 1:
                group = inode_first.setdefault((st.st_dev, st.st_ino), rel)
            try:
                xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                                      for n in os.listxattr(path, follow_symlinks=False)))
            except OSError:
                xattrs = ()
            keep_mtime = mtimes and (dir_mtimes or fmt != stat.S_IFDIR)
            out[rel] = (fmt, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_mtime_ns if keep_mtime else 0, st.st_size if fmt != stat.S_IFDIR else 0,
                        data, st.st_rdev, xattrs, group)
    return out
