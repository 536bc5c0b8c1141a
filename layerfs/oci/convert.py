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
import threading
import zlib
from collections.abc import Callable
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


class _Sink:
    """File-like target of write_tar: hashes the tar, compresses, writes out."""

    def __init__(self, out: BinaryIO, compression: str, on_write: Callable[[int], None] | None) -> None:
        self.out, self.on_write = out, on_write
        self.tar_hash = hashlib.sha256()
        self.blob_hash = hashlib.sha256()
        self.size = 0
        self.buf = bytearray()
        if compression == "gzip":
            # wbits 31: gzip framing written by zlib itself (mtime 0, no name).
            self.comp = zlib.compressobj(media.GZIP_LEVEL, zlib.DEFLATED, 31)
        elif compression == "zstd":
            self.comp = zstandard.ZstdCompressor(level=media.ZSTD_LEVEL).compressobj()
        else:
            self.comp = None

    def write(self, data) -> int:
        self.buf += data
        if len(self.buf) >= media.CHUNK:
            self._push(bytes(self.buf))
            self.buf.clear()
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
    write_tar(store.layer_entries(layer_id), sink, store.objects.open, layer=True)
    sink.close()
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

    def known(digest: str) -> bool:
        # Not store.has_object: its pending set assumes the import commits,
        # and parallel imports in one process must not trust each other.
        if digest in local:
            return True
        with lock:
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
