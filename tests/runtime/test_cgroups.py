"""Per-container cgroups on this host's layout (v1 or hybrid here, v2 elsewhere)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from layerfs.errors import Conflict, InvalidInput
from layerfs.runtime.cgroups import CgroupLimits, V1Cgroup, V2Cgroup, cgroup_version, create_cgroup
from tests.runtime.conftest import root_tests

pytestmark = root_tests


def _read(directory: str, name: str) -> str:
    with open(os.path.join(directory, name), encoding="ascii") as handle:
        return handle.read().strip()


def test_version_matches_the_mount() -> None:
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        pure_v2 = any(line.split()[4] == "/sys/fs/cgroup" and " - cgroup2 " in line
                      for line in handle)
    assert cgroup_version() == (2 if pure_v2 else 1)


def test_limits_are_written() -> None:
    group = create_cgroup("layerfs-test-limits", CgroupLimits(32 << 20, 0.25, 7))
    try:
        if isinstance(group, V1Cgroup):
            memory = group.dirs["memory"]
            assert _read(memory, "memory.limit_in_bytes") == str(32 << 20)
            if os.path.exists(os.path.join(memory, "memory.memsw.limit_in_bytes")):
                assert _read(memory, "memory.memsw.limit_in_bytes") == str(32 << 20)
            assert _read(group.dirs["cpu"], "cpu.cfs_period_us") == "100000"
            assert _read(group.dirs["cpu"], "cpu.cfs_quota_us") == "25000"
            assert _read(group.dirs["pids"], "pids.max") == "7"
            if "devices" in group.dirs:
                assert "c 1:3 rwm" in _read(group.dirs["devices"], "devices.list")
        else:
            assert isinstance(group, V2Cgroup)
            assert _read(group.path, "memory.max") == str(32 << 20)
            assert _read(group.path, "cpu.max") == "25000 100000"
            assert _read(group.path, "pids.max") == "7"
    finally:
        group.remove()


def test_add_stats_remove_kills_leftovers() -> None:
    group = create_cgroup("layerfs-test-remove", CgroupLimits())
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        group.add(sleeper.pid)
        stats = group.stats()
        assert stats.pids == 1 and stats.memory_bytes is not None
        assert not group.oom_killed()
        group.remove()
        assert sleeper.wait(timeout=5) == -9
        assert all(not os.path.exists(p.rsplit("/", 1)[0]) for p in group.procs_files)
        group.remove()  # idempotent
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
            group.remove()


def test_oom_is_detected() -> None:
    group = create_cgroup("layerfs-test-oom", CgroupLimits(memory=16 << 20))
    try:
        hog = subprocess.Popen(["sh", "-c", "read x; head -c 64m /dev/zero | tail"],
                               stdin=subprocess.PIPE)
        group.add(hog.pid)
        assert hog.stdin is not None
        hog.stdin.write(b"go\n")
        hog.stdin.close()
        hog.wait(timeout=20)
        deadline = time.monotonic() + 5
        while not group.oom_killed() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert group.oom_killed()
    finally:
        group.remove()


def test_duplicate_and_bad_names() -> None:
    group = create_cgroup("layerfs-test-dup", CgroupLimits())
    try:
        with pytest.raises(Conflict):
            create_cgroup("layerfs-test-dup", CgroupLimits())
    finally:
        group.remove()
    for bad in ("../up", "a/b", "", ".hidden"):
        with pytest.raises(InvalidInput):
            create_cgroup(bad, CgroupLimits())
