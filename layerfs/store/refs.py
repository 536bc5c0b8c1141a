"""Store references: what lives outside the core and keeps (or describes) parts of it.

Not to be confused with image references (``name:tag``, ``references.py``).
Containers, mounts, the build cache and the OCI blob cache each register
records here (the ``refs`` table) instead of the store knowing about them.
A record says in typed form what it means for the store:

* ``layer_id`` / ``image_id``: what it points at. gc keeps them (and an
  image's layers) alive, unless the record is ``weak``.
* ``weak``: it only describes its target (an OCI digest mapping); gc does
  not keep the target for it, drops it when the target goes, and fsck does
  not report it dangling.
* ``in_use``: something running uses its image (a container, a mount):
  ``rmi`` refuses the image (or with force only untags it) and image prune
  keeps it.
* ``paths``: files outside the store's own that its owner uses (a mount's
  mountpoint, upper, work and scratch dirs): gc removes nothing at, in or
  around them while the record exists.
* ``data``: the owner's payload (JSON text by convention); the store never
  reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# The kinds the store itself has rules for (see store.remove_image, fsck,
# usage); owners pick their own kind names for anything else.
CONTAINER = "container"
MOUNT = "mount"
BUILD_CACHE = "build-cache"

COLUMNS = "kind, key, layer_id, image_id, data, weak, in_use, paths"


@dataclass(frozen=True)
class Ref:
    kind: str
    key: str
    layer_id: str | None = None
    image_id: str | None = None
    data: str | None = None
    weak: bool = False
    in_use: bool = False
    paths: tuple[str, ...] = ()

    def to_row(self) -> tuple:
        return (self.kind, self.key, self.layer_id, self.image_id, self.data,
                int(self.weak), int(self.in_use), json.dumps(list(self.paths)))

    @classmethod
    def from_row(cls, row: tuple) -> "Ref":
        kind, key, layer_id, image_id, data, weak, in_use, paths = row
        return cls(kind, key, layer_id, image_id, data, bool(weak), bool(in_use), decode_paths(paths))


def decode_paths(raw: str | None) -> tuple[str, ...]:
    """The ``paths`` column: a JSON list of strings (anything else is none)."""
    try:
        paths = json.loads(raw or "[]")
    except ValueError:
        return ()
    return tuple(p for p in paths if isinstance(p, str)) if isinstance(paths, list) else ()
