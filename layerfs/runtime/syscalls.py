"""Thin ctypes wrappers for the Linux syscalls the stdlib lacks.

Each wrapper raises ``OSError`` with the real errno, like the ``os`` module,
so callers handle them the same way. Nothing here knows about containers.
"""

from __future__ import annotations

import ctypes
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

MNT_DETACH = 2

AT_FDCWD = -100
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH = 0x4

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# pivot_root has no glibc wrapper on older libcs; capset is called raw too so
# that both share one code path.
_SYSCALL_NUMBERS = {
    "x86_64": {"pivot_root": 155, "capset": 126, "open_tree": 428, "move_mount": 429},
    "aarch64": {"pivot_root": 41, "capset": 91, "open_tree": 428, "move_mount": 429},
}


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _syscall_number(name: str) -> int:
    numbers = _SYSCALL_NUMBERS.get(platform.machine())
    if numbers is None:
        raise OSError(38, f"{name}: unsupported architecture {platform.machine()}")
    return numbers[name]


def _c_str(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str | None, target: str, fstype: str | None,
          flags: int = 0, data: str | None = None) -> None:
    result = _libc.mount(_c_str(source), _c_str(target), _c_str(fstype),
                         ctypes.c_ulong(flags), _c_str(data))
    _check(result, f"mount {fstype or 'bind'} on {target}")


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_c_str(target), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    result = _libc.syscall(ctypes.c_long(_syscall_number("pivot_root")),
                           _c_str(new_root), _c_str(put_old))
    _check(result, "pivot_root")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    args = (ctypes.c_ulong(a) for a in (arg2, arg3, arg4, arg5))
    return _check(_libc.prctl(ctypes.c_int(option), *args), f"prctl({option})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the calling thread's capability sets (64-bit masks)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    result = _libc.syscall(ctypes.c_long(_syscall_number("capset")),
                           ctypes.byref(header), ctypes.byref(data))
    _check(result, "capset")


def open_tree(path: str, flags: int) -> int:
    """Clone the mount tree at ``path`` (relative to cwd); returns its fd."""
    flags |= os.O_CLOEXEC
    result = _libc.syscall(ctypes.c_long(_syscall_number("open_tree")), ctypes.c_int(AT_FDCWD),
                           _c_str(path), ctypes.c_uint(flags))
    return _check(result, f"open_tree {path}")


def move_mount_fd(tree_fd: int, target: str) -> None:
    """Attach the detached tree ``tree_fd`` at ``target`` (relative to cwd)."""
    result = _libc.syscall(ctypes.c_long(_syscall_number("move_mount")), ctypes.c_int(tree_fd),
                           b"", ctypes.c_int(AT_FDCWD), _c_str(target),
                           ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
    _check(result, f"move_mount onto {target}")
