"""Between layerfs and OCI: configs both ways, layer blobs both ways.

Configs: the layerfs config *is* the OCI config with ``rootfs`` naming
layerfs layer ids instead of diff_ids; every other field is kept verbatim,
so OCI -> layerfs -> OCI -> layerfs gives the same layerfs image id.

Layers out: :func:`write_layer_blob` writes the layer's deterministic PAX
tar (``tarlayer.write_tar``) through gzip (zlib, fixed level, mtime 0, no
name) or zstd: the same layer gives the same blob on every machine.
Layers in: :func:`import_layer_blob` decompresses by magic and feeds the
tar reader of the store while checking the blob digest *and* the diff_id;
the layer is committed only after both matched.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import zstandard

from layerfs.errors import Corrupt, InvalidInput
from layerfs.oci import media
from layerfs.oci.cache import LayerBlob
from layerfs.store.images import ROOTFS_TYPE
from layerfs.store.store import Store
from layerfs.store.tarlayer import TarReader, write_tar


def to_oci_config(config: dict[str, Any], diff_ids: list[str]) -> bytes:
    oci = {k: v for k, v in config.items() if k != "rootfs"}
    oci["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    return media.canonical_json(oci)


def from_oci_config(oci: dict[str, Any], layer_ids: list[str]) -> dict[str, Any]:
    cfg = {k: v for k, v in oci.items() if k != "rootfs"}
    cfg["rootfs"] = {"type": ROOTFS_TYPE, "layers": list(layer_ids)}
    for key in ("architecture", "os"):
        if not isinstance(cfg.get(key, ""), str):
            raise InvalidInput(f"image config field {key!r} is not a string")
    if not isinstance(cfg.get("config", {}), (dict, type(None))):
        raise InvalidInput("image config field 'config' is not an object")
    return cfg


SNAPSHOT_AFTER = 256     # files of a layer asked about one by one before a snapshot
SNAPSHOT_MAX = 250_000   # objects; above, pulls ask the database per file
_POOL = ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="layerfs-gzip")


class ParallelGzip:
    """gzip on every core, byte-for-byte deterministic (the pigz scheme).

    The input is cut into fixed CHUNK-sized pieces; each is deflated on
    its own (zlib releases the GIL) with the previous 32 KiB as dictionary,
    ended by a sync flush; an empty final block and the CRC/size trailer
    close the member. The output depends only on the input bytes, level
    and chunk size, never on timing or the number of cores.
    """

    HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"   # no name, mtime 0, OS unknown

    def __init__(self, level: int) -> None:
        self.level = level
        self.crc = 0
        self.size = 0
        self.prev = b""
        self.pending: deque = deque()
        self.started = False

    @staticmethod
    def _deflate(level: int, data: bytes, zdict: bytes) -> bytes:
        c = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, zdict) if zdict else \
            zlib.compressobj(level, zlib.DEFLATED, -15, 9)
        return c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)

    def compress(self, data: bytes) -> bytes:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        self.pending.append(_POOL.submit(self._deflate, self.level, data, self.prev[-32768:]))
        self.prev = data
        out = b""
        if not self.started:
            out, self.started = self.HEADER, True
        while len(self.pending) > 2 * _POOL._max_workers or (self.pending and self.pending[0].done()):
            out += self.pending.popleft().result()
        return out

    def abort(self) -> None:
        """Drop the queued chunks: an interrupted push must not leave the
        shared pool deflating (the interpreter waits for it at exit)."""
        while self.pending:
            self.pending.popleft().cancel()

    def flush(self) -> bytes:
        out = b"" if self.started else self.HEADER
        while self.pending:
            out += self.pending.popleft().result()
        return out + b"\x03\x00" + struct.pack("<II", self.crc & 0xFFFFFFFF, self.size & 0xFFFFFFFF)


class _Sink:
    """File-like target of write_tar: hashes the tar, compresses, writes out."""

    def __init__(self, out: BinaryIO, compression: str, on_write: Callable[[int], None] | None) -> None:
        self.out, self.on_write = out, on_write
        self.tar_hash = hashlib.sha256()
        self.blob_hash = hashlib.sha256()
        self.size = 0
        self.buf = bytearray()
        if compression == "gzip":
            self.comp = ParallelGzip(media.GZIP_LEVEL)
        elif compression == "zstd":
            self.comp = zstandard.ZstdCompressor(level=media.ZSTD_LEVEL).compressobj()
        else:
            self.comp = None

    def write(self, data) -> int:
        self.buf += data
        # Fixed-size pieces: the compressed bytes must not depend on how
        # the tar writer happens to split its writes.
        while len(self.buf) >= media.CHUNK:
            self._push(bytes(self.buf[:media.CHUNK]))
            del self.buf[:media.CHUNK]
        return len(data)

    def _push(self, data: bytes) -> None:
        self.tar_hash.update(data)
        self._emit(self.comp.compress(data) if self.comp else data)
        if self.on_write:
            self.on_write(len(data))

    def _emit(self, data: bytes) -> None:
        if data:
            self.blob_hash.update(data)
            self.out.write(data)
            self.size += len(data)

    def close(self) -> None:
        if self.buf:
            self._push(bytes(self.buf))
            self.buf.clear()
        if self.comp:
            self._emit(self.comp.flush())


def write_layer_blob(store: Store, layer_id: str, compression: str, out: BinaryIO,
                     docker: bool = False, on_write: Callable[[int], None] | None = None) -> LayerBlob:
    """Write the layer's blob to *out*; returns its digests."""
    sink = _Sink(out, compression, on_write)
    try:
        write_tar(store.layer_entries(layer_id), sink, store.objects.open, layer=True)
        sink.close()
    except BaseException:
        if isinstance(sink.comp, ParallelGzip):
            sink.comp.abort()
        raise
    return LayerBlob("sha256:" + sink.blob_hash.hexdigest(), sink.size,
                     "sha256:" + sink.tar_hash.hexdigest(), media.layer_media_type(compression, docker))


