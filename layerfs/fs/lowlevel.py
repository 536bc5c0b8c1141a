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
  zeroing ranges). The module asks :func:`set_fallocate`'s callable for the
  upper file's descriptor and calls fallocate(2) on it.

How, and why the module must be loaded before pyfuse3, is in
``_lowlevel.c``. Without it (not built, or pyfuse3 already imported) the
daemon answers OPENDIR itself, with the inode as handle, and FALLOCATE is
unsupported. ``LAYERFS_DIR_CACHE=off`` leaves the listing handlers alone
on purpose: a developer's A/B.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import ModuleType

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


def prepare(fallocate_fd: Callable[[int], int]) -> None:
    """Before ``pyfuse3.init``: whether this session's listings are to be
    cached, and the callable FALLOCATE asks for a file handle's upper
    file descriptor (or -errno)."""
    if _module is not None:
        _module.set_cache_listings(os.environ.get("LAYERFS_DIR_CACHE") != "off")
        _module.set_fallocate(fallocate_fd)


def kernel_caches_listings() -> bool:
    """After ``pyfuse3.init``: whether the session was made with the
    listing handlers swapped (the kernel will cache this mount's listings)."""
    return _module is not None and _module.hooked()[0]


def answers_fallocate() -> bool:
    """After ``pyfuse3.init``: whether FALLOCATE reaches the upper files."""
    return _module is not None and _module.hooked()[1]
