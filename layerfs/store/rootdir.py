"""Where a store's root is, for code that must not import the store.

``layerfs mount`` answered by the warm mount server (``fs.mountclient``)
finds the store root and the server's socket before anything heavy is
imported: ``store.layout`` alone costs it 20 ms (dataclasses imports
inspect). So the default root and the one name under it the fast path
needs live here, with nothing imported but ``os``; ``store.store`` and
``store.layout`` take them from this module.
"""

from __future__ import annotations

import os

DEFAULT_ROOT = "/var/lib/layerfs"
#: ROOT/mount-server/: the mount server's ``sock`` and ``lock`` (``StoreLayout.mount_server``)
MOUNT_SERVER = "mount-server"


def default_root() -> str:
    """``$LAYERFS_ROOT``, else /var/lib/layerfs for root, else the user's XDG data dir."""
    env = os.environ.get("LAYERFS_ROOT")
    if env:
        return env
    if os.geteuid() == 0:
        return DEFAULT_ROOT
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "layerfs")
