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
from layerfs.store.objects import CHUNK, HOLE, ObjectStore, copy_sparse

OPAQUE = b"trusted.overlay.opaque"
PRIVATE_PREFIX = b"trusted.overlay."
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
_ZERO = bytes(HOLE)
PARALLEL_HASH = 4 << 20   # copy-ups of unverified objects above this hash in a second thread

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def renameat2(src: bytes, dst: bytes, flags: int = 0) -> None:
    if _libc.renameat2(AT_FDCWD, src, AT_FDCWD, dst, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)


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
        self._serial = itertools.count()
        if not read_only:
            os.makedirs(work, exist_ok=True)
            for name in os.listdir(self.work):  # debris of a crash mid copy-up
                _remove_tree(os.path.join(self.work, name))

    def abspath(self, rel: bytes) -> bytes:
        return self.root + b"/" + rel if rel else self.root

    def temp(self) -> bytes:
        return b"%s/#%d.%d" % (self.work, os.getpid(), next(self._serial))

    # -- listing --------------------------------------------------------------
    def scan(self, rel: bytes) -> list[tuple[bytes, os.stat_result]]:
        out = []
        with os.scandir(self.abspath(rel)) as it:
            for d in it:
                out.append((d.name, d.stat(follow_symlinks=False)))
        return out

    def is_opaque(self, rel: bytes) -> bool:
        try:
            return os.getxattr(self.abspath(rel), OPAQUE, follow_symlinks=False) == b"y"
        except OSError:
            return False

    def set_opaque(self, rel: bytes) -> None:
        os.setxattr(self.abspath(rel), OPAQUE, b"y", follow_symlinks=False)

    # -- whiteouts ------------------------------------------------------------
    def whiteout(self, rel: bytes, replace: bool) -> None:
        """Put a whiteout at *rel*; atomically over what is there if *replace*."""
        if not replace:
            os.mknod(self.abspath(rel), stat.S_IFCHR, 0)
            return
        tmp = self.temp()
        os.mknod(tmp, stat.S_IFCHR, 0)
        try:
            os.rename(tmp, self.abspath(rel))
        except IsADirectoryError:
            # A directory (holding only whiteouts) is in the way: swap
            # it out and drop it.
            renameat2(tmp, self.abspath(rel), RENAME_EXCHANGE)
            _remove_tree(tmp)
        except BaseException:
            _unlink_quiet(tmp)
            raise

    def clear_whiteouts(self, rel: bytes) -> None:
        """Remove the whiteouts of an upper dir that is merged-empty."""
        path = self.abspath(rel)
        with os.scandir(path) as it:
            for d in it:
                st = d.stat(follow_symlinks=False)
                if is_whiteout(st):
                    os.unlink(d.path)
                else:  # the caller checked the dir is empty in the merged view
                    raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), d.path)

    def put_over_whiteout(self, tmp: bytes, rel: bytes, is_dir: bool) -> None:
        """Move the new node *tmp* to *rel*, replacing the whiteout there."""
        dst = self.abspath(rel)
        if is_dir:
            renameat2(tmp, dst, RENAME_EXCHANGE)
            os.unlink(tmp)
        else:
            os.rename(tmp, dst)

    # -- metadata -------------------------------------------------------------
    @staticmethod
    def set_meta(path: bytes, fmt: int, mode: int, uid: int, gid: int, mtime_ns: int,
                 xattrs: tuple, atime_ns: int | None = None) -> None:
        """Owner first (chown clears setuid and security.capability), then
        xattrs, mode, times, as the store's extractor does."""
        os.chown(path, uid, gid, follow_symlinks=False)
        for key, value in xattrs:
            os.setxattr(path, key, value, follow_symlinks=False)
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
                    result.append(file_digest(path))
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


HASH_BUF = 8 << 20


def file_digest(path) -> str:
    """blake3 of a file read front to back in big chunks, the next chunk
    already on its way (WILLNEED) while this one is hashed on all cores.

    Not ``update_mmap``: its threads fault the pages of a cold file in
    scattered order, several times slower from disk than one sequential
    stream (a cold 1 GiB first read waited for that)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        h = blake3.blake3()
        buf = bytearray(HASH_BUF)
        view = memoryview(buf)
        off = 0
        while n := os.preadv(fd, [buf], off):
            off += n
            os.posix_fadvise(fd, off, HASH_BUF, os.POSIX_FADV_WILLNEED)
            h.update(view[:n])
        return h.hexdigest()
    finally:
        os.close(fd)


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
