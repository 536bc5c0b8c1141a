"""One cgroup per container: create with limits, join, read, remove.

Two layouts, picked by what is mounted at /sys/fs/cgroup:

* cgroup v2 (pure unified, cgroup2 at /sys/fs/cgroup): one directory
  ``/sys/fs/cgroup/layerfs/<name>``, controllers enabled in the parents'
  ``cgroup.subtree_control``. Placed at the top, as docker's cgroupfs
  driver does, because v2 forbids controllers below a cgroup that has
  processes of its own (the caller's cgroup usually does).
* cgroup v1, also on v1/v2 hybrids (v1 controllers plus an empty unified
  tree at /sys/fs/cgroup/unified): one directory per controller hierarchy
  (memory, cpu, cpuacct, pids, devices), nested under the caller's own
  cgroup in that hierarchy: ``<caller's cgroup>/layerfs/<name>``. v1 allows
  that, and nesting keeps containers inside whatever limits the caller runs
  under instead of escaping them.

Usage::

    group = create_cgroup("abc123", CgroupLimits(memory=32 << 20, pids=64))
    group.add(pid)          # or write group.procs_files from the child
    ...
    group.oom_killed(); group.stats()
    group.remove()          # kills leftover tasks, then rmdir

``remove`` is idempotent. Only ``create_cgroup`` and the ``Cgroup``
protocol are meant for other modules.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from layerfs.errors import Conflict, Unsupported
from layerfs.runtime.errors import ContainerSetupError
from layerfs.runtime.spec import check_name

CGROUP_ROOT = "/sys/fs/cgroup"
PARENT_NAME = "layerfs"
CPU_PERIOD_US = 100_000
_V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "devices")
_V2_CONTROLLERS = ("memory", "cpu", "pids")
# docker's default device rules: mknod of anything, open only the usual
# character devices. Together with nodev mounts this keeps block devices out.
_V1_DEVICE_ALLOW = ("c *:* m", "b *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm",
                    "c 1:8 rwm", "c 1:9 rwm", "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm",
                    "c 136:* rwm", "c 10:200 rwm")
_REMOVE_TIMEOUT = 5.0


@dataclass(frozen=True)
class CgroupLimits:
    """Resource limits; None leaves a resource unlimited."""

    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None


@dataclass(frozen=True)
class CgroupStats:
    """A snapshot of a container's usage; None where the kernel lacks the file."""

    memory_bytes: int | None
    memory_peak_bytes: int | None
    cpu_usage_ns: int | None
    pids: int | None


class Cgroup(Protocol):
    """What the runtime needs from a container's cgroup, v1 or v2."""

    name: str

    @property
    def procs_files(self) -> tuple[str, ...]: ...
    @property
    def paths(self) -> tuple[str, ...]: ...
    def apply(self, limits: CgroupLimits) -> None: ...
    def add(self, pid: int) -> None: ...
    def oom_killed(self) -> bool: ...
    def stats(self) -> CgroupStats: ...
    def remove(self) -> None: ...


def cgroup_version() -> int:
    """2 if /sys/fs/cgroup is a pure cgroup2 mount, else 1 (legacy or hybrid)."""
    for mount in _cgroup_mounts():
        if mount.point == CGROUP_ROOT:
            return 2 if mount.fstype == "cgroup2" else 1
    return 1


def create_cgroup(name: str, limits: CgroupLimits) -> Cgroup:
    """Create the container's cgroup with ``limits`` applied."""
    check_name(name, "cgroup name")
    group: Cgroup
    if cgroup_version() == 2:
        group = V2Cgroup(name, _make_dir(os.path.join(CGROUP_ROOT, PARENT_NAME), name, v2=True))
    else:
        group = V1Cgroup(name, _make_v1_dirs(name))
    try:
        group.apply(limits)
    except BaseException:
        group.remove()
        raise
    return group


@dataclass(frozen=True)
class _Mount:
    point: str
    root: str
    fstype: str
    options: frozenset[str]


def _cgroup_mounts() -> list[_Mount]:
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            sep = fields.index("-")
            fstype = fields[sep + 1]
            if fstype in ("cgroup", "cgroup2"):
                options = frozenset(fields[sep + 3].split(","))
                mounts.append(_Mount(fields[4], fields[3], fstype, options))
    return mounts


