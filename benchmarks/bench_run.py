"""Container start-to-exit latency of `true`: layerfs vs runc vs the floor, one run.

    .venv/bin/python benchmarks/bench_run.py [--reps 15] [--baseline DIR]

Needs root, /dev/fuse, busybox-static and runc. Makes a fresh store with
`layerfs bootstrap busybox`, then measures wall time from spawn to exit
(medians of --reps, after one warm-up each) of:

* `layerfs run --rm busybox true`: the whole user-visible path (CLI start,
  container record, layerfs FUSE mount with a fresh upper, namespaces,
  cgroups, pivot_root, exec, wait, unmount, removal); and the same with
  `--backend kernel` (kernel overlayfs over the cached metadata layer);
* the same from a warm interpreter (``lifecycle.run_foreground`` on a
  created container), which leaves out the CLI's Python start-up;
* `runc run` of the same image as an OCI bundle made by `layerfs bundle`
  (rootfs = a layerfs mount, mounted once beforehand), for both backends;
* `runc run` of that bundle config on the image extracted to a plain dir;
* `unshare --mount --uts --ipc --net --pid --fork chroot ROOTFS /bin/true`
  on the extracted rootfs: the floor (namespaces, no cgroups, no pivot).

With ``--baseline DIR`` (a directory holding another version's ``layerfs``
and ``layerfs_cli`` packages; results-run.md says how the last one was made)
the CLI row is also measured with ``PYTHONPATH=DIR``, alternating run by run
with the current tree, so that before and after see the same noise on a
shared machine. The load average before and after goes into the report.

Writes a table to stdout and benchmarks/results-run.md, keeping whatever
the file has from the line ``<!-- notes -->`` on (hand-written analysis).
"""

from __future__ import annotations

import argparse
import json
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

from layerfs.runtime import containers as records  # noqa: E402
from layerfs.runtime import lifecycle  # noqa: E402
from layerfs.store.store import Store  # noqa: E402

LAYERFS = os.path.join(os.path.dirname(sys.executable), "layerfs")
KERNEL_CLI = "layerfs run --rm --backend kernel busybox true (CLI)"
RUNC_KERNEL = "runc run, bundle from `layerfs bundle --backend kernel` (kernel rootfs)"
NOTES_MARKER = "<!-- notes -->"


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return elapsed


def measure(name: str, fn, reps: int) -> list[float]:  # type: ignore[no-untyped-def]
    fn()  # warm-up: page cache, imports
    runs = [fn() for _ in range(reps)]
    print(f"{name:60s} median {statistics.median(runs) * 1000:8.1f} ms", flush=True)
    return runs


