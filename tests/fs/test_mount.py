"""Real mounts: the merged view, lifecycle (CLI and API), stale mounts,
round trips of the upper dir, integrity errors, busybox workloads."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import time

import pytest

from layerfs import procfs
from layerfs.fs import mount as fsmount
from layerfs.store import images as img
from layerfs.store import transfer
from layerfs.store.store import Store
from tests.conftest import layerfs_cmd
from tests.fs.conftest import flip_byte, fresh_upper, kernel_overlay, layerfs_mount, needs_fuse
from tests.treeutil import describe

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.root]


def test_merged_view_matches_kernel_overlayfs(fs_env, tmp_path):
    """Lookups, readdir, every file type, xattrs, hardlinks, whiteouts and
    opaque dirs: the layerfs view equals the kernel's of the same layers."""
    with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / "mnt"), read_only=True) as h:
        ours = describe(h.mountpoint)
        st = os.stat(h.mountpoint)
        assert os.statvfs(h.mountpoint).f_bsize > 0
    upper = fresh_upper(str(tmp_path / "ku"), like=fs_env["lowers"][-1])
    with kernel_overlay(fs_env["lowers"], upper, str(tmp_path / "kw"), str(tmp_path / "kmnt")) as mp:
        theirs = describe(mp)
    assert stat.S_ISDIR(st.st_mode)
    assert set(ours) == set(theirs)
    for path in ours:
        assert ours[path] == theirs[path], path
    assert "a/f2" not in ours and "a/sub/deep" not in ours and "d/old" not in ours and "e/e1" not in ours
    assert ours["c"][0] == stat.S_IFREG


def test_stat_details(fs_env, tmp_path):
    with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / "mnt")) as h:
        m = h.mountpoint
        a, b, c = os.stat(f"{m}/hl1"), os.stat(f"{m}/hl2"), os.stat(f"{m}/a/hl3")
        assert a.st_ino == b.st_ino == c.st_ino and a.st_nlink == 3
        assert len({os.lstat(f"{m}/{p}").st_dev for p in ("", "a", "b/big", "top")}) == 1
        ino = os.stat(f"{m}/a/f1").st_ino
        assert os.stat(f"{m}/a/f1").st_ino == ino  # stable
        subdirs = [n for n in os.listdir(f"{m}/a") if os.path.isdir(f"{m}/a/{n}")]
        assert os.stat(f"{m}/a").st_nlink == 2 + len(subdirs)
        assert os.stat(f"{m}/a/f1").st_mtime == 1_600_000_000
        assert os.getxattr(f"{m}/xf", "user.k") == b"v"
        assert os.getxattr(f"{m}/xf", "trusted.t") == b"1"
        with pytest.raises(OSError) as exc:
            os.getxattr(f"{m}/xf", "user.missing")
        assert exc.value.errno == errno.ENODATA
        assert os.readlink(f"{m}/link1") == "a/f1"
        assert stat.S_ISFIFO(os.lstat(f"{m}/fifo1").st_mode)
        assert os.lstat(f"{m}/dev1").st_rdev == os.makedev(1, 3)
        assert stat.S_IMODE(os.stat(f"{m}/sticky").st_mode) == 0o1777
        assert stat.S_IMODE(os.stat(f"{m}/suid").st_mode) == 0o4755
        assert sorted(os.listdir(f"{m}/d")) == ["new"]
        all_names = os.listdir(m)
        assert len(all_names) == len(set(all_names))
        assert ".." in subprocess.run(["ls", "-a", m], capture_output=True, text=True).stdout.split()
        # copy-up keeps the inode number and the hardlink group
        with open(f"{m}/hl2", "a") as f:
            f.write("more\n")
        assert os.stat(f"{m}/hl2").st_ino == a.st_ino == os.stat(f"{m}/hl1").st_ino
        assert open(f"{m}/a/hl3").read() == "hard\nmore\n"
        assert os.stat(f"{m}/hl1").st_nlink == 3
        upper = h.upper
        assert os.stat(f"{upper}/hl1").st_ino == os.stat(f"{upper}/a/hl3").st_ino


