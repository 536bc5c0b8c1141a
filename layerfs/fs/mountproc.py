"""What every mount process does, whichever backend serves the mount (the
FUSE daemon, the kernel backend's keeper): drop what it inherited, watch
the process it serves, and clean up after the unmount.
"""

from __future__ import annotations

import errno
import os

from layerfs import procfs
from layerfs.errors import LayerfsError
from layerfs.fs.registry import forget, remove_private


def fork_detached(main, close: tuple[int, ...] = ()) -> int:
    """Fork a detached mount process (double fork + setsid) that runs
    *main()* and exits with its return code; the child closes the fds in
    *close* first. Returns the pid of the intermediate child, to reap."""
    pid = os.fork()
    if pid == 0:  # first child: new session, fork the mount process, leave
        code = 0
        try:
            for fd in close:
                os.close(fd)
            os.setsid()
            if os.fork() == 0:
                code = 1
                code = main()
        finally:
            os._exit(code)
    return pid


def wait_ready(pid: int, ready_r: int, died: str) -> int:
    """Reap the intermediate child *pid* and read the mount process's
    "ok <pid>" (or "error <msg>") from *ready_r*; returns its pid."""
    with os.fdopen(ready_r, "rb") as f:
        os.waitpid(pid, 0)
        msg = f.read().decode(errors="replace")
    if not msg.startswith("ok "):
        raise LayerfsError(msg.removeprefix("error ").strip() or died)
    return int(msg.split()[1])


def close_inherited_fds(keep: set[int]) -> None:
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


def open_owner(params: dict) -> int:
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


def finish_mount(params: dict, orphaned: bool, log) -> None:
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
