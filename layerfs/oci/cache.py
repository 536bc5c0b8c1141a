"""BlobInfoCache: what layerfs knows about OCI blobs, kept in store refs.

Like containers/image's blobinfocache, it remembers which layer a
compressed digest or diff_id stands for (so pulls skip layers the store
holds), which blob layerfs generated for a layer (so a re-push does not
regenerate a tar just to learn its digest), and where a blob was last seen
("registry/repo", so a push can cross-repository mount instead of upload).

Rows (kind, key -> layer_id, data):

    oci-blob    sha256 of a blob     -> layer id, {"media_type","size","diff_id","locations"}
    oci-diffid  sha256 of the tar    -> layer id
    oci-layer   "<layer id>/<comp>/<tar version>" -> layer id, {"digest","size","diff_id","media_type"}
    oci-image   layerfs image id     -> image id, {"manifest","media_type","config","location"}

The refs are weak: they describe the layers and images they name but do
not keep them alive, and gc drops them when their target goes.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

from layerfs.errors import NotFound
from layerfs.store.refs import Ref
from layerfs.store.store import Store

MAX_LOCATIONS = 16
# The version of the layer tars layerfs writes (tarlayer.write_tar). Bump it
# whenever their bytes change: a blob digest cached for an older writer is
# then not offered for a re-push, which would otherwise regenerate different
# bytes than the manifest promised. 2: hardlink headers carry the file's
# metadata (1 wrote 0644 / mtime 0, keyed without a version).
LAYER_TAR_VERSION = 2


@dataclass(frozen=True)
class LayerBlob:
    digest: str
    size: int
    diff_id: str
    media_type: str


def layer_key(layer_id: str, compression: str) -> str:
    return f"{layer_id}/{compression}/{LAYER_TAR_VERSION}"


class BlobInfoCache:
    def __init__(self, store: Store, lock: threading.RLock | None = None) -> None:
        self.store = store
        # One sqlite connection is shared by the copy's worker threads.
        self.lock = lock or threading.RLock()

    def _layer_exists(self, lid: str | None) -> bool:
        if not lid:
            return False
        try:
            self.store.layer_info(lid)
        except NotFound:
            return False
        return True

    def layer_of(self, digest: str) -> str | None:
        """The layer a blob digest or diff_id stands for, if the store has it."""
        with self.lock:
            for kind in ("oci-blob", "oci-diffid"):
                ref = self.store.get_ref(kind, digest)
                if ref and self._layer_exists(ref.layer_id):
                    return ref.layer_id
        return None

    def layer_blob(self, layer_id: str, compression: str) -> LayerBlob | None:
        with self.lock:
            ref = self.store.get_ref("oci-layer", layer_key(layer_id, compression))
        if not ref or not ref.data:
            return None
        d = json.loads(ref.data)
        return LayerBlob(d["digest"], d["size"], d["diff_id"], d["media_type"])

    def record_layer_blob(self, layer_id: str, compression: str, blob: LayerBlob) -> None:
        with self.lock:
            self._put("oci-layer", layer_key(layer_id, compression), layer_id=layer_id,
                      data=json.dumps(blob.__dict__))
            self.record_blob(blob.digest, layer_id, blob.media_type, blob.size, blob.diff_id)

    def record_blob(self, digest: str, layer_id: str, media_type: str, size: int, diff_id: str,
                    location: str = "") -> None:
        with self.lock:
            old = self._blob_data(digest)
            locs = old.get("locations", [])
            if location and location not in locs:
                locs = ([location] + locs)[:MAX_LOCATIONS]
            self._put("oci-blob", digest, layer_id=layer_id, data=json.dumps(
                {"media_type": media_type, "size": size, "diff_id": diff_id, "locations": locs}))
            self._put("oci-diffid", diff_id, layer_id=layer_id)

    def _put(self, kind: str, key: str, **target: str | None) -> None:
        self.store.add_ref(Ref(kind, key, weak=True, **target))

    def _blob_data(self, digest: str) -> dict[str, Any]:
        ref = self.store.get_ref("oci-blob", digest)
        return json.loads(ref.data) if ref and ref.data else {}

    def record_location(self, digest: str, location: str) -> None:
        if not location:
            return
        with self.lock:
            ref = self.store.get_ref("oci-blob", digest)
            if not ref or not ref.layer_id:
                return  # configs and blobs of unknown layers: nothing to record
            d = json.loads(ref.data) if ref.data else {}
            locs = d.get("locations", [])
            if location in locs:
                return
            d["locations"] = ([location] + locs)[:MAX_LOCATIONS]
            self._put("oci-blob", digest, layer_id=ref.layer_id, data=json.dumps(d))

    def locations(self, digest: str) -> list[str]:
        with self.lock:
            return list(self._blob_data(digest).get("locations", []))

    def record_image(self, image_id: str, manifest: bytes, media_type: str, config: bytes, location: str) -> None:
        with self.lock:
            self._put("oci-image", image_id, image_id=image_id, data=json.dumps(
                {"manifest": manifest.decode(), "media_type": media_type, "config": config.decode(),
                 "location": location}))

    def original_image(self, image_id: str) -> dict[str, Any] | None:
        with self.lock:
            ref = self.store.get_ref("oci-image", image_id)
        return json.loads(ref.data) if ref and ref.data else None