def test_read_only_mount_gives_erofs(fs_env, tmp_path):
    with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / "mnt"), read_only=True) as h:
        m = h.mountpoint
        for fn in (lambda: open(f"{m}/new", "w"), lambda: os.mkdir(f"{m}/x"), lambda: os.unlink(f"{m}/top"),
                   lambda: os.chmod(f"{m}/top", 0o600), lambda: open(f"{m}/top", "r+")):
            with pytest.raises(OSError) as exc:
                fn()
            assert exc.value.errno == errno.EROFS
        assert open(f"{m}/top").read() == "top\n"


def test_cli_mount_mounts_umount(fs_env, tmp_path):
    root, mp = fs_env["root"], str(tmp_path / "mnt")
    os.makedirs(mp)
    upper = str(tmp_path / "up")
    r = layerfs_cmd("mount", fs_env["image"], mp, "--upper", upper, root=root)
    assert r.returncode == 0, r.stderr
    try:
        assert open(f"{mp}/top").read() == "top\n"  # serving as soon as mount returns
        listed = json.loads(layerfs_cmd("mounts", "--format", "json", root=root, check=True).stdout)
        assert [m["mountpoint"] for m in listed] == [mp]
        assert listed[0]["upper"] == upper and listed[0]["image"] == fs_env["image"]
        table = layerfs_cmd("mounts", root=root, check=True).stdout.decode()
        assert "MOUNTPOINT" in table and mp in table
        with open(f"{mp}/newfile", "w") as f:
            f.write("cow\n")
        assert open(f"{upper}/newfile").read() == "cow\n"
        again = layerfs_cmd("mount", fs_env["image"], mp, root=root)
        assert again.returncode != 0 and b"already" in again.stderr
    finally:
        r = layerfs_cmd("umount", mp, root=root)
    assert r.returncode == 0, r.stderr
    assert fsmount.mounted_fstype(mp) is None
    assert json.loads(layerfs_cmd("mounts", "--format", "json", root=root, check=True).stdout) == []
    assert open(f"{upper}/newfile").read() == "cow\n"  # the upper outlives the mount


def test_cli_errors_before_mounting(fs_env, tmp_path):
    root = fs_env["root"]
    r = layerfs_cmd("mount", "no-such-image", str(tmp_path), root=root)
    assert r.returncode != 0 and b"no such image" in r.stderr and b"Traceback" not in r.stderr
    r = layerfs_cmd("mount", fs_env["image"], str(tmp_path / "missing"), root=root)
    assert r.returncode != 0 and b"Traceback" not in r.stderr
    r = layerfs_cmd("umount", str(tmp_path), root=root)
    assert r.returncode != 0 and b"not a layerfs mount" in r.stderr


@pytest.mark.parametrize("server", ["on", "off"])
def test_a_mount_the_daemon_refuses_is_a_one_line_error(fs_env, tmp_path, monkeypatch, server):
    """The daemon's own failure (here: an upper dir whose work dir cannot
    be made) reaches the user as one line, not a traceback (abort() used
    to close the ready pipe wait_ready had closed)."""
    monkeypatch.setenv("LAYERFS_MOUNT_SERVER", server)
    mp = tmp_path / "mnt"
    mp.mkdir()
    r = layerfs_cmd("mount", fs_env["image"], str(mp), "--upper", "/proc/self", root=fs_env["root"])
    err = r.stderr.decode()
    assert r.returncode == 1 and err.startswith("Error: cannot mount ") and err.count("\n") == 1, err
    assert fsmount.mounted_fstype(str(mp)) is None


