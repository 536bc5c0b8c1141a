#!/usr/bin/env python3
"""Import benchmark: ``layerfs import`` of a distro-shaped tree vs ``tar | zstd -3``.

    sudo .venv/bin/python benchmarks/bench_import.py [--repeat 3] [--scale 1.0]

On one generated tree (benchmarks/gen_tree.py, default ~25,000 files /
~500 MB), measures, each ``--repeat`` times, cold (``sync; echo 3 >
/proc/sys/vm/drop_caches`` before each run; needs root) and warm (tree in
the page cache):

* ``tar -cf - -C TREE . | gzip > /dev/null`` and ``... | zstd -3 > /dev/null``
  (tar writes to a pipe: GNU tar does not read file data when its archive
  is /dev/null itself);
* first import: ``layerfs import TREE -t bench:1`` into a fresh store
  (``LAYERFS_ROOT``), the CLI as a user runs it, syncfs included;
* re-import of the unchanged tree (stat-cache hits; goal >= 5x faster);
* import after 1 % of the files changed: half only touched (new mtime, same
  bytes), half with new bytes; every repeat changes a different 1 %. The
  tree is restored afterwards (bytes and mtimes).

Reports medians of wall time, CPU time (user+sys of the whole process tree;
on a shared machine wall time includes waiting for the CPU, CPU time does
not), MB/s, files/s, ratios to ``tar | zstd -3``, and store size (objects,
apparent and allocated) vs the .tar.zst / .tar.gz of the same tree. The
markdown table goes to stdout and into benchmarks/results-import.md (the
section between the bench_import markers is replaced; other sections, e.g.
bench_objects', are kept).

Stores are created side by side and deleted only at the end: on ext4 without
a journal, creating files right after deleting many is slow (the inode
allocator skips recently deleted inodes one by one), which would make each
repeat pay for the previous one's ``rm -rf``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import gen_tree  # noqa: E402

MARK_BEGIN = "<!-- bench_import:begin -->"
MARK_END = "<!-- bench_import:end -->"


# -- plumbing -----------------------------------------------------------------
def can_drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def warm_tree(tree: str) -> None:
    """Pull the whole tree (data and metadata) into the page cache."""
    sh(f"tar -cf - -C {shlex.quote(tree)} . | cat > /dev/null")


def sh(cmd: str, env: dict | None = None) -> tuple[float, float, str]:
    """Run *cmd* with bash; returns (wall s, cpu s of it and its children, stdout)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"bench_import: command failed ({p.returncode}): {cmd}\n{p.stderr}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return wall, cpu, p.stdout


