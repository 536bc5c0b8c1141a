"""Directory listings the kernel caches: OPENDIR answered "not supported".

The kernel keeps a FUSE directory's listing in its page cache only when
OPENDIR answers with FOPEN_CACHE_DIR, which pyfuse3 cannot set. A
filesystem whose OPENDIR fails with ENOSYS gets the same cache, and no
OPENDIR or RELEASEDIR again (Linux 5.1+): a cold ``find`` of an image
then costs half the requests, and a warm one none but a GETATTR per
directory (the kernel's check of a listing's mtime, on a writable
mount). The READDIRs that remain carry no file handle, so the C module
``_dircache`` hands pyfuse3 the directory's inode in its place (how, and
why it must be loaded before pyfuse3, is in ``_dircache.c``);
``Union.readdir`` works from any offset of any reader, with no state per
open directory.

Without the module (not built, or pyfuse3 already imported) the daemon
answers OPENDIR itself, with the inode as handle, as before.
``LAYERFS_DIR_CACHE=off`` does that on purpose: a developer's A/B.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

_module: ModuleType | None = None


def load() -> None:
    """Load ``_dircache`` so that pyfuse3, imported next, binds to it.
    A no-op once pyfuse3 is in, or when the module is missing."""
    global _module
    if _module is not None or "pyfuse3" in sys.modules:
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_GLOBAL)
    try:
        from layerfs.fs import _dircache
    except ImportError:
        return
    finally:
        sys.setdlopenflags(flags)
    _module = _dircache


def prepare() -> None:
    """Before ``pyfuse3.init``: whether this session is to be hooked."""
    if _module is not None:
        _module.set_enabled(os.environ.get("LAYERFS_DIR_CACHE") != "off")


def kernel_caches_listings() -> bool:
    """After ``pyfuse3.init``: whether the session was made with the
    handlers swapped (the kernel will cache this mount's listings)."""
    return _module is not None and _module.hooked()
