"""The warm mount server (fs.mountserver): started by `layerfs mount`,
reused, one per store, gone after an idle time or a signal without taking
any mount with it, refusing other users."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from layerfs import procfs
from layerfs.fs import mount as fsmount
from layerfs.fs import mountclient
from layerfs.fs.index import cache_path
from layerfs.fs.indexmemory import IndexMemory
from layerfs.store.layout import StoreLayout
from layerfs.store.store import Store
from tests.conftest import mount_servers, stop_mount_servers
from tests.fs.conftest import build_layers, make_image

pytestmark = pytest.mark.fuse


@pytest.fixture
def servers(tmp_path):
    """Stops (by pid) every mount server of the stores under tmp_path."""
    yield
    stop_mount_servers(mount_servers(str(tmp_path)))


@pytest.fixture
def store_with_image(tmp_path):
    """A store of this test's own (so its server is this test's), holding
    the fs tests' three-layer image."""
    root = str(tmp_path / "store")
    with Store(root) as store:
        make_image(store, build_layers(str(tmp_path / "src")), "fstest:latest")
    return root, "fstest:latest"


class Mounts:
    """CLI mounts made by a test, unmounted at its end."""

    def __init__(self, root: str, base) -> None:
        self.root, self.base, self.made = root, base, []

    def mount(self, image: str, name: str, *args: str, env: dict | None = None) -> str:
        mp = str(self.base / name)
        os.makedirs(mp, exist_ok=True)
        self.made.append(mp)
        r = _cli(self.root, "mount", image, mp, *args, env=env)
        assert r.returncode == 0 and r.stdout == b"" and r.stderr == b"", r.stderr
        return mp

    def unmount_all(self) -> None:
        for mp in self.made:
            if fsmount.mounted_fstype(mp) is not None:
                fsmount.unmount(self.root, mp, timeout=20)


@pytest.fixture
def mounts(store_with_image, tmp_path, servers):
    m = Mounts(store_with_image[0], tmp_path)
    yield m
    m.unmount_all()


def _cli(root: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "layerfs")
    full = dict(os.environ, LAYERFS_ROOT=root, **(env or {}))
    full.pop("LAYERFS_MOUNT_SERVER", None)
    return subprocess.run([exe, *args], capture_output=True, env=full, timeout=120)


def _daemon_pid(root: str, mp: str) -> int:
    [info] = [m for m in fsmount.list_mounts(root) if m.mountpoint == mp]
    return info.pid


def _serves(mp: str) -> bool:
    return open(os.path.join(mp, "top")).read() == "top\n"


