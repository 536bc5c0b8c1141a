"""The FUSE mount daemon: a process forked early (its imports of trio and
pyfuse3 overlap with the caller resolving the image), told what to mount
over a pipe, then serving the union until unmount, SIGTERM or its owner's
death. ``fs.mount`` is the API over it; ``fs.mountproc`` holds what this
daemon shares with the kernel backend's keeper process.
"""

from __future__ import annotations

import json
import os
import signal
import stat

from layerfs import procfs
from layerfs.fs import mountproc
from layerfs.fs.registry import FSNAME
from layerfs.store.layout import StoreLayout

#: (image id, index cache path) -> the index already in memory, or None to
#: read the cache file. Set in the process daemons are forked from by one
#: that keeps indexes (the warm mount server, ``fs.mountserver``).
find_loaded_index = lambda image_id, path: None  # noqa: E731
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Daemon:
    """A detached daemon process, forked early, waiting to be told what to mount."""

    def __init__(self) -> None:
        go_r, self.go_w = os.pipe()
        self.ready_r, ready_w = os.pipe()
        self.pid = mountproc.fork_detached(lambda: _daemon_main(go_r, ready_w), (self.go_w, self.ready_r))
        os.close(go_r)
        os.close(ready_w)

    def go(self, params: dict) -> int:
        """Send the mount parameters; return the daemon's pid once it serves.

        The caller's ``LAYERFS_*`` environment goes along: a daemon forked
        ahead (``mount.prefork`` in the mount server's spare worker) has the
        environment of before the request."""
        env = {k: v for k, v in os.environ.items() if k.startswith("LAYERFS_")}
        os.write(self.go_w, json.dumps({"params": params, "env": env}).encode())
        os.close(self.go_w)
        self.go_w = -1
        # wait_ready reaps the child and closes the pipe, whatever it finds:
        # neither is abort()'s to do again (the fd number, or the pid, may
        # be someone else's by then)
        pid, ready_r, self.pid, self.ready_r = self.pid, self.ready_r, -1, -1
        return mountproc.wait_ready(pid, ready_r, "the mount daemon died before the mount was ready")

    def abort(self) -> None:
        if self.go_w >= 0:
            os.close(self.go_w)  # EOF: the daemon exits without mounting
        if self.ready_r >= 0:
            os.close(self.ready_r)
        if self.pid > 0:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass


def _daemon_main(go_r: int, ready_w: int) -> int:
    mountproc.close_inherited_fds({go_r, ready_w})
    # Heavy imports first: they overlap with the parent resolving the image.
    # No garbage collection meanwhile: imports make many objects and no
    # garbage; run_daemon freezes what is there once the index is loaded.
    import gc

    gc.disable()
    _import_pyfuse3()
    import layerfs.fs.loop  # noqa: F401
    import layerfs.fs.ops  # noqa: F401
    import layerfs.fs.union  # noqa: F401
    from layerfs.store.objects import ObjectStore  # noqa: F401

    _warm_up_while_idle(go_r)
    chunks = []
    while chunk := os.read(go_r, 1 << 16):
        chunks.append(chunk)
    os.close(go_r)
    if not chunks:
        return 0
    message = json.loads(b"".join(chunks))
    for name in [k for k in os.environ if k.startswith("LAYERFS_")]:
        del os.environ[name]
    os.environ.update(message["env"])
    return run_daemon(message["params"], ready_w, detached=True)


def _warm_up_while_idle(go_r: int) -> None:
    """Run trio once if the mount is not asked for yet (a daemon forked
    ahead of its request, ``mount.prefork``): a process's first trio.run
    costs ~2 ms more than the next one, which serves the mount."""
    import select

    import trio

    if not select.select([go_r], [], [], 0)[0]:
        trio.run(trio.sleep, 0)


def _import_pyfuse3() -> None:
    """Import pyfuse3 (and with it trio) without its version look-up.

    pyfuse3 asks ``importlib.metadata`` for its own version at import time,
    which imports the email package and scans every sys.path entry for
    dist-info dirs: about a fifth of the daemon's start-up, for a string the
    daemon never uses. A stub answers instead while pyfuse3 is imported.
    """
    import sys

    from layerfs.fs import lowlevel

    lowlevel.load()  # before pyfuse3: it must bind to the module's fuse_session_new
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


