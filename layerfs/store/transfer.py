"""Getting trees into the store (import) and out of it (export)."""

from __future__ import annotations

import os
from typing import BinaryIO

from layerfs.errors import InvalidInput, NotFound
from layerfs.store import manifest as mf
from layerfs.store import scratch
from layerfs.store.extract import extract
from layerfs.store.images import Image
from layerfs.store.manifest import Entry
from layerfs.store.store import Store
from layerfs.store.tarlayer import TarReader, is_tar_file, write_tar
from layerfs.store.tree import MergedTree, diff, flatten


def import_layer(store: Store, source: str, base: Image | None = None, as_layer: bool = False) -> str:
    """Make one layer from *source* (a dir or a tar file); returns its id.

    Without *base*, or with *as_layer*, the source is the layer as it is
    (overlay upper-dir format for dirs, OCI whiteouts for tars). With a
    *base* and not *as_layer*, the source is a full tree and the layer is
    its difference from the base's tree, whiteouts included.
    """
    if not os.path.lexists(source):
        raise NotFound(f"no such file or directory: {source}")
    with store.writing():
        if os.path.isdir(source):
            entries, fresh, stat_rows = store.scan_dir(source, overlay=as_layer)
        elif is_tar_file(source):
            entries, fresh, stat_rows = _read_tar(store, source) + ([],)
        else:
            raise InvalidInput(f"{source} is neither a directory nor a tar archive")
        if base is not None and not as_layer:
            entries = diff(store.merged_tree(base), flatten([entries]))
        return store.commit_layer(entries, fresh, stat_rows)


def _read_tar(store: Store, path: str) -> tuple[list[Entry], list]:
    # On failure, objects written so far are uncommitted debris for gc:
    # nothing references them, so the store stays consistent.
    reader = TarReader(store.objects, store.import_claims())
    with open(path, "rb") as f:
        entries = reader.read(f)
    return entries, reader.fresh


def import_tar_stream(store: Store, f: BinaryIO) -> str:
    """A layer from an (optionally compressed) layer tar stream."""
    with store.writing():
        reader = TarReader(store.objects, store.import_claims())
        entries = reader.read(f)
        return store.commit_layer(entries, reader.fresh)


def flattened_entries(tree: MergedTree) -> list[Entry]:
    """The merged tree as one layer's entries, hardlink groups rebuilt."""
    return mf.canonical_links(tree.sorted_entries(), tree.link_groups())


def export_image(store: Store, image: Image, dest: str) -> None:
    """Write the image's flattened rootfs to *dest*: a tar file when *dest*
    ends in .tar (written aside and renamed into place), else a new dir."""
    entries = flattened_entries(store.merged_tree(image))
    if not dest.endswith(".tar"):
        extract(entries, dest, store.objects.write_to)
        return
    fd, tmp = scratch.partial_beside(dest)  # (one per writer: two exports to one name don't collide)
    try:
        with os.fdopen(fd, "wb") as out:
            write_tar(entries, out, store.objects.open, layer=False)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_tar_stream(store: Store, image: Image, out: BinaryIO) -> None:
    write_tar(flattened_entries(store.merged_tree(image)), out, store.objects.open, layer=False)


def extract_layer(store: Store, layer_id: str, dest: str) -> None:
    """A layer as an overlayfs upper dir (whiteouts as 0/0 char devices)."""
    extract(store.layer_entries(layer_id), dest, store.objects.write_to, overlay=True)
