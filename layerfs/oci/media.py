"""OCI/Docker vocabulary: media types, descriptors, manifests, digests.

Everything that comes from outside (a registry reply, a file in an archive)
is parsed here into small frozen records, and rejected with
:class:`~layerfs.errors.InvalidInput` when it does not have the shape the
image-spec / distribution-spec require. Blob bytes are checked while they
stream through :class:`VerifyingReader`, never trusted after the fact.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from layerfs.errors import Corrupt, InvalidInput, Unsupported
from layerfs.store import streams
from layerfs.store.images import host_arch

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
OCI_LAYOUT_VERSION = "1.0.0"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"

COMPRESSIONS = ("gzip", "zstd", "none")
GZIP_LEVEL = 6          # fixed: the same layer must give the same bytes everywhere
ZSTD_LEVEL = 3
MAX_MANIFEST = 4 << 20  # distribution's own limit
MAX_CONFIG = 16 << 20
CHUNK = 1 << 20

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_digest(digest: Any, what: str = "digest") -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        if (isinstance(digest, str) and not digest.startswith("sha256:")
                and re.match(r"^[a-z0-9+._-]+:[a-zA-Z0-9=_-]+$", digest)):
            raise Unsupported(f"unsupported {what} algorithm: {digest[:40]!r} (only sha256 is supported)")
        raise InvalidInput(f"invalid {what}: {str(digest)[:80]!r}")
    return digest


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """The bytes layerfs writes for configs and manifests: deterministic."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def layer_media_type(compression: str, docker: bool = False) -> str:
    if docker:
        if compression == "gzip":
            return DOCKER_LAYER_GZIP
        if compression == "none":
            return DOCKER_LAYER
        raise InvalidInput("Docker schema 2 manifests cannot carry zstd layers; use --format oci")
    return {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD, "none": OCI_LAYER}[compression]


