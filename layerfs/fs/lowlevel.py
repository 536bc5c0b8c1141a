"""What pyfuse3 cannot do, done by the C module ``_lowlevel`` at libfuse's level.

* **Directory listings the kernel caches.** The kernel keeps a FUSE
  directory's listing in its page cache only when OPENDIR answers with
  FOPEN_CACHE_DIR, which pyfuse3 cannot set. A filesystem whose OPENDIR
  fails with ENOSYS gets the same cache, and no OPENDIR or RELEASEDIR
  again (Linux 5.1+): a cold ``find`` of an image then costs half the
  requests, and a warm one none but a GETATTR per directory (the kernel's
  check of a listing's mtime, on a writable mount). The READDIRs that
  remain carry no file handle, so the module hands pyfuse3 the
  directory's inode in its place; ``Union.readdir`` works from any offset
  of any reader, with no state per open directory.
* **FALLOCATE**, which pyfuse3 has no handler for: every caller would get
  EOPNOTSUPP, where overlayfs passes the call to the upper file (``fallocate
  -l``, ``posix_fallocate`` without glibc's slow fallback, punching holes,
  zeroing ranges). The module calls fallocate(2) on the upper file's
  descriptor, which the handle's ``served`` tuple names.
* **FUSE_DONT_MASK** asked for at INIT: the umask is left to the daemon,
  which applies it only where the parent has no default ACL (POSIX, as
  overlayfs; the mount enforces ACLs, ``ops.Operations.enable_acl``).
* **LSEEK** with SEEK_DATA and SEEK_HOLE, which pyfuse3 cannot answer
  either: the kernel would take every file for all data, where overlayfs
  shows the holes of the file below it (``cp --sparse``, ``tar -S``).

* **READ and WRITE without Python** for a handle whose data needs no more
  checking (``files.Handle.served``: an upper file, a small object loaded
  and verified, a big object verified whole, or the chunks that matched
  for a random reader), and for the READs and WRITEs that follow one
  (the module receives them itself, without a return to pyfuse3's loop).
  fio's 16,384 READs of a checked object cost the daemon ~75 us of CPU
  each through pyfuse3, ~30 us here. Whatever the module cannot answer
  at once (a page not cached, a node copied up since the open) goes to
  pyfuse3's handler as before.

How, and why the module must be loaded before pyfuse3, is in
``_lowlevel.c``. Without it (not built, or pyfuse3 already imported) the
daemon answers OPENDIR itself, with the inode as handle, FALLOCATE is
unsupported, files have no holes and pyfuse3 answers every READ and
WRITE. ``LAYERFS_DIR_CACHE=off`` leaves the listing handlers alone on
purpose, ``LAYERFS_C_IO=off`` the READ and WRITE ones: developers' A/Bs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

_module: ModuleType | None = None


def load() -> None:
    """Load ``_lowlevel`` so that pyfuse3, imported next, binds to it.
    A no-op once pyfuse3 is in, or when the module is missing."""
    global _module
    if _module is not None or "pyfuse3" in sys.modules:
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        from layerfs.fs import _lowlevel
    except ImportError:
        return
    finally:
        sys.setdlopenflags(flags)
    _module = _lowlevel


def prepare(lseek: Callable[[int, int, int], int], handles: dict[int, Any]) -> None:
    """Before ``pyfuse3.init``: whether this session's listings are to be
    cached and its READs and WRITEs answered in C, the callable LSEEK asks
    for the answer to (fh, offset, whence) (or -errno), and the daemon's
    handles by fh, whose ``served`` tuples FALLOCATE, READ and WRITE
    follow (``files.Handle``)."""
    if _module is not None:
        _module.set_cache_listings(os.environ.get("LAYERFS_DIR_CACHE") != "off")
        _module.set_file_ops(lseek, handles, os.environ.get("LAYERFS_C_IO") != "off")


def kernel_caches_listings() -> bool:
    """After ``pyfuse3.init``: whether the session was made with the
    listing handlers swapped (the kernel will cache this mount's listings)."""
    return _module is not None and _module.hooked()[0]


def answers_file_ops() -> bool:
    """After ``pyfuse3.init``: whether FALLOCATE and LSEEK are answered."""
    return _module is not None and _module.hooked()[1]


def answers_io() -> bool:
    """After ``pyfuse3.init``: whether READ and WRITE are answered in C
    where a handle allows."""
    return _module is not None and _module.hooked()[2]


def answered() -> tuple[int, int]:
    """(READs, WRITEs) the module has answered in this process."""
    return _module.answered() if _module is not None else (0, 0)
