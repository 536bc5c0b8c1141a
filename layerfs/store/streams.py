"""Byte-stream primitives shared by the tar reader and the OCI transports.

* :func:`unpack` picks a decompressor by magic number (gzip, zstd, bzip2,
  xz, or none) on any stream, a pipe or socket included, and meters what
  comes out against :class:`UnpackLimits`, so a compression bomb stops
  with one clear error instead of decompressing for minutes.
* :class:`ChunkStream`, :class:`Limited` and :class:`Prefetch` are the
  forward-only plumbing the tar reader parses from.

Decoding errors of every format become :class:`InvalidInput`: the bytes
come from outside and a damaged archive is bad input, not a crash.
"""

from __future__ import annotations

import io
import os
import queue
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from layerfs.errors import InvalidInput

CHUNK = 1 << 20
READ_AHEAD = 8                 # chunks Prefetch buffers ahead of its reader

GZIP, ZSTD, BZIP2, XZ, NONE = "gzip", "zstd", "bzip2", "xz", "none"


def sniff(head: bytes) -> str:
    """The compression of a stream from its first (up to 6) bytes."""
    if head[:2] == b"\x1f\x8b":
        return GZIP
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return ZSTD
    if head[:3] == b"BZh":
        return BZIP2
    if head[:6] == b"\xfd7zXZ\x00":
        return XZ
    return NONE


# -- limits ------------------------------------------------------------------

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, what: str) -> int:
    """``123``, ``64M``, ``2G``, ``1T`` (binary units) -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        n = int(t[: len(t) - len(unit)])
    except ValueError:
        raise InvalidInput(f"{what}: {text!r} is not a size (bytes, or with K, M, G, T)") from None
    if n < 0:
        raise InvalidInput(f"{what}: {text!r} is negative")
    return n * _UNITS[unit]


@dataclass(frozen=True)
class UnpackLimits:
    """How far one archive may expand (README, "Limits").

    ``max_size``: bytes of uncompressed tar, sparse files' holes included;
    0 means no limit. ``max_ratio``: uncompressed bytes per compressed
    byte, enforced once more than ``ratio_from`` bytes came out (small
    archives of zeros are harmless and legitimate); 0 means no limit.
    """

    max_size: int = 0
    max_ratio: int = 100
    ratio_from: int = 256 << 20

    @classmethod
    def from_env(cls) -> "UnpackLimits":
        env = os.environ
        d = cls()
        ratio = env.get("LAYERFS_MAX_RATIO", "").strip()
        try:
            r = int(ratio) if ratio else d.max_ratio
        except ValueError:
            raise InvalidInput(f"LAYERFS_MAX_RATIO: {ratio!r} is not a whole number") from None
        if r < 0:
            raise InvalidInput(f"LAYERFS_MAX_RATIO: {ratio!r} is negative")
        size = env.get("LAYERFS_MAX_UNPACKED", "").strip()
        start = env.get("LAYERFS_RATIO_FROM", "").strip()
        return cls(parse_size(size, "LAYERFS_MAX_UNPACKED") if size else d.max_size, r,
                   parse_size(start, "LAYERFS_RATIO_FROM") if start else d.ratio_from)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class Meter:
    """Bytes in (compressed) and out (expanded) of one archive, checked
    against its limits at every step. The decompressing thread and the
    tar parser (sparse holes) both count, hence the lock."""

    def __init__(self, limits: UnpackLimits) -> None:
        self.limits = limits
        self.compressed = 0
        self.expanded = 0
        self._lock = threading.Lock()

    def took(self, n: int) -> None:
        self.compressed += n

    def expand(self, n: int) -> None:
        """Count *n* more bytes out (data or holes); raise past a limit."""
        with self._lock:
            self.expanded += n
        lim = self.limits
        if lim.max_size and self.expanded > lim.max_size:
            raise InvalidInput(f"archive expands past {_human(lim.max_size)} (LAYERFS_MAX_UNPACKED); "
                               "raise the limit if it is legitimate")
        if lim.max_ratio and self.expanded > lim.ratio_from and \
                self.expanded > lim.max_ratio * max(self.compressed, 1):
            raise InvalidInput(f"archive expands more than {lim.max_ratio}:1 ({_human(self.compressed)} to "
                               f"over {_human(self.expanded)}): a compression bomb? "
                               "raise LAYERFS_MAX_RATIO if it is legitimate")


# -- readers -----------------------------------------------------------------

class Peek(io.RawIOBase):
    """A stream whose first bytes can be looked at without consuming them
    (to pick a decompressor by magic number on a pipe or socket)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.head = b""

    def peek(self, n: int) -> bytes:
        while len(self.head) < n:
            more = self.f.read(n - len(self.head))
            if not more:
                break
            self.head += more
        return self.head[:n]

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self.readall()
        if self.head:
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.f.read(n)

    def readinto(self, b) -> int:
        return _into(b, self.read(len(b)))


