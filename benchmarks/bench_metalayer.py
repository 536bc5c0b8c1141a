#!/usr/bin/env python3
"""The kernel backend's metadata layer: EROFS image vs directory tree, and
the disk cost of raw copies of zstd objects.

Run as root on a store with an image (e.g. bench_fs.py's data set, an
import of benchmarks/gen_tree.py's tree, a debootstrap image)::

    .venv/bin/python benchmarks/bench_metalayer.py --root STORE --image REF [--repeat 3]

For the image's merged tree it measures:

* EROFS (what layerfs uses): building the image from the cached merged
  index (``fs.metalayer``: nodes + ``fs.erofs.write_image`` + fsync), its
  size, and a kernel-backend mount with the layer cached (Python API);
* a directory tree of sparse files with the same xattrs, written on the
  store's filesystem and on tmpfs: time and disk use (du);
* raw copies: the bytes of the image's zstd objects, stored and raw, i.e.
  what keeping a raw copy beside each costs, against all its objects.

Prints a markdown table; results go in README with the command.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from layerfs.fs import metalayer  # noqa: E402
from layerfs.fs import mount as fsmount  # noqa: E402
from layerfs.fs.erofs import write_image  # noqa: E402
from layerfs.fs.index import ensure_index_cache, read_index_cache  # noqa: E402
from layerfs.store.store import Store  # noqa: E402


def du(path: str) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", path], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def write_tree(nodes, dest: str) -> None:
    """The same metadata as a directory tree (what composefs avoids)."""
    import stat

    def make(i: int, path: str) -> None:
        n = nodes[i]
        fmt = stat.S_IFMT(n.mode)
        if fmt == stat.S_IFDIR:
            if path != dest:
                os.mkdir(path)
        elif fmt == stat.S_IFREG:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, n.size)
            os.close(fd)
        elif fmt == stat.S_IFLNK:
            os.symlink(n.target, path)
        else:
            os.mknod(path, n.mode, n.rdev)
        for name, value in n.xattrs:
            os.setxattr(path, name, value, follow_symlinks=False)
        os.chown(path, n.uid, n.gid, follow_symlinks=False)
        if fmt != stat.S_IFLNK:
            os.chmod(path, stat.S_IMODE(n.mode))
        for name, child in n.children:
            cpath = os.path.join(path, os.fsdecode(name))
            if child in done:
                os.link(done[child], cpath)
            else:
                done[child] = cpath
                make(child, cpath)
        os.utime(path, ns=(n.mtime_ns, n.mtime_ns), follow_symlinks=False)

    done: dict[int, str] = {}
    make(0, dest)


def raw_copy_cost(store: Store, image) -> tuple[int, int, int, int]:
    """(objects, bytes on disk of all objects, zstd objects, extra bytes their raw copies take)."""
    tree = store.merged_tree(image)
    digests = {e.digest for e in tree.entries.values() if e.kind == "file" and e.size}
    total = extra = nzst = 0
    for d in digests:
        path, compressed = store.objects.locate(d)
        if compressed or os.path.exists(store.objects.zst_path(d)):
            zst = store.objects.zst_path(d)
            total += os.lstat(zst).st_blocks * 512
            nzst += 1
            raw = store.objects.raw_path(d)
            size = next(e.size for e in tree.entries.values() if e.digest == d) if not os.path.exists(raw) \
                else os.lstat(raw).st_blocks * 512
            extra += (size + 4095) // 4096 * 4096
        else:
            total += os.lstat(path).st_blocks * 512
    return len(digests), total, nzst, extra


def drop_raw_copies(store: Store) -> None:
    for sub in os.listdir(store.objects.root):
        d = os.path.join(store.objects.root, sub)
        for name in os.listdir(d):
            if name.endswith(".zst") and os.path.exists(os.path.join(d, name[:-4])):
                os.unlink(os.path.join(d, name[:-4]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="scratch dir on the store's filesystem (default: ROOT/tmp)")
    ap.add_argument("--keep-raw-copies", action="store_true",
                    help="keep raw copies a previous run made (default: remove them first)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_metalayer.py needs root (mounts, trusted.* xattrs)")
    rows = []
    with Store(a.root) as store:
        if not a.keep_raw_copies:
            drop_raw_copies(store)
        image = store.image(a.image)
        objs, obj_bytes, nzst, extra = raw_copy_cost(store, image)
        index = read_index_cache(store.root, image.id, ensure_index_cache(store, image))
        nodes, _files = metalayer.nodes_from_index(index)
        t = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            nodes, _ = metalayer.nodes_from_index(index)
            data = write_image(nodes, b"bench")
            fd, tmp = tempfile.mkstemp(dir=a.tmp or store.tmp_dir)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            t.append(time.perf_counter() - t0)
            os.unlink(tmp)
        rows.append(("EROFS image (layerfs writer), store fs", statistics.median(t), len(data)))
        for label, base in (("directory tree, store fs", a.tmp or store.tmp_dir), ("directory tree, tmpfs", None)):
            t = []
            size = 0
            for _ in range(a.repeat):
                mnt = None
                if base is None:
                    mnt = tempfile.mkdtemp()
                    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", mnt], check=True)
                    base_dir = mnt
                else:
                    base_dir = base
                dest = tempfile.mkdtemp(dir=base_dir)
                try:
                    t0 = time.perf_counter()
                    write_tree(nodes, dest)
                    subprocess.run(["sync", "-f", dest], check=True)
                    t.append(time.perf_counter() - t0)
                    size = du(dest)
                finally:
                    shutil.rmtree(dest)
                    if mnt:
                        subprocess.run(["umount", mnt], check=True)
                        os.rmdir(mnt)
            rows.append((label, statistics.median(t), size))
        # first and cached kernel mounts, through the API the runtime uses
        cache = metalayer.cache_path(store.root, image)
    from layerfs.fs.index import cache_path as index_cache

    mounts, firsts = [], []
    mp = tempfile.mkdtemp()
    try:
        # first mounts: with raw copies to make (unless the store keeps objects
        # raw), then again with all objects raw; the merged index and the
        # metadata layer are built in both, as for a new image
        for i in range(a.repeat + 2):
            if i < 2:
                for path in (cache, index_cache(a.root, image.id)):
                    if os.path.exists(path):
                        os.unlink(path)
            t0 = time.perf_counter()
            fsmount.mount_image(a.root, a.image, mp, read_only=True, backend="kernel")
            dt = time.perf_counter() - t0
            fsmount.unmount(a.root, mp)
            (firsts if i < 2 else mounts).append(dt)
    finally:
        os.rmdir(mp)
    print(f"Command: `{' '.join(sys.argv)}`\n")
    print(f"Image {a.image}: {len(index)} paths, {objs} objects ({obj_bytes / 1e6:.1f} MB on disk), "
          f"{nzst} stored zstd.\n")
    print("| metadata layer | build (s) | disk |")
    print("|---|---:|---:|")
    for label, secs, size in rows:
        print(f"| {label} | {secs:.3f} | {size / 1e6:.1f} MB ({size / len(index):.0f} B/path) |")
    print(f"\nkernel mount, read-only, metadata layer cached: {statistics.median(mounts) * 1000:.1f} ms; "
          f"first mount (builds the index and the layer, makes {nzst} raw copies): {firsts[0]:.3f} s; "
          f"first mount with every object already raw: {firsts[1]:.3f} s")
    print(f"raw copies of the {nzst} zstd objects: +{extra / 1e6:.1f} MB "
          f"({100 * extra / max(obj_bytes, 1):.0f}% of the image's objects on disk)")


if __name__ == "__main__":
    main()
