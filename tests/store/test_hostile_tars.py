"""Hostile and extreme tars fed to ``import`` (issue 10, items 4 to 7):
compression bombs stop at a limit, deep trees import, sparse tars import
and stay sparse, names and paths past the kernel's limits are refused at
the door. Every failure is one line on stderr, exit 2, no traceback, and
the store stays fsck-clean. Every input is generated here."""

from __future__ import annotations

import bz2
import io
import lzma
import os
import subprocess
import tarfile
import zlib

import pytest
import zstandard

from layerfs.errors import InvalidInput
from layerfs.store import manifest as mf
from layerfs.store.manifest import Entry
from layerfs.store.streams import UnpackLimits
from layerfs.store.tarlayer import TarReader, decompressed
from tests.conftest import assert_fsck_clean, layerfs_cmd, one_line_error


def _images(root: str) -> bytes:
    return layerfs_cmd("images", "-q", root=root, check=True).stdout


def _header(name: str, size: int, **kw) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = size
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti.tobuf(tarfile.PAX_FORMAT)


def _zero_tar_chunks(size: int, chunk: int = 1 << 20):
    """A tar of one file of *size* zero bytes, as a stream of pieces (never whole in memory)."""
    yield _header("zeros", size)
    for _ in range(size // chunk):
        yield bytes(chunk)
    yield bytes(-size % 512 + 1024)


def _compress(kind: str, pieces) -> bytes:
    c = {"gzip": lambda: zlib.compressobj(9, zlib.DEFLATED, 31),
         "zstd": lambda: zstandard.ZstdCompressor(level=3).compressobj(),
         "bzip2": lambda: bz2.BZ2Compressor(9),
         "xz": lambda: lzma.LZMACompressor()}[kind]()
    return b"".join(c.compress(p) for p in pieces) + c.flush()


# -- item 4: compression bombs ---------------------------------------------------

def test_gzip_bomb_stops_at_the_ratio_limit(tmp_path, monkeypatch):
    root = str(tmp_path / "store")
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(_compress("gzip", _zero_tar_chunks(256 << 20)))
    assert bomb.stat().st_size < 1 << 20       # 256 MiB of zeros in a few hundred KiB
    monkeypatch.setenv("LAYERFS_MAX_RATIO", "50")
    monkeypatch.setenv("LAYERFS_RATIO_FROM", "4M")
    err = one_line_error(layerfs_cmd("import", str(bomb), "-t", "bomb:1", root=root), 2,
                         "more than 50:1", "LAYERFS_MAX_RATIO")
    assert "compression bomb" in err
    assert _images(root) == b""
    assert_fsck_clean(root)
    # Raised past the bomb's ratio, the same archive imports (it is only zeros).
    monkeypatch.setenv("LAYERFS_MAX_RATIO", "0")
    layerfs_cmd("import", str(bomb), "-t", "zeros:1", root=root, check=True)
    assert_fsck_clean(root)


def test_size_limit_stops_a_plain_tar(tmp_path, monkeypatch):
    root = str(tmp_path / "store")
    tar = tmp_path / "big.tar"
    with open(tar, "wb") as f:
        for piece in _zero_tar_chunks(24 << 20):
            f.write(piece)
    monkeypatch.setenv("LAYERFS_MAX_UNPACKED", "8M")
    one_line_error(layerfs_cmd("import", str(tar), "-t", "big:1", root=root), 2,
                   "past 8.0 MiB", "LAYERFS_MAX_UNPACKED")
    assert_fsck_clean(root)


@pytest.mark.parametrize("kind", ["gzip", "zstd", "bzip2", "xz"])
def test_every_compression_is_metered(store, kind):
    data = _compress(kind, _zero_tar_chunks(16 << 20))
    with pytest.raises(InvalidInput, match="more than 10:1"):
        TarReader(store.objects, lambda d: False, limits=UnpackLimits(0, 10, 1 << 20)).read(io.BytesIO(data))
    with pytest.raises(InvalidInput, match="past 4.0 MiB"):
        TarReader(store.objects, lambda d: False, limits=UnpackLimits(4 << 20, 0, 0)).read(io.BytesIO(data))
    entries = TarReader(store.objects, lambda d: False, limits=UnpackLimits(0, 0, 0)).read(io.BytesIO(data))
    assert [e.size for e in entries if e.kind == mf.FILE] == [16 << 20]
    assert decompressed(io.BytesIO(data), UnpackLimits(0, 0, 0)).read(512) == _header("zeros", 16 << 20)


@pytest.mark.parametrize("value", ["lots", "-3"])
def test_bad_limit_setting_is_one_line(tmp_path, monkeypatch, value):
    tar = tmp_path / "x.tar"
    tar.write_bytes(b"".join(_zero_tar_chunks(1000)))
    monkeypatch.setenv("LAYERFS_MAX_UNPACKED", value)
    one_line_error(layerfs_cmd("import", str(tar), "-t", "x:1", root=str(tmp_path / "s")), 2,
                   "LAYERFS_MAX_UNPACKED")


# -- item 5: deep trees -------------------------------------------------------------

# The deepest chain of one-byte names PATH_MAX allows: /d/d/.../d is 2 * 2047
# bytes, and with its NUL one less than PATH_MAX.
DEPTH = 2047


def _deep_tar(path, depth: int, file_at_bottom: bool = True) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        name = ""
        for _ in range(depth):
            name = f"{name}/d" if name else "d"
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            t.addfile(ti)
        if file_at_bottom:
            ti = tarfile.TarInfo(name[:-1] + "f")   # replaces the last dir: still within PATH_MAX
            ti.size = 5
            t.addfile(ti, io.BytesIO(b"deep\n"))


def test_deep_tree_imports_exports_and_can_be_deleted(tmp_path):
    root = str(tmp_path / "store")
    tar = tmp_path / "deep.tar"
    _deep_tar(tar, DEPTH)
    layerfs_cmd("import", str(tar), "-t", "deep:1", root=root, check=True)
    out = tmp_path / "out.tar"
    layerfs_cmd("export", "deep:1", "-o", str(out), root=root, check=True)
    with tarfile.open(out) as t:
        names = t.getnames()
    assert len(names) == DEPTH + 2          # ".", the dirs, the file beside the last one
    assert max(len(n) for n in names) == 2 * DEPTH - 1
    # A whiteout of the top dir removes the whole chain from the merged tree.
    wh = tmp_path / "wh.tar"
    with tarfile.open(wh, "w") as t:
        t.addfile(tarfile.TarInfo(".wh.d"))
    layerfs_cmd("import", str(wh), "--base", "deep:1", "--layer", "-t", "deep:2", root=root, check=True)
    gone = tmp_path / "gone"
    layerfs_cmd("export", "deep:2", "-o", str(gone), root=root, check=True)
    assert os.listdir(gone) == []
    assert_fsck_clean(root)


# -- item 6: sparse tars ---------------------------------------------------------------

def _sparse_files(d) -> dict[str, bytes]:
    d.mkdir()
    with open(d / "data.img", "wb") as f:
        f.truncate(40 << 20)
        f.seek(3 << 20)
        f.write(b"A" * 5000)
        f.seek(30 << 20)
        f.write(os.urandom(100_000))
    with open(d / "hole.img", "wb") as f:
        f.truncate(1 << 20)
    with open(d / "small.img", "wb") as f:     # held in memory by the reader
        f.truncate(2 << 20)
        f.seek(1 << 20)
        f.write(b"middle")
    return {n: (d / n).read_bytes() for n in ("data.img", "hole.img", "small.img")}


@pytest.mark.parametrize("fmt", [["--format=gnu"], ["--format=pax"], ["--format=pax", "--sparse-version=0.0"],
                                 ["--format=pax", "--sparse-version=0.1"], ["--format=pax", "--sparse-version=1.0"]],
                         ids=["gnu", "pax", "pax-0.0", "pax-0.1", "pax-1.0"])
@pytest.mark.tools("tar")
def test_sparse_tars_import_and_stay_sparse(tmp_path, fmt):
    root = str(tmp_path / "store")
    want = _sparse_files(tmp_path / "src")
    tar = tmp_path / "s.tar"
    subprocess.run(["tar", *fmt, "-S", "-cf", str(tar), "-C", str(tmp_path / "src"), "."], check=True)
    assert tar.stat().st_size < 1 << 20        # tar really wrote a sparse archive
    layerfs_cmd("import", str(tar), "-t", "sp:1", root=root, check=True)
    out = tmp_path / "out"
    layerfs_cmd("export", "sp:1", "-o", str(out), root=root, check=True)
    for name, data in want.items():
        assert (out / name).read_bytes() == data, name
    # Holes stayed holes all the way: in the store and in the export.
    assert os.stat(out / "data.img").st_blocks * 512 < 1 << 20
    assert os.stat(out / "hole.img").st_blocks == 0
    used = sum(os.stat(p).st_blocks * 512 for p in (tmp_path / "store" / "objects").rglob("*") if p.is_file())
    assert used < 1 << 20
    assert_fsck_clean(root)


def _pax_sparse(map_: str, realsize: int, stored: bytes) -> bytes:
    """A PAX 0.1 sparse member, as GNU tar writes them, with any map."""
    ti = tarfile.TarInfo("GNUSparseFile.0/f")
    ti.size = len(stored)
    ti.pax_headers = {"GNU.sparse.map": map_, "GNU.sparse.size": str(realsize), "GNU.sparse.name": "f",
                      "GNU.sparse.numblocks": str(map_.count(",") // 2 + 1)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.addfile(ti, io.BytesIO(stored))
    return buf.getvalue()


@pytest.mark.parametrize("map_,realsize,stored,words", [
    ("0,100,50,100", 1000, b"x" * 200, "overlap"),
    ("0,100", 50, b"x" * 100, "pass the file's end"),
    ("0,4096", 8192, b"x" * 100, "more data than the member holds"),
])
def test_bad_sparse_maps_refused(tmp_path, map_, realsize, stored, words):
    root = str(tmp_path / "store")
    tar = tmp_path / "bad.tar"
    tar.write_bytes(_pax_sparse(map_, realsize, stored))
    one_line_error(layerfs_cmd("import", str(tar), "-t", "bad:1", root=root), 2, "bad sparse map", words)
    assert_fsck_clean(root)


def test_sparse_bomb_holes_count_against_the_limit(tmp_path, monkeypatch):
    """A 1 TiB sparse file of 512 bytes: its holes would be hashed for hours."""
    root = str(tmp_path / "store")
    tar = tmp_path / "holes.tar"
    tar.write_bytes(_pax_sparse("0,512", 1 << 40, b"y" * 512))
    monkeypatch.setenv("LAYERFS_RATIO_FROM", "16M")
    one_line_error(layerfs_cmd("import", str(tar), "-t", "holes:1", root=root), 2, "LAYERFS_MAX_RATIO")
    assert_fsck_clean(root)


# -- item 7: NAME_MAX and PATH_MAX -------------------------------------------------------

def _one_member_tar(path, name: str, kind=tarfile.REGTYPE, linkname: str = "") -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname = kind, linkname
        t.addfile(ti, io.BytesIO(b""))


@pytest.mark.parametrize("name,kind,target,words", [
    ("n" * 256, tarfile.REGTYPE, "", "NAME_MAX"),
    ("n" * 4096, tarfile.REGTYPE, "", "NAME_MAX"),          # the 4,096-byte name
    ("é" * 128, tarfile.REGTYPE, "", "NAME_MAX"),           # 256 bytes in UTF-8
    ("/".join(["p" * 200] * 20) + "/x" * 48, tarfile.REGTYPE, "", "PATH_MAX"),
    ("link", tarfile.SYMTYPE, "t" * 4096, "PATH_MAX"),
])
def test_names_and_paths_past_the_kernel_limits_refused(tmp_path, name, kind, target, words):
    root = str(tmp_path / "store")
    tar = tmp_path / "long.tar"
    _one_member_tar(tar, name, kind, target)
    one_line_error(layerfs_cmd("import", str(tar), "-t", "long:1", root=root), 2, words)
    assert _images(root) == b""
    assert_fsck_clean(root)


def test_names_and_paths_at_the_kernel_limits_work(tmp_path):
    root = str(tmp_path / "store")
    longest_path = "/".join(["p" * 255] * 15) + "/" + "q" * 254  # 4094 bytes: /PATH is 4095
    assert len(longest_path) == 4094
    tar = tmp_path / "ok.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, target in [("n" * 255, tarfile.REGTYPE, ""), (longest_path, tarfile.REGTYPE, ""),
                                   ("link", tarfile.SYMTYPE, "t" * 4095)]:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = kind, target
            t.addfile(ti, io.BytesIO(b""))
    layerfs_cmd("import", str(tar), "-t", "ok:1", root=root, check=True)
    out = tmp_path / "out.tar"
    layerfs_cmd("export", "ok:1", "-o", str(out), root=root, check=True)
    with tarfile.open(out) as t:
        assert {"n" * 255, longest_path, "link"} <= set(t.getnames())
    assert_fsck_clean(root)
    with pytest.raises(InvalidInput, match="PATH_MAX"):
        mf.check_path(longest_path + "q")


def test_deeper_than_path_max_refused_for_tar_and_dir(tmp_path):
    root = str(tmp_path / "store")
    tar = tmp_path / "deep.tar"
    _deep_tar(tar, 3000, file_at_bottom=False)
    one_line_error(layerfs_cmd("import", str(tar), "-t", "deep:1", root=root), 2, "PATH_MAX")
    # The same depth as a directory, made step by step with *at calls.
    src = tmp_path / "src"
    src.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(3000):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    one_line_error(layerfs_cmd("import", str(src), "-t", "deepdir:1", root=root), 2)
    assert _images(root) == b""
    assert_fsck_clean(root)
    subprocess.run(["rm", "-rf", str(src)], check=True)


def test_manifest_validation_applies_the_limits(store):
    with pytest.raises(InvalidInput, match="NAME_MAX"):
        mf.encode([Entry("", mf.DIR, 0o755), Entry("x" * 256, mf.FILE)])
    with pytest.raises(InvalidInput, match="PATH_MAX"):
        mf.encode([Entry("", mf.DIR, 0o755), Entry("s", mf.SYMLINK, target="t" * 4096)])
    assert mf.decode(mf.encode([Entry("", mf.DIR, 0o755), Entry("x" * 255, mf.FILE)]))


@pytest.mark.parametrize("headers", [
    {"GNU.sparse.map": "0,zz", "GNU.sparse.size": "100", "GNU.sparse.name": "f"},      # PAX 0.1
    {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "100",  # PAX 1.0: map in the data
     "GNU.sparse.name": "f"},
    {"size": "-5"},
])
def test_garbled_headers_are_one_line(tmp_path, headers):
    ti = tarfile.TarInfo("GNUSparseFile.0/f")
    ti.size = 512
    ti.pax_headers = headers
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.addfile(ti, io.BytesIO(b"not a number\n" + bytes(499)))
    tar = tmp_path / "garbled.tar"
    tar.write_bytes(buf.getvalue())
    root = str(tmp_path / "store")
    one_line_error(layerfs_cmd("import", str(tar), "-t", "g:1", root=root), 2, "malformed tar")
    assert_fsck_clean(root)
