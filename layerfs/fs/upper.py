"""The copy-on-write upper directory, kept in the kernel overlayfs format.

Everything the mount writes lands here, in exactly the layout ``mount -t
overlay`` uses for its ``upperdir``:

* a deleted lower name is a whiteout: a character device 0/0;
* a directory that must hide everything below it (created over a
  whiteout, or moved to a place where the lower layers have that name)
  carries ``trusted.overlay.opaque=y``;
* a copied-up node has the lower node's content, mode, owner, times and
  xattrs; a hardlink group is copied up as a group (all links at once).

So the store can turn the directory into a layer
(``transfer.import_layer(..., as_layer=True)``) and the kernel can mount
it. Redirects (``trusted.overlay.redirect``) are never written: a
directory that moves is copied up whole instead.

New nodes and copy-ups are built in the *work* directory (same
filesystem, created beside the upper) and renamed into place, so a crash
never leaves a half-copied file under a real name. All functions here are
synchronous syscalls on bytes paths; callers decide what runs in a thread.

Paths in the upper are relative to its root and reached from a directory
fd of the root (``openat``, ``mkdirat``, ``renameat2`` ... via ``dir_fd=``),
never as absolute paths: the upper root's own path then costs nothing, and
a path longer than PATH_MAX (a deep tree, built by a user with short
relative paths) is reached by opening its parent a PATH_MAX-sized piece at
a time -- the only case that costs extra syscalls. Syscalls without an
``*at`` form (xattrs, truncate) take ``/proc/self/fd/N/name`` then.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import stat
import threading

import blake3
import zstandard

from layerfs.errors import Corrupt
from layerfs.fs import verify
from layerfs.store.objects import CHUNK, HOLE, ObjectStore, copy_sparse
from layerfs.store.overlay_xattrs import ESCAPED_XATTR_PREFIX, OPAQUE_XATTR, OVERLAY_XATTR_PREFIX

OPAQUE = OPAQUE_XATTR.encode()
DEFAULT_ACL = b"system.posix_acl_default"
PRIVATE_PREFIX = OVERLAY_XATTR_PREFIX.encode()
ESCAPED_PREFIX = ESCAPED_XATTR_PREFIX.encode()


# The bytes forms of store.scan's escape_overlay_xattr / shown_overlay_xattr:
# FUSE hands names over as bytes, on the xattr requests' path.
def escape_xattr(name: bytes) -> bytes:
    """The name a node's own ``trusted.overlay.X`` has in the upper dir:
    ``trusted.overlay.overlay.X``, as overlayfs (6.7+) stores it, so image
    content and users' xattrs never act as overlay markers."""
    return ESCAPED_PREFIX + name[len(PRIVATE_PREFIX):] if name.startswith(PRIVATE_PREFIX) else name


def shown_xattr(name: bytes) -> bytes | None:
    """The name a reader sees for an upper dir xattr; None for overlay's own."""
    if name.startswith(ESCAPED_PREFIX):
        return PRIVATE_PREFIX + name[len(ESCAPED_PREFIX):]
    return None if name.startswith(PRIVATE_PREFIX) else name
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
PATH_MAX = 4096           # bytes of a path argument, the terminating NUL included
NAME_MAX = 255            # bytes of a name: what ext4, xfs, btrfs and tmpfs allow, so overlayfs too
_ZERO = bytes(HOLE)
PARALLEL_HASH = 4 << 20   # copy-ups of unverified objects above this hash in a second thread

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def renameat2(src: bytes, dst: bytes, flags: int = 0, src_dir_fd: int | None = None,
              dst_dir_fd: int | None = None) -> None:
    sfd = AT_FDCWD if src_dir_fd is None else src_dir_fd
    dfd = AT_FDCWD if dst_dir_fd is None else dst_dir_fd
    if _libc.renameat2(sfd, src, dfd, dst, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)


_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]


