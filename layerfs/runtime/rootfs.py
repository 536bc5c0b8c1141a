"""The container's filesystem view: mounts, masks, pivot_root.

Two halves, split by who runs them:

* ``prepare_mountpoints`` runs in the caller (host root, before fork): it
  resolves every target path inside the untrusted rootfs with
  ``secure_join`` and creates missing mountpoints. Doing it here, not in
  the child, also works when the child is an unprivileged user namespace
  that may not write to the rootfs.
* ``mount_host_side`` (shim), ``mount_namespace_side`` and ``pivot_into``
  (init) run in the container's new mount namespace(s), before any
  container code runs; see the note above ``mount_host_side``.

The layout matches runc's default spec: /proc with docker's masked and
read-only paths, a small tmpfs /dev holding bind mounts of the harmless
host devices, a fresh devpts, /dev/shm, /dev/mqueue, a read-only /sys.
/dev and the rootfs are nodev, so a device node made with CAP_MKNOD cannot
be opened (on v2 hosts there is no devices cgroup to stop it).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from layerfs.errors import InvalidInput
from layerfs.runtime import syscalls
from layerfs.runtime.rootpath import make_mountpoint
from layerfs.runtime.syscalls import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MS_SLAVE,
    MS_STRICTATIME,
    mount,
)

MASKED_PATHS = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
              "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2",
              "ptmx": "pts/ptmx", "core": "/proc/kcore"}
_NOSUID_NODEV_NOEXEC = MS_NOSUID | MS_NODEV | MS_NOEXEC
# statvfs flag bits that mount(2) takes back unchanged on a bind remount;
# they must be repeated or a remount inside a user namespace fails (EPERM).
_KEPT_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | syscalls.MS_NOATIME \
    | syscalls.MS_NODIRATIME
_ST_RELATIME = 4096


@dataclass(frozen=True)
class BindMount:
    """A host path to bind onto ``target``, a path relative to the rootfs."""

    source: str
    target: str
    readonly: bool


@dataclass(frozen=True)
class TmpfsMount:
    """A fresh tmpfs on ``target``, a path relative to the rootfs."""

    target: str
    size: int | None = None


@dataclass(frozen=True)
class MountPlan:
    """The rootfs and the resolved mountpoints in it (relative to it)."""

    rootfs: str
    binds: tuple[BindMount | TmpfsMount, ...]
    read_only: bool
    devpts_gid: int | None
    console: bool


def prepare_mountpoints(rootfs: str, binds: list[tuple[str, str, bool]], read_only: bool,
                        devpts_gid: int | None, console: bool,
                        tmpfs: tuple[tuple[str, int | None], ...] = ()) -> MountPlan:
    """Resolve and create every mountpoint; ``binds`` is (host, ctr path, ro),
    ``tmpfs`` (ctr path, size or None)."""
    for name in ("proc", "dev", "sys"):
        _system_dir(rootfs, name)
    resolved: list[BindMount | TmpfsMount] = []
    wanted = [(target, (source, readonly)) for source, target, readonly in binds]
    wanted += [(target, size) for target, size in tmpfs]
    # Parents before children, so a volume at /a/b lands on top of one at /a.
    for target, what in sorted(wanted, key=lambda w: w[0].count("/")):
        if isinstance(what, tuple):
            source, readonly = what
            path = make_mountpoint(rootfs, target, os.path.isdir(source))
            resolved.append(BindMount(source, os.path.relpath(path, rootfs), readonly))
        else:
            path = make_mountpoint(rootfs, target, directory=True)
            resolved.append(TmpfsMount(os.path.relpath(path, rootfs), what))
    return MountPlan(rootfs, tuple(resolved), read_only, devpts_gid, console)


def _system_dir(rootfs: str, name: str) -> None:
    path = make_mountpoint(rootfs, "/" + name, directory=True)
    # runc refuses these too: proc on a symlinked /proc could land anywhere
    # in the rootfs, and the masks below would miss it.
    if path != os.path.join(rootfs, name) or not os.path.isdir(path):
        raise InvalidInput(f"/{name} in the rootfs must be a plain directory")


# The mounts happen in two phases because of user namespaces. Host paths
# (the rootfs, volumes, the state dir, device nodes) may sit below
# directories only host root can search, so they are bound by the shim as
# host root in a first mount namespace, which also leaves the shim's cwd at
# the rootfs. Kernel filesystems tied to the new namespaces (proc to the pid
# ns, sysfs to the net ns, devpts, mqueue to the ipc ns) are mounted by init,
# in a mount namespace of the new user namespace when there is one, using
# paths relative to that cwd so no host directory needs to be searchable.


def mount_host_side(plan: MountPlan) -> None:
    """Phase 1, in the shim's new mount namespace as host root; cwd -> rootfs."""
    # Nothing we do may propagate back to the host's mount namespace.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount(plan.rootfs, plan.rootfs, None, MS_BIND | MS_REC)
    os.chdir(plan.rootfs)
    remount_bind(".", MS_NODEV)
    mount("tmpfs", "dev", "tmpfs", MS_NOSUID | MS_NODEV | MS_STRICTATIME, "mode=755,size=65536k")
    for name in DEVICES:
        target = os.path.join("dev", name)
        _touch(target)
        # Bind, not mknod: works in a user namespace and needs no devices
        # cgroup entry beyond the node itself.
        mount(os.path.join("/dev", name), target, None, MS_BIND)
    for name, link in _DEV_LINKS.items():
        os.symlink(link, os.path.join("dev", name))
    for name in ("pts", "shm", "mqueue"):
        os.mkdir(os.path.join("dev", name), 0o755)
    if plan.console:
        _touch(os.path.join("dev", "console"))
    for bind in plan.binds:
        _bind(bind)


