"""Mounts for a busy process, made from a clean one: the mount helper.

``mount_image`` forks its FUSE daemon from the calling process. A build by
its RUN steps holds threads, an open database and pipes of earlier steps;
a fork of all that is slow and fragile (it first hid a hang: blake3's
thread pool does not survive a fork). :func:`mount_for_owner` forks the
daemon instead from a child of a multiprocessing *forkserver*: a fresh,
exec'd interpreter with the mount code preloaded, started once per caller
(:func:`start_forkserver`, early, so its start overlaps other work).

The mount is made for the caller as its *owner*: the daemon watches the
caller's pidfd and unmounts and exits when the caller dies, removing the
caller's scratch dir, so a killed build leaves no mount, daemon or staging
dir behind. The forkserver exits by itself when the caller does.
"""

from __future__ import annotations

import os
from typing import Any

from layerfs.errors import LayerfsError

_PRELOAD = ["layerfs.fs.helper", "layerfs.fs.mount", "layerfs.fs.kernel_mount"]


def start_forkserver() -> Any:
    """Start (once) the forkserver the helpers fork from; returns its context."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    try:
        from multiprocessing import forkserver

        forkserver.ensure_running()
    except (OSError, ValueError):  # pragma: no cover - started on first use instead
        pass
    return ctx


def mount_for_owner(store_root: str, image_id: str, mp: str, upper: str, scratch: str | None = None,
                    backend: str | None = None) -> int:
    """Mount *image_id* at *mp* with *upper* for this process; returns the
    daemon's (or kernel mount keeper's) pid. The mount ends when this
    process dies (then *scratch*, a dir holding *mp* and *upper*, is
    removed too)."""
    ctx = start_forkserver()
    recv, send = ctx.Pipe(duplex=False)
    args = (store_root, image_id, mp, upper, os.getpid(), scratch, send, backend)
    proc = ctx.Process(target=_mount_child, args=args, daemon=False)
    proc.start()
    send.close()
    try:
        outcome = recv.recv()
    except EOFError:
        outcome = LayerfsError(f"the mount helper for {mp} died (exit code {proc.exitcode})")
    finally:
        recv.close()
        proc.join()
    if isinstance(outcome, BaseException):
        raise outcome
    return int(outcome)


def _mount_child(store_root: str, image_id: str, mp: str, upper: str, owner: int, scratch: str | None,
                 conn: Any, backend: str | None = None) -> None:
    try:
        from layerfs.fs.mount import mount_image

        handle = mount_image(store_root, image_id, mp, upper_dir=upper, owner=owner, owner_scratch=scratch,
                             backend=backend)
        outcome: int | BaseException = handle.pid
    except BaseException as exc:  # sent to the parent, raised there
        outcome = exc
    try:
        _tell_parent(conn, outcome)
    except OSError:
        pass  # the parent is gone (killed): nobody to tell; a mount made ends with its owner
    finally:
        conn.close()


def _tell_parent(conn: Any, outcome: int | BaseException) -> None:
    try:
        conn.send(outcome)
    except OSError:
        raise
    except Exception:  # an exception that does not pickle
        conn.send(LayerfsError(f"mount failed: {outcome}"))
