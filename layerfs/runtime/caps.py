"""Drop privileges the way docker does before the command runs.

Order matters: the bounding set is trimmed first (needs CAP_SETPCAP), then
effective/permitted are set to docker's default set, then groups, gid and
uid change (CAP_SETGID/CAP_SETUID are in that set). A change to a non-zero
uid clears permitted and effective by itself, so a non-root user ends with
no capabilities and docker's default bounding set, exactly like docker.

The inheritable set is left empty: since CVE-2022-24769 docker and runc no
longer fill it, because a non-empty inheritable set lets file capabilities
of an executable grant more than the bounding set suggests.
"""

from __future__ import annotations

import os
import resource

from layerfs.runtime import syscalls
from layerfs.runtime.spec import Rlimit

CAPABILITIES = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4,
    "KILL": 5, "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9,
    "NET_BIND_SERVICE": 10, "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13,
    "IPC_LOCK": 14, "IPC_OWNER": 15, "SYS_MODULE": 16, "SYS_RAWIO": 17,
    "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20, "SYS_ADMIN": 21,
    "SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25,
    "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29,
    "AUDIT_CONTROL": 30, "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33,
    "SYSLOG": 34, "WAKE_ALARM": 35, "BLOCK_SUSPEND": 36, "AUDIT_READ": 37,
    "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}

DEFAULT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW",
                        "SETGID", "SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE",
                        "SYS_CHROOT", "KILL", "AUDIT_WRITE")


def cap_mask(names: tuple[str, ...]) -> int:
    """The 64-bit mask of capability names (0x00000000a80425fb for the default)."""
    mask = 0
    for name in names:
        mask |= 1 << CAPABILITIES[name]
    return mask


DEFAULT_CAP_MASK = cap_mask(DEFAULT_CAPABILITIES)


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as handle:
            return int(handle.read())
    except OSError:
        return max(CAPABILITIES.values())


def drop_privileges(uid: int, gid: int, groups: tuple[int, ...]) -> None:
    """Trim capabilities to docker's set, set no_new_privs, become uid:gid."""
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    for cap in range(_last_cap() + 1):
        if not DEFAULT_CAP_MASK & (1 << cap):
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    syscalls.capset(DEFAULT_CAP_MASK, DEFAULT_CAP_MASK, 0)
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def apply_rlimits(limits: tuple[Rlimit, ...]) -> None:
    """Set each limit, capped at the current hard limit.

    Raising a hard limit needs CAP_SYS_RESOURCE, which the caller may lack;
    capping keeps "docker's default" meaning "as much as this host allows".
    """
    for limit in limits:
        _, hard_now = resource.getrlimit(limit.resource)
        hard = _cap(limit.hard, hard_now)
        soft = _cap(limit.soft, hard)
        resource.setrlimit(limit.resource, (soft, hard))


def _cap(value: int, ceiling: int) -> int:
    if ceiling == resource.RLIM_INFINITY:
        return value
    if value == resource.RLIM_INFINITY:
        return ceiling
    return min(value, ceiling)
