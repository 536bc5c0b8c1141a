"""The one copy routine: any ImageSource to any ImageDestination.

Order (the containers/image contract): pick a manifest the destination can
be given, read and check the config, reuse or send every layer (in
parallel), then the config, then the manifest. Any failure before the
manifest leaves nothing visible at the destination; errors name the step
and the source/destination they happened in.

Interruption (Ctrl-C): the main thread sets ``ctx.cancel``; every worker
stops at its next read of a blob stream, so a copy stops within one read
of a chunk. Blobs already complete stay at the destination (committed
layers in the store, uploaded blobs in a registry) and are reused by the
next copy; :class:`~layerfs.errors.Interrupted` says how many.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from layerfs.errors import Interrupted, LayerfsError, NotFound
from layerfs.oci import media
from layerfs.oci.media import Descriptor, Manifest
from layerfs.oci.types import Context, CopyResult, ImageDestination, ImageSource


def copy_image(src: ImageSource, dst: ImageDestination, ctx: Context,
               names: list[str] | None = None) -> CopyResult:
    """Copy one image; *names* default to the source's names."""
    result = CopyResult(names=list(src.names if names is None else names))
    try:
        return _copy(src, dst, ctx, result)
    except KeyboardInterrupt:
        ctx.cancel.set()
        raise Interrupted(_kept(result, dst)) from None


def _kept(result: CopyResult, dst: ImageDestination) -> str:
    done = result.blobs_sent + result.blobs_reused
    if not result.blobs_total:
        return "interrupted before any layer was copied"
    return (f"interrupted: {done} of {result.blobs_total} layer(s) are complete at {dst.description} "
            f"and are kept there ({result.blobs_sent} copied now); run the same command again to finish")


def _copy(src: ImageSource, dst: ImageDestination, ctx: Context, result: CopyResult) -> CopyResult:
    manifest, config, diff_ids = _choose(src, dst, ctx, result)
    todo = [(d, diff) for d, diff in zip(manifest.layers, diff_ids) if d.digest not in result.notes]
    seen: set[str] = set()
    unique = []
    for d, diff in todo:
        if d.digest not in seen:
            seen.add(d.digest)
            unique.append((d, diff))
    result.blobs_total = len(unique) + result.blobs_reused
    lock = threading.Lock()

    def send(desc: Descriptor, diff_id: str) -> None:
        sent = _send(src, dst, ctx, desc, diff_id)
        with lock:   # counted as each blob lands: an interruption reports what is kept
            result.bytes_sent += sent
            result.blobs_sent += 1

    parallel(send, unique, ctx)
    cfg_note = dst.try_reuse(manifest.config, "")
    if cfg_note is None:
        _step(f"writing config to {dst.description}", dst.put_blob, manifest.config,
              _Bytes(config), "")
    result.manifest_digest = manifest.digest
    result.destination_ref = _step(f"writing manifest to {dst.description}", dst.put_manifest,
                                   manifest, config, result.names, src)
    return result


def _choose(src: ImageSource, dst: ImageDestination, ctx: Context,
            result: CopyResult) -> tuple[Manifest, bytes, list[str]]:
    last: Exception | None = None
    # Candidates are produced lazily: the store's second one (which
    # generates layer tars) is only built when the first cannot be used.
    candidates = _step(f"reading manifest from {src.description}", src.manifests, dst.desired_compression)
    while True:
        manifest = _step(f"reading manifest from {src.description}", next, candidates, None)
        if manifest is None:
            break
        config = _read_config(src, manifest)
        _, diff_ids = _step(f"checking config of {src.description}", media.parse_config, config,
                            len(manifest.layers))
        notes: dict[str, str] = {}
        usable = True
        for d, diff in zip(manifest.layers, diff_ids):
            if d.digest in notes:
                continue
            note = _step(f"checking {d.digest} at {dst.description}", dst.try_reuse, d, diff)
            if note is not None:
                notes[d.digest] = note
                ctx.progress.done(d, note)
                if ctx.cache is not None:
                    ctx.cache.record_location(d.digest, src.location)
                    ctx.cache.record_location(d.digest, dst.location)
            elif not src.can_open(d):
                usable = False
                last = NotFound(f"{src.description} cannot provide blob {d.digest}")
                break
        if usable:
            result.notes = notes
            result.blobs_reused = len(notes)
            return manifest, config, diff_ids
    raise last or NotFound(f"{src.description} offers no manifest")


def _read_config(src: ImageSource, manifest: Manifest) -> bytes:
    if manifest.config.size > media.MAX_CONFIG:
        raise LayerfsError(f"config {manifest.config.digest} is too large ({manifest.config.size} bytes)")

    def read() -> bytes:
        f = src.open_blob(manifest.config)
        try:
            v = media.VerifyingReader(f, manifest.config.digest, manifest.config.size, "config")
            data = v.read(manifest.config.size + 1) if manifest.config.size else b""
            v.finish()
            return data
        finally:
            f.close()

    return _step(f"reading config {manifest.config.digest} from {src.description}", read)


def parallel(fn: Callable, items: Iterable[tuple], ctx: Context) -> list:
    """``fn(*item)`` for every item on ``ctx.jobs`` threads; the results in order.

    If the caller is interrupted (KeyboardInterrupt lands in the main
    thread, which waits here) or one item fails, ``ctx.cancel`` is set and
    the workers are waited for: they stop at their next blob read, so no
    thread outlives the copy and nothing writes after it returned."""
    items = list(items)
    if not items:
        return []
    pool = ThreadPoolExecutor(max(1, min(ctx.jobs, len(items))))
    futures = [pool.submit(fn, *a) for a in items]
    try:
        return [f.result() for f in futures]
    except BaseException:
        ctx.cancel.set()
        for f in futures:
            f.cancel()
        raise
    finally:
        pool.shutdown(wait=True)


def _send(src: ImageSource, dst: ImageDestination, ctx: Context, desc: Descriptor, diff_id: str) -> int:
    ctx.progress.start(desc, "layer")
    f = _step(f"reading blob {desc.digest} from {src.description}", src.open_blob, desc)
    counted = _Counting(f, lambda n: ctx.progress.advance(desc, n), ctx.cancel)
    try:
        _step(f"copying blob {desc.digest} to {dst.description}", dst.put_blob, desc, counted, diff_id)
    finally:
        f.close()
    ctx.progress.done(desc, "done")
    if ctx.cache is not None:
        ctx.cache.record_location(desc.digest, src.location)
        ctx.cache.record_location(desc.digest, dst.location)
    return counted.count


def _step(what: str, fn, *args):
    try:
        return fn(*args)
    except LayerfsError as exc:
        if str(exc).startswith(what):
            raise
        raise type(exc)(f"{what}: {exc}") from exc


class _Counting:
    """A blob stream that reports progress and stops when the copy is cancelled."""

    def __init__(self, f: BinaryIO, cb, cancel=None) -> None:
        self.f, self.cb, self.count, self.cancel = f, cb, 0, cancel

    def read(self, n: int = -1) -> bytes:
        if self.cancel is not None and self.cancel.is_set():
            raise Interrupted("copy cancelled")
        data = self.f.read(n)
        self.count += len(data)
        if data:
            self.cb(len(data))
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seekable(self) -> bool:
        return getattr(self.f, "seekable", lambda: False)()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()


class _Bytes(_Counting):
    def __init__(self, data: bytes) -> None:
        import io

        super().__init__(io.BytesIO(data), lambda n: None)