def run_daemon(params: dict, ready_fd: int, detached: bool) -> int:
    """Body of the daemon process; returns its exit code."""
    import logging
    import shutil

    import pyfuse3
    import trio

    from layerfs.fs import lowlevel
    from layerfs.fs.index import read_index_cache
    from layerfs.fs.ops import Operations
    from layerfs.fs.union import Union
    from layerfs.fs.upper import UpperDir, work_dir_for
    from layerfs.store.objects import ObjectStore

    mp, upper_dir, read_only, log_file = params["mountpoint"], params["upper"], params["read_only"], params["log"]
    os.umask(0)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until serve() reports request counts on it
    if detached:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        os.chdir("/")
        from layerfs.fs import verify

        verify.allow_threads()  # a detached daemon forks nothing: blake3 may use its thread pool here
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
        index = find_loaded_index(params["image_id"], params["index"])
        if index is None:
            index = read_index_cache(params["root"], params["image_id"], params["index"])
        layout = StoreLayout(params["root"])
        objects = ObjectStore(layout.objects, layout.tmp)
        upper = None
        if upper_dir is not None:
            prepare_upper(upper_dir, index.meta[0], read_only)
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
        owner_fd = mountproc.open_owner(params)
        operations = Operations(union)
        lowlevel.prepare(union.lseek, union.handles)
        pyfuse3.init(operations, mp, options)
        log.info("directory listings cached by the kernel: %s; fallocate and lseek answered: %s; "
                 "read and write answered in C: %s", lowlevel.kernel_caches_listings(),
                 lowlevel.answers_file_ops(), lowlevel.answers_io())
        if os.environ.get("LAYERFS_FUSE_LOOP") != "stock":  # developer aid: A/B against pyfuse3's own loop
            from layerfs.fs import loop

            loop.install(pyfuse3)
    except BaseException as exc:
        log.error("cannot mount %s: %s", mp, exc)
        ready(f"error cannot mount {mp}: {exc}")
        if params["private"]:
            shutil.rmtree(os.path.dirname(upper_dir), ignore_errors=True)
        return 1
    log.info("mounted %s at %s (upper %s)", params["image_id"][:12], mp, upper_dir)
    # Mounted: requests wait in the kernel until the loop serves them, so
    # the caller may go on (register the mount, stat it) while trio starts.
    # A stop signal (or a SIGUSR1 asking for the request counts) meanwhile
    # stays pending until the loop's receiver has it.
    signal.pthread_sigmask(signal.SIG_BLOCK, (*_STOP_SIGNALS, signal.SIGUSR1))
    ready(f"ok {os.getpid()}\n")
    orphaned = False

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signal() -> None:
                with trio.open_signal_receiver(*_STOP_SIGNALS) as sigs:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
                    async for sig in sigs:
                        log.info("signal %d: unmounting", sig)
                        pyfuse3.terminate()
                        return

            async def report_requests() -> None:
                with trio.open_signal_receiver(signal.SIGUSR1) as sigs:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
                    async for _ in sigs:
                        log.info("requests %s", json.dumps(operations.counts(), sort_keys=True))

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
            nursery.start_soon(report_requests)
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
    if not union.stop_handovers(timeout=2.0):  # read-ahead threads must not notify a closed session
        log.warning("a read-ahead hand-over was still in flight at unmount")
    pyfuse3.close(unmount=True)
    if upper is not None and not read_only:
        try:
            from layerfs.store.objects import syncfs

            syncfs(upper_dir)
        except OSError:
            pass
    log.info("unmounted %s", mp)
    mountproc.finish_mount(params, orphaned, log)
    return code


def prepare_upper(upper: str, root_meta: tuple, read_only: bool) -> None:
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


def preload() -> None:
    """Import what the mount daemon needs into this process.

    For long-lived processes that mount often (a build's or runtime's
    fork server): daemons forked from it then start with nothing left to
    import, so a mount costs little more than loading the index.
    """
    _import_pyfuse3()
    import layerfs.fs.loop  # noqa: F401
    import layerfs.fs.ops  # noqa: F401
    import layerfs.fs.union  # noqa: F401
    import layerfs.store.objects  # noqa: F401
