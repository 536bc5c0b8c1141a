"""What /proc says about mounts and processes, for every package.

It sits beside ``errors`` at the top of the package because the store's gc
needs it as much as the filesystem's mount registry does: gc must never
delete a directory that is, or holds, a mountpoint, and neither may know
about the other.
"""

from __future__ import annotations

import re

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount this process sees, in mount order."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) > 4 and right:
                    out.append((_unescape(fields[4]), right.split()[0]))
    except OSError:
        pass
    return out


def mounted_fstype(path: str) -> str | None:
    """Filesystem type mounted at *path* (the topmost; None if nothing is)."""
    found = None
    for mountpoint, fstype in mounts():
        if mountpoint == path:
            found = fstype
    return found


def is_mountpoint(path: str) -> bool:
    return mounted_fstype(path) is not None


def mounts_under(path: str) -> list[str]:
    """Mountpoints at *path* or below it (never walk into these)."""
    prefix = path.rstrip("/") + "/"
    return [mp for mp, _ in mounts() if mp == path or mp.startswith(prefix)]


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (state first); [] if the
    process is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return []


def start_time(pid: int) -> str | None:
    """The start time of a live process (clock ticks since boot), None if it
    is gone or a zombie: with the pid it names one process for good."""
    fields = _stat_fields(pid)
    if len(fields) <= 19 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def parent_pid(pid: int) -> int | None:
    """The pid of *pid*'s parent, None if it is gone."""
    fields = _stat_fields(pid)
    return int(fields[1]) if len(fields) > 1 else None


def alive(pid: int | None, start: str | None) -> bool:
    """True if *pid* runs and, when *start* is given, is the process that
    started then (not a later one that reuses the pid)."""
    if not pid or pid <= 0:
        return False
    now = start_time(pid)
    return now is not None and (start is None or now == start)