def compression_of(media_type: str) -> str:
    if media_type.endswith("gzip"):
        return "gzip"
    if media_type.endswith("zstd"):
        return "zstd"
    return "none"


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = field(default_factory=host_arch)
    variant: str = ""

    @classmethod
    def parse(cls, text: str | None) -> "Platform":
        if not text:
            return cls()
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidInput(f"invalid platform {text!r}: want os/arch[/variant], e.g. linux/arm64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    def matches(self, p: dict[str, Any]) -> bool:
        if p.get("os") != self.os or p.get("architecture") != self.architecture:
            return False
        return not self.variant or p.get("variant", "") == self.variant

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: tuple[tuple[str, str], ...] = ()
    platform: tuple[tuple[str, str], ...] = ()
    urls: tuple[str, ...] = ()

    @classmethod
    def parse(cls, d: Any, what: str) -> "Descriptor":
        if not isinstance(d, dict):
            raise InvalidInput(f"{what}: descriptor is not an object")
        mt, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
        if not isinstance(mt, str) or not mt:
            raise InvalidInput(f"{what}: descriptor has no mediaType")
        check_digest(digest, f"{what} digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"{what}: descriptor size {size!r} is not a non-negative integer")
        ann = d.get("annotations") or {}
        plat = d.get("platform") or {}
        if not isinstance(ann, dict) or not isinstance(plat, dict):
            raise InvalidInput(f"{what}: malformed annotations or platform")
        return cls(mt, digest, size, tuple(sorted((str(k), str(v)) for k, v in ann.items())),
                   tuple(sorted((str(k), str(v)) for k, v in plat.items() if isinstance(v, str))),
                   tuple(u for u in d.get("urls") or () if isinstance(u, str)))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out

    def annotation(self, key: str) -> str:
        return dict(self.annotations).get(key, "")

    @property
    def short(self) -> str:
        return self.digest[7:19]


@dataclass(frozen=True)
class Manifest:
    """One image manifest (OCI or Docker schema 2), raw bytes kept verbatim."""

    raw: bytes
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def digest(self) -> str:
        return sha256_digest(self.raw)

    @property
    def is_docker(self) -> bool:
        return self.media_type == DOCKER_MANIFEST


def _load_json(raw: bytes, what: str, limit: int) -> dict[str, Any]:
    if len(raw) > limit:
        raise InvalidInput(f"{what} is larger than {limit} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"{what} is not a JSON object")
    return doc


def sniff_manifest_type(raw: bytes, hint: str = "") -> str:
    doc = _load_json(raw, "manifest", MAX_MANIFEST)
    mt = doc.get("mediaType") or ""
    if doc.get("schemaVersion") == 1 or hint in DOCKER_SCHEMA1 or mt in DOCKER_SCHEMA1:
        raise Unsupported("Docker schema 1 manifests are not supported (re-push the image with a current tool)")
    if mt:
        return mt
    hint = hint.split(";")[0].strip()
    if hint in MANIFEST_TYPES + INDEX_TYPES:
        return hint
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


def parse_manifest(raw: bytes, hint: str = "") -> Manifest:
    mt = sniff_manifest_type(raw, hint)
    if mt not in MANIFEST_TYPES:
        raise InvalidInput(f"not an image manifest: media type {mt!r}")
    doc = json.loads(raw)
    if doc.get("schemaVersion") != 2:
        raise InvalidInput(f"unsupported manifest schemaVersion {doc.get('schemaVersion')!r}")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise InvalidInput("manifest has no layers list")
    config = Descriptor.parse(doc.get("config"), "manifest config")
    descs = tuple(Descriptor.parse(d, f"manifest layer {i}") for i, d in enumerate(layers))
    for d in descs:
        if d.media_type == DOCKER_FOREIGN or d.urls:
            raise Unsupported(f"layer {d.digest} is a foreign (non-distributable) layer; layerfs does not fetch those")
    return Manifest(raw, mt, config, descs)


def parse_index(raw: bytes, hint: str = "") -> list[Descriptor]:
    mt = sniff_manifest_type(raw, hint)
    if mt not in INDEX_TYPES:
        raise InvalidInput(f"not an image index: media type {mt!r}")
    doc = json.loads(raw)
    items = doc.get("manifests")
    if not isinstance(items, list):
        raise InvalidInput("image index has no manifests list")
    return [Descriptor.parse(d, f"index entry {i}") for i, d in enumerate(items)]


def select_platform(entries: list[Descriptor], platform: Platform) -> Descriptor:
    images = [d for d in entries if d.media_type in MANIFEST_TYPES]
    for d in images:
        if platform.matches(dict(d.platform)):
            return d
    have = ", ".join(str(Platform(**{k: v for k, v in d.platform if k in ("os", "architecture", "variant")}))
                     for d in images if d.platform) or "none"
    from layerfs.errors import NotFound

    raise NotFound(f"no image for platform {platform} in the index (available: {have}); use --platform")


def build_manifest(config: Descriptor, layers: list[Descriptor], docker: bool = False) -> Manifest:
    doc: dict[str, Any] = {"schemaVersion": 2,
                           "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
                           "config": config.to_json(),
                           "layers": [d.to_json() for d in layers]}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return Manifest(raw, doc["mediaType"], config, tuple(layers))


def parse_config(raw: bytes, n_layers: int) -> tuple[dict[str, Any], list[str]]:
    """An image config and its diff_ids, checked against the manifest."""
    doc = _load_json(raw, "image config", MAX_CONFIG)
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise InvalidInput("image config has no rootfs.diff_ids")
    diff_ids = [check_digest(d, "diff_id") for d in rootfs["diff_ids"]]
    if len(diff_ids) != n_layers:
        raise InvalidInput(f"image config lists {len(diff_ids)} diff_ids but the manifest has {n_layers} layers")
    return doc, diff_ids


# -- streams ---------------------------------------------------------------

class VerifyingReader(io.RawIOBase):
    """Reads *f*, hashing as it goes; :meth:`finish` checks digest and size.

    Reading more than *size* bytes fails at once, so a hostile peer cannot
    feed an endless stream. *digest* may be empty (then only hashed).
    """

    def __init__(self, f: BinaryIO, digest: str = "", size: int = -1, what: str = "blob",
                 on_read=None) -> None:
        self.f, self.expected, self.size, self.what = f, digest, size, what
        self.h = hashlib.sha256()
        self.count = 0
        self.on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        if not data:
            return 0
        n = len(data)
        self.count += n
        if 0 <= self.size < self.count:
            raise Corrupt(f"{self.what} {self.expected} is larger than its declared size {self.size}")
        self.h.update(data)
        b[:n] = data
        if self.on_read:
            self.on_read(n)
        return n

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.h.hexdigest()

    def finish(self) -> str:
        """Read to the end and verify; returns the digest of what was read."""
        self.drain()
        if self.size >= 0 and self.count != self.size:
            raise Corrupt(f"{self.what} {self.expected} is truncated: got {self.count} of {self.size} bytes")
        if self.expected and self.digest != self.expected:
            raise Corrupt(f"{self.what} does not match its digest: expected {self.expected}, got {self.digest}")
        return self.digest


def sniff_compression(head: bytes) -> str:
    """gzip, zstd or none: the layer compressions the OCI spec allows."""
    return _oci_compression(streams.sniff(head))


def _oci_compression(kind: str) -> str:
    if kind in (streams.BZIP2, streams.XZ):
        raise Unsupported("bzip2/xz compressed layers are not part of the OCI spec")
    return kind


def decompressed(f: BinaryIO, limits: streams.UnpackLimits | None = None) -> tuple[BinaryIO, str]:
    """(uncompressed stream, compression) of a layer blob, by its magic,
    metered against the unpack limits (a compression bomb stops early)."""
    u = streams.unpack(f, limits)
    return u.stream, _oci_compression(u.kind)