def _wait_gone(pid: int, start: str | None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while procfs.alive(pid, start):
        assert time.monotonic() < deadline, f"server {pid} still runs"
        time.sleep(0.05)


def test_started_on_demand_and_reused(store_with_image, mounts):
    root, image = store_with_image
    assert mountclient.server_pid(root) is None
    a = mounts.mount(image, "a", "--upper", str(mounts.base / "up-a"))
    server = mountclient.server_pid(root)
    assert server is not None and list(mount_servers(root)) == [server]
    b = mounts.mount(image, "b", "--read-only")
    assert mountclient.server_pid(root) == server  # reused
    assert _serves(a) and _serves(b)
    layout = StoreLayout(root)
    assert os.stat(os.path.join(layout.mount_server, "sock")).st_mode & 0o777 == 0o600
    assert os.stat(layout.mount_server).st_mode & 0o777 == 0o700
    assert "serving" in open(layout.mount_server_log).read()
    # each daemon is a detached daemon of its own, not the server's child
    for mp in (a, b):
        pid = _daemon_pid(root, mp)
        stat = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
        assert int(stat[1]) != server and os.getsid(pid) not in (os.getsid(server), os.getsid(0))
    # the server keeps no database open and runs no threads (fork safety)
    fds = [os.readlink(f"/proc/{server}/fd/{n}") for n in os.listdir(f"/proc/{server}/fd")]
    assert not any("db.sqlite" in f for f in fds), fds
    assert os.listdir(f"/proc/{server}/task") == [str(server)]
    listed = json.loads(_cli(root, "mounts", "--format", "json").stdout)
    assert sorted(m["mountpoint"] for m in listed) == sorted([a, b])


def test_paths_are_the_callers(store_with_image, mounts, tmp_path):
    """Relative mountpoint and upper resolve in the caller's cwd, not the server's."""
    root, image = store_with_image
    os.makedirs(tmp_path / "rel" / "mnt")
    exe = os.path.join(os.path.dirname(sys.executable), "layerfs")
    r = subprocess.run([exe, "mount", image, "mnt", "--upper", "up"], cwd=tmp_path / "rel", capture_output=True,
                       env=dict(os.environ, LAYERFS_ROOT=root))
    mounts.made.append(str(tmp_path / "rel" / "mnt"))
    assert r.returncode == 0, r.stderr
    assert mountclient.server_pid(root) is not None  # answered by the server
    with open(tmp_path / "rel" / "mnt" / "new", "w") as f:
        f.write("x")
    assert os.path.exists(tmp_path / "rel" / "up" / "new")


def test_idle_exit_leaves_mounts(store_with_image, mounts):
    root, image = store_with_image
    a = mounts.mount(image, "a", env={mountclient.IDLE_ENV: "1"})
    status = mountclient.call(root, {"op": "status"}, start=False)
    _wait_gone(status["pid"], status["start"])
    assert not os.path.exists(mountclient.socket_path(root))
    assert _serves(a)
    b = mounts.mount(image, "b")
    assert mountclient.server_pid(root) not in (None, status["pid"])
    assert _serves(a) and _serves(b)
    assert "idle for 1s: exiting" in open(StoreLayout(root).mount_server_log).read()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_server_leaves_mounts(store_with_image, mounts, sig):
    """A server run as our child, so its exit status is seen: SIGTERM ends
    it with 0; after either signal the mounts serve and the next mount
    starts a new server (over the stale socket kill -9 leaves)."""
    root, image = store_with_image
    proc = subprocess.Popen([sys.executable, "-m", "layerfs.fs.mountserver", root], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while mountclient.server_pid(root) != proc.pid:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        a = mounts.mount(image, "a")
        assert mountclient.server_pid(root) == proc.pid
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert os.path.exists(mountclient.socket_path(root)) == (sig == signal.SIGKILL)
    assert _serves(a)
    b = mounts.mount(image, "b")
    new = mountclient.server_pid(root)
    assert new not in (None, proc.pid)
    assert _serves(a) and _serves(b)
    assert _cli(root, "umount", a).returncode == 0
    assert fsmount.mounted_fstype(a) is None


def test_stale_socket_is_replaced(store_with_image, mounts):
    root, image = store_with_image
    path = mountclient.socket_path(root)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)  # bound, never listening: connect() is refused
    dead.close()
    a = mounts.mount(image, "a")
    assert _serves(a) and mountclient.server_pid(root) is not None


def test_concurrent_mounts_start_one_server(store_with_image, mounts):
    root, image = store_with_image
    names = [f"m{i}" for i in range(4)]
    for n in names:
        os.makedirs(mounts.base / n)
        mounts.made.append(str(mounts.base / n))
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda n: _cli(root, "mount", image, str(mounts.base / n)), names))
    for r in results:
        assert r.returncode == 0, r.stderr
    assert len(mount_servers(root)) == 1
    assert all(_serves(str(mounts.base / n)) for n in names)
    assert len(fsmount.list_mounts(root)) == len(names)


