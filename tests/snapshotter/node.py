"""A node for the containerd tests: a registry holding images that layerfs
built and pushed (busybox, a pause image, a web server), a layerfs
snapshotter and containerd using it, all started here and stopped by pid."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from tests.oci.conftest import Registry
from tests.snapshotter.harness import (
    CONTAINERD,
    CTR,
    LAYERFS,
    Containerd,
    Snapshotter,
    short_tmpdir,
    unmount_all,
    wait_for,
)

PAUSE_DOCKERFILE = """FROM busybox:latest
ENTRYPOINT ["/bin/sleep", "2147483647"]
"""
WEB_DOCKERFILE = """FROM busybox:latest
RUN mkdir -p /www && echo "hello from layerfs" > /www/index.html
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
"""


def layerfs(root: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([LAYERFS, "--root", root, *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"layerfs {' '.join(args)}: {proc.stderr}")
    return proc


def skip_without_tools() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    for tool, name in ((CONTAINERD, "containerd"), (CTR, "ctr"), (shutil.which("runc"), "runc"),
                       (shutil.which("busybox"), "busybox-static"),
                       (shutil.which("docker-registry"), "docker-registry")):
        if tool is None:
            pytest.skip(f"{name} is not installed")


class Images:
    """busybox, pause and web images built with layerfs, pushed to *registry*."""

    def __init__(self, registry: Registry, workdir: str) -> None:
        self.registry = registry
        self.build_root = os.path.join(workdir, "build-store")
        layerfs(self.build_root, "bootstrap", "busybox", "--tag", "busybox:latest")
        self.busybox = self._push("busybox:latest", "busybox:1")
        self.pause = self._build(workdir, "pause", PAUSE_DOCKERFILE)
        self.web = self._build(workdir, "web", WEB_DOCKERFILE)

    def _build(self, workdir: str, name: str, dockerfile: str) -> str:
        ctx = os.path.join(workdir, f"ctx-{name}")
        os.makedirs(ctx)
        with open(os.path.join(ctx, "Dockerfile"), "w") as f:
            f.write(dockerfile)
        layerfs(self.build_root, "build", "-q", "-t", f"{name}:1", ctx)
        return self._push(f"{name}:1", f"{name}:1")

    def _push(self, image: str, dest: str) -> str:
        ref = f"{self.registry.host}/layerfs-test/{dest}"
        layerfs(self.build_root, "push", "--insecure", "-q", image, ref)
        return ref


class Node:
    """A snapshotter and a containerd (optionally with its CRI plugin)."""

    def __init__(self, base: str, registry: Registry | None = None, sandbox_image: str | None = None,
                 cri: bool = False) -> None:
        self.base = base
        self.root = os.path.join(base, "store")
        self.snapshotter = Snapshotter(self.root, os.path.join(base, "s.sock"), os.path.join(base, "snapshotter.log"))
        self.containerd = Containerd(base, self.snapshotter.address, registry.host if registry else None,
                                     sandbox_image, cri)

    def start(self) -> "Node":
        self.snapshotter.start()
        self.containerd.start()
        return self

    def restart_snapshotter(self, sig: int = signal.SIGTERM) -> int:
        """Stop the snapshotter with *sig*, start it again, and wait until
        containerd has reconnected (its proxy client backs off up to 3 s
        between dials, and fails calls meanwhile)."""
        code = self.snapshotter.stop(sig)
        self.snapshotter.start()
        wait_for(lambda: self.ctr("snapshots", "--snapshotter", "layerfs", "ls", check=False).returncode == 0,
                 "containerd reconnecting to the snapshotter", timeout=30)
        return code

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.containerd.ctr(*args, check=check)

    def snapshots(self) -> list[str]:
        out = self.ctr("snapshots", "--snapshotter", "layerfs", "ls").stdout.splitlines()[1:]
        return [line.split()[0] for line in out if line.strip()]

    def stop(self) -> None:
        try:
            if self.containerd.proc is not None:
                self.containerd.remove_everything()
        finally:
            self.containerd.stop()
            self.snapshotter.stop()
            if os.path.isdir(self.root):
                unmount_all(self.root)
            self.containerd.cleanup_host()


@pytest.fixture(scope="package")
def registry():
    skip_without_tools()
    d = short_tmpdir("lfsreg")
    r = Registry(d)
    yield r
    r.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="package")
def images(registry):
    d = short_tmpdir("lfsimg")
    yield Images(registry, d)
    unmount_all(os.path.join(d, "build-store"))
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def node(registry):
    base = short_tmpdir("lfs")
    n = Node(base, registry).start()
    yield n
    n.stop()
    shutil.rmtree(base, ignore_errors=True)
