#!/usr/bin/env python3
"""layerfs (both backends) vs kernel overlayfs vs fuse-overlayfs on the same three-layer tree.

Run as root (mounts, drop_caches)::

    .venv/bin/python benchmarks/bench_fs.py                # full size, 3 repeats
    .venv/bin/python benchmarks/bench_fs.py --scale 0.1 --repeat 1   # quick

The tree (made once per scale, kept under --work): layer 0 with ~26,000
files of mixed sizes (text-like ones compress and are stored as zstd
objects, random ones raw), a 1 GiB file, a 200 MiB file and a dir of 2,000
entries; layer 1 and 2 overwrite, add, white out files and replace dirs
by opaque ones. About 30,000 files and 1.7 GB at --scale 1. The same
layers are imported into a layerfs store and extracted as lowerdirs for
the kernel and fuse-overlayfs.

Each figure is the median of --repeat runs; "cold" means caches dropped
(``echo 3 > /proc/sys/vm/drop_caches``) and the filesystem remounted just
before. Results are printed as a markdown table of seconds and ratios to
kernel overlayfs, and written to --out.

"mount" for layerfs is `layerfs mount` answered by its warm mount server
(fs.mountserver) already running; "first mount (starts the mount server)"
is the same command with no server running (its kernel column repeats the
kernel's mount). The server is stopped at the end. Every `layerfs` command
is the one a `pip install` of this checkout gives (``install_layerfs``:
not the editable dev install, whose import finder alone costs a cold start
~40 ms).

"layerfs" is the FUSE daemon, "layerfs-kernel" the kernel backend
(``--backend kernel``: the image's EROFS metadata layer over the object
dir as a data-only layer); its metadata layer is cached after the first
mount, as in use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERFS = os.path.join(os.path.dirname(sys.executable), "layerfs")
SYSTEMS = ("kernel", "fuse-overlayfs", "layerfs", "layerfs-kernel")
MOUNT_ONLY = False  # --mount-only


# -- the data set ---------------------------------------------------------------
def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _big(path: str, size: int, rng: random.Random) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    chunk = rng.randbytes(1 << 20)
    with open(path, "wb") as f:
        left = size
        i = 0
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n - 8] + i.to_bytes(8, "little") if n > 8 else chunk[:n])
            left -= n
            i += 1


def _content(rng: random.Random, i: int) -> bytes:
    r = rng.random()
    if r < 0.55:  # text-like, compressible: 1-12 KiB
        line = f"line {i} of a config or source file with some words\n".encode()
        return line * rng.randint(20, 240)
    if r < 0.97:  # binary-ish: 1-64 KiB
        return rng.randbytes(rng.randint(1 << 10, 64 << 10))
    return rng.randbytes(rng.randint(200 << 10, 1 << 20))  # a few bigger ones


def _whiteout(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.mknod(path, 0o020000, 0)


def make_layers(dest: str, scale: float) -> list[str]:
    rng = random.Random(42)
    l0, l1, l2 = (os.path.join(dest, f"layer{i}") for i in range(3))
    ndirs = max(4, int(260 * scale))
    per_dir = 100
    total = 0
    for d in range(ndirs):
        for f in range(per_dir):
            data = _content(rng, d * per_dir + f)
            total += len(data)
            _write(f"{l0}/usr/share/d{d % 16}/p{d}/f{f}", data)
    _big(f"{l0}/big/one-gib.bin", int((1 << 30) * scale), rng)
    _big(f"{l0}/copyup/file200", int((200 << 20) * scale), rng)
    for i in range(2000):
        _write(f"{l0}/rmdir/e{i}", b"x" * rng.randint(0, 200))
    os.makedirs(f"{l0}/links")
    for i in range(200):
        os.symlink(f"../usr/share/d{i % 16}", f"{l0}/links/l{i}")
    # layer 1: overwrite 1000, add 2000, white out 500, two opaque dirs
    for k in range(1000):
        d, f = rng.randrange(ndirs), rng.randrange(per_dir)
        _write(f"{l1}/usr/share/d{d % 16}/p{d}/f{f}", _content(rng, k))
    for k in range(2000):
        _write(f"{l1}/opt/app/m{k // 100}/n{k}", _content(rng, k))
    for k in range(500):
        d, f = rng.randrange(ndirs), rng.randrange(per_dir)
        if not os.path.exists(f"{l1}/usr/share/d{d % 16}/p{d}/f{f}"):
            _whiteout(f"{l1}/usr/share/d{d % 16}/p{d}/f{f}")
    for d in (1, 2):
        p = f"{l1}/usr/share/d{d % 16}/p{d}"
        shutil.rmtree(p, ignore_errors=True)
        os.makedirs(p)
        os.setxattr(p, "trusted.overlay.opaque", b"y")
        for k in range(20):
            _write(f"{p}/r{k}", _content(rng, k))
    # layer 2: 500 more whiteouts, an opaque dir, 1000 new files
    for k in range(500):
        d, f = rng.randrange(3, ndirs), rng.randrange(per_dir)
        path = f"{l2}/usr/share/d{d % 16}/p{d}/f{f}"
        if not os.path.lexists(path):
            _whiteout(path)
    p = f"{l2}/opt/app/m3"
    os.makedirs(p)
    os.setxattr(p, "trusted.overlay.opaque", b"y")
    _write(f"{p}/only", b"only\n")
    for k in range(1000):
        _write(f"{l2}/etc/conf{k // 100}/c{k}", _content(rng, k))
    return [l0, l1, l2]


def dataset(work: str, scale: float) -> dict:
    """Build (once) the layers, the store and the extracted lowerdirs."""
    from layerfs.store import images as img
    from layerfs.store import transfer
    from layerfs.store.store import Store

    base = os.path.join(work, f"scale-{scale:g}")
    meta_path = os.path.join(base, "dataset.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return json.load(f)
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    t = time.monotonic()
    layers = make_layers(os.path.join(base, "src"), scale)
    print(f"generated layers in {time.monotonic() - t:.0f}s", flush=True)
    root = os.path.join(base, "store")
    lowers = []
    with Store(root) as store:
        lids = [transfer.import_layer(store, d, as_layer=True) for d in layers]
        image = store.put_image(img.new_config(lids))
        store.tag(image.id, "bench:fs")
        print(f"imported in {time.monotonic() - t:.0f}s", flush=True)
        for i, lid in enumerate(lids):
            d = os.path.join(base, f"lower{i}")
            transfer.extract_layer(store, lid, d)
            lowers.append(d)
        nfiles = sum(1 for e in store.merged_tree(image).entries.values() if e.kind == "file")
        size = sum(e.size for e in store.merged_tree(image).entries.values() if e.kind == "file")
    shutil.rmtree(os.path.join(base, "src"))
    meta = {"root": root, "lowers": lowers, "files": nfiles, "bytes": size, "scale": scale, "image": "bench:fs"}
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    print(f"data set ready in {time.monotonic() - t:.0f}s: {nfiles} files, {size / 1e9:.2f} GB", flush=True)
    return meta


# -- mounting the three systems ---------------------------------------------------
def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL)


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Mount:
    def __init__(self, system: str, ds: dict, scratch: str) -> None:
        self.system, self.ds, self.scratch = system, ds, scratch
        self.mp = os.path.join(scratch, f"mnt-{system}")
        self.upper = os.path.join(scratch, f"upper-{system}")
        self.work = os.path.join(scratch, f"work-{system}")
        self.pid = 0

    def mount(self) -> float:
        for d in (self.upper, self.work, self.upper + ".work"):
            shutil.rmtree(d, ignore_errors=True)
        os.makedirs(self.mp, exist_ok=True)
        lowers = ":".join(reversed(self.ds["lowers"]))
        t = time.perf_counter()
        if self.system == "kernel":
            os.makedirs(self.upper)
            os.makedirs(self.work)
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={lowers},upperdir={self.upper},workdir={self.work}", self.mp], check=True)
        elif self.system == "fuse-overlayfs":
            os.makedirs(self.upper)
            os.makedirs(self.work)
            subprocess.run(["fuse-overlayfs", "-o",
                            f"lowerdir={lowers},upperdir={self.upper},workdir={self.work}", self.mp],
                           check=True, stderr=subprocess.DEVNULL)
        else:
            backend = "kernel" if self.system == "layerfs-kernel" else "fuse"
            subprocess.run([LAYERFS, "--root", self.ds["root"], "mount", self.ds["image"], self.mp,
                            "--upper", self.upper, "--backend", backend], check=True)
        elapsed = time.perf_counter() - t
        os.stat(self.mp)
        self.pid = self._find_pid()
        return elapsed

    def _find_pid(self) -> int:
        if self.system == "kernel":
            return 0
        if self.system.startswith("layerfs"):
            from layerfs.fs.mount import list_mounts
            for m in list_mounts(self.ds["root"], clean=False):
                if m.mountpoint == os.path.realpath(self.mp):
                    return m.pid
            return 0
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().split(b"\0")
                except OSError:
                    continue
                if cmd and cmd[0].endswith(b"fuse-overlayfs") and os.fsencode(self.mp) in cmd:
                    return int(pid)
        return 0

    def requests(self) -> dict[str, int]:
        """The FUSE requests the layerfs daemon has served so far, by
        handler (SIGUSR1 makes it log them); {} for the other systems."""
        if self.system != "layerfs" or not self.pid:
            return {}
        from layerfs.store.layout import StoreLayout

        log = StoreLayout(self.ds["root"]).mount_log(os.path.realpath(self.mp))
        start = os.path.getsize(log)
        os.kill(self.pid, signal.SIGUSR1)
        for _ in range(500):
            with open(log) as f:
                f.seek(start)
                for line in f:
                    if " requests {" in line:
                        return json.loads(line[line.index(" requests {") + 10:])
            time.sleep(0.01)
        return {}

    def rss_mb(self) -> tuple[float, float]:
        if not self.pid:
            return (0.0, 0.0)
        vals = {}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("VmRSS", "VmHWM"):
                        vals[k] = int(v.split()[0]) / 1024
        except OSError:  # the daemon is gone (or was another process): no figure
            return (0.0, 0.0)
        return vals.get("VmRSS", 0.0), vals.get("VmHWM", 0.0)

    def umount(self) -> None:
        if self.system.startswith("layerfs"):
            subprocess.run([LAYERFS, "--root", self.ds["root"], "umount", self.mp], check=True)
        else:
            for _ in range(50):
                if subprocess.run(["umount", self.mp], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            if self.pid:
                for _ in range(100):
                    if not os.path.exists(f"/proc/{self.pid}"):
                        break
                    time.sleep(0.02)
        self.pid = 0


def install_layerfs(work: str) -> str:
    """The `layerfs` command as `pip install` gives it to users, for the CLI
    timings: this checkout built into a wheel and installed, not editable
    (a dev install's import finder costs a cold start ~40 ms), into a venv
    of its own under *work* whose dependencies are this venv's (a path in a
    .pth). Made again each run, so it is this checkout's code."""
    import glob
    import sysconfig
    import tempfile

    venv = os.path.join(work, "venv-installed")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", venv], check=True)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        shutil.copytree(os.path.dirname(HERE), src, ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "build", "dist", "*.egg-info", "*.so", "benchmarks", "tests", "docs"))
        subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", tmp, src], check=True)
        [wheel] = glob.glob(os.path.join(tmp, "*.whl"))
        subprocess.run(pip + ["--python", python, "install", "--no-deps", "--force-reinstall", wheel], check=True)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "_layerfs_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return os.path.join(venv, "bin", "layerfs")


