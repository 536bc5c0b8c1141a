"""Temp files and dirs named after the process that owns them.

Every temp entry a command makes in the store's tmp dir (and the partial
archive a `save` writes beside its destination) is named
``<kind>-<pid>-<rest>``. A command killed with SIGKILL leaves its entries
behind: a killed `save` gigabytes of spooled blobs, a killed build its RUN
step's staging dir. The next command that writes to the store removes
those whose process is gone (:func:`sweep_dead`, from ``Store.writing``),
rather than leaving them until `layerfs gc`. A pid reused since only
delays that to gc, which removes everything no live mount uses while it
holds the store exclusively.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from layerfs import procfs


def prefix(kind: str) -> str:
    """The name prefix of this process's temp entries of *kind*."""
    return f"{kind}-{os.getpid()}-"


def mkstemp(folder: str, kind: str, suffix: str = "") -> tuple[int, str]:
    return tempfile.mkstemp(dir=folder, prefix=prefix(kind), suffix=suffix)


def mkdtemp(folder: str, kind: str) -> str:
    return tempfile.mkdtemp(dir=folder, prefix=prefix(kind))


def owner(name: str) -> int | None:
    """The pid in a temp entry's name (``<kind>-<pid>-...``; *kind* may
    have dashes, never a part of digits only), or None."""
    for part in name.split("-")[1:-1]:
        if part.isdigit():
            return int(part)
    return None


def sweep_dead(folder: str, kind: str | None = None) -> int:
    """Remove the entries of *folder* (of *kind* only, if given) whose
    process is gone and under which nothing is mounted; returns how many."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    dead = [name for name in names
            if (kind is None or name.startswith(kind + "-"))
            and (pid := owner(name)) is not None and not procfs.alive(pid, None)]
    removed = 0
    for name in dead:  # (few: one mount table read each is cheap)
        path = os.path.join(folder, name)
        if procfs.mounts_under(path):  # a killed build's RUN mount: its daemon removes the dir
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        removed += 1
    return removed


def partial_beside(dest: str) -> tuple[int, str]:
    """A temp file (fd, path) in *dest*'s directory, to be renamed to *dest*
    once complete: ``.layerfs-<pid>-*.partial``, with the mode open(2)
    would give *dest*. What killed writers left there goes first."""
    folder = os.path.dirname(os.path.abspath(dest))
    sweep_dead(folder, ".layerfs")
    fd, path = mkstemp(folder, ".layerfs", ".partial")
    chmod_as_created(fd)
    return fd, path


def chmod_as_created(fd: int) -> None:
    """Give a temp file (mkstemp: 0600) the mode open(2) would have given
    the file it becomes."""
    os.fchmod(fd, 0o666 & ~umask())


def umask() -> int:
    """The process's umask, read without setting it (os.umask would, for
    a moment, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022
