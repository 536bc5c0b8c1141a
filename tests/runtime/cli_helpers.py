"""Helpers for the tests that drive the real `layerfs` CLI (containers, restarts).

The `template_store` and `cli` fixtures built on these live in conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from layerfs.runtime.cgroups import parent_dirs
from layerfs.runtime.containers import store_tag
from tests import capabilities

LAYERFS = os.path.join(os.path.dirname(sys.executable), "layerfs")


def cli_skip_reason() -> str | None:
    return capabilities.fuse() or capabilities.namespaces() or capabilities.tools("busybox")


class Cli:
    def __init__(self, root: str) -> None:
        self.root = root
        self.env = dict(os.environ, LAYERFS_ROOT=root)

    def __call__(self, *args: str, timeout: float = 120, input: bytes | None = None,
                 check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run([LAYERFS, *args], capture_output=True, env=self.env, input=input,
                              timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"layerfs {' '.join(args)} -> {proc.returncode}: "
                                 f"{proc.stderr.decode()}")
        return proc

    def out(self, *args: str, **kwargs: object) -> str:
        return self(*args, check=True, **kwargs).stdout.decode()  # type: ignore[arg-type]


def _mounts_below(path: str) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        return [line.split()[4] for line in handle if line.split()[4].startswith(path)]


def _cgroups_of(root: str) -> list[str]:
    tag = store_tag(root)
    found = []
    for parent in parent_dirs():
        if os.path.isdir(parent):
            found += [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(tag)]
    return found


def _processes_of(root: str) -> list[int]:
    marker = f"LAYERFS_ROOT={root}\0".encode()
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as handle:
                    if marker in handle.read() + b"\0":
                        pids.append(int(name))
            except OSError:
                continue
    return pids


def leftovers(root: str, base: str) -> dict[str, list]:
    """What a store's containers left behind: mounts below *base*, cgroups, processes."""
    return {"mounts": _mounts_below(base), "cgroups": _cgroups_of(root),
            "processes": _processes_of(root)}


def wait_for_log(cli: Cli, name: str, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = cli.out("logs", name)
        if text in log:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the log of {name}: {log!r}")
