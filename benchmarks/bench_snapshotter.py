"""containerd with the layerfs snapshotter vs its overlayfs and native ones, one run.

    sudo .venv/bin/python benchmarks/bench_snapshotter.py [--build-root DIR] [--no-debian]

Needs root, /dev/fuse, containerd + ctr (Debian's 1.6), runc, docker-registry,
busybox-static and debootstrap. The images are made once in a layerfs store
(``--build-root`` reuses one: ``layerfs bootstrap debian`` takes minutes),
pushed to a local registry, and for each snapshotter a fresh containerd
(its own root, the same registry) measures:

* pull+unpack: ``ctr images pull`` wall time (fetch from the local
  registry, decompress, apply, commit);
* first start: ``ctr run --rm IMAGE true`` right after the pull, and the
  median of 5 more;
* disk used by 1, 5 and 20 containers of the Debian image (``ctr
  containers create``: their snapshots exist, nothing runs), then by two
  Debian images that share almost every file but no layer (the second is
  the first re-imported with one file changed: a rebuilt base).

Disk is what the snapshotter's own directory takes (``du -sx``: the
layerfs store root, or containerd's snapshotter dir); containerd's content
store holds the same compressed blobs for all three and is left out.
Writes the tables to stdout and benchmarks/results-snapshotter.md, keeping
what the file has from the line ``<!-- notes -->`` on.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from layerfs.store import images as img  # noqa: E402
from layerfs.store import transfer  # noqa: E402
from layerfs.store.store import Store  # noqa: E402
from tests.oci.conftest import Registry  # noqa: E402
from tests.snapshotter.harness import LAYERFS, Containerd, Snapshotter, short_tmpdir, unmount_all  # noqa: E402

SNAPSHOTTERS = ("overlayfs", "native", "layerfs")
COUNTS = (1, 5, 20)
NOTES_MARKER = "<!-- notes -->"


def layerfs(root: str, *args: str) -> str:
    return subprocess.run([LAYERFS, "--root", root, *args], check=True, capture_output=True, text=True).stdout


def make_images(build: str, debian: bool) -> dict[str, str]:
    """name -> image in the build store: busybox, debian, debian-rebuilt."""
    with Store(build) as store:
        have = {t for _, tags in store.images() for t in tags}
    if "busybox:latest" not in have:
        layerfs(build, "bootstrap", "busybox", "--tag", "busybox:latest")
    out = {"busybox": "busybox:latest"}
    if not debian:
        return out
    if "debian:bookworm" not in have:
        layerfs(build, "bootstrap", "debian", "--tag", "debian:bookworm")
    if "debian:rebuilt" not in have:
        _rebuild(build)
    out |= {"debian": "debian:bookworm", "debian-rebuilt": "debian:rebuilt"}
    return out


def _rebuild(build: str) -> None:
    """The Debian tree with one file changed, imported as a new single layer."""
    with Store(build) as store:
        base = store.image("debian:bookworm")
        work = tempfile.mkdtemp(dir=store.tmp_dir)
        tree = os.path.join(work, "rootfs")
        with store.writing():
            transfer.export_image(store, base, tree)
            with open(os.path.join(tree, "etc/rebuilt"), "w") as f:
                f.write("a rebuilt base\n")
            lid = transfer.import_layer(store, tree)
            image = store.put_image(img.new_config([lid], base.runtime_config, []))
        store.tag(image.id, "debian:rebuilt")
        shutil.rmtree(work, ignore_errors=True)


def du(path: str) -> int:
    out = subprocess.run(["du", "-sx", "--block-size=1", path], capture_output=True, text=True).stdout
    return int(out.split()[0]) if out else 0


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Setup:
    def __init__(self, name: str, registry: Registry) -> None:
        self.name = name
        self.base = short_tmpdir("lfb")
        self.snap = None
        address = os.path.join(self.base, "s.sock")
        if name == "layerfs":
            self.snap = Snapshotter(os.path.join(self.base, "store"), address,
                                    os.path.join(self.base, "snapshotter.log")).start()
        self.cd = Containerd(self.base, address).start()
        self.disk_dir = (os.path.join(self.base, "store") if name == "layerfs"
                         else os.path.join(self.base, "root", f"io.containerd.snapshotter.v1.{name}"))

    def ctr(self, *args: str) -> None:
        self.cd.ctr(*args, timeout=900)

    def close(self) -> None:
        self.cd.remove_everything()
        self.cd.stop()
        if self.snap:
            self.snap.stop()
            unmount_all(self.snap.root)
        self.cd.cleanup_host()
        shutil.rmtree(self.base, ignore_errors=True)


def measure(name: str, registry: Registry, refs: dict[str, str]) -> dict:
    s = Setup(name, registry)
    sn = ("--snapshotter", name)
    r: dict = {}
    try:
        for image, ref in refs.items():
            if image == "debian-rebuilt":
                continue
            r[f"pull {image}"] = timed(lambda: s.ctr("images", "pull", "--plain-http", *sn, ref))
            r[f"start {image}"] = timed(lambda: s.ctr("run", "--rm", *sn, ref, "first", "true"))
            r[f"warm start {image}"] = statistics.median(
                timed(lambda i=i: s.ctr("run", "--rm", *sn, ref, f"w{i}", "true")) for i in range(5))
        if "debian" in refs:
            r["disk debian"] = du(s.disk_dir)
            made = 0
            for n in COUNTS:
                while made < n:
                    s.ctr("containers", "create", *sn, refs["debian"], f"c{made}")
                    made += 1
                r[f"disk {n} containers"] = du(s.disk_dir)
            s.cd.remove_everything()
            s.ctr("images", "pull", "--plain-http", *sn, refs["debian-rebuilt"])
            r["disk two bases"] = du(s.disk_dir)
    finally:
        s.close()
    return r


def table(results: dict[str, dict]) -> str:
    keys = list(next(iter(results.values())))
    lines = ["| | " + " | ".join(SNAPSHOTTERS) + " | layerfs / overlayfs |", "|---|" + "---:|" * (len(SNAPSHOTTERS) + 1)]
    for k in keys:
        vals = [results[s].get(k) for s in SNAPSHOTTERS]
        fmt = (lambda v: f"{v / 1e6:,.1f} MB") if k.startswith("disk") else (lambda v: f"{v:.2f} s")
        ratio = vals[2] / vals[0] if vals[0] else float("nan")
        lines.append(f"| {k} | " + " | ".join(fmt(v) for v in vals) + f" | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-root", help="a layerfs store to make (or reuse) the images in")
    ap.add_argument("--no-debian", action="store_true", help="busybox only (no debootstrap)")
    args = ap.parse_args()
    build = args.build_root or short_tmpdir("lfbuild")
    names = make_images(build, not args.no_debian)
    reg_dir = short_tmpdir("lfbreg")
    registry = Registry(reg_dir)
    try:
        refs = {}
        for name, image in names.items():
            refs[name] = f"{registry.host}/bench/{name}:1"
            layerfs(build, "push", "--insecure", "-q", image, refs[name])
        load = os.getloadavg()[0]
        results = {}
        for name in SNAPSHOTTERS:
            results[name] = measure(name, registry, refs)
            print(name, results[name], file=sys.stderr, flush=True)
    finally:
        registry.stop()
        shutil.rmtree(reg_dir, ignore_errors=True)
        if not args.build_root:
            unmount_all(build)
            shutil.rmtree(build, ignore_errors=True)
    report = (f"## bench_snapshotter ({time.strftime('%Y-%m-%d')}, {platform.node()}, "
              f"{os.cpu_count()} cores, load {load:.1f} -> {os.getloadavg()[0]:.1f})\n\n"
              f"    sudo .venv/bin/python benchmarks/bench_snapshotter.py {' '.join(sys.argv[1:])}\n\n"
              + table(results) + "\n")
    print(report)
    path = os.path.join(HERE, "results-snapshotter.md")
    notes = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else ""
    with open(path, "w") as f:
        f.write(report + ("\n" + notes if notes else ""))


if __name__ == "__main__":
    main()
