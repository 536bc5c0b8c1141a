#!/usr/bin/env python3
"""RUN-heavy builds: layerfs (FUSE backend, kernel backend) vs ``buildah bud --layers``.

    sudo .venv/bin/python benchmarks/bench_build_run.py [--repeat 2] [--base-store DIR]

Builds examples/numpy-matplotlib/Dockerfile.numpy (apt-get install of
python3 into a Debian bookworm minbase, a venv, pip install numpy): almost
all of its time is RUN steps writing thousands of files through the
build's rootfs mount. Needs the network (deb.debian.org, PyPI).

The Debian base is made once (``layerfs bootstrap debian``, or taken from
--base-store, a store holding ``debian:bookworm``); buildah gets the same
tree as a tar (``from scratch`` + ``add``). Each tool builds once untimed
to fill its apt and pip cache mounts (the kernel backend's store has
``{"backend": "kernel"}`` in its config.json, so new objects are stored
raw), then ``--no-cache`` builds are timed
(--repeat, alternating the tools run by run), so downloads mostly drop out
and what differs is the RUN steps' filesystem. Medians are printed as a
markdown table; results go in README with this command.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
EXAMPLE = os.path.join(REPO, "examples", "numpy-matplotlib")
LAYERFS = os.path.join(os.path.dirname(sys.executable), "layerfs")
CACERT = "/etc/ssl/certs/ca-certificates.crt"


def run(cmd: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout.decode()[-2000:]}"
                         f"\n{proc.stderr.decode()[-2000:]}")


def secret_args() -> list[str]:
    return ["--secret", f"id=cacert,src={CACERT}"] if os.path.exists(CACERT) else []


class Layerfs:
    def __init__(self, name: str, backend: str, seed: str, work: str) -> None:
        self.name, self.backend = name, backend
        self.root = os.path.join(work, f"store-{backend}")
        shutil.copytree(seed, self.root, symlinks=True)
        if backend == "kernel":  # a store set up for it keeps new objects raw (no raw copies to make)
            with open(os.path.join(self.root, "config.json"), "w") as f:
                f.write('{"backend": "kernel"}')
        self.env = dict(os.environ, LAYERFS_ROOT=self.root)

    def build(self, no_cache: bool) -> float:
        cmd = [LAYERFS, "build", "-q", "--backend", self.backend, *secret_args(), *(["--no-cache"] if no_cache else []),
               "-f", os.path.join(EXAMPLE, "Dockerfile.numpy"), "-t", "py:numpy", EXAMPLE]
        t = time.perf_counter()
        run(cmd, self.env)
        return time.perf_counter() - t


class Buildah:
    name = "buildah bud --layers"

    def __init__(self, base_tar: str, work: str) -> None:
        self.base = ["buildah", "--root", os.path.join(work, "buildah-root"), "--runroot",
                     os.path.join(work, "buildah-run"), "--storage-driver", "overlay"]
        ctr = subprocess.run(self.base + ["from", "scratch"], capture_output=True, check=True).stdout.decode().strip()
        run(self.base + ["add", ctr, base_tar, "/"])
        run(self.base + ["config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                         ctr])
        run(self.base + ["commit", "-q", ctr, "localhost/debian:bookworm"])
        run(self.base + ["rm", ctr])

    def build(self, no_cache: bool) -> float:
        cmd = self.base + ["bud", "--layers", "--pull=never", "--isolation", "chroot", "-q", *secret_args(),
                           *(["--no-cache"] if no_cache else []),
                           "-f", os.path.join(EXAMPLE, "Dockerfile.numpy"), "-t", "py:numpy", EXAMPLE]
        t = time.perf_counter()
        run(cmd)
        return time.perf_counter() - t

    def close(self) -> None:
        subprocess.run(self.base + ["rm", "-a"], capture_output=True)
        subprocess.run(self.base + ["rmi", "-a", "-f"], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--base-store", help="a store holding debian:bookworm (default: bootstrap one)")
    ap.add_argument("--work", default=None, help="scratch dir (default: a temp dir in /var/tmp)")
    a = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("buildah") is None:
        raise SystemExit("run as root, with buildah installed")
    top = a.work or tempfile.mkdtemp(prefix="bench-build-run-", dir="/var/tmp")
    os.makedirs(top, exist_ok=True)
    buildah = None
    try:
        seed = a.base_store
        if seed is None:
            seed = os.path.join(top, "seed")
            run([LAYERFS, "bootstrap", "debian", "--suite", "bookworm"], dict(os.environ, LAYERFS_ROOT=seed))
        base_tar = os.path.join(top, "debian.tar")
        run([LAYERFS, "export", "debian:bookworm", "-o", base_tar], dict(os.environ, LAYERFS_ROOT=seed))
        tools = [Layerfs("layerfs build (FUSE backend)", "fuse", seed, top),
                 Layerfs("layerfs build (kernel backend)", "kernel", seed, top)]
        buildah = Buildah(base_tar, top)
        tools.append(buildah)
        for tool in tools:  # fill the apt and pip cache mounts (downloads)
            print(f"warm-up {tool.name}: {tool.build(False):.1f}s", file=sys.stderr, flush=True)
        times: dict[str, list[float]] = {t.name: [] for t in tools}
        for r in range(a.repeat):
            for tool in tools if r % 2 == 0 else reversed(tools):
                times[tool.name].append(tool.build(True))
                print(f"repeat {r + 1} {tool.name}: {times[tool.name][-1]:.1f}s", file=sys.stderr, flush=True)
    finally:
        if buildah is not None:
            buildah.close()
        if a.work is None:
            shutil.rmtree(top, ignore_errors=True)
    ref = statistics.median(times["buildah bud --layers"])
    print(f"Command: `{' '.join(sys.argv)}`\n")
    print(f"`--no-cache` build of examples/numpy-matplotlib/Dockerfile.numpy, caches warm; median of {a.repeat}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}.\n")
    print("| builder | seconds | / buildah |")
    print("|---|---:|---:|")
    for name, runs in times.items():
        m = statistics.median(runs)
        print(f"| {name} | {m:.1f} | {m / ref:.2f}x |")


if __name__ == "__main__":
    main()
