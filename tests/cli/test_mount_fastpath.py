"""`layerfs mount` answered by the mount server says exactly what the
click path says: the same one-line error and exit code, nothing at all on
success. Each case runs both ways, and with both clients of the server:
the Python one (cli/fastpath.py) and the `layerfs` program (bin/layerfs.c,
which runs the Python command for anything it does not answer). Which
path answered is recorded by the Python process itself (was click
imported?), or is "native" when no Python process ran."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from layerfs.fs import mount as fsmount
from layerfs.fs import mountclient
from tests.conftest import mount_servers, stop_mount_servers

pytestmark = pytest.mark.fuse

NATIVE = os.path.join(os.path.dirname(sys.executable), "layerfs")


def _entry(mark: str) -> str:
    """The Python command's entry point, recording at exit whether click
    was imported: the fast path exits before importing it (through
    os._exit, which skips atexit: noted there too)."""
    return ("import atexit, os, sys\n"
            f"mark = {mark!r}\n"
            "def note():\n"
            "    with open(mark, 'w') as f:\n"
            "        f.write('click' if 'click' in sys.modules else 'fast')\n"
            "atexit.register(note)\n"
            "_exit = os._exit\n"
            "os._exit = lambda code: (note(), _exit(code))\n"
            "sys.argv = ['layerfs'] + sys.argv[1:]\n"
            "from layerfs_cli.main import main\n"
            "main()\n")


def _store(tmp_path, client: str):
    root = str(tmp_path / "store")
    src = tmp_path / "src"
    os.makedirs(src / "etc")
    (src / "etc" / "hello").write_text("hello\n")
    run = _runner(root, tmp_path, client)
    assert run("import", str(src), "-t", "t:1")[0].returncode == 0
    if client == "native":  # it leaves starting a server to the Python client
        mountclient.call(root, {"op": "status"})
    yield root, run
    for m in fsmount.list_mounts(root):
        fsmount.unmount(root, m.mountpoint, timeout=20)
    stop_mount_servers(mount_servers(root))


@pytest.fixture(params=["python", "native"])
def store(tmp_path, request):
    yield from _store(tmp_path, request.param)


@pytest.fixture
def native_store(tmp_path):
    yield from _store(tmp_path, "native")


def _runner(root: str, tmp_path, client: str):
    """run(*args): the command's result and which path answered it. The
    native client runs from a copy beside a `layerfs-py` that records."""
    mark = str(tmp_path / "answered-by")
    if client == "python":
        command = [sys.executable, "-c", _entry(mark)]
    else:
        with open(NATIVE, "rb") as f:
            if f.read(4) != b"\x7fELF":
                pytest.skip("bin/layerfs.c was not built (no C compiler at install): layerfs is the Python command")
        bindir = tmp_path / "bin"
        os.makedirs(bindir)
        shutil.copy2(NATIVE, bindir / "layerfs")
        (bindir / "layerfs-py").write_text(f"#!{sys.executable}\n" + _entry(mark))
        os.chmod(bindir / "layerfs-py", 0o755)
        command = [str(bindir / "layerfs")]

    def run(*args: str, fast: bool = True, env: dict | None = None) -> tuple[subprocess.CompletedProcess, str]:
        full = dict(os.environ, LAYERFS_ROOT=root, **(env or {}))
        full.pop("LAYERFS_MOUNT_SERVER", None)
        if not fast:
            full["LAYERFS_MOUNT_SERVER"] = "off"
        if os.path.exists(mark):
            os.unlink(mark)
        proc = subprocess.run([*command, *args], capture_output=True, env=full, cwd=str(tmp_path), timeout=120)
        if not os.path.exists(mark):
            return proc, "native"
        with open(mark) as f:
            return proc, f.read()

    run.fast = "fast" if client == "python" else "native"  # what answers when the server does
    return run


def both(run, *args: str, env: dict | None = None, fast_answers: bool = True) -> subprocess.CompletedProcess:
    """Run *args* through both paths; they must agree. Returns the fast one."""
    fast, by = run(*args, env=env)
    slow, slow_by = run(*args, env=env, fast=False)
    assert slow_by == "click"
    assert by == (run.fast if fast_answers else "click"), fast.stderr
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
    assert (by, proc.returncode, proc.stdout, proc.stderr) == (run.fast, 0, b"", b"")
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
    assert by == run.fast
    assert fast.returncode == slow.returncode == 1
    assert b"Traceback" in fast.stderr and b"Traceback" in slow.stderr
    assert fast.stderr.splitlines()[-1] == slow.stderr.splitlines()[-1] == \
        b"layerfs.errors.NotFound: no such image: nope:1"


def test_what_the_native_client_leaves_to_python(native_store, tmp_path):
    """Paths it would have to decode or normalize, a socket path too long
    for sun_path, no server running: the Python command answers, as it
    would have (its own fast path starts the server), and the next mount
    is the native client's again."""
    root, run = native_store
    uni = tmp_path / "m\u00fcnt"
    os.makedirs(uni)
    proc, by = run("mount", "t:1", str(uni), "--read-only")
    assert (by, proc.returncode, proc.stderr) == ("fast", 0, b"")
    one_line(run("--root", f"{tmp_path}/x/../store", "mount", "nope:1", str(uni))[0], 1, "no such image")
    assert run("--root", f"{tmp_path}/x/../store", "mount", "nope:1", str(uni))[1] == "fast"
    long_root = tmp_path / ("d" * 100)
    os.symlink(root, long_root)
    proc, by = run("--root", str(long_root), "mount", "nope:1", str(uni))
    assert by == "fast" and proc.returncode == 1, proc.stderr
    stop_mount_servers(mount_servers(root))
    os.makedirs(tmp_path / "mnt2")
    proc, by = run("mount", "t:1", str(tmp_path / "mnt2"), "--read-only")
    assert (by, proc.returncode) == ("fast", 0), proc.stderr  # Python started the server
    os.makedirs(tmp_path / "mnt3")
    proc, by = run("mount", "t:1", str(tmp_path / "mnt3"), "--read-only")
    assert (by, proc.returncode) == ("native", 0), proc.stderr
    assert open(tmp_path / "mnt3" / "etc" / "hello").read() == "hello\n"


def test_every_other_command_is_the_python_one(tmp_path):
    """`layerfs` runs layerfs-py with its arguments, under its own name."""
    from tests.conftest import layerfs_cmd

    proc = layerfs_cmd("--help", root=str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.startswith(b"Usage: layerfs [OPTIONS]"), proc.stdout
    proc = layerfs_cmd("images", "--bogus", root=str(tmp_path))
    assert proc.returncode == 2 and b"Usage: layerfs images" in proc.stderr, proc.stderr