def fs_magic(fd: int) -> int:
    """``f_type`` of the filesystem holding *fd* (0 if fstatfs fails)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs: 120 bytes; f_type first
    if _libc.fstatfs(fd, buf) != 0:
        return 0
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def work_dir_for(upper: str) -> str:
    """The work directory that goes with *upper*: ``<upper>.work`` beside it."""
    return os.path.abspath(upper).rstrip("/") + ".work"


class UpperDir:
    """Syscalls on one upper dir; paths are bytes relative to its root."""

    def __init__(self, root: str, work: str, objects: ObjectStore, read_only: bool = False) -> None:
        self.root = os.fsencode(os.path.abspath(root))
        self.work = os.fsencode(os.path.abspath(work))
        self.objects = objects
        self.fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._serial = itertools.count()
        if not read_only:
            os.makedirs(work, exist_ok=True)
            for name in os.listdir(self.work):  # debris of a crash mid copy-up
                _remove_tree(os.path.join(self.work, name))

    def abspath(self, rel: bytes) -> bytes:
        return self.root + b"/" + rel if rel else self.root

    def temp(self) -> bytes:
        return b"%s/#%d.%d" % (self.work, os.getpid(), next(self._serial))

    def default_acl(self, rel: bytes) -> bytes | None:
        """The default POSIX ACL of the upper dir *rel*, None if it has none."""
        try:
            return self.getxattr(rel, DEFAULT_ACL)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
                return None
            raise

    def acl_holder(self, default_acl: bytes | None) -> bytes | None:
        """A new dir in the work dir with *default_acl* (None: no dir is
        needed), where a node made inherits what it would in place."""
        if default_acl is None:
            return None
        holder = self.temp()
        os.mkdir(holder, 0o700)
        try:
            os.setxattr(holder, DEFAULT_ACL, default_acl)
        except BaseException:
            os.rmdir(holder)
            raise
        return holder

    # -- reaching a relative path -----------------------------------------------
    def at(self, fn, rel: bytes, *args, **kwargs):
        """``fn(name, *args, dir_fd=fd, **kwargs)`` with a dir fd and name
        that reach *rel*: the root fd and *rel* itself unless it is too
        long for one syscall."""
        if len(rel) < PATH_MAX:
            return fn(rel or b".", *args, dir_fd=self.fd, **kwargs)
        fd, name = self._open_parent(rel)
        try:
            return fn(name, *args, dir_fd=fd, **kwargs)
        finally:
            os.close(fd)

    def at2(self, fn, src: bytes, dst: bytes, *args, **kwargs):
        """``fn(src, dst, *args, src_dir_fd=, dst_dir_fd=, **kwargs)``, both
        relative to the upper root (rename, link)."""
        if len(src) < PATH_MAX and len(dst) < PATH_MAX:
            return fn(src, dst, *args, src_dir_fd=self.fd, dst_dir_fd=self.fd, **kwargs)
        sfd, sname = self._open_parent(src) if len(src) >= PATH_MAX else (self.fd, src)
        try:
            dfd, dname = self._open_parent(dst) if len(dst) >= PATH_MAX else (self.fd, dst)
            try:
                return fn(sname, dname, *args, src_dir_fd=sfd, dst_dir_fd=dfd, **kwargs)
            finally:
                if dfd != self.fd:
                    os.close(dfd)
        finally:
            if sfd != self.fd:
                os.close(sfd)

    def by_path(self, fn, rel: bytes, *args, **kwargs):
        """``fn(path, ...)`` for syscalls without an ``*at`` form."""
        if len(self.root) + 1 + len(rel) < PATH_MAX:
            return fn(self.abspath(rel), *args, **kwargs)
        fd, name = self._open_parent(rel)
        try:
            return fn(b"/proc/self/fd/%d/%s" % (fd, name), *args, **kwargs)
        finally:
            os.close(fd)

    def _open_parent(self, rel: bytes) -> tuple[int, bytes]:
        """An O_PATH fd of the parent dir of *rel* (the caller closes it),
        opened in pieces shorter than PATH_MAX, and the last name."""
        head, _, name = rel.rpartition(b"/")
        fd = self.fd
        try:
            while head:
                if len(head) < PATH_MAX:
                    piece, head = head, b""
                else:
                    cut = head.rindex(b"/", 0, PATH_MAX)
                    piece, head = head[:cut], head[cut + 1:]
                nfd = os.open(piece, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
                if fd != self.fd:
                    os.close(fd)
                fd = nfd
        except BaseException:
            if fd != self.fd:
                os.close(fd)
            raise
        if fd == self.fd:
            fd = os.dup(fd)
        return fd, name

    # -- single syscalls, relative to the root ------------------------------------
    def lstat(self, rel: bytes) -> os.stat_result:
        return self.at(os.stat, rel, follow_symlinks=False)

    def open(self, rel: bytes, flags: int, mode: int = 0o777) -> int:
        return self.at(os.open, rel, flags | os.O_CLOEXEC, mode)

    def mkdir(self, rel: bytes, mode: int) -> None:
        self.at(os.mkdir, rel, mode)

    def mknod(self, rel: bytes, mode: int, rdev: int = 0) -> None:
        self.at(os.mknod, rel, mode, rdev)

    def symlink(self, target: bytes, rel: bytes) -> None:
        self.at(lambda name, dir_fd: os.symlink(target, name, dir_fd=dir_fd), rel)

    def readlink(self, rel: bytes) -> bytes:
        return self.at(os.readlink, rel)

    def chown(self, rel: bytes, uid: int, gid: int) -> None:
        self.at(os.chown, rel, uid, gid, follow_symlinks=False)

    def chmod(self, rel: bytes, mode: int) -> None:
        self.at(os.chmod, rel, mode)

    def utime(self, rel: bytes, ns: tuple[int, int]) -> None:
        self.at(os.utime, rel, ns=ns, follow_symlinks=False)

    def unlink(self, rel: bytes) -> None:
        self.at(os.unlink, rel)

    def rmdir(self, rel: bytes) -> None:
        self.at(os.rmdir, rel)

    def link(self, src: bytes, dst: bytes) -> None:
        self.at2(os.link, src, dst, follow_symlinks=False)

    def rename(self, src: bytes, dst: bytes, flags: int = 0) -> None:
        if flags:
            self.at2(renameat2, src, dst, flags)
        else:
            self.at2(os.rename, src, dst)

    def place(self, tmp: bytes, rel: bytes, flags: int = 0) -> None:
        """Move *tmp* (an absolute path in the work dir) to *rel*."""
        self.at(lambda name, dir_fd: renameat2(tmp, name, flags, dst_dir_fd=dir_fd), rel)

    def truncate(self, rel: bytes, size: int) -> None:
        self.by_path(os.truncate, rel, size)

    def getxattr(self, rel: bytes, name: bytes) -> bytes:
        return self.by_path(os.getxattr, rel, name, follow_symlinks=False)

    def setxattr(self, rel: bytes, name: bytes, value: bytes) -> None:
        self.by_path(os.setxattr, rel, name, value, follow_symlinks=False)

    def removexattr(self, rel: bytes, name: bytes) -> None:
        self.by_path(os.removexattr, rel, name, follow_symlinks=False)

    def listxattr(self, rel: bytes) -> list[str]:
        return self.by_path(os.listxattr, rel, follow_symlinks=False)

    def remove_quiet(self, rel: bytes) -> None:
        try:
            if stat.S_ISDIR(self.lstat(rel).st_mode):
                self.rmdir(rel)
            else:
                self.unlink(rel)
        except OSError:
            pass

    # -- listing --------------------------------------------------------------
    def scan(self, rel: bytes) -> list[tuple[bytes, os.stat_result]]:
        path = self.abspath(rel)
        if len(path) + NAME_MAX < PATH_MAX:  # each entry's stat takes its full path
            with os.scandir(path) as it:
                return [(d.name, d.stat(follow_symlinks=False)) for d in it]
        fd = self.open(rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            with os.scandir(fd) as it:
                return [(os.fsencode(d.name), d.stat(follow_symlinks=False)) for d in it]
        finally:
            os.close(fd)

    def is_opaque(self, rel: bytes) -> bool:
        try:
            return self.getxattr(rel, OPAQUE) == b"y"
        except OSError:
            return False

    def set_opaque(self, rel: bytes) -> None:
        self.setxattr(rel, OPAQUE, b"y")

    # -- whiteouts ------------------------------------------------------------
    def whiteout(self, rel: bytes, replace: bool) -> None:
        """Put a whiteout at *rel*; atomically over what is there if *replace*."""
        if not replace:
            self.mknod(rel, stat.S_IFCHR, 0)
            return
        tmp = self.temp()
        os.mknod(tmp, stat.S_IFCHR, 0)
        try:
            self.place(tmp, rel)
        except IsADirectoryError:
            # A directory (holding only whiteouts) is in the way: swap
            # it out and drop it.
            self.place(tmp, rel, RENAME_EXCHANGE)
            _remove_tree(tmp)
        except BaseException:
            _unlink_quiet(tmp)
            raise

    def clear_whiteouts(self, rel: bytes) -> None:
        """Remove the whiteouts of an upper dir that is merged-empty."""
        for name, st in self.scan(rel):
            if not is_whiteout(st):  # the caller checked the dir is empty in the merged view
                raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), name)
            self.unlink(rel + b"/" + name if rel else name)

    def put_over_whiteout(self, tmp: bytes, rel: bytes, is_dir: bool) -> None:
        """Move the new node *tmp* to *rel*, replacing the whiteout there."""
        if is_dir:
            self.place(tmp, rel, RENAME_EXCHANGE)
            os.unlink(tmp)
        else:
            self.place(tmp, rel)

    # -- metadata -------------------------------------------------------------
    @staticmethod
    def set_meta(path: bytes, fmt: int, mode: int, uid: int, gid: int, mtime_ns: int,
                 xattrs: tuple, atime_ns: int | None = None) -> None:
        """Owner first (chown clears setuid and security.capability), then
        xattrs, mode, times, as the store's extractor does."""
        os.chown(path, uid, gid, follow_symlinks=False)
        for key, value in xattrs:
            os.setxattr(path, escape_xattr(key), value, follow_symlinks=False)
        if fmt != stat.S_IFLNK:
            os.chmod(path, mode)
        at = mtime_ns if atime_ns is None else atime_ns
        os.utime(path, ns=(at, mtime_ns), follow_symlinks=False)

    # -- copy-up ----------------------------------------------------------
    def build_copy(self, meta: tuple, with_data: bool, verified: set[str]) -> bytes:
        """Make a copy of a lower node (index meta tuple) in the work dir;
        returns its temp path. Runs in a worker thread for big files."""
        st_mode, uid, gid, mtime_ns, size, digest, target, rdev, xattrs = meta
        fmt = stat.S_IFMT(st_mode)
        tmp = self.temp()
        try:
            if fmt == stat.S_IFREG:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                try:
                    if with_data and size:
                        self._copy_object(digest, fd, verified)
                        os.ftruncate(fd, size)
                finally:
                    os.close(fd)
            elif fmt == stat.S_IFDIR:
                os.mkdir(tmp, 0o700)
            elif fmt == stat.S_IFLNK:
                os.symlink(target, tmp)
            else:
                os.mknod(tmp, fmt | 0o600, rdev)
            self.set_meta(tmp, fmt, stat.S_IMODE(st_mode), uid, gid, mtime_ns,
                          tuple((os.fsencode(k), v) for k, v in xattrs))
        except BaseException:
            _remove_tree(tmp)
            raise
        return tmp

    def _copy_object(self, digest: str, fd: int, verified: set[str]) -> None:
        path, compressed = self.objects.locate(digest)
        if compressed:
            with open(path, "rb") as f:
                data = zstandard.ZstdDecompressor().decompress(f.read())
            if digest not in verified:
                if blake3.blake3(data).hexdigest() != digest:
                    raise Corrupt(f"object {digest[:12]} fails its digest check")
                verified.add(digest)
            _write_sparse_at(fd, data, 0)
            return
        with open(path, "rb", buffering=0) as f:
            if digest in verified:
                copy_sparse(f.fileno(), fd)
                return
            if os.fstat(f.fileno()).st_size <= PARALLEL_HASH:
                # Not verified yet, small: hash while copying, one pass.
                h = blake3.blake3()
                off = 0
                while chunk := os.pread(f.fileno(), CHUNK * 4, off):
                    h.update(chunk)
                    _write_sparse_at(fd, chunk, off)
                    off += len(chunk)
                if h.hexdigest() != digest:
                    raise Corrupt(f"object {digest[:12]} fails its digest check")
                verified.add(digest)
                return
            # Not verified yet, big: hash in a helper thread while the kernel
            # copies the data extents (copy_file_range, no bytes through
            # Python); both read the object once from the page cache, and
            # both release the GIL. The copy is only a temp file in the work
            # dir: the caller renames it into the upper only if this returns.
            result: list = []

            def hash_it() -> None:
                try:
                    result.append(verify.fd_digest(f.fileno()))
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    result.append(exc)

            hasher = threading.Thread(target=hash_it, name="copy-up-hash", daemon=True)
            hasher.start()
            try:
                copy_sparse(f.fileno(), fd)
            finally:
                hasher.join()
            got = result[0] if result else None
            if isinstance(got, (OSError, ValueError)):
                raise Corrupt(f"object {digest[:12]} cannot be hashed: {got}") from got
            if isinstance(got, BaseException):
                raise got
            if got != digest:
                raise Corrupt(f"object {digest[:12]} fails its digest check")
            verified.add(digest)


def _write_sparse_at(fd: int, data: bytes, off: int) -> None:
    view = memoryview(data)
    for i in range(0, len(view), HOLE):
        chunk = view[i:i + HOLE]
        if len(chunk) == HOLE and chunk == _ZERO:
            continue
        done = 0
        while done < len(chunk):
            done += os.pwrite(fd, chunk[done:], off + i + done)


def _unlink_quiet(path: bytes) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def discard(path: bytes) -> None:
    """Remove a node of the work dir, quietly: cleanup after a failure."""
    try:
        _remove_tree(path)
    except OSError:
        pass


def _remove_tree(path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        for name in os.listdir(path):
            _remove_tree(os.path.join(path, name))
        os.rmdir(path)
    else:
        os.unlink(path)
