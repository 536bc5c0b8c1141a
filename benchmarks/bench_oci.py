"""push/pull against a local docker-registry: layerfs vs skopeo, one run.

    .venv/bin/python benchmarks/bench_oci.py [--size-mb 250] [--reps 3]

Makes a distro-like tree (many small text-ish files, some larger binaries,
symlinks) of about --size-mb, imports it as a one-layer base image plus a
~5% app layer on top, then measures (medians of --reps, each on a fresh
registry / fresh store):

* push of the base image: layerfs (generates tar+gzip from the store) vs
  skopeo copying the same blobs from an OCI layout (no compression work);
* pull: layerfs (into a fresh store: unpack, dedup, commit) vs skopeo
  (into an OCI layout dir: blobs only);
* re-push of the unchanged image: bytes sent (goal 0);
* pull of the app image into a store that already has the base: bytes
  fetched (goal: only the app layer).

Writes a table to stdout and benchmarks/results-oci.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from layerfs import oci  # noqa: E402
from layerfs.store import images as img  # noqa: E402
from layerfs.store import transfer  # noqa: E402
from layerfs.store.store import Store  # noqa: E402
from tests.oci.conftest import Registry  # noqa: E402

WORDS = ("lib", "usr", "share", "config", "package", "debian", "version", "install", "the", "and",
         "for", "static", "const", "return", "include", "define", "error", "while", "struct", "int")


def make_tree(root: str, size: int, seed: int = 1) -> int:
    rnd = random.Random(seed)
    total = n = 0
    dirs = [f"usr/share/doc/pkg{i}" for i in range(300)] + [f"usr/lib/x86_64-linux-gnu/m{i}" for i in range(60)] + \
        ["usr/bin", "usr/sbin", "etc", "var/lib/dpkg/info", "usr/share/locale/de/LC_MESSAGES"]
    for d in dirs:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    while total < size:
        d = rnd.choice(dirs)
        if rnd.random() < 0.85:   # text: docs, scripts, dpkg info (compresses well)
            k = int(rnd.lognormvariate(8, 1.3)) + 10
            text = " ".join(rnd.choice(WORDS) for _ in range(k // 6)).encode()[:k]
            data = text
        else:                     # binaries: half-random, compress ~2x
            k = int(rnd.lognormvariate(11, 1.2)) + 100
            data = bytes(rnd.getrandbits(8) & 0x0F for _ in range(min(k, 64))) * 0 + \
                rnd.randbytes(k // 2) + bytes(k - k // 2)
        p = os.path.join(root, d, f"f{n}")
        with open(p, "wb") as f:
            f.write(data)
        if rnd.random() < 0.05:
            os.symlink(f"f{n}", os.path.join(root, d, f"l{n}"))
        total += len(data)
        n += 1
    return n


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return ""


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=250)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results-oci.md"))
    args = ap.parse_args()
    if not shutil.which("skopeo") or not shutil.which("docker-registry"):
        raise SystemExit("needs skopeo and docker-registry")
    load_before = _load()
    work = tempfile.mkdtemp(prefix="bench-oci-")
    rows: dict[str, list[float]] = {}
    facts: dict[str, str] = {}
    try:
        tree = os.path.join(work, "tree")
        nfiles = make_tree(tree, args.size_mb << 20)
        app_tree = os.path.join(work, "app")
        make_tree(app_tree, (args.size_mb << 20) // 20, seed=2)
        store = Store(os.path.join(work, "store"))
        t_import, base_lid = timed(lambda: transfer.import_layer(store, tree))
        base = store.put_image(img.new_config([base_lid], {"Cmd": ["/bin/sh"]}, created="2024-01-01T00:00:00Z"))
        store.tag(base.id, "bench/base:1")
        app_lid = transfer.import_layer(store, app_tree, as_layer=True)
        app = store.put_image(img.with_layer(base.config, app_lid, img.history_entry("COPY app", created="2024-01-02T00:00:00Z")))
        store.tag(app.id, "bench/app:1")
        layout = os.path.join(work, "layout")
        oci.copy("layerfs:bench/base:1", f"oci:{layout}:1", oci.context(store))
        darchive = os.path.join(work, "base-docker.tar")
        oci.save(store, ["bench/base:1"], darchive, fmt="docker")   # uncompressed layer tars
        blob_mb = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(layout) for f in fs) / 1e6
        facts["tree"] = f"{nfiles} files, {args.size_mb} MiB logical; base layer blob {blob_mb:.0f} MB gzip"
        for rep in range(args.reps):
            reg = Registry(os.path.join(work, f"reg{rep}"))
            try:
                h = reg.host
                # cold generation cache only for rep 0; the digest cache does not skip generation
                # when the registry lacks the blob, so every rep generates the tar+gzip.
                t, r = timed(lambda: oci.push(store, "bench/base:1", f"{h}/lf/base:1"))
                rows.setdefault("push base: layerfs", []).append(t)
                t, _ = timed(lambda: run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:1",
                                          f"docker://{h}/sk/base:1"]))
                rows.setdefault("push base: skopeo (oci dir -> registry)", []).append(t)
                t, _ = timed(lambda: run(["skopeo", "copy", "-q", "--dest-tls-verify=false",
                                          f"docker-archive:{darchive}", f"docker://{h}/sk2/base:1"]))
                rows.setdefault("push base: skopeo (docker-archive -> registry, gzips)", []).append(t)
                before = reg.blob_bytes()
                t, r2 = timed(lambda: oci.push(store, "bench/base:1", f"{h}/lf/base:1"))
                rows.setdefault("re-push unchanged: layerfs", []).append(t)
                rows.setdefault("re-push unchanged: layerfs bytes sent", []).append(r2.bytes_sent)
                rows.setdefault("re-push unchanged: registry storage growth (bytes)", []).append(reg.blob_bytes() - before)
                t, _ = timed(lambda: run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:1",
                                          f"docker://{h}/sk/base:1"]))
                rows.setdefault("re-push unchanged: skopeo", []).append(t)
                with Store(os.path.join(work, f"pull{rep}")) as s2:
                    t, _ = timed(lambda: oci.pull(s2, f"{h}/lf/base:1"))
                    rows.setdefault("pull base: layerfs (into store)", []).append(t)
                    oci.push(store, "bench/app:1", f"{h}/lf/app:1")
                    t, res = timed(lambda: oci.copy(f"docker://{h}/lf/app:1", "layerfs:", oci.context(s2)))
                    rows.setdefault("pull app, base in store: layerfs", []).append(t)
                    rows.setdefault("pull app, base in store: bytes fetched", []).append(res[0].bytes_sent)
                shutil.rmtree(os.path.join(work, f"pull{rep}"))
                dst = os.path.join(work, f"skpull{rep}")
                t, _ = timed(lambda: run(["skopeo", "copy", "-q", "--src-tls-verify=false",
                                          f"docker://{h}/sk/base:1", f"oci:{dst}:1"]))
                rows.setdefault("pull base: skopeo (into oci dir)", []).append(t)
                shutil.rmtree(dst)
            finally:
                reg.stop()
        app_blob = store.get_ref("oci-layer", f"{app_lid}/gzip")
        import json

        facts["app layer blob"] = f"{json.loads(app_blob[2])['size']} bytes" if app_blob else "?"
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = ["# OCI push/pull benchmark", "",
             f"{platform.node()} · {os.cpu_count()} cores · Python {platform.python_version()} · "
             f"medians of {args.reps} · local docker-registry on 127.0.0.1 (filesystem storage)", ""]
    lines += [f"- {k}: {v}" for k, v in facts.items()] + [""]
    lines += ["| measurement | median | runs |", "|---|---:|---|"]
    for k, vs in rows.items():
        med = statistics.median(vs)
        unit = "" if "bytes" in k else " s"
        fmt = (lambda v: f"{int(v)}") if "bytes" in k else (lambda v: f"{v:.2f}")
        lines.append(f"| {k} | {fmt(med)}{unit} | {', '.join(fmt(v) for v in vs)} |")
    pl, ps = statistics.median(rows["push base: layerfs"]), statistics.median(rows["push base: skopeo (oci dir -> registry)"])
    ql, qs = statistics.median(rows["pull base: layerfs (into store)"]), statistics.median(rows["pull base: skopeo (into oci dir)"])
    pz = statistics.median(rows["push base: skopeo (docker-archive -> registry, gzips)"])
    lines += ["", f"Ratios: push layerfs/skopeo(blobs ready) = {pl / ps:.2f}; "
              f"push layerfs/skopeo(gzips) = {pl / pz:.2f}; pull layerfs/skopeo = {ql / qs:.2f}.", "",
              "skopeo from an OCI dir only moves ready compressed blobs; from a docker-archive it gzips the "
              "layer tars as layerfs must. layerfs push generates the tar from the store and gzips it "
              "(deterministic: fixed level 6, pigz-style fixed 1 MiB pieces on all cores); object reads are "
              "prefetched by threads, and when the blob's digest is already cached (here: from the OCI-layout "
              "copy made before the runs) the upload streams while the blob is generated. layerfs pull "
              "also unpacks into the store (per-file blake3, dedup, zstd for small files, one syncfs) "
              "where skopeo only writes blobs to a directory; download+sha256+gunzip run in one thread, tar "
              "parsing in another, object stores in worker threads.",
              "", f"Command: `.venv/bin/python benchmarks/bench_oci.py --size-mb {args.size_mb} --reps {args.reps}`"
              + (f"; load average before/after: {load_before} / {_load()}" if load_before else "")]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
