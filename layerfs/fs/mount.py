"""Mounting an image with the layerfs daemon, and unmounting it.

Public API (the CLI, the runtime and the Dockerfile builder use these)::

    h = mount_image(store_root, "busybox:latest", "/mnt/x",
                    upper_dir="/var/lib/layerfs/containers/c1/upper")
    ...                        # /mnt/x is a container rootfs; writes go to upper_dir
    unmount(store_root, "/mnt/x")

* :func:`mount_image` returns a :class:`MountHandle` only once the mount
  answers requests (the daemon writes to a pipe after the FUSE session is
  up and the parent then stats the mountpoint through it); any error before
  that (no such image, mountpoint missing or already mounted, FUSE missing)
  is raised in the caller. The daemon detaches (double fork + setsid) unless
  ``foreground`` is set, in which case the call blocks until unmount.
* ``upper_dir`` is a standard overlayfs upper dir (see ``fs.upper``); its
  work dir is ``<upper_dir>.work``. With ``upper_dir=None`` and not
  ``read_only`` a private upper is made under ``ROOT/uppers/`` and removed
  again when the mount ends. :func:`container_upper` gives the upper of a
  named container (``ROOT/containers/NAME/upper``), which outlives mounts.
* Each active mount has a record in the store (``fs.registry``), so
  :func:`list_mounts` can show it and gc keeps its image and the paths it
  uses. A daemon that died leaves a stale record and an ENOTCONN
  mountpoint; :func:`unmount` and :func:`list_mounts` clean both up.
* SIGTERM/SIGINT make the daemon leave the FUSE loop, unmount, sync the
  upper's filesystem, drop its record and exit 0. The daemon writes to
  the store only that record, so killing it can never corrupt the store.
* A mount that serves one process (``owner``: a build's RUN step, a
  container's owner) must not outlive it: the daemon watches the owner
  through a pidfd and, when it dies, unmounts and exits as on SIGTERM,
  then removes ``owner_scratch`` (the owner's staging dir) if given. A
  mount without an owner (``layerfs mount``) stays until unmounted.
* The daemon logs to ``ROOT/logs/mount-<hash of mountpoint>.log``
  (corrupt objects, unexpected errors; everything with ``debug``).

Start-up cost (the goal is < 0.3 s for a 30,000-file image, CLI included):
the daemon is a fork of the caller that imports trio and pyfuse3 (most of
its start-up) while the caller resolves the image; :func:`prefork` lets a
caller fork it even earlier (a container's shim), and :func:`preload` lets
a long-lived caller (a fork server) import the daemon's modules once so its
forks start with nothing to import. The merged index comes from a marshal
cache per image id (``fs.index``). ``layerfs mount`` goes further: the warm
mount server (``fs.mountserver``) runs this module in a fork of a process
that has imported everything and keeps recent indexes in memory.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

from layerfs import procfs
from layerfs.errors import InvalidInput, LayerfsError, NotFound, Unsupported
from layerfs.fs.daemon import (
    Daemon,
    preload,  # noqa: F401 - part of this module's API
    run_daemon,
)
from layerfs.fs.registry import (  # noqa: F401
    FSNAME,
    REF_KIND,
    MountInfo,
    check_upper,
    choose_upper,
    claim,
    clean_stale,
    forget,
    is_enotconn,
    list_mounts,
    register,
    remove_private,
    unmount,
)
from layerfs.procfs import mounted_fstype  # noqa: F401 - part of this module's API
from layerfs.store.layout import StoreLayout

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class MountHandle:
    mountpoint: str
    pid: int
    image_id: str
    upper: str | None
    log: str


# -- paths -----------------------------------------------------------------
def container_upper(store_root: str, name: str) -> str:
    """The upper dir of container *name*: ROOT/containers/NAME/upper."""
    if not _NAME.match(name):
        raise InvalidInput(f"invalid container name: {name!r}")
    return os.path.join(StoreLayout(store_root).container(name), "upper")


# -- mounting --------------------------------------------------------------
_preforked: "Daemon | None" = None


def prefork() -> None:
    """Start the mount daemon now, before the caller's own imports.

    A process that is about to call :func:`mount_image` (the ``layerfs
    mount`` command) calls this first thing, so the daemon's imports of
    trio and pyfuse3 (the bulk of its start-up) run on the other core while
    the caller imports its CLI and resolves the image. An unused daemon
    exits by itself when this process exits (EOF on its pipe). Cheap to
    call: this module imports nothing heavy.
    """
    global _preforked
    if _preforked is None and os.path.exists("/dev/fuse"):
        _preforked = Daemon()


def _take_preforked() -> "Daemon | None":
    global _preforked
    daemon, _preforked = _preforked, None
    return daemon


def has_preforked() -> bool:
    """True if :func:`prefork` forked a daemon that no mount took yet."""
    return _preforked is not None


def check_image(store_root: str, image_ref: str, store=None) -> None:
    """NotFound if the store has no image *image_ref*: ``layerfs mount``
    reports what was asked for before where it goes (a missing image even
    when the mountpoint is missing too). *store*: an open Store of
    *store_root* to ask (else one is opened)."""
    with _opened(store_root, store) as st:
        st.image(image_ref)


@contextlib.contextmanager
def _opened(store_root: str, store=None) -> Iterator:
    """*store* if given (left open), else a Store of *store_root* opened for the block."""
    if store is not None:
        yield store
        return
    from layerfs.store.store import Store

    with Store(store_root) as opened:
        yield opened


def _usable_mountpoint(store_root: str, mountpoint: str, store) -> str:
    """The absolute mountpoint, a directory. One of this store's mounts
    whose daemon died (kill -9: the dir answers ENOTCONN) is cleaned up
    first, as a remount of a restarted container must work."""
    mp = os.path.realpath(mountpoint)
    if os.path.isdir(mp):
        return mp
    if not is_enotconn(mp):
        raise NotFound(f"mountpoint {mountpoint} is not a directory")
    with _opened(store_root, store) as st:
        clean_stale(st, mp)
    if not os.path.isdir(mp):
        raise LayerfsError(f"mountpoint {mountpoint} is a FUSE mount whose daemon is gone "
                           f"(not this store's: umount -l {mountpoint} detaches it)")
    return mp


def mount_image(store_root: str, image_ref: str, mountpoint: str, upper_dir: str | None = None,
                read_only: bool = False, foreground: bool = False, debug: bool = False,
                container: str | None = None, owner: int | None = None,
                owner_scratch: str | None = None, backend: str | None = None, store=None) -> MountHandle:
    """Mount *image_ref* at *mountpoint*; see the module docstring.

    *store*: an open Store of *store_root* to use, left open (the mount
    server's worker opens it ahead and closes it after answering). Only
    with a daemon already forked (:func:`prefork`) before it was opened:
    forking with an SQLite connection open is not safe.

    *backend* (``fuse`` or ``kernel``; default from ``fs.backend.resolve``)
    picks the data path; the kernel one is ``fs.kernel_mount``.

    The daemon is forked first thing, so its imports of trio and pyfuse3
    (the bulk of its start-up) overlap with the caller resolving the image
    and loading its index; a message on a pipe then tells it what to mount.
    """
    from layerfs.fs import backend as backends

    if backends.resolve(store_root, backend) == backends.KERNEL:
        return _mount_kernel(store_root, image_ref, mountpoint, upper_dir, read_only, foreground, container,
                             owner, owner_scratch)
    if not os.path.exists("/dev/fuse"):
        raise Unsupported("/dev/fuse is missing (modprobe fuse, or run the container with --device /dev/fuse)")
    mp = _usable_mountpoint(store_root, mountpoint, store)
    if container is not None and upper_dir is None:
        upper_dir = container_upper(store_root, container)
    daemon = _take_preforked()
    if foreground and daemon is not None:
        daemon.abort()
        daemon = None
    if store is not None and (foreground or daemon is None):
        raise LayerfsError("internal error: an open store is for a preforked daemon only")
    if not foreground and daemon is None:
        daemon = Daemon()
    try:
        with _opened(store_root, store) as st:  # one store for the look-ups and the record
            params, image_id = _resolve(st, image_ref, mp, upper_dir, read_only, debug, container)
            if owner is not None:
                start = procfs.start_time(owner)
                if start is None:
                    raise NotFound(f"the process {owner} the mount would serve is gone")
                params |= {"owner": owner, "owner_start": start, "scratch": owner_scratch}
            if not foreground:
                pid = daemon.go(params)
                daemon = None
                register(params, image_id, pid, store=st)
        if foreground:
            return _run_foreground(params, image_id)
    finally:
        if daemon is not None:
            daemon.abort()
    _raise_readahead(os.stat(mp).st_dev)  # answered by the daemon: the mount serves requests
    return MountHandle(mp, pid, image_id, params["upper"], params["log"])


def _raise_readahead(dev: int) -> None:
    """Let the kernel read ahead 1 MiB per request on the FUSE mount *dev*
    (it offers 128 KiB): fewer, bigger reads for sequential access. Set
    here, by the caller, once the mount answered a request: the kernel has
    the daemon's INIT reply then (which would set it back). Never by the
    daemon itself: a request a daemon makes of its own mount, read by its
    loop but not answered when it is killed, keeps the process, its
    /dev/fuse fd and so the mount alive, unanswerable, for good (a
    `--foreground` mount keeps 128 KiB)."""
    try:
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
            f.write("1024")
    except OSError:  # no sysfs, not root: the kernel's default then
        pass


def _mount_kernel(store_root, image_ref, mountpoint, upper_dir, read_only, foreground, container, owner,
                  owner_scratch) -> MountHandle:
    from layerfs.fs.kernel_mount import mount_image_kernel

    daemon = _take_preforked()
    if daemon is not None:
        daemon.abort()  # forked for a FUSE mount (``prefork``): not needed
    if foreground:
        raise InvalidInput("--foreground is for the fuse backend: a kernel mount has no daemon to keep")
    return mount_image_kernel(store_root, image_ref, mountpoint, upper_dir, read_only, container, owner,
                              owner_scratch)


def _resolve(store, image_ref, mp, upper_dir, read_only, debug, container) -> tuple[dict, str]:
    from layerfs.fs.index import ensure_index_cache

    claim(store, mp)
    image = store.image(image_ref)
    cache = ensure_index_cache(store, image)
    upper_dir, private = choose_upper(store.layout, upper_dir, read_only)
    if upper_dir is not None:
        check_upper(upper_dir, mp, read_only)
    log_file = store.layout.mount_log(mp)
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    params = {"root": store.root, "index": cache, "mountpoint": mp, "image": image_ref,
              "image_id": image.id, "upper": upper_dir, "container": container, "read_only": read_only,
              "private": private, "debug": debug, "log": log_file}
    return params, image.id


def _run_foreground(params: dict, image_id: str) -> MountHandle:
    ready_r, ready_w = os.pipe()
    os.set_blocking(ready_r, False)
    register(params, image_id, os.getpid())
    code = run_daemon(params, ready_w, detached=False)
    os.close(ready_r)
    if code:
        raise LayerfsError(f"mount of {params['mountpoint']} failed; see {params['log']}")
    return MountHandle(params["mountpoint"], os.getpid(), image_id, params["upper"], params["log"])