def timed(cmd: str) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def api_mount_time(ds: dict, scratch: str, backend: str = "fuse") -> float:
    """layerfs mount through the Python API the runtime uses (no CLI start-up;
    modules imported first, as in the build's and runtime's fork servers)."""
    code = ("import time,sys; from layerfs.fs.mount import mount_image; import layerfs.fs.kernel_mount; "
            "import layerfs.store.store; t=time.perf_counter(); "
            f"mount_image({ds['root']!r}, {ds['image']!r}, {os.path.join(scratch, 'mnt-api')!r}, "
            f"upper_dir={os.path.join(scratch, 'upper-api')!r}, backend={backend!r}); "
            "print(time.perf_counter()-t)")
    shutil.rmtree(os.path.join(scratch, "upper-api"), ignore_errors=True)
    os.makedirs(os.path.join(scratch, "mnt-api"), exist_ok=True)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    subprocess.run([LAYERFS, "--root", ds["root"], "umount", os.path.join(scratch, "mnt-api")], check=True)
    return float(out.split()[-1])


CREATE = ("python3 -c \"import os,sys; d=sys.argv[1]; os.mkdir(d); b=b'x'*4096\n"
          "for i in range(10000):\n  f=open(f'{d}/f{i}','wb'); f.write(b); f.close()\" {dir} && sync")