def rebind_cwd() -> None:
    """Re-bind the rootfs (our cwd) in a user namespace's own mount namespace.

    Mounts copied into a less privileged mount namespace are locked, and
    pivot_root refuses a locked new root. A fresh recursive bind is not
    locked. It is made with open_tree/move_mount so that we can fchdir into
    it through the tree fd: the rootfs's host path may sit below
    directories the namespace's root cannot search.
    """
    tree = syscalls.open_tree(".", syscalls.OPEN_TREE_CLONE | syscalls.AT_RECURSIVE)
    try:
        syscalls.move_mount_fd(tree, ".")
        os.fchdir(tree)
    finally:
        os.close(tree)


def mount_namespace_side(plan: MountPlan) -> None:
    """Phase 2, in init with cwd at the rootfs: proc, devpts, shm, mqueue, sys."""
    _mount_proc("proc")
    pts_options = "newinstance,ptmxmode=0666,mode=0620"
    if plan.devpts_gid is not None:
        pts_options += f",gid={plan.devpts_gid}"
    mount("devpts", "dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, pts_options)
    mount("shm", "dev/shm", "tmpfs", _NOSUID_NODEV_NOEXEC, "mode=1777,size=65536k")
    mount("mqueue", "dev/mqueue", "mqueue", _NOSUID_NODEV_NOEXEC)
    _mount_sys("sys")


def _mount_proc(proc: str) -> None:
    mount("proc", proc, "proc", _NOSUID_NODEV_NOEXEC)
    for path in MASKED_PATHS:
        if path.startswith("/proc/"):
            _mask(os.path.join(proc, path[len("/proc/"):]))
    for path in READONLY_PATHS:
        target = os.path.join(proc, path[len("/proc/"):])
        if os.path.exists(target):
            mount(target, target, None, MS_BIND | MS_REC)
            remount_bind(target, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _mask(path: str) -> None:
    if os.path.isdir(path):
        mount("tmpfs", path, "tmpfs", MS_RDONLY | _NOSUID_NODEV_NOEXEC, "size=0")
    elif os.path.exists(path):
        mount("/dev/null", path, None, MS_BIND)


def _mount_sys(sys_dir: str) -> None:
    try:
        mount("sysfs", sys_dir, "sysfs", MS_RDONLY | _NOSUID_NODEV_NOEXEC)
    except PermissionError:
        # A user namespace sharing the host's network namespace may not
        # mount sysfs; a read-only bind of the host's is what runc does.
        mount("/sys", sys_dir, None, MS_BIND | MS_REC)
        remount_bind(sys_dir, MS_RDONLY | _NOSUID_NODEV_NOEXEC)
    _mask(os.path.join(sys_dir, "firmware"))


def bind_console(slave_path: str) -> None:
    """Make /dev/console the container's pty, as docker does with -t."""
    mount(slave_path, os.path.join("dev", "console"), None, MS_BIND)


def _bind(bind: BindMount | TmpfsMount) -> None:
    if isinstance(bind, TmpfsMount):
        size = f",size={bind.size}" if bind.size else ""
        mount("tmpfs", bind.target, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777" + size)
        return
    if not os.path.lexists(bind.target):
        # The target sits on the tmpfs we mounted (/dev/...), not the rootfs.
        if os.path.isdir(bind.source):
            os.makedirs(bind.target, 0o755)
        else:
            _touch(bind.target)
    mount(bind.source, bind.target, None, MS_BIND | MS_REC)
    if bind.readonly:
        remount_bind(bind.target, MS_RDONLY)


def _touch(path: str) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))


def remount_bind(path: str, flags: int) -> None:
    """Add ``flags`` to the bind mount at ``path``, keeping its current ones."""
    current = os.statvfs(path).f_flag
    kept = current & _KEPT_FLAGS
    if current & _ST_RELATIME:
        kept |= syscalls.MS_RELATIME
    mount(None, path, None, MS_REMOUNT | MS_BIND | kept | flags)


def pivot_into() -> None:
    """pivot_root into the current directory and detach the host's root.

    ``pivot_root(".", ".")`` stacks the old root on top of the new one, so
    no directory has to be created in the image (runc's trick). After the
    lazy unmount nothing of the host's tree is reachable.
    """
    old_root = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    new_root = os.open(".", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchdir(new_root)
        syscalls.pivot_root(".", ".")
        os.fchdir(old_root)
        # Belt and braces: even if something above was shared, the unmount
        # must not propagate to the host.
        mount(None, ".", None, MS_SLAVE | MS_REC)
        syscalls.umount2(".", syscalls.MNT_DETACH)
        os.chdir("/")
    finally:
        os.close(old_root)
        os.close(new_root)


def make_root_readonly() -> None:
    """--read-only: the rootfs, not the volumes or /dev, becomes read-only."""
    try:
        remount_bind("/", MS_RDONLY)
    except OSError as exc:
        raise OSError(exc.errno or errno.EIO, f"remount / read-only: {exc.strerror}") from None
