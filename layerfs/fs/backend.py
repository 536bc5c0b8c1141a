"""Which data path mounts an image: the FUSE daemon or kernel overlayfs.

``fuse`` (the default and the reference) is the pyfuse3 daemon of
``fs.mount``; ``kernel`` is the composefs-style overlay of ``fs.kernel``.
The choice, first match wins:

1. an explicit ``--backend`` (the ``backend`` argument of the mount APIs);
2. the ``LAYERFS_BACKEND`` environment variable;
3. ``"backend"`` in the store's ``ROOT/config.json`` (a store-wide default:
   ``{"backend": "kernel"}``);
4. ``fuse``.

An unknown name anywhere is an InvalidInput that says where it came from.
"""

from __future__ import annotations

import json
import os

from layerfs.errors import InvalidInput
from layerfs.store.layout import StoreLayout

FUSE, KERNEL = "fuse", "kernel"
BACKENDS = (FUSE, KERNEL)
ENV = "LAYERFS_BACKEND"


def resolve(store_root: str, explicit: str | None = None) -> str:
    """The backend to use for a mount in the store at *store_root*."""
    if explicit:
        return _check(explicit, "--backend")
    env = os.environ.get(ENV)
    if env:
        return _check(env, f"${ENV}")
    path = StoreLayout(store_root).config
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        return FUSE
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path}: {exc}") from None
    value = config.get("backend") if isinstance(config, dict) else None
    return _check(value, path) if value else FUSE


def _check(name: object, source: str) -> str:
    if name not in BACKENDS:
        raise InvalidInput(f"{source}: unknown backend {name!r} (choose {' or '.join(BACKENDS)})")
    return str(name)