def test_sigterm_unmounts_and_private_upper_goes(fs_env, tmp_path):
    mp = str(tmp_path / "mnt")
    os.makedirs(mp)
    h = fsmount.mount_image(fs_env["root"], fs_env["image"], mp)
    try:
        with open(f"{mp}/scratch", "w") as f:
            f.write("x")
        assert os.path.exists(f"{h.upper}/scratch")
        os.kill(h.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while procfs.alive(h.pid, None) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not procfs.alive(h.pid, None)
        assert fsmount.mounted_fstype(mp) is None
        assert not os.path.exists(h.upper)
        assert fsmount.list_mounts(fs_env["root"]) == []
    finally:
        if fsmount.mounted_fstype(mp):
            os.kill(h.pid, signal.SIGKILL)
            subprocess.run(["umount", "-l", mp])


def _bare_daemon(fs_env, mp: str) -> tuple[int, dict, int]:
    """A daemon mounting the image read-only at *mp*, with nobody touching
    the mount: (pid, its params, the size of its log before it)."""
    from layerfs.fs.daemon import Daemon

    os.makedirs(mp)
    with Store(fs_env["root"]) as store:
        params, _ = fsmount._resolve(store, fs_env["image"], mp, None, True, False, None)
    start = os.path.getsize(params["log"]) if os.path.exists(params["log"]) else 0
    return Daemon().go(params), params, start


def _gone(pid: int, mp: str, sig: int | None = signal.SIGTERM) -> bool:
    """Send *sig* to the daemon (None: it was sent already); True if it
    exited and unmounted within 20 s. Whatever is left is cleaned up."""
    if sig is not None:
        os.kill(pid, sig)
    deadline = time.monotonic() + 20
    while procfs.alive(pid, None) and time.monotonic() < deadline:
        time.sleep(0.01)
    gone = not procfs.alive(pid, None) and fsmount.mounted_fstype(mp) is None
    if fsmount.mounted_fstype(mp):
        subprocess.run(["umount", "-l", mp])
        os.kill(pid, signal.SIGKILL)
    return gone


def _request_counts(params: dict, start: int) -> dict:
    """The counts the daemon logs (after *start* in its log) on SIGUSR1."""
    deadline = time.monotonic() + 20
    while " requests {" not in (log := open(params["log"]).read()[start:]):
        assert time.monotonic() < deadline, "no request counts logged"
        time.sleep(0.01)
    return json.loads(log[log.index(" requests {") + 10:].splitlines()[0])


def test_sigterm_as_soon_as_the_daemon_is_ready_unmounts_cleanly(fs_env, tmp_path):
    """The daemon says it is ready once mounted, before its loop runs: a stop
    signal then waits for the loop (no death by the default action, which
    would leave a dead mount and its record). The stat is the mount's first
    request, as `mount_image`'s own: a daemon stopped before its first
    request waits for one (pyfuse3.terminate wakes no worker then)."""
    mp = str(tmp_path / "mnt")
    pid, params, start = _bare_daemon(fs_env, mp)
    os.kill(pid, signal.SIGTERM)
    try:
        os.stat(mp)
    except OSError:
        pass
    assert _gone(pid, mp, sig=None)
    assert f"signal {int(signal.SIGTERM)}: unmounting" in open(params["log"]).read()[start:]


def test_the_mount_reads_ahead_a_mib_per_request(fs_env, tmp_path):
    """Set by mount_image once the mount answered (the kernel has the
    daemon's INIT reply then, which would set it back to 128 KiB)."""
    with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / "mnt"), read_only=True) as h:
        dev = os.stat(h.mountpoint).st_dev
        assert open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read().strip() == "1024"


def test_the_daemon_asks_nothing_of_its_own_mount(fs_env, tmp_path):
    """A request a daemon makes of its own mount, read by its loop but not
    answered when the daemon is killed, keeps the process (its /dev/fuse fd
    with it) and so the mount alive and unanswerable for good: seen once,
    a CI run hung in statfs. Nothing else touches this mount, so the
    daemon must have served no request at all."""
    mp = str(tmp_path / "mnt")
    pid, params, start = _bare_daemon(fs_env, mp)
    try:
        time.sleep(0.5)  # (time for a request of its own, which must not come)
        os.kill(pid, signal.SIGUSR1)
        assert _request_counts(params, start) == {}
    finally:
        assert _gone(pid, mp)


def test_a_stop_signal_before_the_loop_answered_anything_still_unmounts(fs_env, tmp_path):
    """A stop signal that comes before the loop served anything (it stays
    pending until the loop's receiver has it). Every mount gets its signal
    at once, ten times over. (A daemon that stat'ed its own mount in a
    thread once hung here: the loop stopped, and nothing answered the
    thread.)"""
    for i in range(10):
        mp = str(tmp_path / f"mnt{i}")
        pid, _, _ = _bare_daemon(fs_env, mp)
        assert _gone(pid, mp), f"daemon {i} still there"


