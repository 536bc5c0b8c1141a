"""The blob info cache describes layers and images; it never keeps them."""

from __future__ import annotations

from layerfs.oci.cache import BlobInfoCache, LayerBlob
from layerfs.store import fsck, gc, transfer
from layerfs.store import images as img


def test_cache_records_are_weak_and_go_with_their_layer(store, tmp_path):
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_text("pulled once" * 100)
    lid = transfer.import_layer(store, str(tree))
    image = store.put_image(img.with_layer(None, lid, img.history_entry("import")))
    cache = BlobInfoCache(store)
    blob = LayerBlob("sha256:" + "b" * 64, 123, "sha256:" + "d" * 64, "application/vnd.oci.image.layer.v1.tar+gzip")
    cache.record_layer_blob(lid, "gzip", blob)
    cache.record_location(blob.digest, "registry.example/a")
    cache.record_image(image.id, b"{}", "application/vnd.oci.image.manifest.v1+json", b"{}", "registry.example/a")
    assert all(ref.weak for ref in store.refs())
    assert {ref.kind for ref in store.refs()} == {"oci-layer", "oci-blob", "oci-diffid", "oci-image"}
    assert cache.layer_of(blob.digest) == lid and cache.locations(blob.digest) == ["registry.example/a"]

    store.remove_image(image.id)
    assert gc.collect(store).layers_removed == 1
    assert store.refs() == []
    assert cache.layer_of(blob.digest) is None and cache.original_image(image.id) is None
    assert fsck.check(store).clean