def import_layer_blob(store: Store, stream: BinaryIO, desc: media.Descriptor, diff_id: str,
                      lock: threading.RLock) -> str:
    """Store one layer blob as a layerfs layer; returns the layer id.

    The caller holds ``store.writing()``. Objects written before a failure
    are uncommitted debris that gc sweeps; no layer row is ever made for a
    blob that did not verify.
    """
    raw = media.VerifyingReader(stream, desc.digest, desc.size, "layer blob")
    plain, compression = media.decompressed(raw)
    tar = media.VerifyingReader(plain, diff_id, what="uncompressed layer") if compression != "none" else plain
    local: set[str] = set()
    # Past the first SNAPSHOT_AFTER files, one query for every digest the
    # store holds replaces one query per file (10k files: up to ~1 s of a
    # pull on the benchmark VM),
    # unless the store is huge. An object committed by another writer after
    # the snapshot is merely written again (same name, same bytes; the row
    # insert is ignored).
    snap: dict[str, Any] = {"asked": 0, "set": None}

    def known(digest: str) -> bool:
        # Like store.import_claims(), plus a snapshot of committed digests
        # that saves a query per file on big layers. Called from the tar
        # reader's worker threads: check-and-claim under the lock, so one
        # content is written once.
        with lock:
            if digest in local:
                return True
            snap["asked"] += 1
            if snap["asked"] == SNAPSHOT_AFTER and \
                    (store.db.value("SELECT count(*) FROM objects", default=0) or 0) <= SNAPSHOT_MAX:
                snap["set"] = {r[0] for r in store.db.all("SELECT digest FROM objects")}
            if snap["set"] is not None:
                hit = digest in snap["set"]
            else:
                hit = store.db.one("SELECT 1 FROM objects WHERE digest=?", digest) is not None
            if not hit:
                local.add(digest)
        return hit

    reader = TarReader(store.objects, known)
    entries = reader.read(tar)
    if compression != "none":
        got_diff = tar.finish()
    raw.finish()
    if compression == "none":
        got_diff = raw.digest
        if diff_id and got_diff != diff_id:
            raise Corrupt(f"layer {desc.digest} does not match its diff_id {diff_id}")
    with lock:
        return store.commit_layer(entries, reader.fresh)
