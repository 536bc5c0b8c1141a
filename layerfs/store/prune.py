"""Removing images the way docker does: with the parents nothing else uses.

An image's *parent* is the image it was made from by one step: its
history minus the last entry, its layers minus the last one if that entry
added a layer. That is what the builder (one image per step) and
``import --base`` produce; layerfs records no parent id, so the relation is
read from the configs (history entries carry their creation time, so two
unrelated images do not match by accident).

An image is *used* if it is tagged, if a container or mount record names
it (a reference ``in_use``), or if it is the parent of an image that stays. Removing an image takes
its untagged parents with it as long as nothing else uses them (docker's
rmi: a build's intermediate step images go with the built image).
*Dangling* images are untagged, unused images that no image is made from:
what ``image prune`` removes (``-a``: every image no container or mount
uses). Bytes come back when gc then runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from layerfs.store.images import Image
from layerfs.store.store import Store


@dataclass(frozen=True)
class Lineage:
    parents: dict[str, set[str]] = field(default_factory=dict)
    children: dict[str, set[str]] = field(default_factory=dict)


def lineage(store: Store, listing: list[tuple[Image, list[str]]] | None = None) -> Lineage:
    """Parents and children of every image in the store (*listing*: what
    ``store.images()`` returned, if the caller has it already)."""
    def key(layers: list[str], history: list[dict]) -> tuple:
        return tuple(layers), json.dumps(history, sort_keys=True)

    images = [image for image, _tags in (store.images() if listing is None else listing)]
    by_key: dict[tuple, list[str]] = {}
    for image in images:
        by_key.setdefault(key(image.layers, image.history), []).append(image.id)
    out = Lineage()
    for image in images:
        history, layers = image.history, image.layers
        if not history:
            continue
        added = 0 if history[-1].get("empty_layer") else 1
        if added > len(layers):
            continue
        for parent in by_key.get(key(layers[:len(layers) - added], history[:-1]), ()):
            if parent != image.id:
                out.parents.setdefault(image.id, set()).add(parent)
                out.children.setdefault(parent, set()).add(image.id)
    return out


def _users(store: Store) -> set[str]:
    return {r.image_id for r in store.refs() if r.in_use and r.image_id}


def remove_image(store: Store, ref: str, force: bool = False) -> list[str]:
    """docker rmi: ``Store.remove_image``, then the image's untagged
    parents that nothing else uses. Returns the Untagged:/Deleted: lines."""
    family = lineage(store)
    image = store.image(ref)
    lines = store.remove_image(ref, force=force)
    if lines[-1:] != [f"Deleted: {image.id}"]:
        return lines
    return lines + _remove_parents(store, family, {image.id})


def _remove_parents(store: Store, family: Lineage, removed: set[str]) -> list[str]:
    """Remove the untagged, unused parents of *removed*, recursively."""
    users = _users(store)
    lines: list[str] = []
    todo = [p for iid in removed for p in family.parents.get(iid, ())]
    while todo:
        iid = todo.pop()
        if iid in removed or iid in users or store.tags_of(iid):
            continue
        if not family.children.get(iid, set()) <= removed:
            continue  # another image is made from it
        lines += store.remove_image(iid)
        removed.add(iid)
        todo += family.parents.get(iid, ())
    return lines


def dangling(store: Store, family: Lineage | None = None,
             listing: list[tuple[Image, list[str]]] | None = None) -> list[str]:
    """Untagged, unused images no other image is made from."""
    listing = store.images() if listing is None else listing
    family = family or lineage(store, listing)
    users = _users(store)
    return [image.id for image, tags in listing
            if not tags and image.id not in users and not family.children.get(image.id)]


def prune_images(store: Store, all_images: bool = False) -> list[str]:
    """docker image prune [-a]: dangling images, or with *all_images* every
    image no container or mount uses, each with the untagged parents
    nothing else uses. Returns the Untagged:/Deleted: lines."""
    listing = store.images()
    family = lineage(store, listing)
    if all_images:
        users = _users(store)
        candidates = [image.id for image, _tags in listing if image.id not in users]
    else:
        candidates = dangling(store, family, listing)
    removed: set[str] = set()
    lines = _remove_leaves_first(store, family, candidates, removed)
    return lines + _remove_parents(store, family, set(removed))


def _remove_leaves_first(store: Store, family: Lineage, candidates: Iterable[str], removed: set[str]) -> list[str]:
    """Remove the candidates whose children all go too, children first."""
    pending = set(candidates)
    lines: list[str] = []
    progress = True
    while progress:
        progress = False
        for iid in sorted(pending):
            if family.children.get(iid, set()) <= removed:
                lines += store.remove_image(iid, force=True)
                removed.add(iid)
                pending.discard(iid)
                progress = True
    return lines