def test_request_counts_asked_for_at_once_are_reported(fs_env, tmp_path):
    """SIGUSR1 (log the request counts) sent as soon as the mount exists,
    before the loop's receiver is there, is answered once it is, not lost."""
    for i in range(5):
        mp = str(tmp_path / f"mnt{i}")
        pid, params, start = _bare_daemon(fs_env, mp)
        os.kill(pid, signal.SIGUSR1)
        try:
            _request_counts(params, start)
        finally:
            assert _gone(pid, mp)


def test_stale_mount_is_cleaned(fs_env, tmp_path):
    mp = str(tmp_path / "mnt")
    os.makedirs(mp)
    h = fsmount.mount_image(fs_env["root"], fs_env["image"], mp, upper_dir=str(tmp_path / "up"))
    try:
        os.kill(h.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while procfs.alive(h.pid, None) and time.monotonic() < deadline:
            time.sleep(0.02)
        # The leader is a zombie before its other threads are gone, and the
        # FUSE connection dies only when the last of them closes the fd.
        while not fsmount.is_enotconn(mp) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fsmount.is_enotconn(mp)
        r = layerfs_cmd("umount", mp, root=fs_env["root"])
        assert r.returncode == 0, r.stderr
        assert fsmount.mounted_fstype(mp) is None
        assert fsmount.list_mounts(fs_env["root"]) == []
        # and a new mount over the same place works
        with layerfs_mount(fs_env["root"], fs_env["image"], mp, upper=str(tmp_path / "up")):
            assert open(f"{mp}/top").read() == "top\n"
    finally:
        if fsmount.mounted_fstype(mp):
            subprocess.run(["umount", "-l", mp])


def test_mount_again_over_a_killed_daemons_mount(fs_env, tmp_path):
    """A restarted container: its daemon was killed (-9), and the next
    `layerfs mount` at the same place with the same upper just works, with
    no `umount` first, even once the dead mount's root answers ENOTCONN."""
    mp, up = str(tmp_path / "mnt"), str(tmp_path / "up")
    os.makedirs(mp)
    root = fs_env["root"]
    h = fsmount.mount_image(root, fs_env["image"], mp, upper_dir=up)
    try:
        with open(f"{mp}/top", "a") as f:
            f.write("more\n")
        os.kill(h.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while os.path.isdir(mp) and time.monotonic() < deadline:
            time.sleep(0.05)  # (the write made the kernel drop the root's cached attrs)
        assert fsmount.is_enotconn(mp) and not os.path.isdir(mp)
        r = layerfs_cmd("mount", fs_env["image"], mp, "--upper", up, root=root)
        assert r.returncode == 0, r.stderr
        assert open(f"{mp}/top").read() == "top\nmore\n"
        assert [m.mountpoint for m in fsmount.list_mounts(root)] == [mp]
        assert layerfs_cmd("umount", mp, root=root).returncode == 0
    finally:
        if fsmount.mounted_fstype(mp):
            subprocess.run(["umount", "-l", mp])


def test_mounts_lists_and_cleans_dead_daemons(fs_env, tmp_path):
    mp = str(tmp_path / "mnt")
    os.makedirs(mp)
    h = fsmount.mount_image(fs_env["root"], fs_env["image"], mp, upper_dir=str(tmp_path / "up"))
    try:
        assert [m.mountpoint for m in fsmount.list_mounts(fs_env["root"])] == [mp]
        os.kill(h.pid, signal.SIGKILL)
        while procfs.alive(h.pid, None):
            time.sleep(0.02)
        assert fsmount.list_mounts(fs_env["root"]) == []
        assert fsmount.mounted_fstype(mp) is None
    finally:
        if fsmount.mounted_fstype(mp):
            subprocess.run(["umount", "-l", mp])


def test_upper_round_trips_to_a_layer(fs_env, tmp_path):
    """Changes made through the mount, imported as a layer on top of the
    image, give an image whose mount shows the same tree."""
    upper = str(tmp_path / "up")
    with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / "m1"), upper=upper) as h:
        m = h.mountpoint
        with open(f"{m}/a/f1", "a") as f:
            f.write("appended\n")
        os.unlink(f"{m}/top")
        os.rename(f"{m}/a/sub", f"{m}/moved")
        os.mkdir(f"{m}/b/newdir")
        os.symlink("../top", f"{m}/b/newdir/l")
        os.chmod(f"{m}/xf", 0o600)
        os.setxattr(f"{m}/xf", "user.new", b"1")
        import shutil
        shutil.rmtree(f"{m}/many")
        os.mkdir(f"{m}/many")
        with open(f"{m}/many/only", "w") as f:
            f.write("only\n")
        expected = describe(m)
    with Store(fs_env["root"]) as store:
        base = store.image(fs_env["image"])
        lid = transfer.import_layer(store, upper, base=base, as_layer=True)
        image = store.put_image(img.new_config(base.layers + [lid]))
        store.tag(image.id, "fstest:roundtrip")
    # the kernel can mount the upper too
    with kernel_overlay(fs_env["lowers"], upper, str(tmp_path / "kw"), str(tmp_path / "km")) as km:
        assert describe(km) == expected
    with layerfs_mount(fs_env["root"], "fstest:roundtrip", str(tmp_path / "m2"), read_only=True) as h:
        got = describe(h.mountpoint)
    assert got.keys() == expected.keys()
    for p in got:
        assert got[p][:4] == expected[p][:4] and got[p][5:] == expected[p][5:], p


