"""Fixtures for the runtime tests: a busybox rootfs and a run helper, and
a store for the tests that drive the real `layerfs` CLI (`cli`).

The rootfs is a directory with the static busybox (a private copy, made
once per session and hard-linked per test), one symlink per applet and a
minimal /etc, fresh for each test so a test may write into it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerfs.runtime import ContainerResult, ContainerSpec, process, run_container
from layerfs.runtime.cgroups import parent_dirs
from tests import capabilities
from tests.runtime.cli_helpers import Cli, cli_skip_reason, leftovers

BUSYBOX = "/bin/busybox"
PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "user:x:1000:1000:user:/home/user:/bin/sh\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
GROUP = "root:x:0:\ntty:x:5:\nuser:x:1000:\nextra:x:2000:user\nnogroup:x:65534:\n"


def root_skip_reason() -> str | None:
    if not os.path.exists(BUSYBOX):
        return f"needs busybox-static at {BUSYBOX}"
    return capabilities.namespaces()


needs_root = pytest.mark.namespaces
root_tests = [pytest.mark.root, pytest.mark.namespaces, pytest.mark.tools("busybox")]


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


TEST_PREFIX = "layerfs-test-"


def _container_cgroups() -> set[str]:
    found = set()
    for parent in parent_dirs():
        if os.path.isdir(parent):
            found.update(os.path.join(parent, name) for name in os.listdir(parent)
                         if name.startswith(TEST_PREFIX))
    return found


@pytest.fixture(autouse=True)
def no_leftover_cgroups(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test must remove the container cgroups it created.

    Test containers get ids with TEST_PREFIX, because the top-level v1
    parents are shared with anything else on the host running layerfs
    containers (other test suites, builds).
    """
    monkeypatch.setattr(process, "new_container_id",
                        lambda: TEST_PREFIX + secrets.token_hex(16))
    if os.geteuid() != 0:
        yield
        return
    before = _container_cgroups()
    yield
    leftovers = _container_cgroups() - before
    assert not leftovers, f"container cgroups left behind: {sorted(leftovers)}"


# -- the real CLI (test_cli_containers.py, test_restart.py) --------------------------------
@pytest.fixture(scope="module")
def template_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    if cli_skip_reason():
        pytest.skip(cli_skip_reason() or "")
    root = str(tmp_path_factory.mktemp("template") / "store")
    Cli(root).out("bootstrap", "busybox")
    return root


@pytest.fixture
def cli(template_store: str, tmp_path: Path) -> Iterator[Cli]:
    root = str(tmp_path / "store")
    shutil.copytree(template_store, root, symlinks=True)
    tool = Cli(root)
    yield tool
    # Tests stop what they start; anything still here is a leak. Clean up
    # (so one failure does not cascade), then fail.
    deadline = time.monotonic() + 10
    while any(leftovers(root, str(tmp_path)).values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    leaks = leftovers(root, str(tmp_path))
    if any(leaks.values()):
        for ref in tool("ps", "-aq", "--no-trunc").stdout.decode().split():
            tool("rm", "-f", ref)
        for mp in leaks["mounts"]:
            subprocess.run(["umount", "-l", mp], capture_output=True)
        for pid in leaks["processes"]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not any(leaks.values()), f"left behind: {leaks}"
