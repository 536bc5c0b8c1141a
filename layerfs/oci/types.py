"""The contracts every transport implements, modelled on containers/image.

A *transport* (see ``transports.TRANSPORTS``) only turns a reference string
into sources or a destination; :func:`layerfs.oci.copy.copy_image` is the one
routine that moves an image between any two of them. It never asks which
transport it is talking to; it asks the destination what it can reuse and
which layer compression it wants.

ImageSource contract
    ``manifests(compression)`` yields candidate manifests, best first (the
    store offers the bit-exact original of a pulled image first, then one it
    generates). ``open_blob`` returns a stream of the blob's bytes; the
    caller verifies them. ``can_open`` says whether a blob can be served at
    all (the store cannot serve a foreign compressed blob it did not keep).

ImageDestination contract
    Blobs before the manifest; ``put_manifest`` per image; ``commit`` last,
    once, after every image. ``try_reuse`` is the dedup hook and runs first
    (HEAD, cross-repository mount, a layer the store already holds).
    ``put_blob`` verifies the digest while streaming and leaves nothing
    behind on any error. Nothing is tagged/visible before ``put_manifest``
    succeeds; ``close`` without ``commit`` discards uncommitted work.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Protocol

from layerfs.oci.media import Descriptor, Manifest, Platform

if TYPE_CHECKING:
    from layerfs.oci.auth import AuthFile
    from layerfs.oci.cache import BlobInfoCache
    from layerfs.store.store import Store


class ImageSource(Protocol):
    description: str
    location: str          # "registry/repo" for registries, "" otherwise
    names: list[str]       # image names (name:tag) the source carries

    def manifests(self, compression: str | None) -> Iterator[Manifest]: ...

    def can_open(self, desc: Descriptor) -> bool: ...

    def open_blob(self, desc: Descriptor) -> BinaryIO: ...

    def close(self) -> None: ...


class ImageDestination(Protocol):
    description: str
    location: str
    desired_compression: str | None   # None: keep what the source has

    def try_reuse(self, desc: Descriptor, diff_id: str) -> str | None:
        """A short note ("exists", "mounted", "in store") when the blob need not be sent."""
        ...

    def put_blob(self, desc: Descriptor, stream: BinaryIO, diff_id: str) -> None: ...

    def put_manifest(self, manifest: Manifest, config: bytes, names: list[str], source: ImageSource) -> str: ...

    def commit(self) -> None: ...

    def close(self) -> None: ...


class Progress(Protocol):
    """Progress of blob transfers; the CLI draws it, the library only reports."""

    def start(self, desc: Descriptor, what: str) -> None: ...

    def advance(self, desc: Descriptor, n: int) -> None: ...

    def done(self, desc: Descriptor, note: str) -> None: ...


class NoProgress:
    def start(self, desc: Descriptor, what: str) -> None:
        pass

    def advance(self, desc: Descriptor, n: int) -> None:
        pass

    def done(self, desc: Descriptor, note: str) -> None:
        pass


@dataclass
class Context:
    """Everything a transport may need; one per command."""

    store: "Store | None" = None
    cache: "BlobInfoCache | None" = None
    auth: "AuthFile | None" = None
    insecure: bool = False
    platform: Platform = field(default_factory=Platform)
    compression: str = "gzip"
    manifest_format: str = "oci"     # oci | docker (for manifests layerfs generates)
    # load --verify: read and check every layer blob, reuse none unread.
    verify: bool = False
    progress: Progress = field(default_factory=NoProgress)
    retries: int = 5
    backoff: float = 0.5
    timeout: float = 120.0
    jobs: int = 3
    # Set to stop a copy: workers check it at every blob read (Ctrl-C).
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class CopyResult:
    """What one copy did: the manifest written and how many bytes moved."""

    manifest_digest: str = ""
    destination_ref: str = ""       # image id for the store, tag/digest elsewhere
    names: list[str] = field(default_factory=list)
    blobs_sent: int = 0
    bytes_sent: int = 0
    blobs_reused: int = 0
    blobs_total: int = 0            # distinct layer blobs of the image
    notes: dict[str, str] = field(default_factory=dict)
