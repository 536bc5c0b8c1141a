"""Fixtures for the runtime tests: a busybox rootfs and a run helper.

The rootfs is a directory with the static busybox (a private copy, made
once per session and hard-linked per test), one symlink per applet and a
minimal /etc, fresh for each test so a test may write into it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerfs.runtime import ContainerResult, ContainerSpec, run_container
from layerfs.runtime.cgroups import PARENT_NAME, _cgroup_mounts, _own_v1_paths, cgroup_version

BUSYBOX = "/bin/busybox"
PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "user:x:1000:1000:user:/home/user:/bin/sh\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
GROUP = "root:x:0:\ntty:x:5:\nuser:x:1000:\nextra:x:2000:user\nnogroup:x:65534:\n"


def root_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, cgroups)"
    if not os.path.exists(BUSYBOX):
        return f"needs busybox-static at {BUSYBOX}"
    if not os.path.exists("/proc/self/ns/user"):
        return "kernel lacks namespaces"
    return None


needs_root = pytest.mark.skipif(root_skip_reason() is not None,
                                reason=root_skip_reason() or "")
root_tests = [pytest.mark.root, needs_root]


@pytest.fixture(scope="session")
def busybox_copy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One private copy of busybox (never the host's inode) and its applets."""
    if root_skip_reason() is not None:
        pytest.skip(root_skip_reason() or "")
    copy = tmp_path_factory.mktemp("busybox") / "busybox"
    shutil.copy2(BUSYBOX, copy)
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    return copy, [a for a in applets if a != "busybox"]


@pytest.fixture
def rootfs(busybox_copy: tuple[Path, list[str]], tmp_path: Path) -> Path:
    """A fresh rootfs per test; busybox is hard-linked to save time."""
    binary, applets = busybox_copy
    root = tmp_path / "rootfs"
    for directory in ("bin", "etc", "root", "home/user", "mnt", "tmp"):
        (root / directory).mkdir(parents=True)
    os.chmod(root / "tmp", 0o1777)
    os.link(binary, root / "bin" / "busybox")
    for applet in applets:
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    os.chown(root / "home" / "user", 1000, 1000)
    return root


@pytest.fixture
def state_dir(tmp_path: Path) -> str:
    return str(tmp_path / "state")


@dataclass(frozen=True)
class Ran:
    result: ContainerResult
    out: str
    err: str

    @property
    def code(self) -> int:
        return self.result.exit_code


@pytest.fixture
def run(rootfs: Path, state_dir: str, tmp_path: Path) -> Callable[..., Ran]:
    """run("echo hi", memory=...) runs `sh -c` in the container; run(["id"]) runs argv."""
    def _run(command: str | list[str], **spec_fields: object) -> Ran:
        args = ["sh", "-c", command] if isinstance(command, str) else command
        spec = ContainerSpec(rootfs=str(rootfs), args=args, **spec_fields)  # type: ignore[arg-type]
        out_path, err_path = tmp_path / "out", tmp_path / "err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            result = run_container(spec, state_dir, stdout=out, stderr=err)
        return Ran(result, out_path.read_text(errors="replace"),
                   err_path.read_text(errors="replace"))
    return _run


def layerfs_cgroup_parents() -> list[str]:
    """Where this process's containers' cgroups live (v1: per hierarchy)."""
    if cgroup_version() == 2:
        return ["/sys/fs/cgroup/" + PARENT_NAME]
    own = _own_v1_paths()
    parents = []
    for mount in _cgroup_mounts():
        if mount.fstype != "cgroup":
            continue
        controller = next((c for c in mount.options if c in own), None)
        if controller is not None:
            relative = os.path.relpath(own[controller], mount.root)
            parents.append(os.path.normpath(os.path.join(mount.point, relative, PARENT_NAME)))
    return parents


@pytest.fixture(autouse=True)
def no_leftover_cgroups() -> Iterator[None]:
    """Every test must leave no container cgroup behind."""
    yield
    if os.geteuid() != 0:
        return
    leftovers = [p for p in layerfs_cgroup_parents() if os.path.isdir(p)]
    assert not leftovers, f"container cgroups left behind under {leftovers}"