def run_once(system: str, ds: dict, scratch: str, results: dict, requests: dict) -> None:
    m = Mount(system, ds, scratch)
    r = results.setdefault(system, {})

    counts = requests.setdefault(system, {})
    seen: dict[str, int] = {}

    def rec(key: str, value: float) -> None:
        nonlocal seen
        r.setdefault(key, []).append(value)
        now = m.requests()
        if now:  # what this operation asked of the daemon
            counts.setdefault(key, []).append({k: n - seen.get(k, 0) for k, n in now.items() if n > seen.get(k, 0)})
        seen = now

    def fresh_mount() -> float:
        nonlocal seen
        elapsed = m.mount()
        seen = m.requests()
        return elapsed

    mp = m.mp
    if system == "layerfs":
        # `layerfs mount` is answered by a warm mount server (fs.mountserver)
        # that the first mount starts: time that start too, from none running
        stop_mount_server(ds)
        drop_caches()
        r.setdefault(FIRST_MOUNT, []).append(m.mount())
        m.umount()
    drop_caches()
    r.setdefault("mount", []).append(fresh_mount())
    if MOUNT_ONLY:
        m.umount()
        return
    rec("walk cold", timed(f"find {mp} -printf '%s %m %u %T@\\n' | wc -l"))
    rec("walk warm", timed(f"find {mp} -printf '%s %m %u %T@\\n' | wc -l"))
    m.umount()
    drop_caches()
    fresh_mount()
    rec("tar cold", timed(f"tar cf - -C {mp} . | cat > /dev/null"))
    rec("tar warm", timed(f"tar cf - -C {mp} . | cat > /dev/null"))
    m.umount()
    drop_caches()
    fresh_mount()
    rec("1 GiB read cold", timed(f"cat {mp}/big/one-gib.bin > /dev/null"))
    rec("1 GiB read warm", timed(f"cat {mp}/big/one-gib.bin > /dev/null"))
    m.umount()
    drop_caches()
    fresh_mount()
    io = max(4 << 20, int((64 << 20) * ds["scale"]))
    rec("fio 4k randread", timed(f"fio --name=rr --filename={mp}/big/one-gib.bin --rw=randread --bs=4k "
                                 f"--io_size={io} --ioengine=psync --randrepeat=1 --norandommap "
                                 f"--output=/dev/null"))
    m.umount()
    fresh_mount()
    rec("copy-up 200 MiB + sync", timed(f"printf x >> {mp}/copyup/file200 && sync"))
    rec("create 10k x 4 KiB + sync", timed(CREATE.replace("{dir}", f"{mp}/created")))
    rec("rm -rf 2,000-entry lower dir", timed(f"rm -rf {mp}/rmdir"))
    rss, hwm = m.rss_mb()
    if system in ("fuse-overlayfs", "layerfs"):
        rec("daemon RSS MB (peak)", hwm)
    m.umount()