def measure_interleaved(cases, reps: int) -> list[tuple[str, list[float]]]:  # type: ignore[no-untyped-def]
    """Like :func:`measure` for several cases, alternating them run by run."""
    for _, fn in cases:
        fn()
    runs: list[list[float]] = [[] for _ in cases]
    for _ in range(reps):
        for i, (_, fn) in enumerate(cases):
            runs[i].append(fn())
    for (name, _), r in zip(cases, runs):
        print(f"{name:60s} median {statistics.median(r) * 1000:8.1f} ms", flush=True)
    return [(name, r) for (name, _), r in zip(cases, runs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--output", default=os.path.join(HERE, "results-run.md"))
    parser.add_argument("--baseline", metavar="DIR",
                        help="also time the CLI row with PYTHONPATH=DIR (another version)")
    args = parser.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("runc"):
        raise SystemExit("needs root, /dev/fuse and runc")

    load_before = os.getloadavg()
    work = tempfile.mkdtemp(prefix="bench-run-")
    root = os.path.join(work, "store")
    env = dict(os.environ, LAYERFS_ROOT=root)
    bundle = os.path.join(work, "bundle")
    kbundle = os.path.join(work, "kbundle")
    plain = os.path.join(work, "plain")
    try:
        subprocess.run([LAYERFS, "bootstrap", "busybox"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([LAYERFS, "bundle", "busybox", bundle, "true"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([LAYERFS, "bundle", "--backend", "kernel", "busybox", kbundle, "true"], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        os.makedirs(plain)
        rootfs_dir = os.path.join(plain, "rootfs")
        subprocess.run([LAYERFS, "export", "busybox", "-o", rootfs_dir], env=env, check=True)
        with open(os.path.join(bundle, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        config["root"]["path"] = rootfs_dir
        with open(os.path.join(plain, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle)
        runc_root = os.path.join(work, "runc-state")
        counter = iter(range(1_000_000))

        def runc(bundle_dir: str) -> float:
            return timed(["runc", "--root", runc_root, "run", "--bundle", bundle_dir,
                          f"bench-{os.getpid()}-{next(counter)}"], env)

        def warm_library(backend: str = "fuse") -> float:
            start = time.perf_counter()
            with Store(root) as store:
                c = records.create_container(store, "busybox", cmd=["true"], auto_remove=True,
                                             backend=backend)
            with open(os.devnull, "wb") as null:
                result = lifecycle.run_foreground(root, c.id, stdout=null, stderr=null)
            elapsed = time.perf_counter() - start
            assert result.exit_code == 0, result
            return elapsed

        cli_argv = [LAYERFS, "run", "--rm", "busybox", "true"]
        cli_case = ("layerfs run --rm busybox true (CLI)", lambda: timed(cli_argv, env))
        baseline_env = dict(env, PYTHONPATH=os.path.abspath(args.baseline or "."))
        # The console script imports layerfs_cli.main from sys.path, so
        # PYTHONPATH (searched before the editable install) picks the version.
        baseline_case = (f"layerfs run --rm busybox true (CLI, baseline {args.baseline})",
                         lambda: timed(cli_argv, baseline_env))
        results = []
        if args.baseline:
            results += measure_interleaved([cli_case, baseline_case], args.reps)
        kernel_argv = [LAYERFS, "run", "--rm", "--backend", "kernel", "busybox", "true"]
        cases = [
            (KERNEL_CLI, lambda: timed(kernel_argv, env)),
            ("layerfs run, warm interpreter (library)", warm_library),
            ("layerfs run, warm interpreter (library), kernel backend", lambda: warm_library("kernel")),
            ("runc run, bundle from `layerfs bundle` (FUSE rootfs)", lambda: runc(bundle)),
            (RUNC_KERNEL, lambda: runc(kbundle)),
            ("runc run, same config on the extracted rootfs", lambda: runc(plain)),
            ("unshare + chroot of the extracted rootfs (floor)",
             lambda: timed(["unshare", "--mount", "--uts", "--ipc", "--net", "--pid", "--fork",
                            "chroot", rootfs_dir, "/bin/true"], env)),
            ("python -c 'import layerfs_cli.main' (CLI start-up alone)",
             lambda: timed([sys.executable, "-c", "import layerfs_cli.main"], env)),
        ]
        if not args.baseline:
            results.append((cli_case[0], measure(cli_case[0], cli_case[1], args.reps)))
        results += [(name, measure(name, fn, args.reps)) for name, fn in cases]
    finally:
        for b in (bundle, kbundle):
            subprocess.run([LAYERFS, "umount", os.path.join(b, "rootfs")], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    loads = (load_before, os.getloadavg())
    write_report(args.output, results, args.reps, loads)


def write_report(path: str, results: list[tuple[str, list[float]]], reps: int,
                 loads: tuple[tuple[float, ...], ...] = ()) -> None:
    med = {name: statistics.median(runs) for name, runs in results}
    names = [name for name, _ in results]
    baseline = [n for n in names if "baseline" in n]
    rest = [n for n in names if n not in baseline and n not in (KERNEL_CLI, RUNC_KERNEL) and "kernel" not in n]
    cli, lib, runc_fuse, runc_plain, floor, startup = (med[n] for n in rest)
    kcli, runc_kernel = med[KERNEL_CLI], med[RUNC_KERNEL]
    lines = [
        "# Container start-to-exit latency of `true`",
        "",
        f"vm · {os.cpu_count()} cores · Python {platform.python_version()} · "
        f"medians of {reps} after one warm-up · busybox image from `layerfs bootstrap busybox`"
        + "".join(f" · load average {when} {' '.join(f'{x:.2f}' for x in load)}"
                  for when, load in zip(("before", "after"), loads)),
        "",
        "| path | median | runs (ms) |",
        "|---|---:|---|",
    ]
    for name, runs in results:
        lines.append(f"| {name} | {statistics.median(runs) * 1000:.1f} ms | "
                     + ", ".join(f"{r * 1000:.0f}" for r in runs) + " |")
    lines += [
        "",
        f"Ratios: layerfs CLI / runc (FUSE bundle) = {cli / runc_fuse:.2f}; "
        f"layerfs CLI / floor = {cli / floor:.2f}; "
        f"layerfs library (warm) / runc (FUSE bundle) = {lib / runc_fuse:.2f}; "
        f"runc FUSE rootfs / runc plain rootfs = {runc_fuse / runc_plain:.2f}; "
        f"runc / floor = {runc_plain / floor:.2f}; "
        f"layerfs CLI, kernel backend / runc (kernel-backend bundle) = {kcli / runc_kernel:.2f}.",
        "",
        "The layerfs paths include what runc's rows do not: creating the container record, "
        "mounting the image with the layerfs FUSE daemon (a forked process that imports trio "
        "and pyfuse3) with a fresh upper dir, and unmounting and removing it all at exit; the runc "
        "rows reuse one mount made beforehand. The CLI row also includes the Python start-up of "
        f"`layerfs` itself (about {startup * 1000:.0f} ms, last row).",
    ]
    if baseline:
        lines += ["", f"Baseline: {baseline[0]} = {med[baseline[0]] * 1000:.1f} ms, measured "
                  f"alternating with the current CLI row; current / baseline = "
                  f"{cli / med[baseline[0]]:.2f}."]
    print("\n".join(lines))
    try:
        with open(path, encoding="utf-8") as handle:
            old = handle.read()
    except FileNotFoundError:
        old = ""
    if NOTES_MARKER in old:
        lines += ["", old[old.index(NOTES_MARKER):].rstrip("\n")]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
