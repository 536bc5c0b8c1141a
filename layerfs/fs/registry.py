"""The mount registry: which layerfs mounts exist, and ending them.

Each mount is a store reference (``store.refs.Ref``) of kind ``"mount"``
keyed by its mountpoint, ``in_use`` of its image, whose ``paths`` are
everything the mount uses (mountpoint, upper, its work dir, scratch): gc
and fsck keep them while the record exists. Its JSON data, which only this
module reads, says what the mount serves::

    pid, start            the daemon (its start time pins the pid); for the
                          kernel backend the mount's keeper (``fs.kernel_mount``)
    backend, metalayer    ``"kernel"`` and its metadata layer, for kernel mounts
    image, container, read_only, log
    upper, private        the upper dir; ``private``: made for this mount,
                          removed when it ends
    owner, owner_start    the process the mount serves, if any: the daemon
                          unmounts and exits when it dies (``fs.mount``)
    scratch               the owner's staging dir, removed with an orphan

A record is *stale* when its daemon is gone (killed, crashed): the mount
is then gone or dead (ENOTCONN). :func:`clean_stale` detaches such mounts
and drops their records; ``mounts``, ``umount`` and ``gc`` call it. The
daemon itself writes nothing to the store but dropping its own record, so
a daemon killed at any point leaves at most a stale record.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerfs import procfs
from layerfs.errors import Conflict, InvalidInput, LayerfsError, NotFound
from layerfs.store import refs
from layerfs.store.refs import Ref

if TYPE_CHECKING:
    from layerfs.store.layout import StoreLayout

REF_KIND = refs.MOUNT
FSNAME = "layerfs"
FSTYPE = f"fuse.{FSNAME}"


@dataclass(frozen=True)
class MountInfo:
    mountpoint: str
    pid: int
    image_id: str
    image: str
    upper: str | None
    container: str | None
    read_only: bool
    alive: bool
    backend: str = "fuse"


def _data(raw: str | None) -> dict:
    try:
        data = json.loads(raw or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def abs_mountpoint(mountpoint: str) -> str:
    try:
        return os.path.realpath(mountpoint)
    except OSError:
        return os.path.abspath(mountpoint)


# -- the records --------------------------------------------------------------
def register(params: dict, image_id: str, pid: int, store=None) -> None:
    """Record the mount *params* (``fs.mount``'s) served by daemon *pid*
    (through *store*, an open Store of its root, if given)."""
    from layerfs.store.store import Store

    keys = ("image", "upper", "container", "read_only", "private", "log", "owner", "owner_start", "scratch",
            "backend", "metalayer")
    data = {k: params.get(k) for k in keys} | {"pid": pid, "start": procfs.start_time(pid)}
    mp, upper = params["mountpoint"], params.get("upper")
    paths = tuple(p for p in (mp, upper, upper and upper + ".work", params.get("scratch")) if p)
    ref = Ref(REF_KIND, mp, image_id=image_id, data=json.dumps(data), in_use=True, paths=paths)
    if store is not None:
        store.add_ref(ref)
        return
    with Store(params["root"]) as opened:
        opened.add_ref(ref)


def forget(params: dict, pid: int) -> None:
    """The daemon's last word: drop its record (if it is still its own)."""
    from layerfs.store.store import Store

    mp = params["mountpoint"]
    with Store(params["root"]) as store:
        ref = store.get_ref(REF_KIND, mp)
        if ref is not None and _data(ref.data).get("pid") in (pid, None):
            store.drop_refs(REF_KIND, mp)


def choose_upper(layout: StoreLayout, upper_dir: str | None, read_only: bool) -> tuple[str | None, bool]:
    """A mount's upper dir, absolute, and whether it is private: one made
    under the store (*layout*) for a writable mount given none, removed
    at its unmount (:func:`remove_private`)."""
    if upper_dir is None and not read_only:
        import secrets

        return layout.private_upper(secrets.token_hex(6)), True
    return (os.path.abspath(upper_dir) if upper_dir is not None else None), False


def remove_private(data: dict) -> None:
    """Remove a private upper (and the dir made for it)."""
    if data.get("private") and data.get("upper"):
        remove_unmounted(os.path.dirname(data["upper"]))


def remove_unmounted(path: str) -> bool:
    """``rm -rf path`` unless a mount is at or below it (rmtree would delete
    through it, or hang on a dead daemon). True if it is gone."""
    import shutil

    if procfs.mounts_under(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


def daemon_alive(data: dict) -> bool:
    return procfs.alive(data.get("pid", 0), data.get("start"))


def ours_mounted(mp: str, data: dict) -> bool:
    """True if the mount at *mp* is the kind the record *data* made: a FUSE
    mount, or an overlay for the kernel backend (whose pid is its keeper)."""
    fstype = procfs.mounted_fstype(mp)
    return fstype == FSTYPE or (fstype == "overlay" and data.get("backend") == "kernel")


# -- ending mounts ---------------------------------------------------------------
def detach(mp: str) -> None:
    """Lazily unmount whatever is at *mp* (works on a dead FUSE mount)."""
    for cmd in (["fusermount3", "-uz", mp], ["umount", "-l", mp]):
        try:
            if subprocess.run(cmd, capture_output=True).returncode == 0:
                return
        except FileNotFoundError:
            continue


def unmount(store_root: str, mountpoint: str, timeout: float = 30.0) -> None:
    """Unmount a layerfs mount and wait for its daemon to exit.

    Also cleans up after a daemon that died (ENOTCONN mountpoint, stale
    record). Raises NotFound if nothing layerfs is mounted there, Conflict
    if the daemon does not exit within *timeout* seconds of SIGTERM.
    """
    from layerfs.store.store import Store

    mp = abs_mountpoint(mountpoint)
    with Store(store_root) as store:
        ref = store.get_ref(REF_KIND, mp)
        data = _data(ref.data) if ref else {}
        if ref is None and procfs.mounted_fstype(mp) != FSTYPE:
            raise NotFound(f"{mountpoint} is not a layerfs mount")
        pid = data.get("pid")
        if daemon_alive(data):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while daemon_alive(data) and time.monotonic() < deadline:
                time.sleep(0.01)
            if daemon_alive(data):
                raise Conflict(f"the daemon of {mp} (pid {pid}) did not exit")
        if ours_mounted(mp, data):
            detach(mp)
        store.drop_refs(REF_KIND, mp)
        remove_private(data)
        clean_stale(store)


def force_unmount(store_root: str, mountpoint: str, timeout: float = 10.0) -> None:
    """Unmount on an error path: a daemon that does not exit in time is
    killed and its mount detached, so nothing is left behind."""
    from layerfs.store.store import Store

    try:
        unmount(store_root, mountpoint, timeout=timeout)
        return
    except NotFound:
        return
    except (LayerfsError, OSError):
        pass
    mp = abs_mountpoint(mountpoint)
    with Store(store_root) as store:
        ref = store.get_ref(REF_KIND, mp)
        data = _data(ref.data) if ref else {}
        if daemon_alive(data):
            try:
                os.kill(data["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        if ours_mounted(mp, data):
            detach(mp)
        store.drop_refs(REF_KIND, mp)
        remove_private(data)


def stale_mounts(store) -> list[str]:
    """Mountpoints whose records are stale (daemon gone)."""
    return [ref.key for ref in store.refs(REF_KIND) if not daemon_alive(_data(ref.data))]


def clean_stale(store, mp: str | None = None) -> list[str]:
    """Detach the mounts of dead daemons and drop their records."""
    cleaned = []
    for ref in store.refs(REF_KIND):
        data = _data(ref.data)
        if (mp is not None and ref.key != mp) or daemon_alive(data):
            continue
        if ours_mounted(ref.key, data):
            detach(ref.key)
        store.drop_refs(REF_KIND, ref.key)
        remove_private(data)
        cleaned.append(ref.key)
    return cleaned


def claim(store, mp: str) -> None:
    """Before mounting at *mp*: drop its stale record, if any; Conflict if
    a live layerfs mount is there."""
    clean_stale(store, mp)
    if procfs.mounted_fstype(mp) is not None and store.get_ref(REF_KIND, mp) is not None:
        raise Conflict(f"{mp} is already a layerfs mount")


def check_upper(upper: str, mp: str, read_only: bool) -> None:
    """Refuse an upper dir (absolute) a mount at *mp* cannot use."""
    if upper == mp or upper.startswith(mp + "/"):
        raise InvalidInput("the upper dir cannot be inside the mountpoint")
    if read_only and not os.path.isdir(upper):
        raise NotFound(f"upper dir {upper} does not exist")


def list_mounts(store_root: str, clean: bool = True) -> list[MountInfo]:
    """Active mounts of this store (stale ones are cleaned up first)."""
    from layerfs.store.store import Store

    with Store(store_root) as store:
        if clean:
            clean_stale(store)
        out = []
        for ref in store.refs(REF_KIND):
            data = _data(ref.data)
            out.append(MountInfo(ref.key, data.get("pid", 0), ref.image_id or "", data.get("image", ""),
                                 data.get("upper"), data.get("container"), bool(data.get("read_only")),
                                 daemon_alive(data), data.get("backend") or "fuse"))
        return out


def is_enotconn(mountpoint: str) -> bool:
    """True if *mountpoint* is a FUSE mount whose daemon is gone."""
    try:
        os.statvfs(mountpoint)  # statfs always reaches the daemon; stat may be cached
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False
