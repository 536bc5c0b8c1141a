"""Mounting an image with the kernel backend, and unmounting it.

The kernel twin of the FUSE daemon's lifecycle in ``fs.mount``, with the
same contract (a :class:`~layerfs.fs.mount.MountHandle` back, a store
reference of kind ``"mount"`` while mounted, the same upper-dir layout):

* the image's metadata layer comes from ``fs.metalayer`` (built and cached
  on first use), the data from ``ROOT/objects``; there is no daemon, so
  the reference's ``pid`` is 0 and ``backend`` is ``"kernel"``: the mount
  is alive while an overlay is mounted at its mountpoint;
* a fresh upper root gets the image root's attributes (as the FUSE
  daemon's), and the upper's filesystem is checked first: overlayfs
  refuses an upper on overlayfs and needs trusted.* xattrs (errors say so);
* the reference keeps the image, hence its layers and objects, alive for
  gc; the mounted EROFS image stays open in the kernel even if gc later
  drops the cache file.
"""

from __future__ import annotations

import json
import os
import secrets
import stat

from layerfs.errors import Conflict, InvalidInput, NotFound
from layerfs.fs import kernel
from layerfs.fs.metalayer import ensure_metalayer

BACKEND = "kernel"


def support(store_root: str) -> kernel.Support:
    """What the running kernel can do (probed once per boot, cached in the store)."""
    return kernel.probe(os.path.join(store_root, "metalayers"))


def mount_image_kernel(store_root: str, image_ref: str, mountpoint: str, upper_dir: str | None = None,
                       read_only: bool = False, container: str | None = None):
    """Mount *image_ref* at *mountpoint* with kernel overlayfs; see the module docstring."""
    from layerfs.fs.mount import REF_KIND, MountHandle, container_upper, mounted_fstype
    from layerfs.store.store import Store

    mp = os.path.realpath(mountpoint)
    if not os.path.isdir(mp):
        raise NotFound(f"mountpoint {mountpoint} is not a directory")
    if container is not None and upper_dir is None:
        upper_dir = container_upper(store_root, container)
    with Store(store_root) as store:
        if store.get_ref(REF_KIND, mp) is not None and mounted_fstype(mp) is not None:
            raise Conflict(f"{mp} is already a layerfs mount")
        kernel.require(support(store.root), writable=not read_only)
        image = store.image(image_ref)
        meta = ensure_metalayer(store, image)
        private = upper_dir is None and not read_only
        if private:
            upper_dir = os.path.join(store.root, "uppers", secrets.token_hex(6), "upper")
        if upper_dir is not None:
            upper_dir = _check_upper(os.path.abspath(upper_dir), mp, read_only)
        data = {"backend": BACKEND, "image": image_ref, "upper": upper_dir, "container": container,
                "read_only": read_only, "private": private, "log": "", "pid": 0, "metalayer": meta}
        store.add_ref(REF_KIND, mp, image_id=image.id, data=json.dumps(data))
        try:
            _mount(mp, meta, store.objects.root, upper_dir, read_only)
        except BaseException:
            store.drop_refs(REF_KIND, mp)
            _remove_private(data)
            raise
    return MountHandle(mp, 0, image.id, upper_dir, "")


def _check_upper(upper: str, mp: str, read_only: bool) -> str:
    if upper == mp or upper.startswith(mp + "/"):
        raise InvalidInput("the upper dir cannot be inside the mountpoint")
    if read_only:
        if not os.path.isdir(upper):
            raise NotFound(f"upper dir {upper} does not exist")
        return upper
    parent = os.path.dirname(upper)
    os.makedirs(parent, exist_ok=True)
    kernel.check_upper_fs(parent)
    return upper


def _mount(mp: str, meta: str, objects: str, upper: str | None, read_only: bool) -> None:
    from layerfs.fs.upper import work_dir_for

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


def is_kernel_mount(data: dict) -> bool:
    return data.get("backend") == BACKEND


def kernel_alive(mountpoint: str) -> bool:
    from layerfs.fs.mount import mounted_fstype

    return mounted_fstype(mountpoint) == "overlay"


def unmount_kernel(store_root: str, mountpoint: str, lazy: bool = False) -> None:
    """Unmount a kernel-backend mount, sync its upper, drop its reference."""
    from layerfs.fs.mount import REF_KIND
    from layerfs.store.objects import syncfs
    from layerfs.store.store import Store

    mp = os.path.realpath(mountpoint)
    with Store(store_root) as store:
        row = store.get_ref(REF_KIND, mp)
        data = json.loads(row[2] or "{}") if row else {}
        if row is None or not is_kernel_mount(data):
            raise NotFound(f"{mountpoint} is not a layerfs kernel mount")
        if kernel_alive(mp):
            kernel.unmount(mp, lazy=lazy)
        if data.get("upper") and not data.get("read_only") and os.path.isdir(data["upper"]):
            syncfs(data["upper"])
        store.drop_refs(REF_KIND, mp)
        _remove_private(data)


def _remove_private(data: dict) -> None:
    if data.get("private") and data.get("upper"):
        import shutil

        shutil.rmtree(os.path.dirname(data["upper"]), ignore_errors=True)