def _into(b, data: bytes) -> int:
    b[: len(data)] = data
    return len(data)


# The readers below implement read() itself, not only readinto(): the
# bytes then move once per layer instead of through a scratch buffer
# (gunzip through four layers ran at 60% of GzipFile's speed otherwise).

class _Counted(io.RawIOBase):
    """A stream whose bytes are counted as they are consumed: *count* is
    the meter's took (the compressed input) or expand (the expanded
    bytes, which raises past a limit)."""

    def __init__(self, f: BinaryIO, count: Callable[[int], None]) -> None:
        self.f, self.count = f, count

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self.readall()
        data = self.f.read(n)
        if data:
            self.count(len(data))
        return data

    def readinto(self, b) -> int:
        return _into(b, self.read(len(b)))


class _Inflate(io.RawIOBase):
    """Streaming gunzip (multi-member, as gzip(1) reads). Each read
    inflates at most what was asked for, so a bomb never sits whole in
    memory and no output is copied twice."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.d = zlib.decompressobj(31)
        self.pending = b""     # compressed bytes read but not yet inflated
        self.done = False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self.readall()
        try:
            while n and not self.done:
                if self.d.eof:
                    rest = self.d.unused_data or self.f.read(CHUNK)
                    if not rest:
                        self.done = True
                        break
                    self.d, self.pending = zlib.decompressobj(31), rest
                data = self.pending or self.f.read(CHUNK)
                if not data:
                    raise InvalidInput("compressed data is truncated")
                out = self.d.decompress(data, n)
                self.pending = self.d.unconsumed_tail
                if out:
                    return out
        except zlib.error as exc:
            raise InvalidInput(f"corrupt gzip data: {exc}") from None
        return b""

    def readinto(self, b) -> int:
        return _into(b, self.read(len(b)))


class _Decoded(io.RawIOBase):
    """A library decompressor's reader, made lazily, its errors mapped to
    InvalidInput."""

    def __init__(self, kind: str, f: BinaryIO) -> None:
        self.kind, self.f = kind, f
        self.r = None

    def readable(self) -> bool:
        return True

    def _open(self):
        if self.kind == ZSTD:
            return zstandard.ZstdDecompressor().stream_reader(self.f, read_across_frames=True, read_size=CHUNK)
        if self.kind == BZIP2:
            import bz2

            return bz2.BZ2File(self.f)
        import lzma

        return lzma.LZMAFile(self.f)

    def read(self, n: int = -1) -> bytes:
        import lzma

        if n is None or n < 0:
            return self.readall()
        try:
            if self.r is None:
                self.r = self._open()
            return self.r.read(n)
        except (zstandard.ZstdError, lzma.LZMAError, EOFError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise   # a real I/O error of the source, not bad data
            raise InvalidInput(f"corrupt {self.kind} data: {exc or 'truncated'}") from None

    def readinto(self, b) -> int:
        return _into(b, self.read(len(b)))


@dataclass(frozen=True)
class Unpacked:
    """An uncompressed view of a stream: the bytes, what they were, the meter."""

    stream: BinaryIO     # reads may be short, as from a pipe
    kind: str
    meter: Meter


def unpack(f: BinaryIO, limits: UnpackLimits | None = None) -> Unpacked:
    """The uncompressed bytes of *f* (gzip, zstd, bzip2, xz or plain),
    metered against *limits* (default: from the environment)."""
    meter = Meter(limits if limits is not None else UnpackLimits.from_env())
    peek = Peek(_Counted(f, meter.took))
    kind = sniff(peek.peek(6))
    if kind == GZIP:
        raw: io.RawIOBase = _Inflate(peek)
    elif kind == NONE:
        raw = peek
    else:
        raw = _Decoded(kind, peek)
    # Unbuffered: a read may return fewer bytes than asked, as from a pipe.
    return Unpacked(_Counted(raw, meter.expand), kind, meter)


# -- forward-only plumbing for the tar reader ----------------------------------

class ChunkStream:
    """One forward-only stream over a chunk source.

    ``read(n)`` returns exactly *n* bytes unless the data ends; it stands
    in for tarfile's own stream (``r|``), which reads in 10 KiB records
    and copies every byte twice more. ``tell``/``seek`` (forward only) are
    what ``TarInfo.fromtarfile`` needs."""

    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        self.next_chunk = next_chunk
        self.buf = b""
        self.pos = 0          # in buf
        self.base = 0         # stream offset of buf[0]
        self.eof = False

    def tell(self) -> int:
        return self.base + self.pos

    def _more(self) -> bool:
        if self.eof:
            return False
        chunk = self.next_chunk()
        if not chunk:
            self.eof = True
            return False
        self.base += len(self.buf)
        self.buf, self.pos = bytes(chunk), 0
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = [self.buf[self.pos:]]
            self.pos = len(self.buf)
            while self._more():
                parts.append(self.buf)
                self.pos = len(self.buf)
            return b"".join(parts)
        end = self.pos + n
        if end <= len(self.buf):
            out = self.buf[self.pos:end]
            self.pos = end
            return out
        parts = [self.buf[self.pos:]]
        need = n - len(parts[0])
        self.pos = len(self.buf)
        while need > 0 and self._more():
            take = self.buf[:need]
            parts.append(take)
            self.pos = len(take)
            need -= len(take)
        return b"".join(parts)

    def skip(self, n: int) -> int:
        """Discard up to *n* bytes; returns how many were there."""
        done = 0
        while done < n:
            avail = len(self.buf) - self.pos
            if avail == 0 and not self._more():
                break
            step = min(n - done, len(self.buf) - self.pos)
            self.pos += step
            done += step
        return done

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self.tell():
            raise OSError("stream can only seek forward")
        self.skip(pos - self.tell())
        return self.tell()

    def drain(self) -> int:
        """Read to the end; returns the total length of the stream."""
        while self._more():
            pass
        self.pos = len(self.buf)
        return self.tell()


class Limited:
    """At most *size* bytes of a stream (one member's data)."""

    def __init__(self, stream: ChunkStream, size: int) -> None:
        self.stream, self.left = stream, size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self.left:
            n = self.left
        data = self.stream.read(n)
        self.left -= len(data)
        return data


_EOF = object()


class Prefetch:
    """Reads *f* in a thread of its own, READ_AHEAD chunks ahead, so that
    download, digest checks and decompression (all GIL-free in C) overlap
    with parsing in the caller's thread. Calling it returns the next
    chunk (b"" at the end) or raises what the reading thread met."""

    def __init__(self, f: BinaryIO, name: str = "layerfs-read") -> None:
        self.f = f
        self.q: queue.Queue = queue.Queue(READ_AHEAD)
        self.stop = False
        self.done = False
        self.t = threading.Thread(target=self._run, name=name, daemon=True)
        self.t.start()

    def _run(self) -> None:
        try:
            while not self.stop:
                chunk = self.f.read(CHUNK)
                if not chunk:
                    break
                self.q.put(chunk)
            self.q.put(_EOF)
        except BaseException as exc:  # handed to the reading thread
            self.q.put(exc)

    def __call__(self) -> bytes:
        if self.done:
            return b""
        item = self.q.get()
        if item is _EOF:
            self.done = True
            return b""
        if isinstance(item, BaseException):
            self.done = True
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue) and wait for it."""
        self.stop = True
        while self.t.is_alive():
            try:
                self.q.get(timeout=0.05)
            except queue.Empty:
                pass
        self.t.join()
