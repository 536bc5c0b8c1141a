"""Kernel overlayfs mounts of a metadata layer over the object directory.

The kernel backend's data path (composefs-style, see ``fs.metalayer``):

    overlay  lowerdir+ = the image's metadata layer (an EROFS image,
                         mounted detached, never visible in the namespace)
             datadir+  = ROOT/objects (a data-only lower layer: only
                         reachable through the metadata layer's redirects)
             upperdir/workdir = the container's upper (optional)

Mounts go through the new mount API (``fsopen``/``fsconfig``/``fsmount``/
``move_mount``, called through ctypes): its ``lowerdir+``/``datadir+``
keys take one path each, so no path needs escaping and no option string
can overflow a page, and a failed ``fsconfig`` leaves the kernel's reason
readable from the context fd, which goes into the error.

Options, and why:

* no ``metacopy=on``: with it a chmod leaves a data-less metacopy file in
  the upper, which is neither importable as a layer nor readable by a
  mount without it. Kernels before 6.16 refuse data-only layers without
  it, so there the backend is read-only (:func:`probe` finds out).
* ``redirect_dir=off``: directories renamed in the upper are not given
  ``redirect`` xattrs, which the store's scanner cannot import; renaming
  a merged directory fails with EXDEV, as on any overlay mount without
  redirects (``mv`` then copies).
* ``index=off``, ``xino=off``: the upper must stay a plain overlayfs upper
  the FUSE backend can also mount; no file handles into the EROFS image
  get stored in it.

:func:`probe` mounts a tiny image of this module's own making once per boot
and caches what worked; :func:`require` turns the answer into an
``Unsupported`` error that says why.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass

from layerfs.errors import LayerfsError, Unsupported

SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 428, 429, 430, 431, 432
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
FSOPEN_CLOEXEC = FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4
OVERLAYFS_MAGIC = 0x794C7630
PROBE_VERSION = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class MountError(LayerfsError):
    """The kernel refused a mount; the message carries its reason."""


class BadMetaLayer(MountError):
    """The kernel cannot mount the metadata layer image (damaged file)."""


@dataclass(frozen=True)
class Support:
    """What this kernel can do for the kernel backend."""

    kernel: str
    mount_api: bool          # fsopen/fsconfig/fsmount/move_mount
    erofs_file: bool         # EROFS images mount (from the file, else through a loop device)
    data_only: bool          # overlay data-only lower layers without metacopy=on (6.16+)
    data_only_metacopy: bool  # ... only with metacopy=on (6.5-6.15): read-only mounts
    reason: str = ""         # why the backend cannot work at all, if it cannot

    @property
    def usable(self) -> bool:
        return self.mount_api and self.erofs_file and (self.data_only or self.data_only_metacopy)


# -- raw syscalls --------------------------------------------------------------
def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _kernel_log(fsfd: int) -> str:
    """The messages the kernel left on a filesystem context (``e ...`` lines)."""
    msgs = []
    while True:
        try:
            msg = os.read(fsfd, 1024)
        except OSError:
            break
        if not msg:
            break
        msgs.append(msg.decode(errors="replace").strip()[2:])
    return "; ".join(msgs)


class _Context:
    """One fsopen() filesystem context; configure, then ``mount()`` it detached."""

    def __init__(self, fstype: str) -> None:
        self.fstype = fstype
        self.fd = _check(_libc.syscall(SYS_FSOPEN, fstype.encode(), FSOPEN_CLOEXEC), f"fsopen({fstype})")

    def set(self, key: str, value: str | None = None) -> None:
        if value is None:
            ret = _libc.syscall(SYS_FSCONFIG, self.fd, FSCONFIG_SET_FLAG, key.encode(), None, 0)
        else:
            ret = _libc.syscall(SYS_FSCONFIG, self.fd, FSCONFIG_SET_STRING, key.encode(),
                                os.fsencode(value), 0)
        if ret < 0:
            self._fail(f"{key}={value}" if value is not None else key)

    def mount(self, read_only: bool) -> int:
        """Create the superblock and return a detached mount fd."""
        if _libc.syscall(SYS_FSCONFIG, self.fd, FSCONFIG_CMD_CREATE, None, None, 0) < 0:
            self._fail("create")
        attrs = MOUNT_ATTR_RDONLY if read_only else 0
        return _check(_libc.syscall(SYS_FSMOUNT, self.fd, FSMOUNT_CLOEXEC, attrs), "fsmount")

    def _fail(self, what: str) -> None:
        err = ctypes.get_errno()
        detail = _kernel_log(self.fd) or os.strerror(err)
        raise OSError(err, f"{self.fstype} {what}: {detail}")

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "_Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _move_mount(mfd: int, target: str) -> None:
    _check(_libc.syscall(SYS_MOVE_MOUNT, mfd, b"", -100, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH),
           f"move_mount to {target}")


# -- mounting ------------------------------------------------------------------
def mount_erofs(image: str) -> int:
    """Mount the EROFS *image* file read-only, detached; returns the mount fd.

    Straight from the file where its filesystem allows (no loop device);
    a file on tmpfs cannot back EROFS directly (ENOTBLK), so it gets a
    read-only, auto-clearing loop device, which goes away with the mount.
    """
    try:
        with _Context("erofs") as ctx:
            ctx.set("source", image)
            return ctx.mount(read_only=True)
    except OSError as exc:
        if exc.errno != errno.ENOTBLK:
            raise
    dev_fd, dev = _loop_device(image)
    try:
        with _Context("erofs") as ctx:
            ctx.set("source", dev)
            ctx.set("ro")  # a read-only superblock: the device is read-only
            return ctx.mount(read_only=True)
    finally:
        os.close(dev_fd)  # the mount holds the device now; autoclear frees it after


LOOP_CTL_GET_FREE, LOOP_CONFIGURE = 0x4C82, 0x4C0A
LO_FLAGS_READ_ONLY, LO_FLAGS_AUTOCLEAR = 1, 4


def _loop_device(image: str) -> tuple[int, str]:
    """A free loop device bound read-only to *image* (fd, path)."""
    import fcntl
    import struct

    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    img = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # struct loop_config: fd, block_size, struct loop_info64 (flags at
        # byte 52 of it), reserved
        info = struct.pack("<5Q4I64s64s32s2Q", 0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
                           b"", b"", b"", 0, 0)
        config = struct.pack("<II", img, 4096) + info + bytes(64)
        for _ in range(50):
            path = f"/dev/loop{fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)}"
            dev = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(dev, LOOP_CONFIGURE, config)
                return dev, path
            except OSError as exc:
                os.close(dev)
                if exc.errno != errno.EBUSY:  # another process took it meanwhile: next one
                    raise
        raise OSError(errno.EBUSY, "no free loop device")
    finally:
        os.close(img)
        os.close(ctl)


def overlay_options(upper: str | None, work: str | None, metacopy: bool) -> list[tuple[str, str | None]]:
    opts: list[tuple[str, str | None]] = [("redirect_dir", "off"), ("index", "off"), ("xino", "off")]
    if metacopy:
        opts.append(("metacopy", "on"))
    if upper is not None:
        opts += [("upperdir", upper), ("workdir", work)]
    return opts


def mount_overlay(mountpoint: str, meta_image: str, data_dir: str, upper: str | None = None,
                  work: str | None = None, read_only: bool = False, metacopy: bool = False,
                  prepare: Callable[[os.stat_result], None] | None = None) -> None:
    """Mount the overlay of *meta_image* over *data_dir* at *mountpoint*.

    A read-only mount with an *upper* stacks it as the top lower layer (the
    kernel then writes nothing into it). *prepare*, if given, is called
    with the metadata layer root's stat before the overlay is made (to
    give a fresh upper the image root's attributes). Raises MountError
    with the kernel's own reason when it refuses.
    """
    try:
        meta_fd = mount_erofs(meta_image)
    except OSError as exc:
        raise BadMetaLayer(f"cannot mount the metadata layer {meta_image}: {exc.strerror}") from None
    try:
        if prepare is not None:
            prepare(os.fstat(meta_fd))
        with _Context("overlay") as ctx:
            if read_only and upper is not None:
                ctx.set("lowerdir+", upper)
                upper = None
            ctx.set("lowerdir+", f"/proc/self/fd/{meta_fd}")
            ctx.set("datadir+", data_dir)
            for key, value in overlay_options(upper, work, metacopy):
                ctx.set(key, value)
            mfd = ctx.mount(read_only or upper is None)
        try:
            _move_mount(mfd, mountpoint)
        finally:
            os.close(mfd)
    except OSError as exc:
        raise MountError(f"kernel overlayfs refused to mount {mountpoint}: {exc.strerror}") from None
    finally:
        os.close(meta_fd)  # the overlay holds its own reference to the EROFS mount


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount a kernel-backend mount (``lazy``: detach even if busy)."""
    if _libc.umount2(os.fsencode(mountpoint), 2 if lazy else 0) != 0:
        err = ctypes.get_errno()
        raise MountError(f"cannot unmount {mountpoint}: {os.strerror(err)}")


