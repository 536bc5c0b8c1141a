"""The ``layerfs:`` transport: the local store as an image source or destination."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from typing import BinaryIO

from layerfs.errors import Interrupted, InvalidInput, NotFound
from layerfs.oci import convert, media
from layerfs.oci.cache import BlobInfoCache, LayerBlob
from layerfs.oci.copy import parallel
from layerfs.oci.media import Descriptor, Manifest
from layerfs.oci.types import Context, ImageSource
from layerfs.store import references, scratch
from layerfs.store.images import Image

# The media type of progress reports for a layer whose blob is being made.
PREPARING = "application/vnd.layerfs.layer.preparing"


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
        self._growing: dict[str, _GrowingSpool] = {}   # blob digest -> spool being generated
        self._lock = threading.Lock()
        # The store's lease while blobs are spooled in its tmp dir: gc (and
        # the next writer's sweep of tmp/) then knows they are not debris.
        self._lease = self.store.writing()
        self._lease.__enter__()

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

        blobs = parallel(one, [(lid,) for lid in layers], self.ctx)
        config = convert.to_oci_config(self.image.config, [b.diff_id for b in blobs])
        cdesc = Descriptor(media.DOCKER_CONFIG if docker else media.OCI_CONFIG,
                           media.sha256_digest(config), len(config))
        self._configs[cdesc.digest] = config
        ldescs = [Descriptor(media.layer_media_type(comp, docker), b.digest, b.size) for b in blobs]
        return media.build_manifest(cdesc, ldescs, docker)

    def _spool(self, lid: str, comp: str) -> LayerBlob:
        fd, path = scratch.mkstemp(self.store.tmp_dir, "oci")
        # Reported as the layer being prepared (docker's "Preparing"): the
        # blob's digest is known only once it is written.
        desc = Descriptor(PREPARING, "blake3:" + lid, self.store.layer_info(lid)[0])
        progress, cancel = self.ctx.progress, self.ctx.cancel

        def wrote(n: int) -> None:
            if cancel.is_set():
                raise Interrupted("copy cancelled")
            progress.advance(desc, n)

        progress.start(desc, "prepare")
        try:
            with os.fdopen(fd, "wb") as out:
                blob = convert.write_layer_blob(self.store, lid, comp, out, on_write=wrote)
        except BaseException:
            os.unlink(path)
            raise
        progress.done(desc, "prepared")
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
            growing = self._growing.get(desc.digest)
            if path is None and growing is None:
                fd, spool = scratch.mkstemp(self.store.tmp_dir, "oci")
                growing = self._growing[desc.digest] = _GrowingSpool(spool, desc)
                self._start_spool(growing, fd)
        if path is not None:
            return open(path, "rb")
        return _GrowingReader(growing)

    def _start_spool(self, g: "_GrowingSpool", fd: int) -> None:
        """Generate a blob whose digest is known (cached) in the background:
        readers get its bytes while they are being written, so generating,
        compressing and uploading overlap. The digest is checked at the end;
        readers see EOF only after it matched."""
        desc, path = g.desc, g.path
        lid, comp = self._layer_of[desc.digest]

        def run() -> None:
            try:
                with os.fdopen(fd, "wb", buffering=0) as out:
                    blob = convert.write_layer_blob(self.store, lid, comp, _Announce(out, g))
                if blob.digest != desc.digest or blob.size != desc.size:
                    raise InvalidInput(f"layer {lid[:12]} regenerated as {blob.digest}, not {desc.digest}; "
                                       "the compressor changed since the digest was cached")
                with self._lock:
                    self._spools[desc.digest] = path
                g.finish(None)
            except BaseException as exc:
                g.finish(exc)

        g.thread = threading.Thread(target=run, name=f"layerfs-spool-{desc.digest[7:19]}", daemon=True)
        g.thread.start()

    def close(self) -> None:
        with self._lock:
            growing = list(self._growing.values())
        for g in growing:
            g.cancelled = True      # nobody will read the rest: stop generating
            g.thread.join()
            if g.error is not None:
                _unlink_quiet(g.path)
        for path in self._spools.values():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._spools.clear()
        if self._lease is not None:
            self._lease.__exit__(None, None, None)
            self._lease = None


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
        """A layer the store holds (by blob digest or diff_id) is reused
        without reading the source's blob, as docker does: the layer was
        verified when it was stored, the source's blob may even be missing.
        With ``ctx.verify`` only blobs read during this copy are reused."""
        if not diff_id:
            return None   # configs are always read
        if self.ctx.verify:
            return "already in store" if desc.digest in self._layers else None
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


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _GrowingSpool:
    """A spool file being written by one thread and read by others."""

    def __init__(self, path: str, desc: Descriptor) -> None:
        self.path, self.desc = path, desc
        self.written = 0
        self.done = False
        self.cancelled = False
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def grew(self, n: int) -> None:
        with self.cond:
            self.written += n
            self.cond.notify_all()

    def finish(self, error: BaseException | None) -> None:
        with self.cond:
            self.error, self.done = error, True
            self.cond.notify_all()

    def wait_beyond(self, pos: int) -> int:
        """Block until more than *pos* bytes are written or the spool is
        complete; returns the bytes written. Raises the writer's error."""
        with self.cond:
            while self.written <= pos and not self.done:
                self.cond.wait()
            if self.error is not None:
                raise self.error
            return self.written


class _Announce:
    """The spool file as write_layer_blob's output; readers are woken per write."""

    def __init__(self, f: BinaryIO, g: _GrowingSpool) -> None:
        self.f, self.g = f, g

    def write(self, data) -> int:
        if self.g.cancelled:
            raise InvalidInput(f"generation of {self.g.desc.digest} cancelled")
        n = len(data)
        view = memoryview(data)
        while view:
            k = self.f.write(view)
            view = view[k:]
        if self.g.written + n > self.g.desc.size:
            raise InvalidInput(f"regenerated blob {self.g.desc.digest} is larger than its cached size "
                               f"{self.g.desc.size}; the compressor changed since the digest was cached")
        self.g.grew(n)
        return n


class _GrowingReader(io.RawIOBase):
    """Reads a _GrowingSpool from the start; seekable, so an upload can be
    retried from the beginning. EOF only once the blob is complete and
    matched its digest."""

    def __init__(self, g: _GrowingSpool) -> None:
        self.g = g
        self.fd = os.open(g.path, os.O_RDONLY | os.O_CLOEXEC)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < 0:
            raise OSError("only absolute seeks")
        self.pos = pos
        return pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        avail = self.g.wait_beyond(self.pos) - self.pos
        n = min(len(b), avail)
        if n <= 0:
            return 0
        got = os.preadv(self.fd, [memoryview(b)[:n]], self.pos)
        self.pos += got
        return got

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.g.desc.size
        avail = self.g.wait_beyond(self.pos) - self.pos
        n = min(n, avail)
        if n <= 0:
            return b""
        data = os.pread(self.fd, n, self.pos)
        self.pos += len(data)
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()
