"""Describe a directory tree completely, to compare two trees bit for bit."""

from __future__ import annotations

import os
import stat


def describe(root: str, mtimes: bool = True, dir_mtimes: bool = True) -> dict:
    """path -> (type, mode, uid, gid, mtime, size, content/target, rdev, xattrs, link group).

    The link group of a regular file is the first of the paths here that
    share its inode, "" if no other path does. Not st_nlink > 1: overlayfs
    reports a lower file's own link count even when the layers above hide
    its other names (a link split by a copy-up, then committed), so a file
    with one name in the view may say nlink 3 there and 1 on layerfs."""
    out = {}
    inode_first: dict[tuple[int, int], str] = {}
    sharing: dict[tuple[int, int], int] = {}
    inode_of: dict[str, tuple[int, int]] = {}
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
                key = (st.st_dev, st.st_ino)
                group = inode_first.setdefault(key, rel)
                sharing[key] = sharing.get(key, 0) + 1
                inode_of[rel] = key
            try:
                xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                                      for n in os.listxattr(path, follow_symlinks=False)))
            except OSError:
                xattrs = ()
            keep_mtime = mtimes and (dir_mtimes or fmt != stat.S_IFDIR)
            out[rel] = (fmt, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_mtime_ns if keep_mtime else 0, st.st_size if fmt != stat.S_IFDIR else 0,
                        data, st.st_rdev, xattrs, group)
    for rel, key in inode_of.items():
        if sharing[key] == 1:  # no other name in this tree
            out[rel] = out[rel][:9] + ("",)
    return out
