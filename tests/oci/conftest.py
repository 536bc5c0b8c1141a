"""Fixtures for the OCI interop tests: a busybox image in a fresh store and
real registries (Debian's docker-registry) on 127.0.0.1, started with a
config of our own and stopped by pid."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import warnings

import pytest

from layerfs.store import images as img
from layerfs.store import transfer
from layerfs.store.store import Store

REGISTRY = shutil.which("docker-registry")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_busybox_tree(dest: str) -> None:
    """/bin/busybox plus one symlink per applet, like busybox --install."""
    bb = shutil.which("busybox")
    os.makedirs(f"{dest}/bin")
    for d in ("etc", "tmp", "root", "usr/bin", "sbin", "usr/sbin"):
        os.makedirs(f"{dest}/{d}", exist_ok=True)
    os.chmod(f"{dest}/tmp", 0o1777)
    shutil.copy2(bb, f"{dest}/bin/busybox")
    applets = subprocess.run([bb, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        if a != "busybox" and not os.path.lexists(f"{dest}/bin/{a}"):
            os.symlink("busybox", f"{dest}/bin/{a}")
    with open(f"{dest}/etc/passwd", "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    with open(f"{dest}/etc/group", "w") as f:
        f.write("root:x:0:\nnogroup:x:65534:\n")


def make_busybox_image(store: Store, tmp_path, name: str = "busybox:test") -> img.Image:
    if shutil.which("busybox") is None:
        pytest.skip("busybox-static is not installed")
    tree = str(tmp_path / "busybox-rootfs")
    if not os.path.exists(tree):
        make_busybox_tree(tree)
    lid = transfer.import_layer(store, tree)
    cfg = img.new_config([lid], {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["sh"]},
                         [img.history_entry("ADD busybox /", created="2024-01-01T00:00:00Z")],
                         created="2024-01-01T00:00:00Z")
    image = store.put_image(cfg)
    store.tag(image.id, name)
    return image


def add_layer(store: Store, base: img.Image, files: dict[str, bytes], tmp_path, name: str) -> img.Image:
    d = tmp_path / f"layer-{name.replace('/', '_').replace(':', '_')}"
    for rel, data in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    lid = transfer.import_layer(store, str(d), as_layer=True)
    cfg = img.with_layer(base.config, lid, img.history_entry(f"COPY {name}", created="2024-01-02T00:00:00Z"))
    image = store.put_image(cfg)
    store.tag(image.id, name)
    return image


@pytest.fixture
def bb_store(tmp_path):
    with Store(str(tmp_path / "store")) as s:
        yield s


@pytest.fixture
def busybox(bb_store, tmp_path):
    return make_busybox_image(bb_store, tmp_path)


class Registry:
    def __init__(self, workdir: str, htpasswd: str | None = None) -> None:
        if REGISTRY is None:
            pytest.skip("docker-registry is not installed")
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = os.path.join(workdir, "storage")
        os.makedirs(self.storage)
        auth = ""
        if htpasswd:
            auth = f"auth:\n  htpasswd:\n    realm: layerfs-test\n    path: {htpasswd}\n"
        cfg = os.path.join(workdir, "config.yml")
        with open(cfg, "w") as f:
            f.write(f"""version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {self.storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{self.port}
{auth}""")
        self.log = open(os.path.join(workdir, "registry.log"), "wb")
        self.proc = subprocess.Popen([REGISTRY, "serve", cfg], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # 401 with auth: it is up
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"docker-registry did not start: {open(self.log.name).read()}")
                time.sleep(0.1)

    def blob_bytes(self) -> int:
        total = 0
        for dp, _, files in os.walk(os.path.join(self.storage, "docker/registry/v2/blobs")):
            for f in files:
                total += os.path.getsize(os.path.join(dp, f))
        return total

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    r = Registry(str(tmp_path_factory.mktemp("registry")))
    yield r
    r.stop()


def bcrypt_hash(password: str) -> str:
    htpasswd = shutil.which("htpasswd")
    if htpasswd:
        out = subprocess.run([htpasswd, "-nbB", "u", password], capture_output=True, text=True, check=True).stdout
        return out.strip().split(":", 1)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt
        except ImportError:
            pytest.skip("need htpasswd (apache2-utils) or the crypt module for bcrypt")
    h = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 5))
    if not h or not h.startswith("$2"):
        pytest.skip("libcrypt has no bcrypt")
    return h


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory):
    d = tmp_path_factory.mktemp("auth-registry")
    hp = d / "htpasswd"
    hp.write_text(f"alice:{bcrypt_hash('s3cret')}\n")
    r = Registry(str(d), htpasswd=str(hp))
    r.user, r.password = "alice", "s3cret"
    yield r
    r.stop()