def test_another_uid_is_refused(store_with_image, mounts):
    """The socket is 0600 in a 0700 dir; opened up by mistake, the server
    still answers nobody but its own uid (SO_PEERCRED)."""
    root, image = store_with_image
    mounts.mount(image, "a")
    path = mountclient.socket_path(root)
    os.chmod(os.path.dirname(path), 0o711)
    os.chmod(path, 0o666)
    try:
        # through an fd of the socket's dir: pytest's tmp dirs are 0700
        dfd = os.open(os.path.dirname(path), os.O_PATH)
        pid = os.fork()
        if pid == 0:  # the other user: connects, asks, must get no answer
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(f"/proc/self/fd/{dfd}/sock")
                try:
                    mountclient.send_frame(sock, {"op": "status"})
                    code = 0 if sock.recv(1) == b"" else 2
                except (BrokenPipeError, ConnectionResetError):
                    code = 0  # closed on us before we asked: refused too
            except BaseException as exc:
                os.write(2, f"the other user's client: {exc!r}\n".encode())
            finally:
                os._exit(code)
        os.close(dfd)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o600)
    assert "uid 65534 is not the server's" in open(StoreLayout(root).mount_server_log).read()
    assert mountclient.server_pid(root) is not None  # still serving its own user


def test_mount_server_commands(store_with_image, mounts):
    root, image = store_with_image
    assert _cli(root, "mount-server", "status").stdout == b"not running\n"
    a = mounts.mount(image, "a")
    pid = mountclient.server_pid(root)
    assert _cli(root, "mount-server", "status").stdout == f"{pid}\n".encode()
    assert _cli(root, "mount-server", "stop").returncode == 0
    assert not procfs.alive(pid, None) or procfs.start_time(pid) is None
    assert mountclient.server_pid(root) is None
    assert _serves(a)


def test_index_memory_is_keyed_by_the_cache_file(store_with_image, mounts):
    """A kept index is served only while its cache file is the one it was
    loaded from: a rebuilt cache is read again."""
    root, image = store_with_image
    mounts.mount(image, "a")  # builds the index cache
    image_id = fsmount.list_mounts(root)[0].image_id
    path = cache_path(root, image_id)
    memory = IndexMemory(limit=1)
    memory.load(root, image_id)
    kept = memory.get(image_id, path)
    assert kept is not None and memory.get(image_id, path) is kept
    assert memory.get("0" * 64, path) is None
    data = open(path, "rb").read()
    with open(path + ".new", "wb") as f:
        f.write(data)
    os.replace(path + ".new", path)  # as ensure_index_cache does after a rebuild
    assert memory.get(image_id, path) is None
    deadline = time.monotonic() + 30  # the server keeps it once the worker reports, after answering
    while mountclient.call(root, {"op": "status"}, start=False)["indexes"] != 1:
        assert time.monotonic() < deadline, "the server did not keep the index"
        time.sleep(0.05)
    b = mounts.mount(image, "b")  # its index read from the new file, then kept again
    c = mounts.mount(image, "c")  # from memory
    assert _serves(b) and _serves(c)
    kept = "kept in memory by the mount server"
    layout = StoreLayout(root)
    assert kept not in open(layout.mount_log(b)).read()
    assert kept in open(layout.mount_log(c)).read()


def test_removed_socket(store_with_image, mounts):
    """A server whose socket was deleted exits by itself (checked every few
    seconds); a client meanwhile waits for its lock, then starts another."""
    root, image = store_with_image
    a = mounts.mount(image, "a")
    status = mountclient.call(root, {"op": "status"}, start=False)
    os.unlink(mountclient.socket_path(root))
    b = mounts.mount(image, "b")
    assert not procfs.alive(status["pid"], status["start"])
    assert mountclient.server_pid(root) not in (None, status["pid"])
    assert _serves(a) and _serves(b)


def test_store_path_longer_than_a_socket_address(tmp_path, servers):
    """sun_path holds 108 bytes: a deeper store is reached through an fd of
    the socket's dir."""
    root = str(tmp_path / ("x" * 60) / ("y" * 60) / "store")
    with Store(root) as store:
        make_image(store, build_layers(str(tmp_path / "src")), "fstest:latest")
    assert len(mountclient.socket_path(root)) > 108
    m = Mounts(root, tmp_path)
    try:
        a = m.mount("fstest:latest", "a")
        assert _serves(a) and mountclient.server_pid(root) is not None
    finally:
        m.unmount_all()


