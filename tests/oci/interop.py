"""Other tools unpacking what layerfs pushes: a containerd of the test's
own (config, root, state and socket under a temp dir, stopped by pid) and
buildah on a temp vfs storage; and a tree signature that sees everything
an unpacker can get wrong (mode, owner, times, xattrs, hardlink groups)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time

import pytest

CONTAINERD = shutil.which("containerd")
CTR = shutil.which("ctr")
BUILDAH = shutil.which("buildah")
NAMESPACE = "layerfs-test"


def full_signature(root: str) -> dict[str, tuple]:
    """path -> (type, mode, uid, gid, mtime_ns, content/target, xattrs, link group).

    The link group is the sorted tuple of every path sharing the inode, so
    two trees agree only if the same names are hardlinked together. The
    root directory itself is left out (unpackers treat "./" differently)."""
    groups: dict[int, list[str]] = {}
    out: dict[str, list] = {}
    for dp, dns, fns in os.walk(root):
        for name in dns + fns:
            p = os.path.join(dp, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            extra = ""
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()
                if st.st_nlink > 1:
                    groups.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = str(st.st_rdev)
            xattrs = tuple(sorted((k, os.getxattr(p, k, follow_symlinks=False))
                                  for k in os.listxattr(p, follow_symlinks=False)))
            out[rel] = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                        st.st_mtime_ns, extra, xattrs, ()]
    for paths in groups.values():
        for p in paths:
            out[p][7] = tuple(sorted(paths))
    return {k: tuple(v) for k, v in out.items()}


def diff_signatures(want: dict, got: dict) -> list[str]:
    """Readable differences, for assertion messages."""
    lines = [f"missing: {p}" for p in sorted(set(want) - set(got))]
    lines += [f"extra: {p}" for p in sorted(set(got) - set(want))]
    lines += [f"{p}: want {want[p]} got {got[p]}" for p in sorted(set(want) & set(got)) if want[p] != got[p]]
    return lines


class Containerd:
    """containerd on a socket of its own; everything it writes is under
    one temp dir, except what 1.6 insists on creating under
    /run/containerd (shim sockets, fifos, runc state), removed at stop
    if it was not there before."""

    def __init__(self) -> None:
        if CONTAINERD is None or CTR is None:
            pytest.skip("containerd is not installed (apt-get install containerd)")
        if os.geteuid() != 0:
            pytest.skip("containerd needs root")
        # sun_path is 108 bytes: a pytest tmp_path is too long for it.
        self.dir = tempfile.mkdtemp(prefix="ctd-", dir="/tmp")
        self.sock = os.path.join(self.dir, "c.sock")
        self.had_run_dir = os.path.exists("/run/containerd")
        cfg = os.path.join(self.dir, "config.toml")
        with open(cfg, "w") as f:
            f.write(f"""version = 2
root = "{self.dir}/root"
state = "{self.dir}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp",
                    "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
""")
        self.log = open(os.path.join(self.dir, "containerd.log"), "wb")
        self.proc = subprocess.Popen([CONTAINERD, "--config", cfg], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while self.ctr("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"containerd did not start: {self.read_log()}")
            time.sleep(0.2)

    def read_log(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-1500:]

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        p = subprocess.run([CTR, "-a", self.sock, "-n", NAMESPACE, *args], capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({p.returncode}): {p.stderr}\n{self.read_log()}")
        return p

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        _unmount_below(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        if not self.had_run_dir:
            shutil.rmtree("/run/containerd", ignore_errors=True)
        _remove_cgroups(NAMESPACE)


def _remove_cgroups(name: str) -> None:
    """containerd puts containers in cgroup /NAMESPACE/ID; runc removes the
    ID level, the namespace level stays. Empty ones go (v1 and v2)."""
    base = "/sys/fs/cgroup"
    for top in [base] + [os.path.join(base, c) for c in os.listdir(base)]:
        path = os.path.join(top, name)
        if not os.path.isdir(path):
            continue
        for dp, dns, _ in os.walk(path, topdown=False):
            try:
                os.rmdir(dp)
            except OSError:
                pass   # still in use: left for the test that made it to fail on


class Buildah:
    """buildah with its own storage root (vfs: plain directories)."""

    def __init__(self) -> None:
        if BUILDAH is None:
            pytest.skip("buildah is not installed")
        self.dir = tempfile.mkdtemp(prefix="bah-", dir="/tmp")

    def run(self, *args: str) -> str:
        p = subprocess.run([BUILDAH, "--root", f"{self.dir}/root", "--runroot", f"{self.dir}/run",
                            "--storage-driver", "vfs", *args], capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise AssertionError(f"buildah {' '.join(args)} failed ({p.returncode}): {p.stderr}")
        return p.stdout.strip()

    def stop(self) -> None:
        try:
            self.run("rm", "--all")
            self.run("rmi", "--all", "--force")
        finally:
            _unmount_below(self.dir)
            shutil.rmtree(self.dir, ignore_errors=True)


def _unmount_below(path: str) -> None:
    """Unmount whatever a tool left mounted below *path*, deepest first."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for p in sorted((p for p in points if p.startswith(path + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", p], capture_output=True)
