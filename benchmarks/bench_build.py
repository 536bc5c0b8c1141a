#!/usr/bin/env python3
"""Build benchmark: ``layerfs build`` vs ``buildah bud --layers``, same run.

    sudo .venv/bin/python benchmarks/bench_build.py [--repeat 3] [--files 10000] [--mb 200]

Both tools build the same Dockerfiles from copies of the same contexts,
each into its own fresh store in a temporary directory (buildah:
``--root/--runroot TMP --storage-driver overlay``, ``--isolation chroot``;
layerfs: ``LAYERFS_ROOT``). The busybox base is the same tree for both
(``layerfs bootstrap busybox``; for buildah a ``from scratch`` + ``add``
of that tree's tar, committed as ``localhost/busybox:latest``). Not timed:
making stores and bases.

Per repeat (a fresh pair of stores each time), timed with the CLI as a
user runs it:

* examples/busybox-pair/Dockerfile.first: first build, no-change rebuild,
  rebuild after changing shared.txt (one COPY'd file);
* then Dockerfile.second (shares every step but the last), five containers
  of each image (buildah: ``buildah from``; layerfs: ``layerfs run`` of
  ``true``, which leaves a stopped container with its upper dir), and the
  disk both stores use, ``du -sbx`` (tools' own reports double-count
  shared layers);
* a context of --files files / --mb MB (random bytes) and
  ``FROM busybox:latest`` + ``COPY data/ /data/``: first build and
  no-change rebuild (goal: layerfs >= 3x faster than buildah).

Medians over the repeats; the table goes to stdout and into
benchmarks/results-build.md between the bench_build markers.
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
REPO = os.path.dirname(HERE)
PAIR = os.path.join(REPO, "examples", "busybox-pair")
LAYERFS = os.path.join(os.path.dirname(sys.executable), "layerfs")
RESULTS = os.path.join(HERE, "results-build.md")
MARK_BEGIN = "<!-- bench_build:begin -->"
MARK_END = "<!-- bench_build:end -->"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(cmd: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, env=env)
    if check and proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout.decode()[-2000:]}"
                         f"\n{proc.stderr.decode()[-2000:]}")
    return proc


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    proc = run(cmd, env)
    return time.perf_counter() - t, proc.stdout.decode()


def du(*paths: str) -> int:
    out = run(["du", "-sbxc", *paths]).stdout.decode().splitlines()
    return int(out[-1].split()[0])


class Buildah:
    name = "buildah"

    def __init__(self, work: str, base_tar: str):
        self.root = os.path.join(work, "buildah-root")
        self.runroot = os.path.join(work, "buildah-run")
        self.base = ["buildah", "--root", self.root, "--runroot", self.runroot, "--storage-driver", "overlay"]
        ctr = run(self.base + ["from", "scratch"]).stdout.decode().strip()
        run(self.base + ["add", ctr, base_tar, "/"])
        run(self.base + ["config", "--env", PATH_ENV, "--cmd", "sh", ctr])
        run(self.base + ["commit", "-q", ctr, "localhost/busybox:latest"])
        run(self.base + ["rm", ctr])

    def build(self, ctx: str, dockerfile: str, tag: str) -> tuple[float, str]:
        return timed(self.base + ["bud", "--layers", "--pull=never", "--isolation", "chroot", "-q",
                                  "-t", tag, "-f", os.path.join(ctx, dockerfile), ctx])

    def container(self, image: str, n: int) -> None:
        run(self.base + ["from", "--pull=never", "--name", f"c{n}", image])

    def disk(self) -> int:
        return du(self.root)

    def close(self) -> None:
        run(self.base + ["rm", "-a"], check=False)
        run(self.base + ["rmi", "-a", "-f"], check=False)
        run(["umount", "-R", self.runroot], check=False)


class Layerfs:
    name = "layerfs"

    def __init__(self, work: str, base_tar: str):
        self.root = os.path.join(work, "layerfs-store")
        self.env = dict(os.environ, LAYERFS_ROOT=self.root)
        run([LAYERFS, "bootstrap", "busybox"], self.env)

    def build(self, ctx: str, dockerfile: str, tag: str) -> tuple[float, str]:
        return timed([LAYERFS, "build", "-q", "-t", tag, "-f", os.path.join(ctx, dockerfile), ctx], self.env)

    def container(self, image: str, n: int) -> None:
        run([LAYERFS, "run", "--name", f"c{n}", image, "true"], self.env)

    def disk(self) -> int:
        return du(self.root)

    def close(self) -> None:
        proc = run([LAYERFS, "ps", "-a", "-q"], self.env, check=False)
        ids = proc.stdout.decode().split()
        if ids:
            run([LAYERFS, "rm", "-f", *ids], self.env, check=False)


def make_big_context(dest: str, files: int, mb: int) -> None:
    data = os.path.join(dest, "data")
    per = max(1, mb * 1_000_000 // files)
    for i in range(files):
        d = os.path.join(data, f"d{i // 100:03d}")
        if i % 100 == 0:
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:05d}.bin"), "wb") as f:
            f.write(os.urandom(per))
    with open(os.path.join(dest, "Dockerfile"), "w") as f:
        f.write("FROM busybox:latest\nCOPY data/ /data/\n")


def one_repeat(tool_cls, base_tar: str, pair_ctx: str, big_ctx: str, work: str) -> dict[str, float]:
    out: dict[str, float] = {}
    tool = tool_cls(work, base_tar)
    try:
        shared = os.path.join(pair_ctx, "shared.txt")
        with open(shared, "w") as f:
            f.write("greeting from the busybox pair\n")
        out["first"], _ = tool.build(pair_ctx, "Dockerfile.first", "pair:first")
        out["nochange"], _ = tool.build(pair_ctx, "Dockerfile.first", "pair:first")
        with open(shared, "a") as f:
            f.write(f"changed {time.time()}\n")
        out["onefile"], _ = tool.build(pair_ctx, "Dockerfile.first", "pair:first")
        out["second"], _ = tool.build(pair_ctx, "Dockerfile.second", "pair:second")
        for n in range(5):
            tool.container("pair:first", n)
            tool.container("pair:second", 5 + n)
        out["disk_pair"] = tool.disk()
        out["big_first"], _ = tool.build(big_ctx, "Dockerfile", "big:1")
        out["big_nochange"], _ = tool.build(big_ctx, "Dockerfile", "big:1")
        out["disk_all"] = tool.disk()
    finally:
        tool.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--no-write", action="store_true", help="do not update results-build.md")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (FUSE, namespaces, buildah's storage)")
    if shutil.which("buildah") is None:
        raise SystemExit("buildah is not installed (apt-get install buildah)")

    sys.path.insert(0, REPO)
    from layerfs.bootstrap import busybox_tree

    # Byte-compile layerfs once, as an installed package would be (this
    # machine may run with PYTHONDONTWRITEBYTECODE, which would make every
    # CLI run compile its modules again).
    run([sys.executable, "-m", "compileall", "-q", os.path.join(REPO, "layerfs"), os.path.join(REPO, "cli")],
        check=False)
    top = tempfile.mkdtemp(prefix="bench-build-", dir=os.environ.get("BENCH_TMP", "/var/tmp"))
    try:
        tree = os.path.join(top, "busybox")
        busybox_tree(tree)
        base_tar = os.path.join(top, "busybox.tar")
        run(["tar", "-C", tree, "-cf", base_tar, "."])
        big_ctx = os.path.join(top, "big")
        make_big_context(big_ctx, args.files, args.mb)
        results: dict[str, list[dict[str, float]]] = {"buildah": [], "layerfs": []}
        for r in range(args.repeat):
            for cls in (Buildah, Layerfs) if r % 2 == 0 else (Layerfs, Buildah):
                work = os.path.join(top, f"{cls.name}-{r}")
                pair_ctx = os.path.join(work, "pair")
                shutil.copytree(PAIR, pair_ctx)
                res = one_repeat(cls, base_tar, pair_ctx, big_ctx, work)
                results[cls.name].append(res)
                print(f"repeat {r + 1} {cls.name}: " + ", ".join(
                    f"{k}={v:.3f}" if not k.startswith("disk") else f"{k}={v / 1e6:.1f}MB"
                    for k, v in res.items()), file=sys.stderr, flush=True)
                shutil.rmtree(work, ignore_errors=True)
        table = render(results, args)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print(table)
    if not args.no_write:
        write_results(table)


def render(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    def med(tool: str, key: str) -> float:
        return statistics.median(r[key] for r in results[tool])

    rows = [
        ("busybox pair, first build (7 steps, 2 RUN)", "first", "s"),
        ("busybox pair, no-change rebuild", "nochange", "s"),
        ("busybox pair, rebuild after one COPY'd file changed", "onefile", "s"),
        ("busybox pair, second image (all but the last step cached)", "second", "s"),
        (f"{args.files:,}-file / {args.mb} MB context, first build (COPY)", "big_first", "s"),
        (f"{args.files:,}-file / {args.mb} MB context, no-change rebuild", "big_nochange", "s"),
        ("disk, `du -sbx`: the two pair images + 5 containers of each", "disk_pair", "MB"),
        ("disk, `du -sbx`: all of the above + the big-context image", "disk_all", "MB"),
    ]
    lines = [
        MARK_BEGIN,
        "",
        f"`sudo .venv/bin/python benchmarks/bench_build.py --repeat {args.repeat} "
        f"--files {args.files} --mb {args.mb}`",
        "",
        f"{platform.node()}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
        f"{run(['buildah', '--version']).stdout.decode().strip()}; medians of {args.repeat} runs, "
        "each tool with a fresh store per run; wall time of the CLI. "
        "buildah: `--layers --isolation chroot`, overlay driver. "
        "layerfs containers: `layerfs run --name cN IMAGE true` (stopped container + upper dir); "
        "buildah containers: `buildah from`.",
        "",
        "| what | buildah | layerfs | layerfs / buildah |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, key, unit in rows:
        b, f = med("buildah", key), med("layerfs", key)
        if unit == "s":
            lines.append(f"| {label} | {b:.2f} s | {f:.2f} s | {f / b:.2f} |")
        else:
            lines.append(f"| {label} | {b / 1e6:.1f} MB | {f / 1e6:.1f} MB | {f / b:.2f} |")
    b, f = med("buildah", "big_nochange"), med("layerfs", "big_nochange")
    lines += ["", f"No-change rebuild of the big context: layerfs is {b / f:.1f}x faster than buildah "
                  "(goal: >= 3x).", "", MARK_END]
    return "\n".join(lines)


def write_results(table: str) -> None:
    try:
        with open(RESULTS) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# `layerfs build` benchmarks\n\n" + MARK_BEGIN + "\n" + MARK_END + "\n"
    if MARK_BEGIN in text and MARK_END in text:
        head, _, rest = text.partition(MARK_BEGIN)
        _, _, tail = rest.partition(MARK_END)
        text = head + table + tail
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    with open(RESULTS, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