@pytest.mark.damages_store
def test_corrupt_object_gives_eio_and_a_log_line(tmp_path):
    root = str(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    (src / "good").write_bytes(b"good\n")
    (src / "bad").write_bytes(b"bad content that will be damaged\n")
    (src / "bigbad").write_bytes(os.urandom(3 << 20))
    huge = os.urandom(6 << 20)  # over upper.PARALLEL_HASH: copy-up hashes in a second thread
    (src / "hugebad").write_bytes(huge[:-1] + b"1")
    (src / "hugegood").write_bytes(huge)
    with Store(root) as store:
        lid = transfer.import_layer(store, str(src))
        image = store.put_image(img.new_config([lid]))
        for e in store.layer_entries(lid):
            if e.path in ("bad", "bigbad", "hugebad"):
                path, _ = store.objects.locate(e.digest)
                flip_byte(path, 3)
    with layerfs_mount(root, image.id, str(tmp_path / "mnt")) as h:
        assert open(f"{h.mountpoint}/good", "rb").read() == b"good\n"
        for name in ("bad", "bigbad"):
            with pytest.raises(OSError) as exc:
                open(f"{h.mountpoint}/{name}", "rb").read()
            assert exc.value.errno == errno.EIO
        with pytest.raises(OSError) as exc:  # copy-up verifies too
            open(f"{h.mountpoint}/bad", "ab").close()
        assert exc.value.errno == errno.EIO
        with pytest.raises(OSError) as exc:  # a big one, never read before
            with open(f"{h.mountpoint}/hugebad", "ab") as f:
                f.write(b"x")
        assert exc.value.errno == errno.EIO
        assert not os.path.exists(f"{h.upper}/hugebad")
        with open(f"{h.mountpoint}/hugegood", "ab") as f:
            f.write(b"+")
        assert open(f"{h.mountpoint}/hugegood", "rb").read() == huge + b"+"
        assert open(f"{h.upper}/hugegood", "rb").read() == huge + b"+"
        log = open(h.log).read()
    assert "fails its digest check" in log


def test_busybox_chroot_workloads(tmp_path):
    from layerfs.bootstrap import bootstrap_busybox

    root = str(tmp_path / "store")
    with Store(root) as store:
        bootstrap_busybox(store, tag="busybox:test")
    upper = str(tmp_path / "ctr-upper")
    with layerfs_mount(root, "busybox:test", str(tmp_path / "rootfs"), upper=upper) as h:
        m = h.mountpoint

        def sh(script: str, user: str | None = None) -> str:
            cmd = ["chroot"] + ([f"--userspec={user}"] if user else []) + [m, "/bin/sh", "-c", script]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, (script, p.stdout, p.stderr)
            return p.stdout

        assert sh("echo hello; ls /bin | wc -l").split()[0] == "hello"
        sh("mkdir -p /work/a/b && cd /work && for i in $(seq 1 50); do echo $i > a/b/f$i; done")
        assert sh("cat /work/a/b/f7") == "7\n"
        assert sh("cd /work && tar cf /tmp/w.tar a && mkdir x && cd x && tar xf /tmp/w.tar && cat a/b/f50") == "50\n"
        sh("sed -i 's/root:x/root:y/' /etc/passwd && grep -q root:y /etc/passwd")
        sh("rm -rf /usr/sbin && test ! -e /usr/sbin")
        sh("mv /etc /etc2 && test -f /etc2/passwd && mv /etc2 /etc")
        sh("ln -s /etc/passwd /p && cat /p >/dev/null && ln /etc/group /g && test /g -ef /etc/group")
        sh("find / -xdev -type f | wc -l > /count")
        # an unprivileged user: files get the caller's owner; permissions enforced
        sh("mkdir -m 1777 /shared")
        sh("echo mine > /shared/nobody.txt", user="65534:65534")
        assert sh("stat -c '%u:%g' /shared/nobody.txt") == "65534:65534\n"
        p = subprocess.run(["chroot", "--userspec=65534:65534", m, "/bin/sh", "-c", "echo x >> /etc/passwd"],
                           capture_output=True, text=True)
        assert p.returncode != 0 and "denied" in p.stderr.lower()
        # setuid is cleared when an unprivileged user writes
        sh("cp /bin/busybox /shared/su && chmod 4777 /shared/su")
        sh("echo >> /shared/su", user="65534:65534")
        assert sh("stat -c '%a' /shared/su").strip() == "777"
    assert open(f"{upper}/work/a/b/f1").read() == "1\n"
    assert stat.S_ISCHR(os.lstat(f"{upper}/usr/sbin").st_mode)


def test_cli_container_upper_and_foreground(fs_env, tmp_path):
    root, mp = fs_env["root"], str(tmp_path / "mnt")
    os.makedirs(mp)
    r = layerfs_cmd("mount", fs_env["image"], mp, "--container", "c1", root=root)
    assert r.returncode == 0, r.stderr
    try:
        with open(f"{mp}/ctr-file", "w") as f:
            f.write("c1\n")
        listed = json.loads(layerfs_cmd("mounts", "--format", "json", root=root, check=True).stdout)
        assert listed[0]["container"] == "c1"
    finally:
        layerfs_cmd("umount", mp, root=root, check=True)
    upper = fsmount.container_upper(root, "c1")
    assert upper == os.path.join(os.path.abspath(root), "containers", "c1", "upper")
    assert open(f"{upper}/ctr-file").read() == "c1\n"
    # --foreground: the command itself serves until unmounted, then exits 0
    import sys
    exe = os.path.join(os.path.dirname(sys.executable), "layerfs")
    proc = subprocess.Popen([exe, "--root", root, "mount", "--foreground", "--read-only", fs_env["image"], mp])
    try:
        deadline = time.monotonic() + 30
        while fsmount.mounted_fstype(mp) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open(f"{mp}/top").read() == "top\n"
        layerfs_cmd("umount", mp, root=root, check=True)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        if fsmount.mounted_fstype(mp):
            subprocess.run(["umount", "-l", mp])


def test_a_copy_up_shows_its_new_ctimes_at_once(fs_env, tmp_path):
    """A write below lower dirs copies them up: their ctimes are the upper
    dir's from then on, also to a kernel that cached the old attributes
    (tar of the tree then does not find it "changed as we read it")."""
    mp, upper = str(tmp_path / "mnt"), str(tmp_path / "up")
    with layerfs_mount(fs_env["root"], fs_env["image"], mp, upper=upper):
        before = {d: os.stat(f"{mp}/{d}").st_ctime_ns for d in ("a", "a/sub")}  # now in the kernel's cache
        with open(f"{mp}/a/sub/g", "ab") as f:
            f.write(b"more\n")
        for d in ("a", "a/sub"):
            assert os.stat(f"{mp}/{d}").st_ctime_ns == os.stat(f"{upper}/{d}").st_ctime_ns != before[d], d
        r = subprocess.run(["tar", "cf", "/dev/null", "-C", mp, "a"], capture_output=True)
        assert r.returncode == 0, r.stderr
