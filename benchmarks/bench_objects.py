#!/usr/bin/env python3
"""Object compression policy: read cost and disk saved, per file-size class.

    sudo .venv/bin/python benchmarks/bench_objects.py [--repeat 3] [--scale 1.0]

Stores the unique contents of the generated tree (benchmarks/gen_tree.py;
the same default tree as bench_import.py) three times, once per policy:

* never  : every object raw;
* always : every object zstd -3 (``.zst``), whatever its size;
* ours   : ``ObjectStore.put_file`` as layerfs does it: zstd -3 for
           8 KiB..16 MiB when that frees >= 25 % of the 4 KiB blocks.

and for each file-size class reports: disk allocated (st_blocks) and saved
vs never, the CPU spent writing (compressing) the class, and read cost
through ``ObjectStore.read(digest, verify=False)`` -- the whole object into
memory, which is also what the FUSE daemon does for a compressed object on
its first read -- warm (page cache) and cold (after ``drop_caches``), plus
the latency of a first 4 KiB read at a random offset: ``pread`` of the raw
file vs decompressing the object (the FUSE daemon's ``mem`` handle).

The table is printed and written into benchmarks/results-import.md between
the bench_objects markers (replaced if present, else appended).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)
import gen_tree  # noqa: E402
import zstandard  # noqa: E402
from bench_import import can_drop_caches, drop_caches, environment  # noqa: E402

from layerfs.store import objects as ob  # noqa: E402
from layerfs.store.objects import ObjectStore  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
CLASSES = [
    ("< 4 KiB", 0, 4 * KiB - 1),
    ("4-8 KiB", 4 * KiB, 8 * KiB - 1),
    ("8-64 KiB", 8 * KiB, 64 * KiB - 1),
    ("64 KiB-1 MiB", 64 * KiB, MiB - 1),
    ("1-16 MiB", MiB, ob.COMPRESS_MAX),
    ("> 16 MiB", ob.COMPRESS_MAX + 1, 1 << 62),
]
POLICIES = ("never", "always", "ours")
MARK_BEGIN = "<!-- bench_objects:begin -->"
MARK_END = "<!-- bench_objects:end -->"


def size_class(n: int) -> str:
    for name, lo, hi in CLASSES:
        if lo <= n <= hi:
            return name
    raise AssertionError(n)


def collect(tree: str) -> dict[str, list[tuple[str, str, int]]]:
    """Unique contents of *tree* by class: [(digest, a path, size)]."""
    seen_ino, seen_digest = set(), set()
    out: dict[str, list] = {c[0]: [] for c in CLASSES}
    for dirpath, _, filenames in os.walk(tree):
        for n in filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if not os.path.isfile(p) or os.path.islink(p) or (st.st_dev, st.st_ino) in seen_ino:
                continue
            seen_ino.add((st.st_dev, st.st_ino))
            d, size = ObjectStore.hash_file(None, p)
            if d in seen_digest:
                continue
            seen_digest.add(d)
            out[size_class(size)].append((d, p, size))
    for v in out.values():
        v.sort()
    return out


def store_all(policy: str, objs: ObjectStore, items: list[tuple[str, str, int]]) -> float:
    """Write *items* under *policy*; returns CPU seconds spent."""
    cctx = zstandard.ZstdCompressor(level=ob.ZSTD_LEVEL)
    cpu = 0.0
    for d, p, _ in items:
        if policy == "ours":
            t = time.thread_time()
            objs.put_file(p)
            cpu += time.thread_time() - t
            continue
        with open(p, "rb") as f:
            data = f.read()
        t = time.thread_time()
        if policy == "never":
            objs._write(objs.raw_path(d), [data])
        else:
            objs._write(objs.zst_path(d), [cctx.compress(data)])
        cpu += time.thread_time() - t
    return cpu


def disk(objs: ObjectStore, items) -> tuple[int, int, int]:
    """(apparent bytes, allocated bytes, objects stored compressed)."""
    app = alloc = comp = 0
    for d, _, _ in items:
        path, compressed = objs.locate(d)
        st = os.stat(path)
        app += st.st_size
        alloc += st.st_blocks * 512
        comp += compressed
    return app, alloc, comp


def read_all(objs: ObjectStore, items) -> float:
    t = time.perf_counter()
    for d, _, _ in items:
        objs.read(d, verify=False)
    return time.perf_counter() - t


def first_read_us(objs: ObjectStore, items, n: int, rng: random.Random) -> float:
    """Median µs of open + a 4 KiB read at a random offset, as the FUSE daemon
    serves a first read: raw objects are pread, compressed ones decompressed whole."""
    if not items:
        return float("nan")
    sample = [items[rng.randrange(len(items))] for _ in range(n)]
    times = []
    for d, _, size in sample:
        off = rng.randrange(0, max(1, size - 4096))
        t = time.perf_counter()
        path, compressed = objs.locate(d)
        if compressed:
            with open(path, "rb") as f:
                data = zstandard.ZstdDecompressor().decompress(f.read())
            data[off:off + 4096]
        else:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            os.pread(fd, 4096, off)
            os.close(fd)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", help="tree to use; default: the generated one (made if missing)")
    ap.add_argument("--workdir", default="/var/tmp/layerfs-bench")
    ap.add_argument("--files", type=int, default=25000)
    ap.add_argument("--mb", type=float, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeat", "-n", type=int, default=3)
    ap.add_argument("--random-reads", type=int, default=200, help="first-4KiB-read samples per class")
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results-import.md"))
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()

    os.makedirs(a.workdir, exist_ok=True)
    if a.tree:
        tree = os.path.abspath(a.tree)
        gen_note = f"given tree {tree}"
    else:
        tree = os.path.join(a.workdir, f"tree-f{a.files}-mb{a.mb:g}-s{a.seed}-x{a.scale:g}")
        if not os.path.exists(tree + ".json"):
            print(f"generating {tree} ...", file=sys.stderr)
            info = gen_tree.generate(tree, a.files, a.mb, a.seed, a.scale, force=True)
            with open(tree + ".json", "w") as f:
                json.dump(info.summary(), f, indent=1)
        gen_note = (f"`python benchmarks/gen_tree.py TREE --files {a.files} --mb {a.mb:g} --seed {a.seed} "
                    f"--scale {a.scale:g}`")
    cold = not a.no_cold and can_drop_caches()
    run_dir = os.path.join(a.workdir, f"objects-{os.getpid()}")
    os.makedirs(run_dir)
    t_start = time.time()
    load0 = os.getloadavg()

    by_class = collect(tree)
    stores = {}
    rows = {}  # (class, policy) -> dict
    for pol in POLICIES:
        root = os.path.join(run_dir, pol)
        os.makedirs(os.path.join(root, "objects"))
        os.makedirs(os.path.join(root, "tmp"))
        objs = stores[pol] = ObjectStore(os.path.join(root, "objects"), os.path.join(root, "tmp"))
        for cls, items in by_class.items():
            cpu = store_all(pol, objs, items)
            app, alloc, comp = disk(objs, items)
            rows[(cls, pol)] = {"write_cpu": cpu, "apparent": app, "alloc": alloc, "compressed": comp}
        print(f"  stored {pol}", file=sys.stderr)
    os.sync()

    rng = random.Random(a.seed)
    for cls, items in by_class.items():
        logical = sum(s for _, _, s in items)
        for pol in POLICIES:
            r = rows[(cls, pol)]
            objs = stores[pol]
            read_all(objs, items)  # warm it
            r["warm"] = min(read_all(objs, items) for _ in range(a.repeat))  # min: noise only adds
            r["first4k"] = first_read_us(objs, items, a.random_reads, rng)
            if cold:
                ts = []
                for _ in range(a.repeat):
                    drop_caches()
                    ts.append(read_all(objs, items))
                r["cold"] = statistics.median(ts)
            r["logical"] = logical
            print(f"  {cls:13s} {pol:6s} warm {r['warm']:.3f}s cold {r.get('cold', float('nan')):.3f}s "
                  f"4k {r['first4k']:.0f}us", file=sys.stderr)

    # Report.
    def mbs(b: int, s: float) -> str:
        return f"{b / 1e6 / s:.0f}" if s == s and s > 0 else "-"

    cmd = "sudo .venv/bin/python benchmarks/bench_objects.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    L = [f"## Object compression policy ({time.strftime('%Y-%m-%d %H:%M')})\n",
         f"Reproduce: `{cmd.strip()}` (from the repo root, as root for the cold reads).  ",
         f"Tree: {gen_note}; unique contents only (duplicates and hardlinks are one object).  ",
         f"Machine: {environment()}; load average {load0[0]:.2f}; took {(time.time() - t_start) / 60:.1f} min.  ",
         f"Read = `ObjectStore.read(d, verify=False)` of every object of the class, one thread; warm = best of "
         f"{a.repeat} (other load only adds time), cold = median of {a.repeat} after `drop_caches`. First 4 KiB = open + 4 KiB at a random offset "
         f"(raw: `pread`; zst: decompress the whole object, as the FUSE daemon's first read does), "
         f"median of {a.random_reads}. Disk = allocated blocks (`st_blocks`), 4 KiB filesystem blocks. "
         f"Write CPU: never/always = compress + write; ours = `put_file`, which also reads and hashes the source. "
         f"never and ours do identical work for the raw classes: their difference is the noise level.\n",
         "| size class | objects | MB | policy | compressed | disk MB | saved vs never | write CPU s "
         "| warm read MB/s | warm µs/object | cold read MB/s | first 4 KiB µs |",
         "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    totals = {p: {"alloc": 0, "warm": 0.0, "cold": 0.0, "write_cpu": 0.0} for p in POLICIES}
    logical_total = 0
    for cls, items in by_class.items():
        if not items:
            continue
        logical_total += rows[(cls, "never")]["logical"]
        base = rows[(cls, "never")]["alloc"]
        for pol in POLICIES:
            r = rows[(cls, pol)]
            for k in ("alloc", "warm", "write_cpu"):
                totals[pol][k] += r[k]
            totals[pol]["cold"] += r.get("cold", float("nan"))
            L.append(f"| {cls} | {len(items)} | {r['logical'] / 1e6:.1f} | {pol} | {r['compressed']} | "
                     f"{r['alloc'] / 1e6:.1f} | {1 - r['alloc'] / base:.0%} | {r['write_cpu']:.2f} | "
                     f"{mbs(r['logical'], r['warm'])} | {r['warm'] / len(items) * 1e6:.0f} | "
                     f"{mbs(r['logical'], r.get('cold', float('nan')))} | {r['first4k']:.0f} |")
    L.append("")
    L += ["| policy (whole tree) | disk MB | saved vs never | write CPU s | warm read s | cold read s |",
          "|---|---:|---:|---:|---:|---:|"]
    for pol in POLICIES:
        t = totals[pol]
        L.append(f"| {pol} | {t['alloc'] / 1e6:.1f} | {1 - t['alloc'] / totals['never']['alloc']:.0%} | "
                 f"{t['write_cpu']:.2f} | {t['warm']:.2f} | {t['cold']:.2f} |")
    L.append(f"\n({logical_total / 1e6:.1f} MB of unique content.)")
    text = "\n".join(L)
    print(text)
    _append_section(a.out, text)
    print(f"\nwritten to {a.out}", file=sys.stderr)
    if not a.keep:
        shutil.rmtree(run_dir)


def _append_section(path: str, text: str) -> None:
    """Replace our marked section if present, else append it."""
    old = open(path).read() if os.path.exists(path) else "# Import benchmarks\n\n"
    block = f"{MARK_BEGIN}\n{text.rstrip()}\n{MARK_END}\n"
    if MARK_BEGIN in old and MARK_END in old:
        head, _, rest = old.partition(MARK_BEGIN)
        new = head + block + rest.partition(MARK_END)[2].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    with open(path, "w") as f:
        f.write(new)


if __name__ == "__main__":
    main()
