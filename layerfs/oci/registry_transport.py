"""``docker://[REGISTRY/]REPO[:TAG|@DIGEST]``: a registry as source or destination."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from layerfs.errors import InvalidInput
from layerfs.oci import media
from layerfs.oci.auth import DOCKER_HUB
from layerfs.oci.media import Descriptor, Manifest
from layerfs.oci.registry import Client
from layerfs.oci.types import Context, ImageSource
from layerfs.store import references, scratch

_clients: dict[tuple, Client] = {}
_clients_lock = threading.Lock()


@dataclass(frozen=True)
class RegistryRef:
    host: str       # as the user wrote it (docker.io for the hub)
    repo: str       # path inside the registry (library/x on the hub)
    tag: str
    digest: str

    @classmethod
    def parse(cls, text: str) -> "RegistryRef":
        text = text.removeprefix("//")
        r = references.parse(text)
        host, path = references.split_registry(r.name)
        if not host:
            host = DOCKER_HUB
            if "/" not in path:
                path = "library/" + path
        explicit_tag = ":" in text.partition("@")[0].rpartition("/")[2]
        return cls(host, path, r.tag if (explicit_tag or not r.digest) else "", r.digest)

    @property
    def reference(self) -> str:
        return self.digest or self.tag

    @property
    def location(self) -> str:
        return f"{self.host}/{self.repo}"

    @property
    def name(self) -> str:
        """The name to tag a pulled image with (docker's short form for the hub)."""
        if self.host == DOCKER_HUB:
            return self.repo.removeprefix("library/")
        return self.location

    def __str__(self) -> str:
        base = self.location
        return f"{base}:{self.tag}" if not self.digest else f"{base}@{self.digest}"


def client_for(host: str, ctx: Context) -> Client:
    creds = ctx.auth.get(host) if ctx.auth is not None else None
    key = (host, creds, ctx.insecure, ctx.retries, ctx.backoff)
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            c = _clients[key] = Client(host, credentials=creds, insecure=ctx.insecure, retries=ctx.retries,
                                       backoff=ctx.backoff, timeout=ctx.timeout)
        return c


def forget_clients() -> None:
    """Drop cached connections and tokens (after login/logout)."""
    with _clients_lock:
        _clients.clear()


class RegistrySource:
    def __init__(self, ref: RegistryRef, ctx: Context) -> None:
        self.ref, self.ctx = ref, ctx
        self.client = client_for(ref.host, ctx)
        self.location = ref.location
        self.description = str(ref)
        self.names = [f"{ref.name}:{ref.tag}"] if ref.tag else []

    def manifests(self, compression: str | None) -> Iterator[Manifest]:
        raw, ctype = self.client.get_manifest(self.ref.repo, self.ref.reference)
        mt = media.sniff_manifest_type(raw, ctype)
        if mt in media.INDEX_TYPES:
            d = media.select_platform(media.parse_index(raw, mt), self.ctx.platform)
            raw, ctype = self.client.get_manifest(self.ref.repo, d.digest)
        yield media.parse_manifest(raw, ctype)

    def can_open(self, desc: Descriptor) -> bool:
        return True

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        return self.client.open_blob(self.ref.repo, desc)

    def close(self) -> None:
        pass


class RegistryDestination:
    desired_compression = None

    def __init__(self, ref: RegistryRef, ctx: Context) -> None:
        if ref.digest:
            raise InvalidInput(f"cannot push to a digest reference: {ref}")
        self.ref, self.ctx = ref, ctx
        self.client = client_for(ref.host, ctx)
        self.location = ref.location
        self.description = str(ref)
        self.spools: dict[str, str] = {}

    def try_reuse(self, desc: Descriptor, diff_id: str) -> str | None:
        if self.client.blob_exists(self.ref.repo, desc.digest):
            return "already exists"
        if self.ctx.cache is None:
            return None
        for loc in self.ctx.cache.locations(desc.digest):
            host, _, repo = loc.partition("/")
            if host == self.ref.host and repo != self.ref.repo:
                if self.client.mount_blob(self.ref.repo, desc.digest, repo):
                    return f"mounted from {repo}"
        return None

    def put_blob(self, desc: Descriptor, stream: BinaryIO, diff_id: str) -> None:
        # The registry verifies the digest too, but only after the upload;
        # spool and check first so a bad source never reaches the registry.
        import os
        import tempfile

        if getattr(stream, "seekable", lambda: False)():
            # A local file (the store's spool, a layout blob): send it as is,
            # rewinding for retries; the registry checks the digest on PUT.
            start = stream.tell()

            def reopen() -> BinaryIO:
                stream.seek(start)
                return _NoClose(stream)

            self.client.upload_blob(self.ref.repo, desc, reopen)
            return
        tmp_dir = self.ctx.store.tmp_dir if self.ctx.store is not None else tempfile.gettempdir()
        fd, path = scratch.mkstemp(tmp_dir, "oci-up")
        try:
            with os.fdopen(fd, "wb") as f:
                v = media.VerifyingReader(stream, desc.digest, desc.size, "blob")
                while chunk := v.read(media.CHUNK):
                    f.write(chunk)
                v.finish()
            self.client.upload_blob(self.ref.repo, desc, lambda: open(path, "rb"))
        finally:
            os.unlink(path)

    def put_manifest(self, manifest: Manifest, config: bytes, names: list[str], source: ImageSource) -> str:
        return self.client.put_manifest(self.ref.repo, self.ref.tag, manifest.raw, manifest.media_type)

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass


class RegistryTransport:
    name = "docker"

    def sources(self, ref: str, ctx: Context) -> list[ImageSource]:
        return [RegistrySource(RegistryRef.parse(ref), ctx)]

    def destination(self, ref: str, ctx: Context) -> RegistryDestination:
        return RegistryDestination(RegistryRef.parse(ref), ctx)


class _NoClose:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def close(self) -> None:
        pass
