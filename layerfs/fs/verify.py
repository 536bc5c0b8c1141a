"""Whole-object verification in the daemon: the blake3 of a big raw
object, as fast as the disk delivers it.

The first read of a big object (``files.FileIO``) and the copy-up of one
not yet verified (``upper.UpperDir``) hash it whole; no byte of it is
served or placed in the upper dir before its digest matched.

Threads. blake3 hashes on several cores through rayon's global thread
pool, which does not survive fork(): a process that used it and then
forks, and whose child hashes with threads, hangs that child (why
``fs/helper.py`` exists). So hashing here is single-threaded unless
:func:`allow_threads` was called, and only the detached FUSE daemon calls
it (``daemon.run_daemon`` with ``detached=True``): that process forks
nothing. The CLI, the store, the builder, a foreground daemon (``mount
--foreground`` serves in the caller's process) and the tests' own process
never hash with threads.

Reading. The object is mapped and hashed from the mapping: the hashing
threads fault its pages in in parallel, which reads a cold 1 GiB object
in 0.4-0.5 s here where 8 MiB ``pread`` calls in order took 1.2 s or more
(``file_digest``, even with WILLNEED ahead and threaded hashing). A
mapped file truncated under the mapping raises SIGBUS, which would kill
the daemon. Objects are immutable and replaced only by rename, so only
someone damaging the store in place (``open(path, 'wb')``, truncate) can
do that, and even then it must not happen: the object is mapped only
under a read lease (``F_SETLEASE``), which makes the kernel hold any open
for writing or truncate of it until the lease is released, and only
``SEGMENT`` bytes at a time, the lease checked before each. Once a writer
waits, the lease is released and the rest read with ``pread``, which sees
what the writer did: a damaged object hashes wrong (EIO), never SIGBUS.
(Damage done after an object was verified is not seen, as before.)
Where no lease can be had (the object is open for writing, a filesystem
without leases, ``/proc/sys/fs/leases-enable`` off) the whole object is
read with ``pread``. The lease break is signalled to its holder: SIGIO by default,
which terminates; ``F_SETSIG`` makes it SIGURG, ignored by default (no
part of layerfs handles SIGURG).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import signal

import blake3
import trio

from layerfs.store.objects import hash_fd

# Mapped and hashed at once: far inside a lease break's 45 s, and what a
# verification adds to the daemon's RSS (mapped pages count). 32 and 64 MiB
# hashed a cold 1 GiB object as fast as 256 MiB here; 16 MiB was slower.
SEGMENT = 32 << 20

_max_threads = 1
_running: dict[str, trio.Event] = {}  # digests being verified in this process


def allow_threads() -> None:
    """Hash on every core from now on. Only for the detached FUSE daemon
    (see the module docstring): never call it in a process that forks."""
    global _max_threads
    _max_threads = blake3.blake3.AUTO


def threads_allowed() -> bool:
    return _max_threads != 1


async def object_ok(fd: int, digest: str, verified: set[str]) -> bool:
    """Whether the object open read-only at *fd* has *digest*, hashed in a
    worker thread; adds it to *verified* if so. Concurrent first reads of
    one object (the kernel sends several reads of a file at once) wait
    for one hash and take its outcome, a failed one too (each hashing the
    object again in turn would stall every reader of a bad one)."""
    running = _running.get(digest)
    if running is not None:
        await running.wait()
        return digest in verified
    done = _running[digest] = trio.Event()
    try:
        ok = await trio.to_thread.run_sync(fd_digest, fd) == digest
        if ok:
            verified.add(digest)
        return ok
    finally:
        del _running[digest]
        done.set()


def fd_digest(fd: int) -> str:
    """blake3 hex digest of the whole file open read-only at *fd* (see
    the module docstring for how it is read). Blocks: call it in a thread."""
    h = blake3.blake3(max_threads=_max_threads)
    off = 0
    if take_lease(fd):
        try:
            size = os.fstat(fd).st_size  # after the lease: nothing truncates it now
            while off < size and leased(fd):
                n = min(SEGMENT, size - off)
                with mmap.mmap(fd, n, offset=off, access=mmap.ACCESS_READ) as mm:
                    h.update(mm)
                off += n
        finally:
            release_lease(fd)
        if off == size:
            return h.hexdigest()
    return hash_fd(fd, h, off).hexdigest()


def take_lease(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:
        return False
    return True


def leased(fd: int) -> bool:
    """False once a writer waits for the lease (it reads F_UNLCK then)."""
    return fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK


def release_lease(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass
