"""The merged indexes of recently mounted images, kept in the warm mount
server's memory (``fs.mountserver``) so the daemons it forks find their
index there (``daemon.find_loaded_index``) instead of unmarshalling it.

Keyed by the cache file's identity (device, inode, size, times), so a
rebuilt cache is never served stale. Loaded in the server, which never
opens a Store: an unusable cache file is left for the next daemon to
rebuild.
"""

from __future__ import annotations

import gc
import logging
import os
from collections import OrderedDict

log = logging.getLogger("layerfs.mountserver")

INDEXES_KEPT = 4


class IndexMemory:
    """The merged indexes of the last few images mounted, by cache file."""

    def __init__(self, limit: int = INDEXES_KEPT) -> None:
        self.limit = limit
        self._kept: OrderedDict[tuple, object] = OrderedDict()
        self.generation = 0  # counts indexes added: a spare forked before one lacks it

    @staticmethod
    def _key(image_id: str, path: str) -> tuple | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return image_id, path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def get(self, image_id: str, path: str):
        """The index of *image_id* if the cache file at *path* is the one it
        was loaded from; None otherwise (the daemon then reads the file)."""
        key = self._key(image_id, path)
        index = self._kept.get(key) if key else None
        if index is not None:  # in a forked daemon: its log says so
            log.info("index of %s kept in memory by the mount server", image_id[:12])
        return index

    def load(self, root: str, image_id: str) -> None:
        """Keep the index of *image_id* (its cache file as it is now)."""
        from layerfs.fs.index import LowerIndex, cache_path

        path = cache_path(root, image_id)
        key = self._key(image_id, path)
        if key is None:
            return
        if key in self._kept:
            self._kept.move_to_end(key)
            return
        try:
            with open(path, "rb") as f:
                data = f.read()
            index = LowerIndex.load(data)
        except (OSError, ValueError, EOFError, TypeError):
            return  # unusable: the next daemon rebuilds it (never here: no Store in the server)
        if self._key(image_id, path) != key:
            return  # replaced while we read it
        self._kept[key] = index
        self.generation += 1
        while len(self._kept) > self.limit:
            self._kept.popitem(last=False)
        gc.freeze()  # long-lived: keep it out of collections here and in every fork

    def __len__(self) -> int:
        return len(self._kept)
