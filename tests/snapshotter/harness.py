"""Real containerd (Debian's 1.6) and a real ``layerfs snapshotter``,
started in a short temp dir and stopped by pid.

containerd 1.6 still puts shim sockets, fifos and runc state under
/run/containerd whatever its config says; each instance uses its own
containerd namespace, so what it leaves there (and its cgroups, which go
under /<namespace>/<id> in each v1 hierarchy) can be removed by name.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

CONTAINERD = shutil.which("containerd")
CTR = shutil.which("ctr")
LAYERFS = os.path.join(os.path.dirname(sys.executable), "layerfs")


def short_tmpdir(prefix: str) -> str:
    """A temp dir under /tmp: socket paths must fit sun_path (108 bytes)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def wait_for(pred, what: str, timeout: float = 30.0, proc: subprocess.Popen | None = None, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited ({proc.returncode}): {_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: timed out: {_tail(log)}")
        time.sleep(0.05)


def _listening(address: str) -> bool:
    """True once a server accepts on unix socket *address* (a killed
    server leaves its socket file behind)."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(address)
            return True
        except OSError:
            return False


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-3000:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


class Snapshotter:
    """``layerfs --root ROOT snapshotter --address SOCK`` as a child process."""

    def __init__(self, root: str, address: str, log: str) -> None:
        self.root, self.address, self.log = root, address, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Snapshotter":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([LAYERFS, "--root", self.root, "snapshotter", "--address", self.address],
                                         stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: _listening(self.address), "layerfs snapshotter", proc=self.proc, log=self.log)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        code = _stop(self.proc, sig) if self.proc else 0
        self.proc = None
        return code


class Containerd:
    """containerd with a config of our own: root, state and sockets in *base*,
    the layerfs proxy plugin at *snapshotter_address*, optionally the CRI
    plugin (host-network pods only: no CNI) using it."""

    def __init__(self, base: str, snapshotter_address: str, registry_host: str | None = None,
                 sandbox_image: str | None = None, cri: bool = False) -> None:
        self.base = base
        self.address = os.path.join(base, "c.sock")
        # The CRI plugin always works in containerd's "k8s.io" namespace.
        self.namespace = "k8s.io" if cri else "lfs" + secrets.token_hex(4)
        self.cgroup_parent = "lfs" + secrets.token_hex(4)  # for CRI pods
        self.log = os.path.join(base, "containerd.log")
        self.config = os.path.join(base, "config.toml")
        self.proc: subprocess.Popen | None = None
        disabled = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
        if not cri:
            disabled.append("io.containerd.grpc.v1.cri")
        lines = [
            "version = 2",
            f'root = "{base}/root"',
            f'state = "{base}/state"',
            f"disabled_plugins = {disabled!r}".replace("'", '"'),
            "[grpc]", f'  address = "{self.address}"',
            "[ttrpc]", f'  address = "{self.address}.ttrpc"',
            "[debug]", '  address = ""', '  level = "info"',
            "[metrics]", '  address = ""',
            "[proxy_plugins.layerfs]", '  type = "snapshot"', f'  address = "{snapshotter_address}"',
        ]
        if cri:
            os.makedirs(f"{base}/cni/bin", exist_ok=True)
            os.makedirs(f"{base}/cni/conf", exist_ok=True)
            lines += [
                '[plugins."io.containerd.grpc.v1.cri"]',
                f'  sandbox_image = "{sandbox_image}"',
                "  disable_apparmor = true",
                # Lowering oom_score_adj (the sandbox's -998) needs
                # CAP_SYS_RESOURCE, which root in a CI container may lack.
                "  restrict_oom_score_adj = true",
                "  enable_selinux = false",
                '[plugins."io.containerd.grpc.v1.cri".containerd]',
                '  snapshotter = "layerfs"',
                '  default_runtime_name = "runc"',
                '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]',
                '  runtime_type = "io.containerd.runc.v2"',
                # LFS_RUNC=wrapper: a developer's hook to log runc's calls.
                *(['[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]',
                   f'  BinaryName = "{os.environ["LFS_RUNC"]}"'] if os.environ.get("LFS_RUNC") else []),
                '[plugins."io.containerd.grpc.v1.cri".cni]',
                f'  bin_dir = "{base}/cni/bin"',
                f'  conf_dir = "{base}/cni/conf"',
            ]
            if registry_host:
                lines += [f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry_host}"]',
                          f'  endpoint = ["http://{registry_host}"]']
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")

    RUN_DIRS = ("/run/containerd/fifo", "/run/containerd/s", "/run/containerd/runc", "/run/containerd")

    def start(self) -> "Containerd":
        if not hasattr(self, "_had_run_dirs"):
            self._had_run_dirs = {d for d in self.RUN_DIRS if os.path.exists(d)}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([CONTAINERD, "--config", self.config], stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(self.address) and self.ctr("version", check=False).returncode == 0,
                 "containerd", proc=self.proc, log=self.log)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        code = _stop(self.proc, sig) if self.proc else 0
        self.proc = None
        return code

    def ctr(self, *args: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
        proc = subprocess.run([CTR, "--address", self.address, "--namespace", self.namespace, *args],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({proc.returncode}): {proc.stderr}\n"
                                 f"containerd: {_tail(self.log)}")
        return proc

    def remove_everything(self) -> None:
        """Kill and delete this namespace's tasks and containers (their
        shims exit with them), then images and their snapshots."""
        for cid in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
            for _ in range(100):
                if self.ctr("tasks", "delete", cid, check=False).returncode == 0 or \
                        "not found" in self.ctr("tasks", "ls", check=False).stdout:
                    break
                if cid not in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
                    break
                time.sleep(0.1)
            self.ctr("containers", "delete", cid, check=False)

    def cleanup_host(self) -> None:
        """What containerd 1.6 left outside *base* for our namespace."""
        shutil.rmtree(f"/run/containerd/runc/{self.namespace}", ignore_errors=True)
        for d in self.RUN_DIRS:  # made by this instance and now empty
            if d not in getattr(self, "_had_run_dirs", set(self.RUN_DIRS)):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
        groups = (self.namespace, self.cgroup_parent)
        for hierarchy, group in ((h, g) for h in os.listdir("/sys/fs/cgroup") for g in groups):
            path = f"/sys/fs/cgroup/{hierarchy}/{group}"
            if os.path.isdir(path):
                for d in sorted((dp for dp, _, _ in os.walk(path)), key=len, reverse=True):
                    try:
                        os.rmdir(d)
                    except OSError:
                        pass


def unmount_all(root: str) -> None:
    """Stop every layerfs daemon serving a mount of this store."""
    from layerfs.fs import mount as fsmount

    for m in fsmount.list_mounts(root, clean=True):
        try:
            fsmount.unmount(root, m.mountpoint)
        except Exception:  # noqa: BLE001  (teardown: try them all)
            pass
