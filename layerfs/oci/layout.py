"""``oci:DIR`` and ``oci-archive:FILE``: the OCI image layout, as a
directory or a tarball (oci-layout, index.json, blobs/sha256/...).

Names: each manifest in index.json carries the tag in
``org.opencontainers.image.ref.name`` (what umoci and skopeo read) and the
full name in ``io.containerd.image.name`` (what containerd reads); loading
prefers the full name.
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


def blob_path(digest: str) -> str:
    media.check_digest(digest)
    return "blobs/sha256/" + digest[7:]


def _name_of(desc: Descriptor) -> str:
    for key in (media.ANNOTATION_CONTAINERD_NAME, media.ANNOTATION_REF_NAME):
        value = desc.annotation(key)
        if value:
            try:
                r = references.parse(value)
            except InvalidInput:
                continue
            if ":" in value.rpartition("/")[2] or key == media.ANNOTATION_CONTAINERD_NAME:
                return str(r)
    return ""


class LayoutSource:
    location = ""

    def __init__(self, bundle: Bundle, desc: Descriptor, name: str) -> None:
        self.bundle, self.desc = bundle, desc
        self.names = [name] if name else []
        self.description = f"{bundle.description} ({name or desc.digest[:19]})"

    def manifests(self, compression: str | None) -> Iterator[Manifest]:
        raw = _read_blob(self.bundle, self.desc, media.MAX_MANIFEST, "manifest")
        yield media.parse_manifest(raw, self.desc.media_type)

    def can_open(self, desc: Descriptor) -> bool:
        return self.bundle.exists(blob_path(desc.digest))

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        try:
            return self.bundle.open(blob_path(desc.digest))
        except NotFound:
            raise NotFound(f"{self.bundle.description}: blob {desc.digest} is missing") from None

    def close(self) -> None:
        pass


def _read_blob(bundle: Bundle, desc: Descriptor, limit: int, what: str) -> bytes:
    if desc.size > limit:
        raise InvalidInput(f"{what} {desc.digest} is too large ({desc.size} bytes)")
    with bundle.open(blob_path(desc.digest)) as f:
        v = media.VerifyingReader(f, desc.digest, desc.size, what)
        data = v.read(desc.size + 1)
        v.finish()
    return data


def layout_sources(bundle: Bundle, ctx: Context, ref: str = "") -> list[LayoutSource]:
    """One source per image of the layout, nested indexes resolved by platform."""
    if not bundle.exists("oci-layout"):
        raise InvalidInput(f"{bundle.description}: not an OCI image layout (no oci-layout file)")
    try:
        layout = json.loads(bundle.read("oci-layout", 4096))
        version = layout.get("imageLayoutVersion")
    except (ValueError, AttributeError):
        raise InvalidInput(f"{bundle.description}: oci-layout is not valid JSON") from None
    if not isinstance(version, str) or not version.startswith("1."):
        raise InvalidInput(f"{bundle.description}: unsupported imageLayoutVersion {version!r}")
    entries = media.parse_index(bundle.read("index.json", media.MAX_MANIFEST), media.OCI_INDEX)
    out = []
    for d in entries:
        if ref and ref not in (d.annotation(media.ANNOTATION_REF_NAME), d.annotation(media.ANNOTATION_CONTAINERD_NAME)):
            continue
        name = _name_of(d)
        if d.media_type in media.INDEX_TYPES:
            nested = media.parse_index(_read_blob(bundle, d, media.MAX_MANIFEST, "index"), d.media_type)
            d = media.select_platform(nested, ctx.platform)
        if d.media_type in media.MANIFEST_TYPES:
            out.append(LayoutSource(bundle, d, name))
    if not out:
        raise NotFound(f"{bundle.description}: no image{' named ' + ref if ref else ''} in the layout")
    return out


class LayoutDestination:
    location = ""
    desired_compression = None

    def __init__(self, path: str, archive: bool, ctx: Context, ref_name: str = "") -> None:
        self.ref_name = ref_name
        tmp = ctx.store.tmp_dir if (archive and ctx.store is not None) else None
        self.w = BundleWriter(path, archive, tmp)
        self.description = f"{'oci-archive' if archive else 'oci'}:{path}"
        self.index: list[dict[str, Any]] = []
        if not archive and self.w.has("index.json"):
            try:
                self.index = json.loads(open(f"{self.w.path}/index.json", "rb").read()).get("manifests", [])
            except (ValueError, OSError, AttributeError):
                raise InvalidInput(f"{path}: existing index.json is not valid") from None

    def try_reuse(self, desc: Descriptor, diff_id: str) -> str | None:
        return "exists" if self.w.has(blob_path(desc.digest)) else None

    def put_blob(self, desc: Descriptor, stream: BinaryIO, diff_id: str) -> None:
        self.w.add_stream(blob_path(desc.digest), stream, desc.digest, desc.size)

    def put_manifest(self, manifest: Manifest, config: bytes, names: list[str], source: ImageSource) -> str:
        if not self.w.has(blob_path(manifest.digest)):
            self.w.add_bytes(blob_path(manifest.digest), manifest.raw)
        try:
            oci = json.loads(config)
            platform = {"architecture": oci.get("architecture", ""), "os": oci.get("os", "")}
            if oci.get("variant"):
                platform["variant"] = oci["variant"]
        except (ValueError, AttributeError):
            platform = {}
        if self.ref_name:
            self.index = [e for e in self.index
                          if (e.get("annotations") or {}).get(media.ANNOTATION_REF_NAME) != self.ref_name]
            self.index.append(Descriptor(manifest.media_type, manifest.digest, len(manifest.raw),
                                         ((media.ANNOTATION_REF_NAME, self.ref_name),),
                                         tuple(sorted(platform.items()))).to_json())
            return manifest.digest
        for name in names or [""]:
            ann = {}
            if name:
                r = references.parse(name)
                ann = {media.ANNOTATION_REF_NAME: r.tag, media.ANNOTATION_CONTAINERD_NAME: str(r)}
                self.index = [e for e in self.index
                              if (e.get("annotations") or {}).get(media.ANNOTATION_CONTAINERD_NAME) != str(r)]
            entry = Descriptor(manifest.media_type, manifest.digest, len(manifest.raw),
                               tuple(sorted(ann.items())), tuple(sorted(platform.items()))).to_json()
            self.index.append(entry)
        return manifest.digest

    def commit(self) -> None:
        index = {"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": self.index}
        self.w.add_bytes("oci-layout", json.dumps({"imageLayoutVersion": media.OCI_LAYOUT_VERSION}).encode())
        self.w.add_bytes("index.json", json.dumps(index, separators=(",", ":")).encode())
        self.w.commit()

    def close(self) -> None:
        self.w.close()


class LayoutTransport:
    def __init__(self, archive: bool) -> None:
        self.archive = archive
        self.name = "oci-archive" if archive else "oci"

    @staticmethod
    def _split(ref: str) -> tuple[str, str]:
        path, sep, image = ref.rpartition(":")
        if sep and "/" not in image and path:
            return path, image
        return ref, ""

    def sources(self, ref: str, ctx: Context) -> list[ImageSource]:
        path, image = self._split(ref)
        bundle = open_bundle(path)
        return layout_sources(bundle, ctx, image)

    def destination(self, ref: str, ctx: Context) -> LayoutDestination:
        path, image = self._split(ref)
        return LayoutDestination(path, self.archive, ctx, image)
