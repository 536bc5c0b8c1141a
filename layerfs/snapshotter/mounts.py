"""What a snapshot hands containerd to mount, and the layerfs mounts behind it.

Each snapshot has a directory ``ROOT/snapshots/<id>/`` holding ``fs`` (its
upper: an overlayfs-format dir, 0/0 char-device whiteouts and the opaque
xattr), ``work`` (overlayfs' work dir), ``mnt`` (where its layerfs union is
mounted) and ``lower`` (a read-only layerfs mount of the parent chain).
How a snapshot is served is its *mode*, chosen at Prepare/View:

* ``bind``: no parent. ``fs`` itself, bind-mounted (read-only for a
  view), as containerd's overlayfs snapshotter does for the first layer:
  the diff applier writes straight to disk.
* ``overlay``: a layer being unpacked on top of a parent (containerd's
  ``extract-`` keys). An ``overlay`` mount whose lowerdir is the parent
  chain served read-only by layerfs and whose upperdir is ``fs``.
  containerd's applier recognises a single overlay mount and writes the
  layer tar into the upperdir directly, turning OCI whiteouts into overlay
  whiteouts (which ``import --layer`` scanning reads back); the lowerdir
  answers its look-ups of parent directories. Mounted by the kernel, the
  same mount is the correct union, so it is valid for any other user too.
* ``fuse``: a container rootfs on a committed chain. The layerfs union of
  the chain with ``fs`` as its copy-on-write upper, mounted at ``mnt`` by
  a layerfs daemon; containerd gets a bind mount of ``mnt``.
* ``view``: a read-only view of a committed chain: the union mounted
  read-only at ``mnt``, bind-mounted read-only.

The layerfs daemons are separate processes: they outlive a restart of the
snapshotter (running containers keep their rootfs) and are re-established
by :func:`activate` when they died. Remove/Commit stop them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from layerfs.errors import NotFound
from layerfs.fs import mount as fsmount
from layerfs.snapshotter.records import Snapshot
from layerfs.store.layout import StoreLayout

BIND, OVERLAY, FUSE, VIEW_MODE = "bind", "overlay", "fuse", "view"


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Dirs:
    base: str

    @property
    def upper(self) -> str:
        return os.path.join(self.base, "fs")

    @property
    def work(self) -> str:
        return os.path.join(self.base, "work")

    @property
    def mnt(self) -> str:
        return os.path.join(self.base, "mnt")

    @property
    def lower(self) -> str:
        return os.path.join(self.base, "lower")


def snapshots_dir(root: str) -> str:
    return StoreLayout(root).snapshots


def dirs(root: str, snap_id: str) -> Dirs:
    return Dirs(os.path.join(snapshots_dir(root), snap_id))


def create_dirs(root: str, snap_id: str, mode: str) -> Dirs:
    """Make the snapshot's directories aside and rename them into place, so
    a crash never leaves a half-made ``<id>`` (Cleanup sweeps ``new-*``)."""
    final = dirs(root, snap_id)
    tmp = os.path.join(snapshots_dir(root), f"new-{snap_id}")
    os.makedirs(tmp, mode=0o700)
    subdirs = {BIND: ("fs",), OVERLAY: ("fs", "work", "lower"), FUSE: ("mnt",), VIEW_MODE: ("mnt",)}[mode]
    for name in subdirs:
        os.mkdir(os.path.join(tmp, name), 0o755)
    os.rename(tmp, final.base)
    return final


def remove_dirs(root: str, snap_id: str) -> None:
    shutil.rmtree(dirs(root, snap_id).base, ignore_errors=True)


def mounts_of(root: str, snap: Snapshot) -> list[Mount]:
    d = dirs(root, snap.id)
    ro = snap.kind == "view"
    if snap.mode == OVERLAY:
        return [Mount("overlay", "overlay", (f"workdir={d.work}", f"upperdir={d.upper}", f"lowerdir={d.lower}"))]
    source = d.upper if snap.mode == BIND else d.mnt
    return [Mount("bind", source, ("ro" if ro else "rw", "rbind"))]


def _alive(mp: str) -> bool:
    return fsmount.mounted_fstype(mp) == f"fuse.{fsmount.FSNAME}" and not fsmount.is_enotconn(mp)


def _ensure(root: str, image_id: str, mp: str, upper: str | None, read_only: bool) -> None:
    if _alive(mp):
        return
    _stop(root, mp)  # a dead daemon leaves an ENOTCONN mount and a stale reference
    # The FUSE daemon whatever the store's default backend: the modes above
    # (and _alive) are written for it.
    fsmount.mount_image(root, image_id, mp, upper_dir=upper, read_only=read_only, backend="fuse")


def activate(root: str, snap: Snapshot) -> None:
    """Make sure the layerfs mount *snap* needs is being served."""
    d = dirs(root, snap.id)
    if snap.mode == OVERLAY:
        _ensure(root, snap.image_id, d.lower, None, True)
    elif snap.mode == FUSE:
        _ensure(root, snap.image_id, d.mnt, d.upper, False)
    elif snap.mode == VIEW_MODE:
        _ensure(root, snap.image_id, d.mnt, None, True)


def _stop(root: str, mp: str) -> None:
    try:
        fsmount.unmount(root, mp)
    except NotFound:
        pass


def deactivate(root: str, snap_id: str) -> None:
    """Stop every layerfs mount of the snapshot (its upper is then stable:
    the daemon syncs it before it exits)."""
    d = dirs(root, snap_id)
    for mp in (d.mnt, d.lower):
        if os.path.isdir(mp) or fsmount.mounted_fstype(mp):
            _stop(root, mp)