def stop_mount_server(ds: dict) -> None:
    from layerfs.fs import mountclient

    mountclient.stop_server(ds["root"])


FIRST_MOUNT = "first mount (starts the mount server)"
ORDER = ["mount", FIRST_MOUNT, "walk cold", "walk warm", "tar cold", "tar warm", "1 GiB read cold", "1 GiB read warm",
         "fio 4k randread", "copy-up 200 MiB + sync", "create 10k x 4 KiB + sync", "rm -rf 2,000-entry lower dir"]


def report(results: dict, ds: dict, args, api_times: dict[str, list[float]]) -> str:
    med = {s: {k: statistics.median(v) for k, v in results.get(s, {}).items()} for s in SYSTEMS}
    others = ("fuse-overlayfs", "layerfs", "layerfs-kernel")
    lines = ["| operation | kernel overlayfs (s) | fuse-overlayfs (s) | ratio | layerfs FUSE (s) | ratio "
             "| layerfs kernel backend (s) | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(value: float | None, k: float) -> str:
        if value is None:
            return "- | -"
        return f"{value:.3f} | {value / k:.2f}x" if k else f"{value:.3f} | -"

    for key in ORDER:
        k = med["kernel"].get(key if key != FIRST_MOUNT else "mount")  # a first mount vs the kernel's mount
        if k is None or (key == FIRST_MOUNT and not any(key in med[s] for s in others)):
            continue
        lines.append(f"| {key} | {k:.3f} | " + " | ".join(cell(med[s].get(key), k) for s in others) + " |")
    if api_times:
        api = {b: f"{statistics.median(v):.3f}" if v else "-" for b, v in api_times.items()}
        lines.append(f"| mount via Python API, modules imported | | | | {api.get('fuse', '-')} | | "
                     f"{api.get('kernel', '-')} | |")
    rss_f = med["fuse-overlayfs"].get("daemon RSS MB (peak)", 0)
    rss_l = med["layerfs"].get("daemon RSS MB (peak)", 0)
    lines.append(f"| daemon peak RSS (MB) | - | {rss_f:.0f} | | {rss_l:.0f} | | none | |")
    head = [f"Command: `{' '.join(sys.argv)}`", "",
            f"Tree: {ds['files']} files, {ds['bytes'] / 1e9:.2f} GB in 3 layers (scale {ds['scale']:g}); "
            f"median of {args.repeat} run(s); {os.cpu_count()} CPUs, kernel {platform.release()}, "
            f"{time.strftime('%Y-%m-%d')}.", ""]
    return "\n".join(head + lines) + "\n"


def request_report(counts: dict[str, list[dict[str, int]]]) -> str:
    """FUSE requests the layerfs daemon served per operation: the run with
    the median total, by handler (most frequent first)."""
    if not counts:
        return ""
    lines = ["", "FUSE requests served by the layerfs daemon (run with the median total):", "",
             "| operation | requests | by handler |", "|---|---:|---|"]
    for key in ORDER:
        runs = counts.get(key)
        if not runs:
            continue
        run = sorted(runs, key=lambda c: sum(c.values()))[len(runs) // 2]
        top = ", ".join(f"{k} {n}" for k, n in sorted(run.items(), key=lambda kv: -kv[1])[:6])
        lines.append(f"| {key} | {sum(run.values())} | {top} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/layerfs-bench")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--out", default=os.path.join(HERE, "results-fs.md"))
    ap.add_argument("--mount-only", action="store_true",
                    help="time the mounts only (with --systems kernel,layerfs --repeat 9: the mount figure)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_fs.py needs root (mounts, drop_caches)")
    # An installed package has its bytecode compiled; without it (this
    # machine sets PYTHONDONTWRITEBYTECODE) every `layerfs` command would
    # compile layerfs's modules again and the CLI mount would time that.
    import compileall

    for pkg in ("layerfs", "cli"):
        compileall.compile_dir(os.path.join(os.path.dirname(HERE), pkg), quiet=1)
    global LAYERFS, MOUNT_ONLY
    LAYERFS = install_layerfs(args.work)
    MOUNT_ONLY = args.mount_only
    ds = dataset(args.work, args.scale)
    scratch = os.path.join(args.work, "scratch")
    os.makedirs(scratch, exist_ok=True)
    results: dict = {}
    requests: dict = {}
    api_times: dict[str, list[float]] = {"fuse": [], "kernel": []}
    systems = args.systems.split(",")
    if "layerfs-kernel" in systems:
        # the metadata layer is made once per image and cached: not timed
        # here (benchmarks/bench_metalayer.py times the first mount)
        warm = Mount("layerfs-kernel", ds, scratch)
        warm.mount()
        warm.umount()
    for rep in range(args.repeat):
        for system in systems:
            t = time.monotonic()
            run_once(system, ds, scratch, results, requests)
            print(f"run {rep + 1}/{args.repeat} {system}: {time.monotonic() - t:.0f}s", flush=True)
        if "layerfs" in systems:
            api_times["fuse"].append(api_mount_time(ds, scratch))
        if "layerfs-kernel" in systems:
            api_times["kernel"].append(api_mount_time(ds, scratch, "kernel"))
    if "layerfs" in systems:
        stop_mount_server(ds)  # leave nothing running on the bench's store
    text = report(results, ds, args, api_times) + request_report(requests.get("layerfs", {}))
    print(text)
    with open(args.out, "w") as f:
        f.write("# layerfs filesystem benchmark\n\n" + text)
    with open(os.path.join(scratch, "raw.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
