"""`layerfs mount` answered by the mount server (cli/fastpath.py) says
exactly what the click path says: the same one-line error and exit code,
nothing at all on success. Each case runs both ways; which path answered
is recorded by the process itself (was click imported?)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from layerfs.fs import mount as fsmount
from tests.conftest import mount_servers, stop_mount_servers

pytestmark = pytest.mark.fuse

# Runs the command's entry point and records at exit whether click was
# imported: the fast path exits before importing it (through os._exit,
# which skips atexit: noted there too).
_RUN = ("import atexit, os, sys\n"
        "mark = sys.argv[1]\n"
        "def note():\n"
        "    with open(mark, 'w') as f:\n"
        "        f.write('click' if 'click' in sys.modules else 'fast')\n"
        "atexit.register(note)\n"
        "_exit = os._exit\n"
        "os._exit = lambda code: (note(), _exit(code))\n"
        "sys.argv = ['layerfs'] + sys.argv[2:]\n"
        "from layerfs_cli.main import main\n"
        "main()\n")


@pytest.fixture
def store(tmp_path):
    root = str(tmp_path / "store")
    src = tmp_path / "src"
    os.makedirs(src / "etc")
    (src / "etc" / "hello").write_text("hello\n")
    run = _runner(root, tmp_path)
    assert run("import", str(src), "-t", "t:1")[0].returncode == 0
    yield root, run
    for m in fsmount.list_mounts(root):
        fsmount.unmount(root, m.mountpoint, timeout=20)
    stop_mount_servers(mount_servers(root))


def _runner(root: str, tmp_path):
    def run(*args: str, fast: bool = True, env: dict | None = None) -> tuple[subprocess.CompletedProcess, str]:
        mark = str(tmp_path / "answered-by")
        full = dict(os.environ, LAYERFS_ROOT=root, **(env or {}))
        full.pop("LAYERFS_MOUNT_SERVER", None)
        if not fast:
            full["LAYERFS_MOUNT_SERVER"] = "off"
        proc = subprocess.run([sys.executable, "-c", _RUN, mark, *args], capture_output=True, env=full,
                              cwd=str(tmp_path), timeout=120)
        with open(mark) as f:
            return proc, f.read()
    return run


def both(run, *args: str, env: dict | None = None, fast_answers: bool = True) -> subprocess.CompletedProcess:
    """Run *args* through both paths; they must agree. Returns the fast one."""
    fast, by = run(*args, env=env)
    slow, slow_by = run(*args, env=env, fast=False)
    assert slow_by == "click"
    assert by == ("fast" if fast_answers else "click"), fast.stderr
    assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr)
    return fast


def one_line(proc: subprocess.CompletedProcess, code: int, text: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.decode().count("\n") == 1 and proc.stderr.decode().startswith("Error: "), proc.stderr
    assert text in proc.stderr.decode(), proc.stderr


def test_success_prints_nothing_and_umount_works(store, tmp_path):
    root, run = store
    os.makedirs(tmp_path / "mnt")
    proc, by = run("mount", "t:1", str(tmp_path / "mnt"), "--upper", str(tmp_path / "up"), "--debug")
    assert (by, proc.returncode, proc.stdout, proc.stderr) == ("fast", 0, b"", b"")
    assert open(tmp_path / "mnt" / "etc" / "hello").read() == "hello\n"
    proc, _ = run("umount", str(tmp_path / "mnt"))
    assert proc.returncode == 0 and fsmount.mounted_fstype(str(tmp_path / "mnt")) is None


def test_missing_image(store, tmp_path):
    _, run = store
    one_line(both(run, "mount", "nope:1", str(tmp_path / "no-such-dir")), 1, "no such image: nope:1")


def test_missing_mountpoint(store, tmp_path):
    _, run = store
    one_line(both(run, "mount", "t:1", str(tmp_path / "no-such-dir")), 1, "is not a directory")


def test_mountpoint_already_mounted(store, tmp_path):
    _, run = store
    mp = str(tmp_path / "mnt")
    os.makedirs(mp)
    assert run("mount", "t:1", mp, "--read-only")[0].returncode == 0
    one_line(both(run, "mount", "t:1", mp), 1, "already a layerfs mount")


def test_bad_container_name(store, tmp_path):
    _, run = store
    os.makedirs(tmp_path / "mnt")
    one_line(both(run, "mount", "t:1", str(tmp_path / "mnt"), "--container", "../evil"), 2, "invalid container name")


def test_upper_inside_mountpoint_and_missing_read_only_upper(store, tmp_path):
    _, run = store
    mp = str(tmp_path / "mnt")
    os.makedirs(mp)
    one_line(both(run, "mount", "t:1", mp, "--upper", f"{mp}/up"), 2, "cannot be inside the mountpoint")
    one_line(both(run, "mount", "t:1", mp, "--read-only", "--upper", str(tmp_path / "none")), 1, "does not exist")


def test_bad_backend_in_the_environment(store, tmp_path):
    _, run = store
    os.makedirs(tmp_path / "mnt")
    proc = both(run, "mount", "t:1", str(tmp_path / "mnt"), env={"LAYERFS_BACKEND": "bogus"})
    one_line(proc, 2, "$LAYERFS_BACKEND: unknown backend 'bogus'")


def test_what_the_fast_path_leaves_to_click(store, tmp_path):
    """Usage errors print click's usage text: the fast path does not try."""
    _, run = store
    mp = str(tmp_path / "mnt")
    os.makedirs(mp)
    (tmp_path / "file").write_text("")
    for args in (["--upper", str(tmp_path / "u"), "--container", "c1"],  # mutually exclusive
                 ["--upper"],  # missing value
                 ["--bogus"]):
        proc = both(run, "mount", "t:1", mp, *args, fast_answers=False)
        assert proc.returncode == 2, (args, proc.stderr)
    proc = both(run, "mount", "t:1", str(tmp_path / "file"), fast_answers=False)
    assert proc.returncode == 2 and b"is a file" in proc.stderr
    proc = both(run, "mount", "--help", fast_answers=False)
    assert proc.returncode == 0 and b"Usage:" in proc.stdout
    proc, by = run("mount", "t:1", mp, "--backend=fuse")  # a form it does not parse: click mounts
    assert (by, proc.returncode) == ("click", 0), proc.stderr


def test_debug_shows_the_traceback_both_ways(store, tmp_path):
    _, run = store
    fast, by = run("mount", "nope:1", str(tmp_path), "--debug")
    slow, _ = run("mount", "nope:1", str(tmp_path), "--debug", fast=False)
    assert by == "fast"
    assert fast.returncode == slow.returncode == 1
    assert b"Traceback" in fast.stderr and b"Traceback" in slow.stderr
    assert fast.stderr.splitlines()[-1] == slow.stderr.splitlines()[-1] == \
        b"layerfs.errors.NotFound: no such image: nope:1"
