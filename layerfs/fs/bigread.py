"""Reads of big objects checked a chunk at a time, and the chunks after a
sequential reader's checked ahead of it.

A big object with a chunk-sum table (``store.chunksums``) need not be
hashed whole before its first byte is served: each READ waits only for
the 1 MiB chunks it covers to match their sums. While a file is read from
its start onwards, background threads check the next chunks
(:data:`WINDOW` of them past the last READ), so the reader's next READs
(the kernel's own read-ahead sends them, 1 MiB each) find their chunks
checked: hashing runs beside the reader instead of before it, on a second
core. The threads are handed :data:`BATCH` chunks at a time (woken for
every READ, they cost the daemon 0.66-0.76 s of CPU per GiB read with the
hashing itself taken out, against 0.45-0.52 s in batches and 0.36-0.39 s
for an object already verified), and mark each chunk as they get to it,
so a reader that needs one of them meanwhile checks it itself. The
threads read through a mapping and leave the disk to the kernel's
read-ahead for it (asking for the window with WILLNEED as well made a
cold GiB slower: 0.92-1.02 s against 0.74-0.76 s, two threads hashing
it; so did WILLNEED on each thread's batch, 1.15-1.31 s against
0.96-1.00 s with 8 threads).

The checked chunks are not pushed into the kernel's page cache
(``notify_store``, as ``fs.readahead`` does for small files): the kernel
fills a pushed page by page, which cost more than the READs it saves
(a GiB read front to back, interleaved runs on 2 cores: its object
cached, 0.84-1.24 s pushed against 0.71-0.82 s served by READs; from a
cold disk 1.66-1.83 s against 1.19-1.47 s).

Nothing unchecked is served: a chunk whose sum differs gives EIO (and a
log line) for every read that covers it, checked anew each time. Reads
that jump (a random reader: a database file, fio) have only the chunks
they cover checked, and nothing read ahead: the first of them waits for
one chunk, not for the whole object. A reader that keeps jumping
(:data:`JUMPS` times) has the background threads check all the object's
other chunks, front to back (sequential disk reads, each chunk hashed
once: its own reads wait for a chunk in progress or check it
themselves); a sparse reader never pays for the chunks it does not read.
Once every chunk matched, the object counts as verified.
Objects without a sound table are verified whole as before
(``fs.verify``); after that, a background thread writes one, from a
second read hashed against the name in the same pass, so the next cold
reader of it takes this path.
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import threading

import trio

from layerfs.errors import LayerfsError
from layerfs.fs import verify
from layerfs.store import chunksums
from layerfs.store.chunksums import SUM_CHUNK, chunk_sum
from layerfs.store.objects import ObjectStore

log = logging.getLogger("layerfs.fs")

WINDOW = 64          # chunks checked ahead of a sequential reader (64 MiB: room for every thread's batch)
SEGMENT = 8 << 20    # mapped at once by a read-ahead thread (mapped pages count in the daemon's RSS)
SLACK = 8            # a READ up to this many chunks past the furthest one is still sequential
BACK = 2             # ... or this many before it (READs in flight together are served out of order)
BATCH = 8            # chunks a thread takes at once, and queued at once ahead of a reader
JUMPS = 16           # READs that jump before the threads check the rest of the object (check_all_later)
# Checking threads. They mostly wait for the disk (the sums release the
# GIL), and each keeps one run of faults in flight: 4 read a cold GiB
# faster than 2 (0.89-1.02 s against 1.00-1.06 s, interleaved, WINDOW 64
# against 32); 8 were about as fast as 4 and map twice the RSS.
WORKERS = 4
IDLE_EXIT = 5.0      # a thread exits after this long without work (restarted on demand)
KEPT = 64            # objects whose chunk states are kept (each: one byte per MiB)
UNKNOWN, CHECKING, GOOD = 0, 1, 2   # (GOOD is CHUNK_GOOD in _lowlevel.c, which reads the states too)


class ObjectChunks:
    """What is known of one big object's chunks."""

    __slots__ = ("digest", "path", "size", "nonce", "sums", "state", "good", "furthest", "queued", "streak",
                 "jumps", "all_queued")

    def __init__(self, digest: str, path: str, size: int, table: chunksums.Table) -> None:
        self.digest, self.path, self.size = digest, path, size
        self.nonce, self.sums = table.nonce, table.sums
        self.state = bytearray(len(self.sums))
        self.good = 0        # chunks in state GOOD
        self.jumps = 0       # READs that started a new run
        self.all_queued = False  # every chunk was given to the threads (check_all_later)
        self.furthest = -1   # the furthest chunk the current run of sequential READs asked for
        self.queued = -1     # chunks up to here were given to the threads
        self.streak = 0      # READs in that run

    def note_read(self, off: int, size: int) -> bool:
        """Record a READ of *size* bytes at *off*; True if it is the second
        or later of a sequential run (read ahead of it then). A READ
        continues the run if it starts near the furthest chunk asked for
        (the kernel's read-ahead sends several at once) or up to a few
        chunks past those handed ahead (the reader got those from the
        page cache, without READs); any other starts a new run. Two in a
        row are asked for, so a random reader is not read ahead of by
        chance."""
        first, last = off // SUM_CHUNK, (min(off + size, self.size) - 1) // SUM_CHUNK
        if self.furthest - BACK <= first <= max(self.furthest, self.queued) + SLACK:
            self.streak += 1
            self.furthest = max(self.furthest, last)
        else:
            self.streak, self.furthest, self.queued = 1, last, last
            self.jumps += 1
        return self.streak >= 2

    def all_good(self) -> bool:
        return self.good == len(self.sums)