def _own_v1_paths() -> dict[str, str]:
    """Map each v1 controller to the caller's cgroup path in its hierarchy."""
    paths = {}
    with open("/proc/self/cgroup", encoding="utf-8") as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(","):
                if controller:
                    paths[controller] = path
    return paths


def _v1_bases() -> list[tuple[tuple[str, ...], str]]:
    """(controllers, caller's cgroup dir) for each v1 hierarchy we use."""
    own = _own_v1_paths()
    bases = []
    seen: set[str] = set()
    for mount in _cgroup_mounts():
        wanted = tuple(c for c in _V1_CONTROLLERS if c in mount.options)
        if mount.fstype != "cgroup" or not wanted or wanted[0] in seen:
            continue
        seen.update(wanted)
        relative = os.path.relpath(own.get(wanted[0], "/"), mount.root)
        bases.append((wanted, os.path.normpath(os.path.join(mount.point, relative))))
    return bases


def parent_dirs() -> tuple[str, ...]:
    """The directories holding this process's container cgroups.

    For garbage collection after a crash: a child of one of these with an
    empty ``cgroup.procs`` belongs to a container whose owner died.
    """
    if cgroup_version() == 2:
        return (os.path.join(CGROUP_ROOT, PARENT_NAME),)
    return tuple(os.path.join(base, PARENT_NAME) for _, base in _v1_bases())


def _make_v1_dirs(name: str) -> dict[str, str]:
    dirs: dict[str, str] = {}
    made: list[str] = []
    try:
        for controllers, base in _v1_bases():
            path = _make_dir(os.path.join(base, PARENT_NAME), name, v2=False)
            made.append(path)
            for controller in controllers:
                dirs[controller] = path
    except BaseException:
        remove_cgroup_paths(made)
        raise
    if "memory" not in dirs or "pids" not in dirs:
        remove_cgroup_paths(made)
        raise Unsupported("cgroup v1 memory and pids controllers are not mounted")
    return dirs


def _make_dir(parent: str, name: str, v2: bool) -> str:
    path = os.path.join(parent, name)
    for _ in range(5):
        try:
            os.makedirs(parent, exist_ok=True)
            if v2:
                _enable_v2_controllers(parent)
            os.mkdir(path)
            return path
        except FileExistsError:
            raise Conflict(f"cgroup {path} already exists") from None
        except FileNotFoundError:
            continue  # a concurrent remove() took the parent away; retry
        except OSError as exc:
            raise ContainerSetupError(f"cannot create cgroup {path}: {exc.strerror}") from None
    raise ContainerSetupError(f"cannot create cgroup {path}: parent keeps vanishing")


def _enable_v2_controllers(parent: str) -> None:
    # Every ancestor from the root down must delegate the controllers.
    for directory in (CGROUP_ROOT, parent):
        with open(os.path.join(directory, "cgroup.controllers"), encoding="ascii") as handle:
            available = set(handle.read().split())
        wanted = [c for c in _V2_CONTROLLERS if c in available]
        if wanted:
            _write(os.path.join(directory, "cgroup.subtree_control"),
                   " ".join(f"+{c}" for c in wanted))


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(value)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _read_int(path: str) -> int | None:
    text = _read(path)
    return int(text.split()[0]) if text and text.split()[0].isdigit() else None


def _keyed(path: str, key: str) -> int | None:
    """Read ``key value`` files (memory.events, memory.oom_control, cpu.stat)."""
    for line in (_read(path) or "").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == key:
            return int(fields[1])
    return None


def remove_cgroup_paths(paths: Iterable[str]) -> None:
    """Kill what is left in each cgroup, rmdir it, then try its parent.

    v1 may answer EBUSY for a moment after the last task exited, so rmdir
    is retried for a few seconds before ``Conflict`` is raised.
    """
    for path in paths:
        deadline = time.monotonic() + _REMOVE_TIMEOUT
        while os.path.isdir(path):
            _kill_tasks(path)
            try:
                os.rmdir(path)
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise Conflict(f"cannot remove cgroup {path}: {exc.strerror}") from None
                time.sleep(0.01)
        try:
            os.rmdir(os.path.dirname(path))
        except OSError:
            pass  # other containers still use the shared parent


def _kill_tasks(path: str) -> None:
    if os.path.exists(os.path.join(path, "cgroup.kill")):
        _write(os.path.join(path, "cgroup.kill"), "1")
        return
    for pid in (_read(os.path.join(path, "cgroup.procs")) or "").split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


