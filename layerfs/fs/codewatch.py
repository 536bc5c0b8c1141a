"""Notice that the code a long-lived process runs has changed on disk.

The warm mount server imports layerfs once and forks workers from that for
minutes: after an upgrade or an edit of the package it would go on
mounting with the old code. :class:`CodeWatch` watches the directories of
the loaded layerfs modules with inotify (no work per request: the server
polls its fd beside the socket) so the server can exit and let the next
mount start one that runs the new code.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys

_libc = ctypes.CDLL(None, use_errno=True)
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
# a file written, replaced (pip renames new files in), created or removed
IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x8, 0x40, 0x80, 0x100, 0x200
CHANGES = IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; the name follows


def module_dirs(prefix: str = "layerfs") -> set[str]:
    """The directories of the loaded modules of package *prefix*."""
    return {os.path.dirname(m.__file__) for name, m in list(sys.modules.items())
            if (name == prefix or name.startswith(prefix + ".")) and getattr(m, "__file__", None)}


class CodeWatch:
    """inotify on *dirs*; :meth:`changed` says whether a ``.py`` file there
    was written, replaced, created or removed since the last call."""

    def __init__(self, dirs: set[str]) -> None:
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for d in sorted(dirs):
            if _libc.inotify_add_watch(self.fd, os.fsencode(d), CHANGES) < 0:
                err = ctypes.get_errno()
                os.close(self.fd)
                raise OSError(err, os.strerror(err), d)

    def changed(self) -> bool:
        found = False
        while True:
            try:
                buf = os.read(self.fd, 64 << 10)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return found
                raise
            off = 0
            while off < len(buf):
                _wd, _mask, _cookie, n = _EVENT.unpack_from(buf, off)
                name = buf[off + _EVENT.size:off + _EVENT.size + n].rstrip(b"\0")
                found |= name.endswith(b".py")
                off += _EVENT.size + n

    def close(self) -> None:
        os.close(self.fd)
