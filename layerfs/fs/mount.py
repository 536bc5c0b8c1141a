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
caller fork it even earlier (the CLI, before its own imports), and
:func:`preload` lets a long-lived caller (a fork server) import the daemon's
modules once so its forks start with nothing to import. The merged index
comes from a marshal cache per image id (``fs.index``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import stat
from dataclasses import dataclass

from layerfs import procfs
from layerfs.errors import Conflict, InvalidInput, LayerfsError, NotFound, Unsupported
from layerfs.fs.registry import (  # noqa: F401
    FSNAME,
    REF_KIND,
    MountInfo,
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
_preforked: "_Daemon | None" = None


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
        _preforked = _Daemon()


def prefork_for_cli(argv: list[str]) -> None:
    """:func:`prefork` if *argv* (``sys.argv[1:]`` of the ``layerfs``
    command) runs ``layerfs [--root DIR] [--debug] mount ...``."""
    args = iter(argv)
    for arg in args:
        if arg == "--root":
            next(args, None)
        elif not arg.startswith("-"):
            if arg == "mount" and "--foreground" not in argv and "--help" not in argv and "-h" not in argv \
                    and not _asks_for_kernel(argv):
                prefork()
            return


def _asks_for_kernel(argv: list[str]) -> bool:
    """A kernel-backend mount needs no daemon (the store's own default is
    not known yet here: an unneeded daemon is aborted later)."""
    if "--backend=kernel" in argv or any(a == "--backend" and b == "kernel" for a, b in zip(argv, argv[1:])):
        return True
    return "--backend" not in " ".join(argv) and os.environ.get("LAYERFS_BACKEND") == "kernel"


def preload() -> None:
    """Import what the mount daemon needs into this process.

    For long-lived processes that mount often (a build's or runtime's
    fork server): daemons forked from it then start with nothing left to
    import, so a mount costs little more than loading the index.
    """
    import pyfuse3  # noqa: F401

    import layerfs.fs.ops  # noqa: F401
    import layerfs.fs.union  # noqa: F401
    import layerfs.store.objects  # noqa: F401


def _take_preforked() -> "_Daemon | None":
    global _preforked
    daemon, _preforked = _preforked, None
    return daemon


def mount_image(store_root: str, image_ref: str, mountpoint: str, upper_dir: str | None = None,
                read_only: bool = False, foreground: bool = False, debug: bool = False,
                container: str | None = None, owner: int | None = None,
                owner_scratch: str | None = None, backend: str | None = None) -> MountHandle:
    """Mount *image_ref* at *mountpoint*; see the module docstring.

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
    mp = os.path.realpath(mountpoint)
    if not os.path.isdir(mp):
        raise NotFound(f"mountpoint {mountpoint} is not a directory")
    if container is not None and upper_dir is None:
        upper_dir = container_upper(store_root, container)
    daemon = _take_preforked()
    if foreground and daemon is not None:
        daemon.abort()
        daemon = None
    if not foreground and daemon is None:
        daemon = _Daemon()
    try:
        params, image_id = _resolve(store_root, image_ref, mp, upper_dir, read_only, debug, container)
        if owner is not None:
            start = procfs.start_time(owner)
            if start is None:
                raise NotFound(f"the process {owner} the mount would serve is gone")
            params |= {"owner": owner, "owner_start": start, "scratch": owner_scratch}
        if foreground:
            return _run_foreground(params, image_id)
        pid = daemon.go(params)
        daemon = None
        register(params, image_id, pid)
    finally:
        if daemon is not None:
            daemon.abort()
    os.stat(mp)  # answered by the daemon: the mount serves requests
    return MountHandle(mp, pid, image_id, params["upper"], params["log"])


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


def _resolve(store_root, image_ref, mp, upper_dir, read_only, debug, container) -> tuple[dict, str]:
    from layerfs.fs.index import ensure_index_cache
    from layerfs.store.store import Store

    with Store(store_root) as store:
        clean_stale(store, mp)
        if mounted_fstype(mp) is not None and store.get_ref(REF_KIND, mp) is not None:
            raise Conflict(f"{mp} is already a layerfs mount")
        image = store.image(image_ref)
        cache = ensure_index_cache(store, image)
        private = upper_dir is None and not read_only
        if private:
            import secrets

            upper_dir = store.layout.private_upper(secrets.token_hex(6))
        if upper_dir is not None:
            upper_dir = os.path.abspath(upper_dir)
            if upper_dir == mp or upper_dir.startswith(mp + "/"):
                raise InvalidInput("the upper dir cannot be inside the mountpoint")
            if read_only and not os.path.isdir(upper_dir):
                raise NotFound(f"upper dir {upper_dir} does not exist")
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
    code = _run_daemon(params, ready_w, detached=False)
    os.close(ready_r)
    if code:
        raise LayerfsError(f"mount of {params['mountpoint']} failed; see {params['log']}")
    return MountHandle(params["mountpoint"], os.getpid(), image_id, params["upper"], params["log"])


class _Daemon:
    """A detached daemon process, forked early, waiting to be told what to mount."""

    def __init__(self) -> None:
        go_r, self.go_w = os.pipe()
        self.ready_r, ready_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # first child: new session, fork the daemon, leave
            code = 0
            try:
                os.close(self.go_w)
                os.close(self.ready_r)
                os.setsid()
                if os.fork() == 0:
                    code = 1
                    code = _daemon_main(go_r, ready_w)
            finally:
                os._exit(code)
        os.close(go_r)
        os.close(ready_w)

    def go(self, params: dict) -> int:
        """Send the mount parameters; return the daemon's pid once it serves."""
        os.write(self.go_w, json.dumps(params).encode())
        os.close(self.go_w)
        self.go_w = -1
        os.waitpid(self.pid, 0)
        with os.fdopen(self.ready_r, "rb") as f:
            msg = f.read().decode(errors="replace")
        if not msg.startswith("ok "):
            raise LayerfsError(msg.removeprefix("error ").strip() or "the mount daemon died before the mount was ready")
        return int(msg.split()[1])

    def abort(self) -> None:
        if self.go_w >= 0:
            os.close(self.go_w)  # EOF: the daemon exits without mounting
        os.close(self.ready_r)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _close_inherited_fds(keep: set[int]) -> None:
    """Drop every fd the forking process had open (store lock, sqlite,
    pipes of other children): a daemon must not keep the store's flock
    alive, nor a caller's pipe open, for as long as the mount lives."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _daemon_main(go_r: int, ready_w: int) -> int:
    _close_inherited_fds({go_r, ready_w})
    # Heavy imports first: they overlap with the parent resolving the image.
    # No garbage collection meanwhile: imports make many objects and no
    # garbage; _run_daemon freezes what is there once the index is loaded.
    import gc

    gc.disable()
    _import_pyfuse3()
    import layerfs.fs.ops  # noqa: F401
    import layerfs.fs.union  # noqa: F401
    from layerfs.store.objects import ObjectStore  # noqa: F401

    chunks = []
    while chunk := os.read(go_r, 1 << 16):
        chunks.append(chunk)
    os.close(go_r)
    if not chunks:
        return 0
    return _run_daemon(json.loads(b"".join(chunks)), ready_w, detached=True)


def _import_pyfuse3() -> None:
    """Import pyfuse3 (and with it trio) without its version look-up.

    pyfuse3 asks ``importlib.metadata`` for its own version at import time,
    which imports the email package and scans every sys.path entry for
    dist-info dirs: about a fifth of the daemon's start-up, for a string the
    daemon never uses. A stub answers instead while pyfuse3 is imported.
    """
    import sys

    if "pyfuse3" in sys.modules or "importlib.metadata" in sys.modules:
        import pyfuse3  # noqa: F401
        return
    import types

    stub = types.ModuleType("importlib.metadata")

    class PackageNotFoundError(Exception):
        pass

    def version(name: str) -> str:
        raise PackageNotFoundError(name)

    stub.PackageNotFoundError, stub.version = PackageNotFoundError, version
    sys.modules["importlib.metadata"] = stub
    try:
        import pyfuse3  # noqa: F401
    finally:
        if sys.modules.get("importlib.metadata") is stub:
            del sys.modules["importlib.metadata"]


def _run_daemon(params: dict, ready_fd: int, detached: bool) -> int:
    """Body of the daemon process; returns its exit code."""
    import logging
    import shutil

    import pyfuse3
    import trio

    from layerfs.fs.index import read_index_cache
    from layerfs.fs.ops import Operations
    from layerfs.fs.union import Union
    from layerfs.fs.upper import UpperDir, work_dir_for
    from layerfs.store.objects import ObjectStore

    mp, upper_dir, read_only, log_file = params["mountpoint"], params["upper"], params["read_only"], params["log"]
    os.umask(0)
    if detached:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        os.chdir("/")
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {os.getpid()} %(levelname)s %(name)s: %(message)s"))
    root_log = logging.getLogger()
    root_log.handlers[:] = [handler]
    root_log.setLevel(logging.DEBUG if params["debug"] else logging.INFO)
    log = logging.getLogger("layerfs.fs")

    def ready(msg: str) -> None:
        nonlocal ready_fd
        if ready_fd >= 0:
            os.write(ready_fd, msg.encode())
            os.close(ready_fd)
            ready_fd = -1

    try:
        index = read_index_cache(params["root"], params["image_id"], params["index"])
        layout = StoreLayout(params["root"])
        objects = ObjectStore(layout.objects, layout.tmp)
        upper = None
        if upper_dir is not None:
            _prepare_upper(upper_dir, index.meta[0], read_only)
            upper = UpperDir(upper_dir, work_dir_for(upper_dir), objects, read_only=read_only)
        union = Union(index, objects, upper, read_only=read_only)
        import gc

        gc.enable()
        gc.freeze()  # the index lives as long as the mount: keep it out of collections
        options = {"default_permissions", "allow_other", f"fsname={FSNAME}", f"subtype={FSNAME}",
                   "suid", "dev"}
        if read_only:
            options.add("ro")
        if params["debug"]:
            options.add("debug")
        owner_fd = _open_owner(params)
        pyfuse3.init(Operations(union), mp, options)
    except BaseException as exc:
        log.error("cannot mount %s: %s", mp, exc)
        ready(f"error cannot mount {mp}: {exc}")
        if params["private"]:
            shutil.rmtree(os.path.dirname(upper_dir), ignore_errors=True)
        return 1
    log.info("mounted %s at %s (upper %s)", params["image_id"][:12], mp, upper_dir)
    orphaned = False

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                    async for sig in sigs:
                        log.info("signal %d: unmounting", sig)
                        pyfuse3.terminate()
                        return

            async def announce() -> None:
                await trio.sleep(0)
                ready(f"ok {os.getpid()}\n")
                await trio.to_thread.run_sync(_raise_readahead, mp)

            async def on_owner_exit() -> None:
                nonlocal orphaned
                if owner_fd >= 0:
                    await trio.lowlevel.wait_readable(owner_fd)
                else:  # no pidfd (Linux < 5.3): poll
                    while procfs.alive(params["owner"], params["owner_start"]):
                        await trio.sleep(0.5)
                log.info("owner %d exited: unmounting", params["owner"])
                orphaned = True
                pyfuse3.terminate()

            nursery.start_soon(on_signal)
            nursery.start_soon(announce)
            if params.get("owner"):
                nursery.start_soon(on_owner_exit)
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            nursery.cancel_scope.cancel()

    code = 0
    profile = os.environ.get("LAYERFS_FS_PROFILE")  # developer aid: cProfile the daemon into this file
    try:
        if profile:
            import cProfile

            cProfile.runctx("trio.run(serve)", globals(), {"trio": trio, "serve": serve}, profile)
        else:
            trio.run(serve)
    except BaseException:
        log.exception("FUSE loop failed")
        code = 1
    pyfuse3.close(unmount=True)
    if upper is not None and not read_only:
        try:
            _syncfs(upper_dir)
        except OSError:
            pass
    log.info("unmounted %s", mp)
    _finish(params, orphaned, log)
    return code


def _open_owner(params: dict) -> int:
    """A pidfd of the mount's owner (-1: none, or no pidfd support).

    Opened before the mount exists and checked against the owner's start
    time, so an owner that died meanwhile (its pid maybe reused) fails the
    mount instead of leaving one that nothing serves."""
    owner = params.get("owner")
    if not owner:
        return -1
    try:
        fd = os.pidfd_open(owner)
    except (AttributeError, OSError) as exc:
        if getattr(exc, "errno", None) not in (None, errno.ENOSYS):
            raise LayerfsError(f"the process {owner} this mount serves is gone") from None
        fd = -1
    if not procfs.alive(owner, params["owner_start"]):
        raise LayerfsError(f"the process {owner} this mount serves is gone")
    return fd


def _finish(params: dict, orphaned: bool, log) -> None:
    """After the unmount: an orphan removes its owner's staging dir (which
    the owner can no longer clean), then the record goes, then a private
    upper."""
    from layerfs.fs.registry import remove_unmounted

    if orphaned and params.get("scratch"):
        remove_unmounted(params["scratch"])
    try:
        forget(params, os.getpid())
    except (LayerfsError, OSError, ValueError):
        log.exception("cannot drop the mount record")
    remove_private(params)


def _syncfs(path: str) -> None:
    from layerfs.store.objects import syncfs

    syncfs(path)


def _raise_readahead(mp: str) -> None:
    """Let the kernel read ahead 1 MiB per request (the FUSE default is
    128 KiB): fewer, bigger reads for sequential access."""
    try:
        dev = os.stat(mp).st_dev
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
            f.write("1024")
    except OSError:
        pass


def _prepare_upper(upper: str, root_meta: tuple, read_only: bool) -> None:
    from layerfs.fs.upper import work_dir_for

    if os.path.isdir(upper):
        if not read_only:
            os.makedirs(work_dir_for(upper), exist_ok=True)
        return
    os.makedirs(os.path.dirname(upper), exist_ok=True)
    os.mkdir(upper)
    # A fresh upper root shows the image's root as it is (overlayfs takes
    # the root's attributes from the upper dir).
    st_mode, uid, gid, mtime_ns = root_meta[:4]
    os.chown(upper, uid, gid)
    os.chmod(upper, stat.S_IMODE(st_mode))
    os.utime(upper, ns=(mtime_ns, mtime_ns))
    os.makedirs(work_dir_for(upper), exist_ok=True)


