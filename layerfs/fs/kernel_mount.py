"""Mounting an image with the kernel backend, and the keeper of the mount.

The kernel twin of the FUSE daemon's lifecycle in ``fs.mount``, with the
same contract: a :class:`~layerfs.fs.mount.MountHandle` back, a record in
the mount registry (``fs.registry``) while mounted, the same upper-dir
layout, the same ``owner`` rule.

* The image's metadata layer comes from ``fs.metalayer`` (built and cached
  on first use), the data from ``ROOT/objects`` (``fs.kernel``).
* The caller makes the mount itself, so every refusal (unsupported kernel,
  upper on overlayfs or without trusted xattrs, missing object, hostile
  content) is raised in the caller as a LayerfsError.
* Kernel overlayfs needs no daemon, but a mount needs someone to end it
  when its owner dies, and the registry needs a process to tell a live
  mount from a stale record. So each mount gets a *keeper*: a tiny detached
  process (no FUSE, no threads) that waits for SIGTERM or its owner's
  death, then unmounts, syncs the upper, drops the record (and an orphan's
  scratch dir, and a private upper) and exits, as the FUSE daemon does.
  Its pid is the record's ``pid``, so ``unmount``, ``list_mounts`` and
  ``clean_stale`` treat both backends alike; a keeper killed with -9 leaves
  a stale record whose mount ``clean_stale`` detaches.
* The record keeps the image, hence its layers and objects, alive for gc;
  the mounted EROFS image stays open in the kernel even if its cache file
  goes.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import stat
import time

from layerfs import procfs
from layerfs.errors import LayerfsError, NotFound
from layerfs.fs import (
    kernel,
    mountproc,  # imported before any fork (see _spawn_keeper)
    registry,
)
from layerfs.fs.metalayer import ensure_metalayer
from layerfs.fs.upper import work_dir_for
from layerfs.store.layout import StoreLayout
from layerfs.store.objects import syncfs

BACKEND = "kernel"
FSTYPE = "overlay"


def support(store_root: str) -> kernel.Support:
    """What the running kernel can do (probed once per boot, cached in the store)."""
    return kernel.probe(StoreLayout(store_root).metalayers)


def mount_image_kernel(store_root: str, image_ref: str, mountpoint: str, upper_dir: str | None = None,
                       read_only: bool = False, container: str | None = None, owner: int | None = None,
                       owner_scratch: str | None = None):
    """Mount *image_ref* at *mountpoint* with kernel overlayfs; see the module docstring."""
    from layerfs.fs.mount import MountHandle, container_upper
    from layerfs.fs.registry import claim, register
    from layerfs.store.store import Store

    mp = os.path.realpath(mountpoint)
    if not os.path.isdir(mp):
        raise NotFound(f"mountpoint {mountpoint} is not a directory")
    if container is not None and upper_dir is None:
        upper_dir = container_upper(store_root, container)
    with Store(store_root) as store:
        claim(store, mp)
        kernel.require(support(store.root), writable=not read_only)
        image = store.image(image_ref)
        meta = ensure_metalayer(store, image)
        upper_dir, private = registry.choose_upper(store.layout, upper_dir, read_only)
        if upper_dir is not None:
            try:
                upper_dir = _check_upper(upper_dir, mp, read_only)
            except BaseException:
                registry.remove_private({"private": private, "upper": upper_dir})
                raise
        root = store.root
        objects = store.objects.root
    params = {"root": root, "mountpoint": mp, "image": image_ref, "image_id": image.id, "upper": upper_dir,
              "container": container, "read_only": read_only, "private": private, "log": "",
              "backend": BACKEND, "metalayer": meta}
    if owner is not None:
        start = procfs.start_time(owner)
        if start is None:
            raise NotFound(f"the process {owner} the mount would serve is gone")
        params |= {"owner": owner, "owner_start": start, "scratch": owner_scratch}
    try:
        try:
            _mount(mp, meta, objects, upper_dir, read_only)
        except kernel.BadMetaLayer:
            # A damaged cache file (a disk error; never a torn write, see
            # fs.metalayer) is rebuilt once, not trusted.
            with Store(root) as store:
                meta = params["metalayer"] = ensure_metalayer(store, image, rebuild=True)
            _mount(mp, meta, objects, upper_dir, read_only)
    except BaseException:
        registry.remove_private(params)
        raise
    pid = 0
    try:
        pid = _spawn_keeper(params)
        register(params, image.id, pid)
    except BaseException:
        if pid:
            os.kill(pid, signal.SIGTERM)  # the keeper unmounts and cleans up too
        if procfs.mounted_fstype(mp) == FSTYPE:
            kernel.unmount(mp, lazy=True)
        registry.remove_private(params)
        raise
    return MountHandle(mp, pid, image.id, upper_dir, "")


def _check_upper(upper: str, mp: str, read_only: bool) -> str:
    registry.check_upper(upper, mp, read_only)
    if read_only:
        return upper
    parent = os.path.dirname(upper)
    os.makedirs(parent, exist_ok=True)
    kernel.check_upper_fs(parent)
    return upper


def _mount(mp: str, meta: str, objects: str, upper: str | None, read_only: bool) -> None:
    work = work_dir_for(upper) if upper is not None else None

    def prepare(root: os.stat_result) -> None:
        if upper is None or read_only:
            return
        if not os.path.isdir(upper):
            os.mkdir(upper)
            # A fresh upper root shows the image's root as it is (overlayfs
            # takes the root's attributes from the upper dir).
            os.chown(upper, root.st_uid, root.st_gid)
            os.chmod(upper, stat.S_IMODE(root.st_mode))
            os.utime(upper, ns=(root.st_mtime_ns, root.st_mtime_ns))
        os.makedirs(work, exist_ok=True)

    kernel.mount_overlay(mp, meta, objects, upper, work, read_only=read_only, prepare=prepare)


# -- the keeper ----------------------------------------------------------------
class _Stop(Exception):
    pass


def _spawn_keeper(params: dict) -> int:
    """Start the mount's keeper (detached: double fork + setsid); returns its pid.

    The keeper runs only code this module imported at its top: a fork of a
    threaded caller must not need the import lock another thread may hold."""
    ready_r, ready_w = os.pipe()
    pid = mountproc.fork_detached(lambda: _keeper_main(params, ready_w), (ready_r,))
    os.close(ready_w)
    return mountproc.wait_ready(pid, ready_r, "the mount's keeper died before it was ready")


def _keeper_main(params: dict, ready_w: int) -> int:
    mountproc.close_inherited_fds({ready_w})
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.chdir("/")

    def stop(_sig, _frame) -> None:
        raise _Stop

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    orphaned = False
    try:
        try:
            owner_fd = mountproc.open_owner(params)
        except LayerfsError as exc:
            os.write(ready_w, f"error {exc}".encode())
            orphaned = True
            raise _Stop from None
        os.write(ready_w, f"ok {os.getpid()}\n".encode())
        os.close(ready_w)
        ready_w = -1
        _wait_for_owner(params, owner_fd)
        orphaned = True
    except _Stop:
        pass
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # finish the clean-up whatever comes
    if ready_w >= 0:
        os.close(ready_w)
    _end(params, orphaned)
    return 0


def _wait_for_owner(params: dict, owner_fd: int) -> None:
    """Return when the owner dies; without an owner, wait for a signal."""
    if not params.get("owner"):
        while True:
            signal.pause()
    if owner_fd >= 0:
        select.select([owner_fd], [], [])
        return
    while procfs.alive(params["owner"], params["owner_start"]):  # no pidfd: poll
        time.sleep(0.2)


def _end(params: dict, orphaned: bool) -> None:
    """Unmount, sync the upper, and clean up as the FUSE daemon does."""
    mp = params["mountpoint"]
    if procfs.mounted_fstype(mp) == FSTYPE:
        try:
            kernel.unmount(mp)
        except LayerfsError:
            kernel.unmount(mp, lazy=True)  # busy (a shell inside it): detach
    upper = params.get("upper")
    if upper and not params.get("read_only") and os.path.isdir(upper):
        try:
            syncfs(upper)
        except OSError:
            pass
    mountproc.finish_mount(params, orphaned, logging.getLogger("layerfs.fs"))