class ChunkReader:
    """Chunk checks of big objects, and checks ahead of their readers (see
    the module docstring)."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        # developer aid: LAYERFS_BIG_READS=whole verifies every big object
        # whole, as before chunk sums, for A/B runs
        self.whole = os.environ.get("LAYERFS_BIG_READS") == "whole"
        self._objects: collections.OrderedDict[str, ObjectChunks | None] = collections.OrderedDict()
        self._lock = threading.Lock()      # chunk states, and the queue below
        self._wake = threading.Condition(self._lock)     # work queued (for idle threads)
        self._settled = threading.Condition(self._lock)  # a chunk left CHECKING (for waiting READs)
        self._idle = 0                     # threads waiting for work
        self._waiting = 0                  # READs waiting for a chunk in progress
        self._queue: collections.deque[tuple[ObjectChunks, int]] = collections.deque()  # (object, chunk)
        self._threads = 0
        self._tabled: set[str] = set()     # objects this daemon wrote (or tried to write) a table for

    def chunks(self, digest: str, path: str, size: int) -> ObjectChunks | None:
        """The chunk states of a big raw object at *path*; None if it has
        no sound table (it is then verified whole)."""
        with self._lock:
            if digest in self._objects:
                self._objects.move_to_end(digest)
                return self._objects[digest]
        try:
            table = self.objects.chunk_sums(digest, size)
        except (OSError, LayerfsError) as exc:  # an unreadable table or key: verified whole
            log.info("chunk sums of %s not used: %s", digest[:12], exc)
            table = None
        oc = ObjectChunks(digest, path, size, table) if table and table.sums else None
        with self._lock:
            self._objects[digest] = oc
            if len(self._objects) > KEPT:
                self._objects.popitem(last=False)
        return oc

    async def check(self, oc: ObjectChunks, fd: int, off: int, size: int) -> bool:
        """Wait until every chunk the READ of *size* bytes at *off* covers
        has matched its sum (checking those nobody checks yet, in a worker
        thread); False if one did not."""
        last = min(off + size, oc.size) - 1
        for i in range(off // SUM_CHUNK, last // SUM_CHUNK + 1):
            if oc.state[i] == GOOD:  # (the usual case: no lock; GOOD is final)
                continue
            if self._take(oc, i):
                ok = await trio.to_thread.run_sync(self._check_chunk, oc, fd, i, bytearray(SUM_CHUNK))
            else:  # a read-ahead thread checks it right now, or it matched since
                ok = oc.state[i] == GOOD or await trio.to_thread.run_sync(self._wait_settled, oc, i)
            if not ok:
                return False
        return True

    def follow(self, oc: ObjectChunks, sequential: bool) -> None:
        """After a READ's chunks matched: check ahead of a sequential
        reader, or have the rest checked for a reader that keeps jumping."""
        if sequential:
            self.ahead(oc)
        elif oc.jumps >= JUMPS:
            self.check_all_later(oc)

    def ahead(self, oc: ObjectChunks) -> None:
        """Have the threads check the chunks up to :data:`WINDOW` past the
        furthest READ of the sequential reader, :data:`BATCH` or more at
        a time (fewer only at the object's end): waking a thread for
        every READ cost more than the checks it does."""
        end = min(oc.furthest + WINDOW, len(oc.sums) - 1)
        start = max(oc.queued, oc.furthest) + 1
        if end - start + 1 < (BATCH if end < len(oc.sums) - 1 else 1):
            return
        with self._lock:
            self._queue.extend((oc, i) for i in range(start, end + 1))
            oc.queued = end
            self._start_threads()

    def check_all_later(self, oc: ObjectChunks) -> None:
        """Have the threads check every chunk not checked yet, in order
        (for a reader that keeps jumping: its next reads find them
        checked)."""
        if oc.all_queued:
            return
        oc.all_queued = True
        with self._lock:
            self._queue.extend((oc, i) for i in range(len(oc.sums)) if oc.state[i] == UNKNOWN)
            self._start_threads()

    def write_table_later(self, digest: str, path: str, size: int) -> None:
        """After a whole check of an object without a table: write one in
        a background thread (once per object and daemon)."""
        if digest in self._tabled or size < chunksums.MIN_SIZE:
            return
        self._tabled.add(digest)
        threading.Thread(target=self._write_table, args=(digest, path),
                         name="layerfs-chunksums", daemon=True).start()

    # -- in threads ----------------------------------------------------------
    def _check_chunk(self, oc: ObjectChunks, fd: int, i: int, buf: bytearray) -> bool:
        """Read chunk *i* into *buf* and check it (:meth:`_check_view`)."""
        view = memoryview(buf)[:_chunk_len(oc, i)]
        try:
            n = os.preadv(fd, [view], i * SUM_CHUNK)
        except OSError:
            n = -1
        return self._check_view(oc, i, view if n == len(view) else None)

    def _check_view(self, oc: ObjectChunks, i: int, view: memoryview | None) -> bool:
        """Compare chunk *i*'s bytes (None: could not be read whole) with
        its sum and record the outcome (a bad chunk goes back to unknown:
        checked anew, and reported, by every read of it)."""
        ok = view is not None and chunk_sum(self.objects.sums_key(), oc.nonce, i, view) == oc.sums[i]
        self._settle(oc, i, GOOD if ok else UNKNOWN)
        if not ok:  # (the read that needed it logs the file's name)
            log.error("object %s: chunk %d (bytes %d-) fails its sum", oc.digest, i, i * SUM_CHUNK)
        return ok

    def _settle(self, oc: ObjectChunks, i: int, state: int) -> None:
        """Chunk *i* leaves CHECKING for *state* (GOOD, or UNKNOWN: not
        checked, or bad); READs waiting for it hear of it."""
        with self._lock:
            oc.state[i] = state
            oc.good += state == GOOD
            if self._waiting:
                self._settled.notify_all()

    def _take(self, oc: ObjectChunks, i: int) -> bool:
        """Mark chunk *i* CHECKING if nobody checked or checks it yet."""
        with self._lock:
            if oc.state[i] != UNKNOWN:
                return False
            oc.state[i] = CHECKING
            return True

    def _wait_settled(self, oc: ObjectChunks, i: int) -> bool:
        """Wait while another thread checks chunk *i*; True if it matched."""
        with self._lock:
            self._waiting += 1
            try:
                while oc.state[i] == CHECKING:
                    self._settled.wait()
            finally:
                self._waiting -= 1
            return oc.state[i] == GOOD

    def _start_threads(self) -> None:
        """Called with the lock held, after work was queued."""
        while self._threads < WORKERS:
            threading.Thread(target=self._run, name="layerfs-bigread", daemon=True).start()
            self._threads += 1
        if self._idle:
            self._wake.notify(min(self._idle, (len(self._queue) + BATCH - 1) // BATCH))

    def _next(self, src: _Source | None) -> tuple[ObjectChunks, list[int]] | None:
        """The next run of up to :data:`BATCH` chunks of one object to
        check, None after :data:`IDLE_EXIT` idle. They are not marked
        CHECKING yet (:meth:`_take`, one at a time): a READ that needs one
        of them checks it itself rather than wait for the chunks before it.
        *src* (the thread's open object) lets go of its mapping and lease
        while the thread waits."""
        with self._wake:
            while True:
                run: list[int] = []
                run_oc: ObjectChunks | None = None
                while self._queue and len(run) < BATCH:
                    oc, i = self._queue[0]
                    if run and (oc is not run_oc or i != run[-1] + 1):
                        break
                    self._queue.popleft()
                    if oc.state[i] == UNKNOWN:
                        run_oc = oc
                        run.append(i)
                if run_oc is not None:
                    return run_oc, run
                if src is not None:
                    src.unmap()
                self._idle += 1
                try:
                    woken = self._wake.wait(IDLE_EXIT)
                finally:
                    self._idle -= 1
                if not woken and not self._queue:
                    self._threads -= 1
                    return None

    def _run(self) -> None:
        buf = bytearray(SUM_CHUNK)
        src: _Source | None = None  # one per object in a row: mapped once, and the kernel's read-ahead follows it
        try:
            while (item := self._next(src)) is not None:
                oc, run = item
                if src is None or src.oc is not oc:
                    if src is not None:
                        src.close()
                    src = _Source.open(oc)
                for i in run:
                    if src is None:  # gone: the reader's own read reports it
                        break
                    if not self._take(oc, i):
                        continue
                    with src.chunk(i, buf) as view:
                        self._check_view(oc, i, view if len(view) == _chunk_len(oc, i) else None)
        finally:
            if src is not None:
                src.close()

    def _write_table(self, digest: str, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                found, table = chunksums.digest_and_sums(self.objects.sums_key(), fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if found == digest:
                self.objects.write_sums(digest, size, table)
                with self._lock:
                    self._objects.pop(digest, None)  # the next reader loads the table
        except Exception as exc:  # a read-only store, a full disk: reads just stay whole-checked
            log.info("no chunk-sum table written for %s: %s", digest[:12], exc)


def _chunk_len(oc: ObjectChunks, i: int) -> int:
    return min(SUM_CHUNK, oc.size - i * SUM_CHUNK)


class _Source:
    """A read-ahead thread's open object. Chunks are hashed straight from
    a mapping of it (no copy into a buffer first) while a read lease keeps
    anyone from truncating it under the mapping, which would be SIGBUS
    (see ``fs.verify``: same lease, same rule); without a lease, or once a
    writer waits for it, chunks are read into a buffer.
    :data:`SEGMENT` bytes are mapped at a time: mapped pages count in the
    daemon's RSS."""

    def __init__(self, oc: ObjectChunks, fd: int) -> None:
        self.oc, self.fd = oc, fd
        self.mm: mmap.mmap | None = None
        self.base = 0           # offset of the mapping
        self.leased = False
        self.mappable = True    # until a lease cannot be had or a writer came

    @classmethod
    def open(cls, oc: ObjectChunks) -> _Source | None:
        try:
            fd = os.open(oc.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        return cls(oc, fd)

    def chunk(self, i: int, buf: bytearray) -> memoryview:
        """Chunk *i*'s bytes (shorter if the file is), as a view to
        release before the next call: of the mapping while the lease
        holds, else of *buf*."""
        start, n = i * SUM_CHUNK, _chunk_len(self.oc, i)
        view = self._mapped(start, n)
        if view is not None:
            return view
        view = memoryview(buf)[:n]
        try:
            got = os.preadv(self.fd, [view], start)
        except OSError:
            got = 0
        return view[:got]

    def _mapped(self, start: int, n: int) -> memoryview | None:
        if not self.mappable:
            return None
        if not self.leased:
            self.leased = self.mappable = verify.take_lease(self.fd)
            if not self.leased:
                return None
        elif not verify.leased(self.fd):  # a writer waits: let go, read the rest
            self.mappable = False
            self.unmap()
            return None
        base = start - start % SEGMENT
        if self.mm is None or self.base != base:
            self._drop_mapping()
            length = min(SEGMENT, os.fstat(self.fd).st_size - base)  # (leased: nobody truncates it now)
            if length < start - base + n:  # cut short: the buffer's read shows how much is left
                return None
            try:
                self.mm, self.base = mmap.mmap(self.fd, length, offset=base, access=mmap.ACCESS_READ), base
            except (OSError, ValueError):
                self.mappable = False
                self.unmap()
                return None
        return memoryview(self.mm)[start - base:start - base + n]

    def _drop_mapping(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None

    def unmap(self) -> None:
        """Let go of the mapping and the lease (the thread waits, or is done)."""
        self._drop_mapping()
        if self.leased:
            verify.release_lease(self.fd)
            self.leased = False

    def close(self) -> None:
        self.unmap()
        os.close(self.fd)
