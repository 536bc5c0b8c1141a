"""Read-ahead across files: load the small files that follow a read.

A layer's files are objects named by their digest, so files that sit side
by side in the image lie scattered over the store's disk, and a program
that reads a tree file by file (tar, cp -r, a compiler, an interpreter's
imports) waits for one small random read after another, each behind a
thread hop. Kernel read-ahead works within one file only. This does the
same across files: when lower files are read in the index's order (slots
are the merged paths in bytewise order, which is also the order readdir
gives), background threads read the next small objects (several at once:
the disk serves them in parallel), decompress them and check their
digests. Verified content is then *handed over*: the union gives it to the
kernel's page cache for the file's inode (``notify_store``, from the
reading thread, so this work runs beside the request loop), and the
file's reads never reach the daemon. Content that cannot be handed over
yet (no mount, or the kernel does not know the inode) is kept, bounded by
:data:`BUDGET` bytes, until an open takes it.

Content is only handed out once its digest matched, so what the kernel
gets from here is as verified as any read; an object that fails the check
is dropped and its own read then reports it (EIO and a log line).

Like the kernel's file read-ahead, a window starts only when reads look
sequential (a cold read within one window after the previous one), and
the next window is asked for when a read or open reaches the middle of
the current one, so a sequential reader does not stall at window edges.
Random access pays one comparison per load.
"""

from __future__ import annotations

import collections
import logging
import stat
import threading
from collections.abc import Callable

from layerfs.errors import LayerfsError
from layerfs.fs.index import LowerIndex
from layerfs.store.objects import ObjectStore, read_first

log = logging.getLogger("layerfs.fs")

WINDOW = 64              # files per read-ahead window
WINDOW_BYTES = 8 << 20   # and at most this many bytes
BUDGET = 32 << 20        # bytes of content kept, loaded but not yet read
MAX_FILE = 1 << 20       # bigger objects are read (and verified) by the kernel's own read-ahead
WORKERS = 4              # reading threads: the disk serves several small reads at once
IDLE_EXIT = 5.0          # a thread exits after this long without work (restarted on demand)


class Readahead:
    """Loads (and verifies) the small objects that follow a read in slot order."""

    def __init__(self, index: LowerIndex, objects: ObjectStore, verify: Callable[[bytes, str], bool],
                 wanted: Callable[[int], bool], hand_over: Callable[[int, str, bytes], bool]) -> None:
        """*verify(data, digest)* checks content; in a reading thread,
        *wanted(slot)* says whether the file still needs its content (not
        if the kernel has it already), *hand_over(slot, digest, data)*
        gives the content to the kernel, False if it could not (it is then
        kept for an open)."""
        self.index, self.objects, self._verify = index, objects, verify
        self._wanted, self._hand_over = wanted, hand_over
        self._last = -1     # slot of the last load
        self._mark = -1     # a load at or past this slot asks for the next window
        self._until = -1    # slots up to here have been asked for
        self._queue: collections.deque[tuple[int, str]] = collections.deque()  # (slot, digest)
        self._again: collections.deque[tuple[int, str]] = collections.deque()  # hand-overs to retry
        self._ready: dict[str, bytes] = {}
        # slots whose content is kept because the kernel did not know their
        # inode yet (the reader had not listed their directory): the union
        # calls known() when it lists them
        self.waiting: dict[int, str] = {}
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

    def opened(self, slot: int) -> None:
        """A lower file at *slot* was opened: ask for the next window when
        the reader is halfway through this one (its reads may never reach
        the daemon: read-ahead put them in the kernel's page cache)."""
        if self._mark <= slot <= self._until:
            self._request(self._until + 1)

    def loaded(self, slot: int, cold: bool) -> None:
        """A lower file at *slot* was loaded; *cold* if it had to wait for the disk."""
        last, self._last = self._last, slot
        if self._mark <= slot <= self._until:
            self._request(self._until + 1)
        elif cold and 0 <= last < slot <= last + WINDOW:
            self._request(slot + 1)

    def _request(self, start: int) -> None:
        meta, n = self.index.meta, len(self.index.meta)
        todo, total, slot = [], 0, start
        while slot < n and len(todo) < WINDOW and total < WINDOW_BYTES:
            m = meta[slot]
            if stat.S_ISREG(m[0]) and 0 < m[4] <= MAX_FILE and m[5]:
                todo.append((slot, m[5]))
                total += m[4]
            slot += 1
        self._until = slot - 1
        self._mark = start + (slot - start) // 2
        if not todo:
            return
        with self._wake:
            self._evict(BUDGET // 2)
            self._queue.extend(todo)
            self._start_threads()

    def _evict(self, keep: int) -> None:
        """Drop the oldest unread content until at most *keep* bytes are held
        (a reader that moved on never takes it)."""
        while self._held > keep and self._ready:
            data = self._ready.pop(next(iter(self._ready)), None)
            if data is not None:
                self._held -= len(data)
        for slot, digest in list(self.waiting.items()):  # (one C call: no other thread runs meanwhile)
            if digest not in self._ready:
                self.waiting.pop(slot, None)

    def known(self, slot: int) -> None:
        """The kernel now knows the inode of *slot* (its entry was listed):
        hand over content that was kept because it did not know it yet."""
        digest = self.waiting.pop(slot, None)
        if digest is not None:
            with self._wake:
                self._again.append((slot, digest))
                self._start_threads()

    def _start_threads(self) -> None:
        while self._threads < WORKERS:
            threading.Thread(target=self._run, name="layerfs-readahead", daemon=True).start()
            self._threads += 1
        self._wake.notify_all()

    def _next(self) -> tuple[int, str] | None:
        """The next (slot, digest) to work on, None when idle for long:
        hand-overs of kept content first, loads while within the budget."""
        with self._wake:
            while True:
                if self._again:
                    return self._again.popleft()
                if self._queue and self._held < BUDGET:
                    return self._queue.popleft()
                if not self._wake.wait(IDLE_EXIT):
                    if not self._again and not self._queue:
                        self._threads -= 1
                        return None
                    self._evict(BUDGET // 2)  # over budget and nobody took anything for a while

    def _run(self) -> None:
        while (item := self._next()) is not None:
            slot, digest = item
            if not self._wanted(slot):
                continue
            data = self._ready.get(digest)
            if data is not None:  # loaded for another slot, or kept: try the hand-over again
                if self._hand_over(slot, digest, data):
                    self._drop(digest)
                else:
                    with self._wake:
                        self.waiting[slot] = digest
                continue
            data = self._load(digest)
            if data is None or self._hand_over(slot, digest, data):
                continue
            with self._wake:
                if digest not in self._ready:  # (two windows may list one digest)
                    self._ready[digest] = data
                    self._held += len(data)
                self.waiting[slot] = digest

    def _drop(self, digest: str) -> None:
        with self._wake:
            data = self._ready.pop(digest, None)
            if data is not None:
                self._held -= len(data)
                self._wake.notify()

    def _load(self, digest: str) -> bytes | None:
        try:
            data = read_first(self.objects.files(digest, digest in self.index.packed), digest)
        except (OSError, LayerfsError):  # the file's own read reports it
            return None
        return data if self._verify(data, digest) else None
