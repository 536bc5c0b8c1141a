"""Every path under a store root, named in one place.

The store owns its root directory. Other packages keep their own data
there (index caches, uppers, container dirs, build caches, credentials),
but they ask :class:`StoreLayout` where it goes instead of joining names
onto the root themselves, so gc, df and fsck see the same tree the writers
use::

    db.sqlite, db.sqlite-wal    metadata (store.db)
    lock                        flock: shared for writers, exclusive for gc
    objects/ab/cd...            file contents (store.objects)
    layers/<id>                 canonical layer manifests
    tmp/                        in-flight writes and staging; debris after a crash
    fscache/<image id>...       merged-index caches (fs.index); rebuilt if lost
    metalayers/<chain>.v1.erofs kernel backend's metadata layers (fs.metalayer); rebuilt if lost
    config.json                 store-wide settings: the default mount backend (fs.backend)
    uppers/<token>/upper        private uppers of mounts (fs.mount)
    snapshots/<id>/             containerd snapshots: uppers, mountpoints (snapshotter)
    containers/<id>/            container records and uppers (runtime)
    logs/mount-<hash>.log       mount daemon logs (fs.mount)
    logs/mount-server.log       the warm mount server's log (fs.mountserver)
    mount-server/sock, lock     the mount server's socket and its lifetime flock
    cache-mounts/<name>         RUN --mount=type=cache dirs (builder.run_mounts)
    build-stat-cache.sqlite*    the builder's own stat cache before it used
                                the db's stat_cache table: debris gc removes
    auth.json                   registry credentials (oci.auth)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from layerfs.store.rootdir import MOUNT_SERVER


@dataclass(frozen=True)
class StoreLayout:
    """The paths of the store at *root* (made absolute)."""

    root: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", os.path.abspath(self.root))

    def _at(self, *names: str) -> str:
        return os.path.join(self.root, *names)

    # -- the store's own ---------------------------------------------------
    @property
    def db(self) -> str:
        return self._at("db.sqlite")

    @property
    def db_files(self) -> tuple[str, ...]:
        """The database and its write-ahead log (what df counts)."""
        return self.db, self.db + "-wal"

    @property
    def lock(self) -> str:
        return self._at("lock")

    @property
    def objects(self) -> str:
        return self._at("objects")

    @property
    def layers(self) -> str:
        return self._at("layers")

    def layer(self, layer_id: str) -> str:
        return self._at("layers", layer_id)

    @property
    def tmp(self) -> str:
        return self._at("tmp")

    @property
    def made_on_open(self) -> tuple[str, ...]:
        """Directories every open store has."""
        return self.objects, self.layers, self.tmp

    # -- areas other packages keep here -------------------------------------
    @property
    def fscache(self) -> str:
        return self._at("fscache")

    def fscache_entry(self, name: str) -> str:
        """A file of the index cache: the image id, or ``<id>.<suffix>``."""
        return self._at("fscache", name)

    @staticmethod
    def fscache_image(name: str) -> str:
        """The image id an index cache file belongs to."""
        return name.split(".")[0]

    @property
    def metalayers(self) -> str:
        return self._at("metalayers")

    def metalayer_entry(self, name: str) -> str:
        """A file there: ``<chain key>.v<format>.erofs`` (fs.metalayer) or
        the kernel support probe's cache (fs.kernel)."""
        return self._at("metalayers", name)

    @staticmethod
    def metalayer_chain(name: str) -> str | None:
        """The layer chain key a metadata layer file belongs to (None: not one)."""
        return name.split(".")[0] if name.endswith(".erofs") else None

    @property
    def config(self) -> str:
        """Store-wide settings (``{"backend": "kernel"}``; fs.backend)."""
        return self._at("config.json")

    @property
    def uppers(self) -> str:
        return self._at("uppers")

    @property
    def snapshots(self) -> str:
        """containerd snapshots' dirs; staging like tmp/: their uppers are
        imported as layers at Commit, then deleted."""
        return self._at("snapshots")

    def private_upper(self, token: str) -> str:
        """The upper of a mount that made its own; its parent goes with it."""
        return self._at("uppers", token, "upper")

    @property
    def containers(self) -> str:
        return self._at("containers")

    def container(self, name: str) -> str:
        return self._at("containers", name)

    @property
    def logs(self) -> str:
        return self._at("logs")

    def mount_log(self, mountpoint: str) -> str:
        digest = hashlib.sha256(mountpoint.encode()).hexdigest()[:12]
        return self._at("logs", f"mount-{digest}.log")

    @property
    def mount_server(self) -> str:
        """The warm mount server's dir (``sock``, ``lock``; fs.mountserver)."""
        return self._at(MOUNT_SERVER)

    @property
    def mount_server_log(self) -> str:
        return self._at("logs", "mount-server.log")

    @property
    def cache_mounts(self) -> str:
        return self._at("cache-mounts")

    @property
    def old_build_stat_cache(self) -> tuple[str, ...]:
        """The files of the builder's former stat cache (with SQLite's WAL
        and shared-memory files); the builder now uses the db's table."""
        base = self._at("build-stat-cache.sqlite")
        return (base, base + "-wal", base + "-shm")

    @property
    def auth_file(self) -> str:
        return self._at("auth.json")
