"""The ``layerfs:`` transport: the local store as an image source or destination."""

from __future__ import annotations

import io
import os
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from layerfs.errors import InvalidInput, NotFound
from layerfs.oci import convert, media
from layerfs.oci.cache import BlobInfoCache, LayerBlob
from layerfs.oci.media import Descriptor, Manifest
from layerfs.oci.types import Context, ImageSource
from layerfs.store import references
from layerfs.store.images import Image
from layerfs.store.store import Store


def _cache(ctx: Context) -> BlobInfoCache:
    if ctx.store is None:
        raise InvalidInput("the layerfs: transport needs a store")
    if ctx.cache is None:
        ctx.cache = BlobInfoCache(ctx.store)
    return ctx.cache


class StoreSource:
    """An image of the store, offered as OCI blobs.

    Layer blobs are generated on demand and spooled in the store's tmp dir
    until :meth:`close`; their digests are cached per layer, so an
    unchanged image is re-pushed without generating anything.
    """

    location = ""

    def __init__(self, ctx: Context, image: Image, names: list[str]) -> None:
        self.ctx, self.store, self.cache = ctx, ctx.store, _cache(ctx)
        self.image, self.names = image, names
        self.description = f"layerfs image {image.id[:12]}"
        self._spools: dict[str, str] = {}        # blob digest -> spool file
        self._layer_of: dict[str, tuple[str, str]] = {}  # blob digest -> (layer id, compression)
        self._configs: dict[str, bytes] = {}
        self._lock = threading.Lock()

    # -- manifests -------------------------------------------------------
    def manifests(self, compression: str | None) -> Iterator[Manifest]:
        comp = compression or self.ctx.compression
        orig = self.cache.original_image(self.image.id)
        if orig is not None:
            m = media.parse_manifest(orig["manifest"].encode(), orig["media_type"])
            if all(media.compression_of(d.media_type) == comp for d in m.layers):
                self._configs[m.config.digest] = orig["config"].encode()
                for d, lid in zip(m.layers, self.image.layers):
                    mine = self.cache.layer_blob(lid, comp)
                    if mine and mine.digest == d.digest:
                        self._layer_of[d.digest] = (lid, comp)
                yield m
        yield self._generate(comp)

    def _generate(self, comp: str) -> Manifest:
        docker = self.ctx.manifest_format == "docker"
        layers = self.image.layers

        def one(lid: str) -> LayerBlob:
            blob = self.cache.layer_blob(lid, comp)
            if blob is None:
                blob = self._spool(lid, comp)
            self._layer_of[blob.digest] = (lid, comp)
            return blob

        with ThreadPoolExecutor(max(1, min(self.ctx.jobs, len(layers) or 1))) as pool:
            blobs = list(pool.map(one, layers))
        config = convert.to_oci_config(self.image.config, [b.diff_id for b in blobs])
        cdesc = Descriptor(media.DOCKER_CONFIG if docker else media.OCI_CONFIG,
                           media.sha256_digest(config), len(config))
        self._configs[cdesc.digest] = config
        ldescs = [Descriptor(media.layer_media_type(comp, docker), b.digest, b.size) for b in blobs]
        return media.build_manifest(cdesc, ldescs, docker)

    def _spool(self, lid: str, comp: str) -> LayerBlob:
        fd, path = tempfile.mkstemp(dir=self.store.tmp_dir, prefix="oci-")
        try:
            with os.fdopen(fd, "wb") as out:
                blob = convert.write_layer_blob(self.store, lid, comp, out)
        except BaseException:
            os.unlink(path)
            raise
        with self._lock:
            if blob.digest in self._spools:
                os.unlink(path)
            else:
                self._spools[blob.digest] = path
        self.cache.record_layer_blob(lid, comp, blob)
        return blob

    # -- blobs -----------------------------------------------------------
    def can_open(self, desc: Descriptor) -> bool:
        return desc.digest in self._configs or desc.digest in self._layer_of

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        if desc.digest in self._configs:
            return io.BytesIO(self._configs[desc.digest])
        if desc.digest not in self._layer_of:
            raise NotFound(f"{self.description}: blob {desc.digest} cannot be regenerated from the store")
        with self._lock:
            path = self._spools.get(desc.digest)
        if path is None:
            lid, comp = self._layer_of[desc.digest]
            blob = self._spool(lid, comp)
            if blob.digest != desc.digest:
                raise InvalidInput(f"layer {lid[:12]} regenerated as {blob.digest}, not {desc.digest}; "
                                   "the compressor changed since the digest was cached")
            path = self._spools[desc.digest]
        return open(path, "rb")

    def close(self) -> None:
        for path in self._spools.values():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._spools.clear()


class StoreDestination:
    """Images land in the store: layers verified and committed one by one,
    the image and its tags only once every blob is in."""

    location = ""
    desired_compression = None

    def __init__(self, ctx: Context, tag: str | None = None) -> None:
        self.ctx, self.store, self.cache = ctx, ctx.store, _cache(ctx)
        self.description = f"layerfs store {self.store.root}"
        self.tag_override = tag
        self.lock = self.cache.lock
        self._layers: dict[str, str] = {}    # blob digest -> layer id
        self._configs: dict[str, bytes] = {}
        self.images: list[tuple[Image, list[str]]] = []
        self._writing = self.store.writing()
        self._writing.__enter__()

    def try_reuse(self, desc: Descriptor, diff_id: str) -> str | None:
        if not diff_id:
            return None   # configs are always read
        lid = self.cache.layer_of(desc.digest) or self.cache.layer_of(diff_id)
        if lid is None:
            return None
        self._layers[desc.digest] = lid
        return "already in store"

    def put_blob(self, desc: Descriptor, stream: BinaryIO, diff_id: str) -> None:
        if not diff_id:
            v = media.VerifyingReader(stream, desc.digest, desc.size, "config")
            data = v.read(media.MAX_CONFIG + 1)
            v.finish()
            self._configs[desc.digest] = data
            return
        lid = convert.import_layer_blob(self.store, stream, desc, diff_id, self.lock)
        self.cache.record_blob(desc.digest, lid, desc.media_type, desc.size, diff_id)
        self._layers[desc.digest] = lid

    def put_manifest(self, manifest: Manifest, config: bytes, names: list[str], source: ImageSource) -> str:
        oci, _ = media.parse_config(config, len(manifest.layers))
        lids = [self._layers[d.digest] for d in manifest.layers]
        cfg = convert.from_oci_config(oci, lids)
        wanted = [self.tag_override] if self.tag_override else names
        tags = []
        for n in wanted:
            r = references.parse(n)   # rejects bad names before anything is written
            if not r.digest:
                tags.append(str(r))
        with self.lock:
            image = self.store.put_image(cfg)
            self.cache.record_image(image.id, manifest.raw, manifest.media_type, config, source.location)
            for t in tags:
                self.store.tag(image.id, t)
        self.images.append((image, tags))
        return image.id

    def commit(self) -> None:
        pass

    def close(self) -> None:
        if self._writing is not None:
            self._writing.__exit__(None, None, None)
            self._writing = None


class StoreTransport:
    name = "layerfs"

    @staticmethod
    def sources(ref: str, ctx: Context) -> list[StoreSource]:
        store = ctx.store
        image = store.image(ref)
        if image.id.startswith(ref.removeprefix("blake3:")):
            names = store.tags_of(image.id)
        else:
            names = [str(references.parse(ref))]
        return [StoreSource(ctx, image, names)]

    @staticmethod
    def destination(ref: str, ctx: Context) -> StoreDestination:
        _cache(ctx)
        return StoreDestination(ctx, ref or None)