def _processes_of(root: str) -> set[int]:
    """Every process running the server's command line for *root*: the
    server, its workers (the spare among them) and the daemons they forked."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if cmd[1:4] == [b"-m", b"layerfs.fs.mountserver", os.fsencode(root)]:
            found.add(int(name))
    return found


def _wait_only_daemons(root: str, timeout: float = 30) -> None:
    """Wait until nothing of the server's is left but the daemons of live mounts."""
    deadline = time.monotonic() + timeout
    while True:
        left = _processes_of(root) - {m.pid for m in fsmount.list_mounts(root, clean=False)}
        if not left:
            return
        assert time.monotonic() < deadline, f"still running: {sorted(left)}"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["stop", "kill -9"])
def test_spare_worker_goes_with_the_server(store_with_image, mounts, how):
    """The server keeps a worker forked ahead (with a daemon forked for it):
    both go when the server goes, by a stop or kill -9; the mounts stay."""
    root, image = store_with_image
    a = mounts.mount(image, "a")
    server = mountclient.server_pid(root)
    deadline = time.monotonic() + 30
    while len(_processes_of(root) - {server, _daemon_pid(root, a)}) < 2:  # the spare and its daemon
        assert time.monotonic() < deadline, "no spare worker forked"
        time.sleep(0.05)
    if how == "stop":
        assert _cli(root, "mount-server", "stop").returncode == 0
    else:
        os.kill(server, signal.SIGKILL)
    _wait_only_daemons(root)
    assert _serves(a)


def test_preforked_daemon_gets_the_callers_environment(store_with_image, mounts, tmp_path):
    """A mount taken by the spare worker, whose daemon was forked before the
    request: the caller's LAYERFS_* variables still reach the daemon (here
    LAYERFS_FS_PROFILE, which makes it write a profile when it ends)."""
    root, image = store_with_image
    mounts.mount(image, "a")  # starts the server; its spare takes the next mount
    profile = tmp_path / "daemon.prof"
    b = mounts.mount(image, "b", env={"LAYERFS_FS_PROFILE": str(profile)})
    assert _serves(b)
    assert _cli(root, "umount", b).returncode == 0
    assert profile.exists()


def test_replaced_database_is_reopened(store_with_image, mounts):
    """The spare opened the store's database ahead; a database replaced
    meanwhile (a restore) is opened again, so the mount is recorded where
    `layerfs mounts` looks."""
    root, image = store_with_image
    mounts.mount(image, "a")
    db = StoreLayout(root).db
    _wait_for_spare_with(root, db)
    with Store(root) as store:  # a consistent copy, swapped in with nothing left in the WAL
        store.db.conn.execute("VACUUM INTO ?", (db + ".copy",))
        assert store.db.one("PRAGMA wal_checkpoint(TRUNCATE)")[0] == 0
        os.replace(db + ".copy", db)
    b = mounts.mount(image, "b")
    assert b in [m.mountpoint for m in fsmount.list_mounts(root)]


def _wait_for_spare_with(root: str, path: str, timeout: float = 30) -> None:
    """Wait until a process of the server's (its spare) has *path* open and
    no other has the store's database open (the last worker closed it)."""
    server = mountclient.server_pid(root)
    deadline = time.monotonic() + timeout
    while True:
        holders = set()
        for pid in _processes_of(root) - {server}:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
                if any(_readlink(f"/proc/{pid}/fd/{n}") == path for n in fds):
                    holders.add(pid)
            except OSError:
                continue
        if len(holders) == 1:
            return
        assert time.monotonic() < deadline, f"processes with {path} open: {holders}"
        time.sleep(0.05)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""