class _CgroupBase:
    """What v1 and v2 cgroups share: both are derived from ``paths``."""

    paths: tuple[str, ...]

    @property
    def procs_files(self) -> tuple[str, ...]:
        return tuple(os.path.join(d, "cgroup.procs") for d in self.paths)

    def apply(self, limits: CgroupLimits) -> None:
        try:
            self._apply(limits)
        except OSError as exc:
            raise ContainerSetupError(f"cannot set cgroup limits: {exc}") from None

    def _apply(self, limits: CgroupLimits) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class V1Cgroup(_CgroupBase):
    """A container's cgroups in the v1 hierarchies, keyed by controller."""

    name: str
    dirs: dict[str, str]

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.dirs.values())))

    def _apply(self, limits: CgroupLimits) -> None:
        memory = self.dirs["memory"]
        if limits.memory is not None:
            _write(os.path.join(memory, "memory.limit_in_bytes"), str(limits.memory))
            memsw = os.path.join(memory, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                # Equal to the memory limit: no swap on top (docker would
                # allow as much swap again), so hitting the limit means OOM.
                _write(memsw, str(limits.memory))
        if limits.cpus is not None and "cpu" in self.dirs:
            _write(os.path.join(self.dirs["cpu"], "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            _write(os.path.join(self.dirs["cpu"], "cpu.cfs_quota_us"),
                   str(int(limits.cpus * CPU_PERIOD_US)))
        if limits.pids is not None:
            _write(os.path.join(self.dirs["pids"], "pids.max"), str(limits.pids))
        if "devices" in self.dirs:
            _write(os.path.join(self.dirs["devices"], "devices.deny"), "a")
            for rule in _V1_DEVICE_ALLOW:
                _write(os.path.join(self.dirs["devices"], "devices.allow"), rule)

    def add(self, pid: int) -> None:
        for path in self.procs_files:
            _write(path, str(pid))

    def oom_killed(self) -> bool:
        control = os.path.join(self.dirs["memory"], "memory.oom_control")
        kills = _keyed(control, "oom_kill")
        if kills is not None:
            return kills > 0
        # Kernels before 4.13 lack the counter; hitting the limit is the
        # closest signal they give.
        return (_read_int(os.path.join(self.dirs["memory"], "memory.failcnt")) or 0) > 0

    def stats(self) -> CgroupStats:
        memory = self.dirs["memory"]
        cpuacct = self.dirs.get("cpuacct")
        return CgroupStats(
            memory_bytes=_read_int(os.path.join(memory, "memory.usage_in_bytes")),
            memory_peak_bytes=_read_int(os.path.join(memory, "memory.max_usage_in_bytes")),
            cpu_usage_ns=_read_int(os.path.join(cpuacct, "cpuacct.usage")) if cpuacct else None,
            pids=_read_int(os.path.join(self.dirs["pids"], "pids.current")),
        )

    def remove(self) -> None:
        remove_cgroup_paths(self.paths)


@dataclass(frozen=True)
class V2Cgroup(_CgroupBase):
    """A container's cgroup in the unified hierarchy."""

    name: str
    path: str

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,)

    def _apply(self, limits: CgroupLimits) -> None:
        if limits.memory is not None:
            _write(os.path.join(self.path, "memory.max"), str(limits.memory))
            if os.path.exists(os.path.join(self.path, "memory.swap.max")):
                _write(os.path.join(self.path, "memory.swap.max"), "0")
        if limits.cpus is not None:
            _write(os.path.join(self.path, "cpu.max"),
                   f"{int(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")
        if limits.pids is not None:
            _write(os.path.join(self.path, "pids.max"), str(limits.pids))

    def add(self, pid: int) -> None:
        _write(os.path.join(self.path, "cgroup.procs"), str(pid))

    def oom_killed(self) -> bool:
        return (_keyed(os.path.join(self.path, "memory.events"), "oom_kill") or 0) > 0

    def stats(self) -> CgroupStats:
        usage_us = _keyed(os.path.join(self.path, "cpu.stat"), "usage_usec")
        return CgroupStats(
            memory_bytes=_read_int(os.path.join(self.path, "memory.current")),
            memory_peak_bytes=_read_int(os.path.join(self.path, "memory.peak")),
            cpu_usage_ns=None if usage_us is None else usage_us * 1000,
            pids=_read_int(os.path.join(self.path, "pids.current")),
        )

    def remove(self) -> None:
        remove_cgroup_paths([self.path])