def fs_type_magic(path: str) -> int:
    """statfs(2) f_type of the filesystem holding *path*."""
    buf = ctypes.create_string_buffer(120)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int.from_bytes(buf.raw[:8], "little")


def check_upper_fs(upper_parent: str) -> None:
    """Refuse an upper dir kernel overlayfs cannot use, saying why."""
    if fs_type_magic(upper_parent) == OVERLAYFS_MAGIC:
        raise Unsupported(f"the upper dir's filesystem ({upper_parent}) is overlayfs, which kernel "
                          "overlayfs refuses as an upper dir; use --backend fuse or a store on another "
                          "filesystem")
    probe = tempfile.mkdtemp(prefix=".xattr-probe-", dir=upper_parent)
    try:
        os.setxattr(probe, "trusted.overlay.opaque", b"y")
    except OSError as exc:
        raise Unsupported(f"the upper dir's filesystem ({upper_parent}) cannot hold trusted.* xattrs "
                          f"({exc.strerror}), which overlayfs needs for whiteouts and opaque "
                          "directories") from None
    finally:
        os.rmdir(probe)


# -- support detection ---------------------------------------------------------
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def probe(cache_dir: str) -> Support:
    """What this kernel supports, found by trying (cached per boot in *cache_dir*)."""
    cache = os.path.join(cache_dir, "kernel-support.json")
    key = f"{PROBE_VERSION} {_boot_id()} {platform.release()}"
    try:
        with open(cache) as f:
            data = json.load(f)
        if data.pop("key") == key:
            return Support(**data)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    support = _probe_now()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(support) | {"key": key}, f)
    os.replace(tmp, cache)
    return support


