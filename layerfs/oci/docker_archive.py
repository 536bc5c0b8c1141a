"""``docker-archive:FILE``: the ``docker save`` format.

manifest.json lists, per image, the config file, the RepoTags and the
layer tars (uncompressed, named ``<diff_id hex>.tar`` as skopeo writes
them); ``repositories`` maps name -> tag -> top layer for old docker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, BinaryIO

from layerfs.errors import InvalidInput, NotFound
from layerfs.oci import media
from layerfs.oci.bundle import Bundle, BundleWriter, open_bundle
from layerfs.oci.media import Descriptor, Manifest
from layerfs.oci.types import Context, ImageSource
from layerfs.store import references


class DockerArchiveSource:
    location = ""

    def __init__(self, bundle: Bundle, entry: dict[str, Any], index: int) -> None:
        self.bundle = bundle
        config_name, layers, tags = entry.get("Config"), entry.get("Layers"), entry.get("RepoTags") or []
        if (not isinstance(config_name, str) or not isinstance(layers, list)
                or not all(isinstance(x, str) for x in layers)):
            raise InvalidInput(f"{bundle.description}: manifest.json entry {index} is malformed")
        if not isinstance(tags, list):
            raise InvalidInput(f"{bundle.description}: RepoTags is not a list")
        self.names = [t for t in tags if isinstance(t, str)]
        self.description = f"{bundle.description} ({self.names[0] if self.names else f'image {index}'})"
        self.config = bundle.read(config_name, media.MAX_CONFIG)
        self.warnings = _check_config_name(bundle, config_name, self.config)
        _, diff_ids = media.parse_config(self.config, len(layers))
        self.paths: dict[str, str] = {}
        descs = []
        for name, diff_id in zip(layers, diff_ids):
            with bundle.open(name) as f:
                head = f.read(6)
            comp = media.sniff_compression(head)
            if comp == "none":
                digest = diff_id   # an uncompressed layer's digest is its diff_id; verified while read
                size = bundle.size(name)
            else:
                v = media.VerifyingReader(bundle.open(name))
                v.drain()
                digest, size = v.digest, v.count
            self.paths[digest] = name
            descs.append(Descriptor(media.layer_media_type(comp), digest, size))
        cdesc = Descriptor(media.OCI_CONFIG, media.sha256_digest(self.config), len(self.config))
        self.paths[cdesc.digest] = config_name
        self.manifest = media.build_manifest(cdesc, descs)

    def manifests(self, compression: str | None) -> Iterator[Manifest]:
        yield self.manifest

    def can_open(self, desc: Descriptor) -> bool:
        return desc.digest in self.paths

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        if desc.digest not in self.paths:
            raise NotFound(f"{self.bundle.description}: no blob {desc.digest}")
        return self.bundle.open(self.paths[desc.digest])

    def close(self) -> None:
        pass


def _check_config_name(bundle: Bundle, name: str, config: bytes) -> list[str]:
    """docker save names the config by its digest (``<hex>.json``, or
    ``blobs/sha256/<hex>`` since docker 25); a name that is a digest but
    not this content's means the archive was altered or mislabelled.
    Nothing relies on the name (the image id is computed from the bytes),
    so it is a warning."""
    stem = name.rpartition("/")[2].removesuffix(".json")
    got = media.sha256_digest(config)
    if len(stem) == 64 and all(c in "0123456789abcdef" for c in stem) and stem != got[7:]:
        return [f"{bundle.description}: config file {name} is named for digest sha256:{stem[:12]}... "
                f"but its content is {got[:19]}...; the archive was altered or mislabelled"]
    return []


def docker_sources(bundle: Bundle) -> list[DockerArchiveSource]:
    try:
        doc = json.loads(bundle.read("manifest.json", media.MAX_MANIFEST))
    except ValueError as exc:
        raise InvalidInput(f"{bundle.description}: manifest.json is not valid JSON: {exc}") from None
    if not isinstance(doc, list) or not doc:
        raise InvalidInput(f"{bundle.description}: manifest.json lists no images")
    return [DockerArchiveSource(bundle, e if isinstance(e, dict) else {}, i) for i, e in enumerate(doc)]


class DockerArchiveDestination:
    location = ""
    desired_compression = "none"

    def __init__(self, path: str, ctx: Context) -> None:
        self.w = BundleWriter(path, True, ctx.store.tmp_dir if ctx.store is not None else None)
        self.description = f"docker-archive:{path}"
        self.files: dict[str, str] = {}   # blob digest -> member name
        self.entries: list[dict[str, Any]] = []
        self.repositories: dict[str, dict[str, str]] = {}

    def try_reuse(self, desc: Descriptor, diff_id: str) -> str | None:
        if diff_id and diff_id in self.files:
            self.files[desc.digest] = self.files[diff_id]
            return "exists"
        return None

    def put_blob(self, desc: Descriptor, stream: BinaryIO, diff_id: str) -> None:
        if not diff_id:
            name = desc.digest[7:] + ".json"
            self.w.add_stream(name, stream, desc.digest, desc.size, "config")
            self.files[desc.digest] = name
            return
        name = diff_id[7:] + ".tar"
        raw = media.VerifyingReader(stream, desc.digest, desc.size, "layer blob")
        plain, _ = media.decompressed(raw)
        self.w.add_stream(name, plain, diff_id, what="uncompressed layer")
        raw.finish()
        self.files[desc.digest] = self.files[diff_id] = name

    def put_manifest(self, manifest: Manifest, config: bytes, names: list[str], source: ImageSource) -> str:
        tags = []
        for n in names:
            r = references.parse(n)
            if not r.digest:
                tags.append(str(r))
        layers = [self.files[d.digest] for d in manifest.layers]
        self.entries.append({"Config": self.files[manifest.config.digest], "RepoTags": tags, "Layers": layers})
        for t in tags:
            name, _, tag = t.rpartition(":")
            if layers:
                self.repositories.setdefault(name, {})[tag] = layers[-1][:-4]
        return manifest.config.digest

    def commit(self) -> None:
        self.w.add_bytes("manifest.json", json.dumps(self.entries, separators=(",", ":")).encode())
        self.w.add_bytes("repositories", json.dumps(self.repositories, separators=(",", ":")).encode())
        self.w.commit()

    def close(self) -> None:
        self.w.close()


class DockerArchiveTransport:
    name = "docker-archive"

    def sources(self, ref: str, ctx: Context) -> list[ImageSource]:
        return docker_sources(open_bundle(ref))

    def destination(self, ref: str, ctx: Context) -> DockerArchiveDestination:
        return DockerArchiveDestination(ref, ctx)

