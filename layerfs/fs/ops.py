"""The pyfuse3 Operations of a layerfs mount: a thin adapter over Union.

Each handler converts arguments, calls :class:`layerfs.fs.union.Union` and
shapes the reply. Errors are mapped in one place, :func:`fuse_errors`:
``OSError`` keeps its errno, store errors get the errno that fits
(``Corrupt`` -> EIO plus a log line), and anything unexpected is logged
with its traceback and answered with EIO -- a bad request never takes the
daemon down.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

import pyfuse3
from pyfuse3 import FUSEError

from layerfs.errors import Corrupt, InvalidInput, LayerfsError, NotFound, Unsupported
from layerfs.fs.names import NAME_MAX
from layerfs.fs.union import LOWER_TIMEOUT, Union

log = logging.getLogger("layerfs.fs")

_ERRNO_OF = ((NotFound, errno.ENOENT), (InvalidInput, errno.EINVAL), (Unsupported, errno.EOPNOTSUPP),
             (Corrupt, errno.EIO), (LayerfsError, errno.EIO))


def fuse_errors(fn: Callable) -> Callable:
    """Turn every exception of a handler into a FUSEError with the right errno."""

    @functools.wraps(fn)
    async def wrapper(self: "Operations", *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except LayerfsError as exc:
            code = next(c for cls, c in _ERRNO_OF if isinstance(exc, cls))
            log.error("%s: %s", fn.__name__, exc)
            raise FUSEError(code) from None
        except Exception:
            log.exception("unexpected error in %s%r", fn.__name__, args[:3])
            raise FUSEError(errno.EIO) from None

    return wrapper


def _negative() -> pyfuse3.EntryAttributes:
    # st_ino 0 with a timeout makes the kernel cache the miss; names only
    # appear through this mount, and the kernel drops the entry then.
    a = pyfuse3.EntryAttributes()
    a.st_ino = 0
    a.entry_timeout = LOWER_TIMEOUT
    return a


_NEGATIVE = _negative()  # pyfuse3 only reads it: one for every miss


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers for one :class:`Union`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, union: Union) -> None:
        super().__init__()
        self.u = union

    def _entry(self, ino: int) -> pyfuse3.EntryAttributes:
        a = self.u.attr(ino)
        self.u.table.looked_up(ino)
        return a

    # -- lookups and attributes -----------------------------------------
    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        ino = self.u.child(self.u.node(parent_inode), name)
        if not ino:
            if name == b"." or name == b"..":
                raise FUSEError(errno.ENOENT)
            return _NEGATIVE
        return self._entry(ino)

    async def forget(self, inode_list):
        try:
            for ino, n in inode_list:
                self.u.table.forget(ino, n)
        except Exception:  # forget must never raise
            log.exception("forget")

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        return self.u.attr(inode)

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        return await self.u.setattr(inode, fields, attr, fh)

    @fuse_errors
    async def readlink(self, inode, ctx):
        return self.u.readlink(inode)

    @fuse_errors
    async def access(self, inode, mode, ctx):
        return True

    @fuse_errors
    async def statfs(self, ctx):
        st = self.u.statfs()
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(out, name, getattr(st, name))
        return out

    # -- xattrs -------------------------------------------------------
    @fuse_errors
    async def getxattr(self, inode, name, ctx):
        return self.u.getxattr(inode, name)

    @fuse_errors
    async def listxattr(self, inode, ctx):
        return self.u.listxattr(inode)

    @fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        await self.u.setxattr(inode, name, value)

    @fuse_errors
    async def removexattr(self, inode, name, ctx):
        await self.u.removexattr(inode, name)

    # -- files --------------------------------------------------------
    @fuse_errors
    async def open(self, inode, flags, ctx):
        fh, keep = await self.u.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    @fuse_errors
    async def read(self, fh, off, size):
        return await self.u.read(fh, off, size)

    @fuse_errors
    async def write(self, fh, off, buf):
        return await self.u.write(fh, off, buf)

    async def flush(self, fh):
        # Nothing to do at close(2): ENOSYS makes the kernel stop sending
        # FLUSH at all, one request less per open file.
        raise FUSEError(errno.ENOSYS)

    @fuse_errors
    async def fsync(self, fh, datasync):
        await self.u.fsync(fh, datasync)

    @fuse_errors
    async def release(self, fh):
        self.u.release(fh)

    @fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        node, fd = await self.u.create(parent_inode, name, stat.S_IFREG, mode, ctx.uid, ctx.gid,
                                       flags=flags)
        fh = self.u.adopt_fd(node, fd)
        attr = self.u.upper_attr(node, os.fstat(fd))  # the new fd: no path walk, no lstat
        self.u.table.looked_up(node.ino)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), attr

    # -- directories ------------------------------------------------------
    @fuse_errors
    async def opendir(self, inode, ctx):
        return self.u.opendir(inode)

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        self.u.readdir(fh, start_id, token)

    @fuse_errors
    async def releasedir(self, fh):
        self.u.releasedir(fh)

    @fuse_errors
    async def fsyncdir(self, fh, datasync):
        pass

    # -- namespace ------------------------------------------------------
    @fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        node, _ = await self.u.create(parent_inode, name, stat.S_IFDIR, mode, ctx.uid, ctx.gid)
        return self._entry(node.ino)

    @fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        node, fd = await self.u.create(parent_inode, name, stat.S_IFMT(mode), mode, ctx.uid, ctx.gid,
                                       rdev=rdev)
        if fd >= 0:
            os.close(fd)
        return self._entry(node.ino)

    @fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        node, _ = await self.u.create(parent_inode, name, stat.S_IFLNK, 0o777, ctx.uid, ctx.gid,
                                      target=target)
        return self._entry(node.ino)

    @fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        node = await self.u.link(inode, new_parent_inode, new_name)
        return self._entry(node.ino)

    @fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        await self.u.unlink(parent_inode, name, want_dir=False)

    @fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self.u.unlink(parent_inode, name, want_dir=True)

    @fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.u.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)
