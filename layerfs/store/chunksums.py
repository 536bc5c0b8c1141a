"""Chunk sums: a keyed checksum of every 1 MiB of a big object, so a
reader can check the part it reads instead of the whole object.

An object's name is the blake3 of its whole content, so checking any byte
against the name means hashing every byte first: 0.3-0.6 s per GiB before
a big file's first byte can be served. A chunk-sum table is written beside
a big raw object (``objects/ab/cdef....sums``) by whoever has just hashed
its content against its name: the store when it writes the object, the
FUSE daemon after its first whole-object check of an object that has
none. A reader then checks each chunk it serves against the table.

Why the sums are keyed. The name needs no key: content with another
digest is another object. A table has no such anchor, so an unkeyed one
would let anyone who can rewrite an object's file rewrite its table to
match. The sums are keyed with a secret of this store
(``objects/sums.key``, 32 random bytes, mode 0600, made on first use):
forging a table, or content that matches one, needs that key.

Why GMAC. A chunk sum is the tag of AES-256-GCM over the chunk as
associated data, with no plaintext (GMAC; OpenSSL's AES-NI and
carry-less multiply, through ``cryptography``), under a key derived from
the store's. It costs half of keyed blake3 (0.17 s against 0.34-0.44 s
per GiB of cached data, one core here), and a cold read of a big object
spends its CPU on little else: hashing, one copy in the daemon, one into
the kernel. GMAC is only sound if no (key, nonce) pair ever tags two
different messages: each table draws a random 96-bit nonce, and chunk *i*
is tagged with the 16-byte nonce ``table nonce + i``; a rewritten table
draws a new one. The table's nonce is kept in it, under the seal.

The table's last 32 bytes are a keyed blake3 sum of the rest,
including the object's digest and size, so a table damaged on disk, or
written for another object, is refused as a whole (the reader then hashes
the whole object as before and writes a new table) and a chunk that fails
its sum is damage to the object itself: EIO. A lost key is the same: every
table is refused and rewritten under the new key.

Layout of a table: ``MAGIC``, the object's size (u64 LE), its digest (32
bytes), the table's nonce (12 bytes), one 16-byte sum per chunk, the
32-byte sum of all that. Tables of the first format (``LFSUMS1``, keyed
blake3 sums) are refused like damaged ones: the next reader verifies the
object whole and writes a new table.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
from typing import TYPE_CHECKING

import blake3

from layerfs.errors import LayerfsError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SUM_CHUNK = 1 << 20     # bytes per sum
SUM_BYTES = 16          # a keyed 128-bit sum per chunk
SEAL_BYTES = 32         # the keyed sum of the table
MIN_SIZE = (1 << 20) + 1  # objects above 1 MiB get a table (smaller ones are read and checked whole)
NONCE_BYTES = 12        # a table's random nonce; a chunk's is that and its index (u32 BE)
MAGIC = b"LFSUMS2\n"
KEY_CONTEXT = "layerfs 2026-12-07 chunk sums: AES-256-GCM key"
KEY_NAME = "sums.key"
SUFFIX = ".sums"
_HEAD = struct.Struct("<8sQ32s12s")


@dataclasses.dataclass(frozen=True)
class Table:
    """A big object's chunk sums and the nonce they were made under."""

    nonce: bytes
    sums: tuple[bytes, ...]


def chunk_count(size: int) -> int:
    return (size + SUM_CHUNK - 1) // SUM_CHUNK


def chunk_sum(key: bytes, nonce: bytes, index: int, chunk: bytes | bytearray | memoryview) -> bytes:
    """The keyed sum of chunk *index* of a table made under *nonce* (the
    GIL is released while it is computed)."""
    return _gmac(key).encrypt(nonce + index.to_bytes(4, "big"), b"", chunk)


@functools.lru_cache(maxsize=8)
def _gmac(key: bytes) -> AESGCM:
    # imported here: 20 ms that commands which never check a chunk don't pay
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(blake3.blake3(key, derive_key_context=KEY_CONTEXT).digest())


def load_key(objects_dir: str) -> bytes | None:
    """The store's chunk-sum key; None if it has none yet (the object
    store makes one: ``ObjectStore.sums_key``)."""
    path = os.path.join(objects_dir, KEY_NAME)
    try:
        with open(path, "rb") as f:
            key = f.read()
    except FileNotFoundError:
        return None
    if len(key) != 32:
        raise LayerfsError(f"{path} is damaged (not a 32-byte key); remove it and a new one is made")
    return key


def pack(key: bytes, digest: str, size: int, table: Table) -> bytes:
    body = _HEAD.pack(MAGIC, size, bytes.fromhex(digest), table.nonce) + b"".join(table.sums)
    return body + blake3.blake3(body, key=key).digest()


def unpack(key: bytes, digest: str, size: int, table: bytes) -> Table | None:
    """What *table* holds if it is a sound table of object *digest* of
    *size* bytes under *key*; None if not (damaged, another object's,
    another key's, another format)."""
    n = chunk_count(size)
    if len(table) != _HEAD.size + n * SUM_BYTES + SEAL_BYTES:
        return None
    body, seal = table[:-SEAL_BYTES], table[-SEAL_BYTES:]
    if blake3.blake3(body, key=key).digest() != seal:
        return None
    magic, stored_size, stored_digest, nonce = _HEAD.unpack_from(body)
    if magic != MAGIC or stored_size != size or stored_digest != bytes.fromhex(digest):
        return None
    return Table(nonce, tuple(body[i:i + SUM_BYTES] for i in range(_HEAD.size, len(body), SUM_BYTES)))


class ChunkSummer:
    """Sums of a stream fed in pieces of any size, cut at chunk boundaries
    (pieces of exactly one chunk, the usual case, are not copied)."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.nonce = os.urandom(NONCE_BYTES)
        self.sums: list[bytes] = []
        self._partial = bytearray()

    def _add(self, chunk: bytes | bytearray | memoryview) -> None:
        self.sums.append(chunk_sum(self.key, self.nonce, len(self.sums), chunk))

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if self._partial:
            take = SUM_CHUNK - len(self._partial)
            self._partial += view[:take]
            view = view[take:]
            if len(self._partial) < SUM_CHUNK:
                return
            self._add(self._partial)
            self._partial = bytearray()
        while len(view) >= SUM_CHUNK:
            self._add(view[:SUM_CHUNK])
            view = view[SUM_CHUNK:]
        if len(view):
            self._partial += view

    def finish(self) -> Table:
        if self._partial:
            self._add(self._partial)
            self._partial = bytearray()
        return Table(self.nonce, tuple(self.sums))


def digest_and_sums(key: bytes, fd: int) -> tuple[str, Table]:
    """The blake3 hex digest and the sums of what the file open at *fd*
    holds, from one read of it: a table is only ever made from bytes that
    were hashed against the name in the same pass."""
    h = blake3.blake3()
    summer = ChunkSummer(key)
    buf = bytearray(SUM_CHUNK)
    view = memoryview(buf)
    off = 0
    while n := os.preadv(fd, [buf], off):
        h.update(view[:n])
        summer.update(view[:n])
        off += n
    return h.hexdigest(), summer.finish()