def _probe_now() -> Support:
    release = platform.release()
    if os.geteuid() != 0:
        return Support(release, False, False, False, False, "the kernel backend needs root")
    try:
        _Context("overlay").close()
    except OSError as exc:
        reason = ("this kernel lacks the new mount API (fsopen, Linux 5.2+)" if exc.errno == errno.ENOSYS
                  else f"kernel overlayfs is not available ({exc.strerror})")
        return Support(release, False, False, False, False, reason)
    base = tempfile.mkdtemp(prefix="layerfs-kprobe-")
    try:
        return _probe_in(base, release)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _probe_in(base: str, release: str) -> Support:
    from layerfs.fs.erofs import Node, write_image

    data, mnt = os.path.join(base, "data"), os.path.join(base, "mnt")
    os.makedirs(os.path.join(data, "ab"))
    os.mkdir(mnt)
    with open(os.path.join(data, "ab", "cd"), "wb") as f:
        f.write(b"layerfs")
    image = os.path.join(base, "meta.erofs")
    regular = Node(stat.S_IFREG | 0o644, size=7, xattrs=[(b"trusted.overlay.metacopy", b""),
                                                          (b"trusted.overlay.redirect", b"/ab/cd")])
    with open(image, "wb") as f:
        f.write(write_image([Node(stat.S_IFDIR | 0o755, nlink=2, children=[(b"f", 1)]), regular], b"probe"))
    try:
        os.close(mount_erofs(image))
    except OSError as exc:
        return Support(release, True, False, False, False,
                       f"this kernel cannot mount an EROFS image, from a file (Linux 6.12+) or through a "
                       f"loop device ({exc.strerror})")
    results = []
    for metacopy in (False, True):
        try:
            mount_overlay(mnt, image, data, read_only=True, metacopy=metacopy)
        except MountError as exc:
            results.append((False, str(exc)))
            continue
        try:
            with open(os.path.join(mnt, "f"), "rb") as f:
                results.append((f.read() == b"layerfs", "reads through the data-only layer return wrong data"))
        except OSError as exc:
            results.append((False, f"reads through the data-only layer fail ({exc.strerror})"))
        finally:
            unmount(mnt, lazy=True)
    (plain, why), (meta, _) = results
    reason = "" if plain or meta else (f"kernel overlayfs here has no data-only lower layers "
                                       f"(Linux 6.5+, without metacopy 6.16+): {why}")
    return Support(release, True, True, plain, meta, reason)


def require(support: Support, writable: bool) -> None:
    """Raise Unsupported, saying why, if the kernel backend cannot do this mount."""
    if not support.usable:
        raise Unsupported(f"--backend kernel cannot work on kernel {support.kernel}: {support.reason}")
    if writable and not support.data_only:
        raise Unsupported(f"--backend kernel on kernel {support.kernel} can mount read-only only: its "
                          "overlayfs needs metacopy=on for data-only layers, and a writable metacopy "
                          "mount leaves data-less files in the upper (Linux 6.16+ needs no metacopy)")