def du(path: str) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of everything under *path*."""
    apparent = allocated = 0
    seen = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for n in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, n))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            if not os.path.isdir(os.path.join(dirpath, n)):
                apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def tree_stats(tree: str) -> dict:
    files = bytes_ = links = dirs = entries = 0
    seen = set()
    for dirpath, dirnames, filenames in os.walk(tree):
        dirs += len(dirnames)
        for n in filenames + dirnames:
            entries += 1
            st = os.lstat(os.path.join(dirpath, n))
            if os.path.islink(os.path.join(dirpath, n)):
                links += 1
            elif not os.path.isdir(os.path.join(dirpath, n)):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                files += 1
                bytes_ += st.st_size
    return {"files": files, "bytes": bytes_, "symlinks": links, "dirs": dirs, "entries": entries}


# -- the 1 % change -----------------------------------------------------------
class Mutation:
    """Touch or rewrite a deterministic 1 % of the files; undo() restores
    their bytes and mtimes (ctimes move on, which nothing here depends on)."""

    def __init__(self, tree: str, round_: int, share: float = 0.01, seed: int = 1) -> None:
        paths = []
        for dirpath, _, filenames in os.walk(tree):
            for n in filenames:
                p = os.path.join(dirpath, n)
                if not os.path.islink(p):
                    paths.append(p)
        paths.sort()
        rng = random.Random(f"mutate:{seed}:{round_}")
        self.picked = rng.sample(paths, max(2, int(len(paths) * share)))
        self.saved: list[tuple[str, int, int, bytes | None]] = []
        self.round = round_

    def apply(self) -> tuple[int, int]:
        touched = changed = 0
        now = time.time_ns()
        for i, p in enumerate(self.picked):
            st = os.stat(p)
            if i % 2 == 0 or st.st_size == 0:   # touch only
                self.saved.append((p, st.st_atime_ns, st.st_mtime_ns, None))
                os.utime(p, ns=(now, now))
                touched += 1
                continue
            n = min(16, st.st_size)
            with open(p, "r+b") as f:
                old = f.read(n)
                f.seek(0)
                f.write(bytes((b + 1 + self.round) % 256 for b in old))
            self.saved.append((p, st.st_atime_ns, st.st_mtime_ns, old))
            os.utime(p, ns=(now, now))
            changed += 1
        return touched, changed

    def undo(self) -> None:
        for p, at, mt, old in reversed(self.saved):
            if old is not None:
                with open(p, "r+b") as f:
                    f.write(old)
            os.utime(p, ns=(at, mt))
        self.saved.clear()


# -- report -------------------------------------------------------------------
def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_s(x: float) -> str:
    return f"{x:.2f}" if x == x else "-"


def write_section(path: str, text: str, begin: str, end: str) -> None:
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    if begin in old and end in old:
        head, _, rest = old.partition(begin)
        _, _, tail = rest.partition(end)
        new = head + block + tail.lstrip("\n")
    elif old:
        new = block + "\n" + old  # the import section goes first
    else:
        new = "# Import benchmarks\n\n" + block
    with open(path, "w") as f:
        f.write(new)


def environment() -> str:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO).stdout.strip()
        except OSError:
            return "?"
    head = out(["git", "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "status", "--porcelain", "--", "layerfs/store"])
    fs = out(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "-T", REPO]).split("\n")[0][:80]
    return (f"{platform.node()}: {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}, "
            f"{out(['zstd', '--version']).split(',')[0].replace('*** ', '')}, "
            f"git {head}{' (layerfs/store modified)' if dirty else ''}, fs {fs}")


# -- main ---------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", help="existing tree to use (it is changed and restored); default: generate one")
    ap.add_argument("--workdir", default="/var/tmp/layerfs-bench", help="trees, stores and archives go here")
    ap.add_argument("--files", type=int, default=25000)
    ap.add_argument("--mb", type=float, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeat", "-n", type=int, default=3)
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--no-warm", action="store_true")
    ap.add_argument("--layerfs", default=os.path.join(REPO, ".venv", "bin", "layerfs"))
    ap.add_argument("--out", default=os.path.join(HERE, "results-import.md"))
    ap.add_argument("--keep", action="store_true", help="keep the stores and archives")
    a = ap.parse_args()

    os.makedirs(a.workdir, exist_ok=True)
    run_dir = os.path.join(a.workdir, f"run-{os.getpid()}")
    os.makedirs(run_dir)
    if a.tree:
        tree = os.path.abspath(a.tree)
        gen_note = f"given tree {tree}"
    else:
        tree = os.path.join(a.workdir, f"tree-f{a.files}-mb{a.mb:g}-s{a.seed}-x{a.scale:g}")
        stamp = tree + ".json"
        if not os.path.exists(stamp):
            print(f"generating {tree} ...", file=sys.stderr)
            info = gen_tree.generate(tree, a.files, a.mb, a.seed, a.scale, force=True)
            with open(stamp, "w") as f:
                json.dump(info.summary(), f, indent=1)
        gen_note = (f"`python benchmarks/gen_tree.py TREE --files {a.files} --mb {a.mb:g} --seed {a.seed} "
                    f"--scale {a.scale:g}`")
    ts = tree_stats(tree)
    mb = ts["bytes"] / 1e6
    modes = [m for m in ("cold", "warm") if not (m == "cold" and a.no_cold) and not (m == "warm" and a.no_warm)]
    if "cold" in modes and not can_drop_caches():
        print("bench_import: cannot write /proc/sys/vm/drop_caches (not root?); cold runs skipped", file=sys.stderr)
        modes.remove("cold")
    env = dict(os.environ)
    load0 = os.getloadavg()
    t_start = time.time()
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}

    def measure(name: str, mode: str, cmd: str, run_env: dict | None = None, before=None) -> None:
        for i in range(a.repeat):
            c = cmd.format(i=i)
            if before:
                before(i)
            if mode == "cold":
                drop_caches()
            else:
                warm_tree(tree)
            wall, cpu, _ = sh(c, run_env)
            results.setdefault((name, mode), []).append((wall, cpu))
            print(f"  {name:22s} {mode} #{i + 1}: {wall:7.2f}s wall {cpu:7.2f}s cpu", file=sys.stderr)

    q = shlex.quote
    sh("sync")
    # (a) tar baselines, and the archives' sizes.
    tgz, tzst = os.path.join(run_dir, "tree.tar.gz"), os.path.join(run_dir, "tree.tar.zst")
    sh(f"tar -cf - -C {q(tree)} . | gzip > {tgz}; tar -cf - -C {q(tree)} . | zstd -3 -q > {tzst}")
    for mode in modes:
        measure("tar | gzip", mode, f"tar -cf - -C {q(tree)} . | gzip > /dev/null")
        measure("tar | zstd -3", mode, f"tar -cf - -C {q(tree)} . | zstd -3 -q > /dev/null")

    # (b) first import, a fresh store each time.
    lf = q(a.layerfs)
    stores = []

    def first_env(mode: str, i: int) -> dict:
        root = os.path.join(run_dir, f"store-first-{mode}-{i}")
        stores.append(root)
        return {**env, "LAYERFS_ROOT": root}

    for mode in modes:
        for i in range(a.repeat):
            e = first_env(mode, i)
            if mode == "cold":
                drop_caches()
            else:
                warm_tree(tree)
            wall, cpu, _ = sh(f"{lf} import {q(tree)} -t bench:1", e)
            results.setdefault(("first import", mode), []).append((wall, cpu))
            print(f"  {'first import':22s} {mode} #{i + 1}: {wall:7.2f}s wall {cpu:7.2f}s cpu", file=sys.stderr)
    main_env = {**env, "LAYERFS_ROOT": stores[0]}

    # (c) re-import, unchanged tree, into the first store.
    for mode in modes:
        measure("re-import (unchanged)", mode, f"{lf} import {q(tree)} -t bench:1", main_env)

    # (d) 1 % of the files changed before each import.
    muts: list[Mutation] = []
    counts = []

    def mutate(i: int) -> None:
        m = Mutation(tree, len(muts), seed=a.seed)
        counts.append(m.apply())
        muts.append(m)

    try:
        for mode in modes:
            measure("import after 1% change", mode, f"{lf} import {q(tree)} -t bench:1", main_env, before=mutate)
    finally:
        for m in reversed(muts):
            m.undo()

    # Sizes.
    obj_app, obj_alloc = du(os.path.join(stores[0], "objects"))
    db_app = sum(os.path.getsize(os.path.join(stores[0], f)) for f in os.listdir(stores[0])
                 if f.startswith("db.sqlite"))
    lay_app, _ = du(os.path.join(stores[0], "layers"))
    tree_app, tree_alloc = du(tree)
    gz_size, zst_size = os.path.getsize(tgz), os.path.getsize(tzst)
    load1 = os.getloadavg()
    elapsed = time.time() - t_start

    # Report.
    lines = []
    cmdline = "sudo .venv/bin/python benchmarks/bench_import.py " + " ".join(
        shlex.quote(x) for x in sys.argv[1:])
    lines.append(f"## layerfs import vs tar ({time.strftime('%Y-%m-%d %H:%M')})\n")
    lines.append(f"Reproduce: `{cmdline.strip()}` (from the repo root, as root for the cold runs).  ")
    lines.append(f"Tree: {gen_note}: {ts['files']} regular files ({mb:.1f} MB), {ts['dirs']} dirs, "
                 f"{ts['symlinks']} symlinks, {ts['entries']} entries.  ")
    lines.append(f"Machine: {environment()}.  ")
    lines.append(f"Load average before/after: {load0[0]:.2f} / {load1[0]:.2f}; the run took {elapsed / 60:.1f} min. "
                 f"Median of {a.repeat} runs each. cold = `sync; echo 3 > /proc/sys/vm/drop_caches` before each run; "
                 f"warm = tree read once before each run. CPU = user+sys of all processes of the run.\n")
    hdr = "| step | cache | wall s | CPU s | MB/s | files/s | wall vs tar\\|zstd -3 | CPU vs tar\\|zstd -3 |"
    lines += [hdr, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("tar | gzip", "tar | zstd -3", "first import", "re-import (unchanged)", "import after 1% change"):
        for mode in modes:
            rs = results.get((name, mode))
            if not rs:
                continue
            w, c = med([r[0] for r in rs]), med([r[1] for r in rs])
            zw = med([r[0] for r in results[("tar | zstd -3", mode)]])
            zc = med([r[1] for r in results[("tar | zstd -3", mode)]])
            label = name.replace("|", "\\|")
            lines.append(f"| {label} | {mode} | {fmt_s(w)} | {fmt_s(c)} | {mb / w:.0f} | {ts['files'] / w:.0f} | "
                         f"{w / zw:.2f}x | {c / zc:.2f}x |")
    lines.append("")
    lines.append("MB/s and files/s are of the whole tree in every row (a re-import still walks all of it).  ")
    if counts:
        t, c = counts[0]
        lines.append(f"1% change: {t} files touched (mtime only) + {c} files with new bytes per run.  ")
    for mode in modes:
        f = med([r[0] for r in results[("first import", mode)]])
        r = med([r[0] for r in results[("re-import (unchanged)", mode)]])
        z = med([r[0] for r in results[("tar | zstd -3", mode)]])
        lines.append(f"**{mode}**: first import is **{f / z:.2f}x** the time of `tar | zstd -3` "
                     f"(goal <= 1x: {'met' if f <= z else 'NOT met'}); re-import is **{f / r:.1f}x** faster "
                     f"than the first (goal >= 5x: {'met' if f / r >= 5 else 'NOT met'}).  ")
    lines.append("")
    lines += ["| what | apparent MB | allocated MB | vs tree |", "|---|---:|---:|---:|",
              f"| tree (du, incl. dirs) | {tree_app / 1e6:.1f} | {tree_alloc / 1e6:.1f} | 100% |",
              f"| store objects/ | {obj_app / 1e6:.1f} | {obj_alloc / 1e6:.1f} | {obj_alloc / tree_alloc:.0%} (allocated) |",
              f"| store db.sqlite* + layers/ | {(db_app + lay_app) / 1e6:.1f} | | |",
              f"| tree.tar.zst (zstd -3) | {zst_size / 1e6:.1f} | | {zst_size / tree_app:.0%} |",
              f"| tree.tar.gz (gzip -6) | {gz_size / 1e6:.1f} | | {gz_size / tree_app:.0%} |", ""]
    lines.append(f"Store objects / .tar.zst = {obj_app / zst_size:.2f} (apparent), {obj_alloc / zst_size:.2f} (allocated).\n")
    lines.append("<details><summary>every run (wall s / CPU s)</summary>\n")
    for (name, mode), rs in results.items():
        lines.append(f"- {name} {mode}: " + ", ".join(f"{w:.2f}/{c:.2f}" for w, c in rs))
    lines.append("\n</details>")
    text = "\n".join(lines)
    print(text)
    write_section(a.out, text, MARK_BEGIN, MARK_END)
    print(f"\nwritten to {a.out}", file=sys.stderr)

    if not a.keep:
        shutil.rmtree(run_dir)


if __name__ == "__main__":
    main()
