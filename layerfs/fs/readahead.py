"""Read-ahead across files: load the small files that follow a read.

A layer's files are objects named by their digest, so files that sit side
by side in the image lie scattered over the store's disk, and a program
that reads a tree file by file (tar, cp -r, a compiler, an interpreter's
imports) waits for one small random read after another, each behind a
thread hop. Kernel read-ahead works within one file only. This does the
same across files: when lower files are read in the index's order (slots
are the merged paths in bytewise order, which is also the order readdir
gives), background threads read the next small objects, decompresses
them and checks their digests, and keeps the content until the file is
read (bounded by :data:`BUDGET` bytes). A read of such a file is then
answered from memory, in the trio thread, with no disk wait.

Content is only kept once its digest matched, so a read served from here
is as verified as any other; an object that fails the check is not kept
and its own read then reports it (EIO and a log line) as usual.

Like the kernel's file read-ahead, a window starts only when reads look
sequential (a cold read within one window after the previous one), and
the next window is asked for when a read reaches the middle of the current
one, so a sequential reader does not stall at window edges. Random access
pays one comparison per load.
"""

from __future__ import annotations

import collections
import logging
import stat
import threading

from layerfs.errors import LayerfsError
from layerfs.fs.index import LowerIndex
from layerfs.store.objects import ObjectStore, read_object_file

log = logging.getLogger("layerfs.fs")

WINDOW = 64              # files per read-ahead window
WINDOW_BYTES = 8 << 20   # and at most this many bytes
BUDGET = 32 << 20        # bytes of content kept, loaded but not yet read
MAX_FILE = 1 << 20       # bigger objects are read (and verified) by the kernel's own read-ahead
WORKERS = 4              # reading threads: the disk serves several small reads at once
IDLE_EXIT = 5.0          # a thread exits after this long without work (restarted on demand)


class Readahead:
    """Loads (and verifies) the small objects that follow a read in slot order."""

    def __init__(self, index: LowerIndex, objects: ObjectStore, verify) -> None:
        self.index, self.objects, self._verify = index, objects, verify
        self._last = -1     # slot of the last load
        self._mark = -1     # a load at or past this slot asks for the next window
        self._until = -1    # slots up to here have been asked for
        self._queue: collections.deque[str] = collections.deque()
        self._ready: dict[str, bytes] = {}
        self._held = 0      # bytes in _ready
        self._wake = threading.Condition()
        self._threads = 0

    def take(self, digest: str) -> bytes | None:
        """The verified content of *digest* if it was read ahead (once)."""
        if digest not in self._ready:  # the common case, without the lock
            return None
        with self._wake:
            data = self._ready.pop(digest, None)
            if data is not None:
                self._held -= len(data)
                self._wake.notify()
        return data

    def loaded(self, slot: int, cold: bool) -> None:
        """A lower file at *slot* was loaded; *cold* if it had to wait for the disk."""
        last, self._last = self._last, slot
        if self._mark <= slot <= self._until:
            self._request(self._until + 1)
        elif cold and 0 <= last < slot <= last + WINDOW:
            self._request(slot + 1)

    def _request(self, start: int) -> None:
        meta, n = self.index.meta, len(self.index.meta)
        digests, total, slot = [], 0, start
        while slot < n and len(digests) < WINDOW and total < WINDOW_BYTES:
            m = meta[slot]
            if stat.S_ISREG(m[0]) and 0 < m[4] <= MAX_FILE and m[5]:
                digests.append(m[5])
                total += m[4]
            slot += 1
        self._until = slot - 1
        self._mark = start + (slot - start) // 2
        if not digests:
            return
        with self._wake:
            self._evict(BUDGET // 2)
            self._queue.extend(digests)
            while self._threads < WORKERS:
                threading.Thread(target=self._run, name="layerfs-readahead", daemon=True).start()
                self._threads += 1
            self._wake.notify_all()

    def _evict(self, keep: int) -> None:
        """Drop the oldest unread content until at most *keep* bytes are held
        (a reader that moved on never takes it)."""
        while self._held > keep and self._ready:
            data = self._ready.pop(next(iter(self._ready)), None)
            if data is not None:
                self._held -= len(data)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue or self._held >= BUDGET:
                    if not self._wake.wait(IDLE_EXIT) and (not self._queue or self._held >= BUDGET):
                        self._threads -= 1
                        return
                digest = self._queue.popleft()
            if digest in self._ready:
                continue
            data = self._load(digest)
            if data is not None:
                with self._wake:
                    if digest not in self._ready:  # (two windows may list one digest)
                        self._ready[digest] = data
                        self._held += len(data)

    def _load(self, digest: str) -> bytes | None:
        raw = self.objects.raw_path(digest)
        order = (True, False) if digest in self.index.packed else (False, True)
        for compressed in order:
            try:
                data = read_object_file(raw + ".zst" if compressed else raw, compressed)
            except FileNotFoundError:
                continue
            except (OSError, LayerfsError):  # the file's own read reports it
                return None
            return data if self._verify(data, digest) else None
        return None
