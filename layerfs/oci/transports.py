"""The transports, by name, and the commands built on the one copy routine.

``TRANSPORTS`` is an explicit table (no registration by import side
effect): a reference ``NAME:REST`` picks ``TRANSPORTS[NAME]``, which turns
REST into sources or a destination. save, load, push and pull are all
:func:`copy` between two such references.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerfs.errors import InvalidInput, LayerfsError, NotFound
from layerfs.oci.auth import AuthFile, normalize_host
from layerfs.oci.bundle import open_bundle
from layerfs.oci.cache import BlobInfoCache
from layerfs.oci.copy import copy_image
from layerfs.oci.docker_archive import DockerArchiveTransport, docker_sources
from layerfs.oci.layout import LayoutTransport, layout_sources
from layerfs.oci.registry_transport import RegistryRef, RegistryTransport, client_for, forget_clients
from layerfs.oci.store_transport import StoreTransport
from layerfs.oci.types import Context, CopyResult
from layerfs.store import references
from layerfs.store.images import Image
from layerfs.store.store import Store

TRANSPORTS = {
    "layerfs": StoreTransport(),
    "oci": LayoutTransport(archive=False),
    "oci-archive": LayoutTransport(archive=True),
    "docker-archive": DockerArchiveTransport(),
    "docker": RegistryTransport(),
}


def split_ref(text: str) -> tuple[object, str]:
    name, sep, rest = text.partition(":")
    if not sep or name not in TRANSPORTS:
        raise InvalidInput(f"unknown transport in {text!r}; use one of: {', '.join(TRANSPORTS)}")
    return TRANSPORTS[name], rest


def context(store: Store | None, **kw) -> Context:
    ctx = Context(store=store, **kw)
    if store is not None:
        ctx.cache = BlobInfoCache(store)
        if ctx.auth is None:
            ctx.auth = auth_file(store)
    return ctx


def auth_file(store: Store) -> AuthFile:
    return AuthFile(store.layout.auth_file)


def copy(src_ref: str, dst_ref: str, ctx: Context, sources=None) -> list[CopyResult]:
    """Copy every image of *src_ref* to *dst_ref* (``transport:reference``)."""
    dst_t, dst_rest = split_ref(dst_ref)
    if sources is None:
        src_t, src_rest = split_ref(src_ref)
        sources = src_t.sources(src_rest, ctx)
    dst = None
    results = []
    try:
        dst = dst_t.destination(dst_rest, ctx)
        for src in sources:
            results.append(copy_image(src, dst, ctx))
        dst.commit()
    finally:
        errors = []
        for obj in [*(sources or []), dst]:
            if obj is None:
                continue
            try:
                obj.close()
            except LayerfsError as exc:
                errors.append(exc)
        if errors and results:
            raise errors[0]
    return results


# -- the commands ------------------------------------------------------------

@dataclass(frozen=True)
class Loaded:
    image: Image
    names: list[str]
    reference: str = ""     # what a pull fetched, fully qualified (docker.io/library/x:tag)
    # load: blobs not read because the store held their layer; and what
    # the source looked suspicious about (it loaded anyway).
    reused: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def save(store: Store, images: list[str], output: str, fmt: str = "oci", **kw) -> list[CopyResult]:
    """Write *images* to one OCI layout tarball or docker-archive."""
    if fmt not in ("oci", "docker"):
        raise InvalidInput(f"unknown archive format {fmt!r} (oci or docker)")
    if not images:
        raise InvalidInput("no image to save")
    ctx = context(store, **kw)
    sources = []
    try:
        for ref in images:
            sources += TRANSPORTS["layerfs"].sources(ref, ctx)
    except BaseException:
        for s in sources:
            s.close()
        raise
    return copy("", f"{'oci-archive' if fmt == 'oci' else 'docker-archive'}:{output}", ctx, sources=sources)


def detect_sources(path: str, ctx: Context):
    bundle = open_bundle(path, ctx.store.tmp_dir if ctx.store is not None else None)
    try:
        if bundle.exists("oci-layout") and bundle.exists("index.json"):
            return layout_sources(bundle, ctx)
        if bundle.exists("manifest.json"):
            return docker_sources(bundle)
    except BaseException:
        bundle.close()
        raise
    bundle.close()
    raise InvalidInput(f"{path}: neither an OCI image layout nor a docker-archive")


def load(store: Store, path: str, **kw) -> list[Loaded]:
    """Load every image of an OCI layout (dir or tar) or docker-archive."""
    ctx = context(store, **kw)
    sources = detect_sources(path, ctx)
    results = copy("", "layerfs:", ctx, sources=sources)
    # With verify every blob was read; a note then only marks a blob
    # shared by two images of the archive, read for the first.
    return [Loaded(store.image(r.destination_ref), _tags(store, r),
                   reused=() if ctx.verify else tuple(r.notes),
                   warnings=tuple(getattr(s, "warnings", ())))
            for s, r in zip(sources, results)]


def _tags(store: Store, r: CopyResult) -> list[str]:
    """The tags this copy set (not every tag the image happens to have)."""
    wanted = set()
    for n in r.names:
        try:
            wanted.add(str(references.parse(n)))
        except InvalidInput:
            pass
    return [t for t in store.tags_of(r.destination_ref) if t in wanted]


def push(store: Store, image: str, dest: str | None = None, **kw) -> CopyResult:
    """Push a store image to ``[REGISTRY/]REPO[:TAG]`` (default: the image's own name)."""
    ctx = context(store, **kw)
    if ctx.compression not in ("gzip", "zstd"):
        raise InvalidInput(f"unknown compression {ctx.compression!r} (gzip or zstd)")
    if ctx.manifest_format == "docker" and ctx.compression != "gzip":
        raise InvalidInput("Docker schema 2 manifests carry only gzip layers; use --format oci for zstd")
    ref = RegistryRef.parse(dest or image)
    (result,) = copy(f"layerfs:{image}", f"docker://{ref}", ctx)
    result.destination_ref = str(ref)
    return result


def pull(store: Store, ref: str, **kw) -> Loaded:
    """Pull ``[REGISTRY/]REPO[:TAG|@DIGEST]`` into the store and tag it (tags only)."""
    ctx = context(store, **kw)
    r = RegistryRef.parse(ref)
    (result,) = copy(f"docker://{r}", "layerfs:", ctx)
    image = store.image(result.destination_ref)
    return Loaded(image, store.tags_of(image.id) if r.tag else [], str(r))


def login(store: Store, registry: str, user: str, password: str, insecure: bool = False) -> None:
    """Check the credentials against the registry, then store them."""
    if not user or not password:
        raise InvalidInput("login needs a username and a password")
    host = normalize_host(registry)
    ctx = context(store, insecure=insecure, retries=2, backoff=0.2)
    ctx.auth = None
    forget_clients()
    client = client_for(host, ctx)
    client.credentials = (user, password)
    client.ping()
    auth_file(store).set(host, user, password)
    forget_clients()


def logout(store: Store, registry: str) -> None:
    if not auth_file(store).remove(registry):
        raise NotFound(f"not logged in to {normalize_host(registry)}")
    forget_clients()


__all__ = ["TRANSPORTS", "copy", "save", "load", "push", "pull", "login", "logout", "Loaded", "context"]
