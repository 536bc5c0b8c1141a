"""The pyfuse3 Operations of a layerfs mount: a thin adapter over Union.

The only module of the union that knows pyfuse3. Each handler converts
arguments (``SetattrFields`` to a :class:`SetAttr`, ``ctx`` to uid/gid),
calls :class:`layerfs.fs.union.Union` and shapes the reply (an
:class:`Attr` becomes ``EntryAttributes``; readdir entries go to
``readdir_reply``). Errors are mapped in one place, :func:`fuse_errors`:
``OSError`` keeps its errno, store errors get the errno that fits
(``Corrupt`` -> EIO plus a log line), and anything unexpected is logged
with its traceback and answered with EIO -- a bad request never takes the
daemon down.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
from collections.abc import Callable
from typing import Any

import pyfuse3
from pyfuse3 import FUSEError

from layerfs.errors import Corrupt, InvalidInput, LayerfsError, NotFound, Unsupported
from layerfs.fs import lowlevel
from layerfs.fs.inodes import ROOT, Attr, SetAttr
from layerfs.fs.union import LOWER_TIMEOUT, Union

log = logging.getLogger("layerfs.fs")

_ERRNO_OF = ((NotFound, errno.ENOENT), (InvalidInput, errno.EINVAL), (Unsupported, errno.EOPNOTSUPP),
             (Corrupt, errno.EIO), (LayerfsError, errno.EIO))


def fuse_errors(fn: Callable) -> Callable:
    """Turn every exception of a handler into a FUSEError with the right errno."""

    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: "Operations", *args: Any) -> Any:
        self.requests[name] += 1
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

if ROOT != pyfuse3.ROOT_INODE:  # checked once, at import, even under python -O
    raise ImportError(f"the union's root inode {ROOT} is not FUSE's {pyfuse3.ROOT_INODE}")


def _build(a: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino, e.st_mode, e.st_nlink, e.st_uid, e.st_gid, e.st_rdev = a[:6]
    e.st_size, e.st_blksize, e.st_blocks = a.size, a.blksize, a.blocks
    e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = a.atime_ns, a.mtime_ns, a.ctime_ns
    e.entry_timeout = e.attr_timeout = a.timeout
    return e


def _store_in_page_cache(inode: int, content: bytes | memoryview, offset: int) -> None:
    """Put a file's content in the kernel's page cache: its reads then come
    from there, and with no READ there is no GETATTR either (a READ makes
    the kernel drop the cached atime). Called by read-ahead threads only,
    never by the request loop: the kernel may make it wait for a READ of
    the same file (libfuse's notify is one write(2), safe beside the loop).
    Raises OSError if the kernel refused (ENOENT: it does not know the inode)."""
    pyfuse3.notify_store(inode, offset, content)


def _forget_attrs(inode: int) -> None:
    """Make the kernel ask for *inode*'s attributes again (attributes only:
    no page is touched, so this does not wait for requests in flight)."""
    try:
        pyfuse3.invalidate_inode(inode, attr_only=True)
    except OSError as exc:  # ENOENT: the kernel holds no such inode, nothing to drop
        if exc.errno != errno.ENOENT:
            log.warning("invalidating the attributes of inode %d: %s", inode, exc)


def _setattr_request(attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields) -> SetAttr:
    return SetAttr(size=attr.st_size if fields.update_size else None,
                   mode=attr.st_mode if fields.update_mode else None,
                   uid=attr.st_uid if fields.update_uid else None,
                   gid=attr.st_gid if fields.update_gid else None,
                   atime_ns=attr.st_atime_ns if fields.update_atime else None,
                   mtime_ns=attr.st_mtime_ns if fields.update_mtime else None)


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers for one :class:`Union`."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    # POSIX ACLs enforced by the kernel, as on overlayfs over an fs with
    # them (without it an ACL's deny was ignored): it asks for the
    # system.posix_acl_* xattrs and leaves the umask at create to us.
    enable_acl = True

    def __init__(self, union: Union) -> None:
        super().__init__()
        self.u = union
        union.push = _store_in_page_cache
        union.attrs_changed = _forget_attrs
        union.reply_of = self._reply
        # requests served, by handler (the daemon logs them on SIGUSR1;
        # benchmarks/bench_fs.py reports them per operation)
        self.requests: collections.Counter[str] = collections.Counter()
        # Replies for lower-only attrs (the union caches those records per
        # slot and they never change): made once, as the union did before it
        # spoke its own records. Keyed by the record's id, which stays its
        # own while the entry holds the record; the identity check makes a
        # hit exact. Bounded by the lower inodes (plus those a copy-up
        # replaced). Hashing the record's value instead costs more than a
        # reply's construction saves.
        self._lower_replies: dict[int, tuple[Attr, pyfuse3.EntryAttributes]] = {}

    def counts(self) -> dict[str, int]:
        """Requests served so far, by handler; READs and WRITEs the C
        module answered without a handler (``fs.lowlevel``) as
        ``read (C)`` and ``write (C)``."""
        reads, writes = lowlevel.answered()
        c_side = {"read (C)": reads, "write (C)": writes}
        return {**self.requests, **{k: n for k, n in c_side.items() if n}}

    def _reply(self, a: Attr) -> pyfuse3.EntryAttributes:
        if not a.lower:
            return _build(a)
        hit = self._lower_replies.get(id(a))
        if hit is not None and hit[0] is a:
            return hit[1]
        e = _build(a)
        self._lower_replies[id(a)] = (a, e)
        return e

    # -- lookups and attributes -----------------------------------------
    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        a = self.u.lookup(parent_inode, name)
        return _NEGATIVE if a is None else self._reply(a)

    async def forget(self, inode_list):
        self.requests["forget"] += 1
        try:
            for ino, n in inode_list:
                self.u.forget(ino, n)
        except Exception:  # forget must never raise
            log.exception("forget")

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        return self._reply(self.u.attr(inode))

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        return self._reply(await self.u.setattr(inode, _setattr_request(attr, fields), fh))

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
        opened = await self.u.open(inode, flags)
        return pyfuse3.FileInfo(fh=opened.fh, keep_cache=opened.keep_cache)

    @fuse_errors
    async def read(self, fh, off, size):
        return await self.u.read(fh, off, size)

    @fuse_errors
    async def write(self, fh, off, buf):
        return await self.u.write(fh, off, buf)

    async def flush(self, fh):
        self.requests["flush"] += 1
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
        fh, attr = await self.u.create_file(parent_inode, name, mode, flags, ctx.uid, ctx.gid, ctx.umask)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._reply(attr)

    # -- directories ------------------------------------------------------
    @fuse_errors
    async def opendir(self, inode, ctx):
        return self.u.opendir(inode)

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        self.u.readdir(fh, start_id, functools.partial(pyfuse3.readdir_reply, token))

    @fuse_errors
    async def releasedir(self, fh):
        self.u.releasedir(fh)

    @fuse_errors
    async def fsyncdir(self, fh, datasync):
        pass

    # -- namespace ------------------------------------------------------
    @fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._reply(await self.u.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid, ctx.umask))

    @fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._reply(await self.u.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid, ctx.umask))

    @fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        return self._reply(await self.u.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._reply(await self.u.link(inode, new_parent_inode, new_name))

    @fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        await self.u.unlink(parent_inode, name, want_dir=False)

    @fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        await self.u.unlink(parent_inode, name, want_dir=True)

    @fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.u.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)
