"""The ``trusted.overlay.*`` names of overlay-format dirs, and their escaping.

overlayfs acts on its own xattrs (opaque, redirect, metacopy, whiteout
...); an image's own ``trusted.overlay.X`` must never be taken for one, so
in every overlay-format dir layerfs writes (extracted layers, upper dirs,
metadata layers) it is stored as ``trusted.overlay.overlay.X`` and read
back unescaped, as overlayfs 6.7+ does. A leaf module: the FUSE daemon
imports it without the rest of the store.
"""

from __future__ import annotations

OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_XATTR_PREFIX = "trusted.overlay."
ESCAPED_XATTR_PREFIX = "trusted.overlay.overlay."


def escape_overlay_xattr(name: str) -> str:
    """The name a file's own ``trusted.overlay.X`` has in an overlay-format
    dir: ``trusted.overlay.overlay.X``, as overlayfs (6.7+) stores it, so
    image content never acts as an overlay marker."""
    if name.startswith(OVERLAY_XATTR_PREFIX):
        return ESCAPED_XATTR_PREFIX + name[len(OVERLAY_XATTR_PREFIX):]
    return name


def shown_overlay_xattr(name: str) -> str | None:
    """Inverse of :func:`escape_overlay_xattr`; None for overlay's own markers."""
    if name.startswith(ESCAPED_XATTR_PREFIX):
        return OVERLAY_XATTR_PREFIX + name[len(ESCAPED_XATTR_PREFIX):]
    return None if name.startswith(OVERLAY_XATTR_PREFIX) else name
