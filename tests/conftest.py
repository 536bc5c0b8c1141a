"""Shared fixtures: a fresh store per test, and trees to import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from layerfs import procfs
from layerfs.store.store import Store
from tests import capabilities

ROOT = os.geteuid() == 0
needs_root = pytest.mark.root


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """The one skip hook: a test's markers say what it needs."""
    for mark in item.iter_markers():
        reason = capabilities.missing(mark)
        if reason is not None:
            pytest.skip(reason)


# Parts of the suite whose tests write stores through mounts, builds and
# containers: every store such a test leaves under its tmp_path is fsck'ed.
FSCK_AFTER = ("fs", "builder", "runtime", "cli", "snapshotter")


def _stores_under(top: str, depth: int = 3) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        if "db.sqlite" in filenames and "objects" in dirnames:
            found.append(dirpath)
            dirnames[:] = []
        elif dirpath[len(top):].count(os.sep) >= depth:
            dirnames[:] = []
        else:
            # never walk into a mount a failed test left behind
            dirnames[:] = [d for d in dirnames if not os.path.ismount(os.path.join(dirpath, d))]
    return found


@pytest.fixture(autouse=True)
def fsck_stores_after(request: pytest.FixtureRequest):
    """After each fs/builder/runtime/cli test, every store it wrote must
    pass fsck: kill -9 paths, failed builds and unmounts included. A test
    that damages a store on purpose says so with @pytest.mark.damages_store."""
    part = os.path.relpath(str(request.path), os.path.dirname(__file__)).split(os.sep)[0]
    if part not in FSCK_AFTER or request.node.get_closest_marker("damages_store"):
        yield
        return
    top = str(request.getfixturevalue("tmp_path"))
    yield
    for root in _stores_under(top):
        assert_fsck_clean(root)


def mount_servers(under: str) -> dict[int, str]:
    """The warm mount servers (``fs.mountserver``) of stores under *under*:
    pid -> store root."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/comm", "rb") as f:
                comm = f.read().strip()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        # the FUSE daemons a server forked share its command line, not its name
        if comm == b"layerfs-mserver" and len(cmd) > 3 and cmd[1:3] == [b"-m", b"layerfs.fs.mountserver"]:
            root = os.fsdecode(cmd[3])
            if root == under or root.startswith(under.rstrip("/") + "/"):
                found[int(name)] = root
    # A worker the server has just forked bears its name until it renames
    # itself (fs.mountserver: _leave), a moment on a busy machine: a server
    # is one whose parent is not a server.
    return {pid: root for pid, root in found.items() if procfs.parent_pid(pid) not in found}


def stop_mount_servers(pids) -> None:
    """SIGTERM each server (SIGKILL after 10 s) and wait until it is gone."""
    import signal
    import time

    from layerfs import procfs

    starts = {pid: procfs.start_time(pid) for pid in pids}
    for pid, start in starts.items():
        if start is not None:
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for pid, start in starts.items():
        while start is not None and procfs.alive(pid, start):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)


@pytest.fixture(autouse=True)
def stop_mount_servers_after(request: pytest.FixtureRequest):
    """``layerfs mount`` starts a mount server that outlives the command:
    stop those a test started (by pid: the ones of this session's stores
    that were not running before it)."""
    part = os.path.relpath(str(request.path), os.path.dirname(__file__)).split(os.sep)[0]
    if part not in FSCK_AFTER:
        yield
        return
    base = str(request.getfixturevalue("tmp_path_factory").getbasetemp())
    before = set(mount_servers(base))
    yield
    stop_mount_servers(set(mount_servers(base)) - before)


def assert_fsck_clean(root: str) -> None:
    """The store at *root* passes fsck: every object re-hashed, every
    reference resolved."""
    from layerfs.store import fsck

    with Store(root) as st:
        report = fsck.check(st)
    assert report.clean, f"fsck of {root}: {report.problems[:5]}"


def one_line_error(proc: subprocess.CompletedProcess, code: int | None = None, *words: str) -> str:
    """A failed command's stderr is one ``Error: ...`` line (no traceback,
    no progress: callers pass -q) with exit *code* and these *words*."""
    err = proc.stderr.decode()
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    if code is not None:
        assert proc.returncode == code, err
    for w in words:
        assert w in err, err
    return lines[0]


@pytest.fixture
def store(tmp_path):
    with Store(str(tmp_path / "store")) as s:
        yield s


@pytest.fixture
def store_root(tmp_path):
    return str(tmp_path / "store")


def layerfs_cmd(*args: str, root: str, input: bytes | None = None, check: bool = False,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real console script as a user would."""
    exe = os.path.join(os.path.dirname(sys.executable), "layerfs")
    env = dict(os.environ, LAYERFS_ROOT=root)
    proc = subprocess.run([exe, *args], capture_output=True, env=env, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"layerfs {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc


@pytest.fixture
def busybox_tree(tmp_path):
    from layerfs.bootstrap import busybox_tree as make

    if (reason := capabilities.tools("busybox")) is not None:
        pytest.skip(reason)
    dest = str(tmp_path / "busybox-rootfs")
    make(dest)
    return dest
