"""The EROFS writer, read back by the kernel's own EROFS driver.

Images are mounted detached (``kernel.mount_erofs``) and read through
``/proc/self/fd/N``, so nothing appears in the mount namespace.
"""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerfs.errors import InvalidInput, Unsupported
from layerfs.fs import backend, kernel
from layerfs.fs.erofs import BLKSZ, Node, write_image


def _erofs_skip() -> str | None:
    if os.geteuid() != 0:
        return "mounting EROFS needs root"
    s = kernel._probe_now()
    return None if s.erofs_file else f"no file-backed EROFS here: {s.reason}"


EROFS_SKIP = _erofs_skip()
needs_erofs = pytest.mark.skipif(EROFS_SKIP is not None, reason=EROFS_SKIP or "")
DIR, REG, LNK = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFLNK | 0o777


def _read_back(tmp_path, nodes: list[Node]) -> dict:
    image = tmp_path / "img.erofs"
    image.write_bytes(write_image(nodes, b"test-uuid"))
    fd = kernel.mount_erofs(str(image))
    try:
        root = f"/proc/self/fd/{fd}"  # the detached mount's root
        out = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for name in sorted(dirnames + filenames) + ([""] if dirpath == root else []):
                path = os.path.join(dirpath, name) if name else root
                rel = os.path.relpath(path, root) if name else "."
                s = os.stat(path, follow_symlinks=not name)
                xattrs = {n: os.getxattr(path, n, follow_symlinks=not name)
                          for n in os.listxattr(path, follow_symlinks=not name)}
                target = os.readlink(path) if stat.S_ISLNK(s.st_mode) else None
                out[rel] = (s.st_mode, s.st_uid, s.st_gid, s.st_mtime_ns, s.st_size if not stat.S_ISDIR(s.st_mode)
                            else None, s.st_rdev, s.st_nlink, target, xattrs, s.st_ino)
        return out
    finally:
        os.close(fd)


@needs_erofs
def test_every_kind_of_node_reads_back(tmp_path):
    big_x = [(b"trusted.big%d" % i, os.urandom(900)) for i in range(6)]   # record > one block
    nodes = [
        Node(DIR, 0, 0, 1_600_000_000_123_456_789, nlink=3,
             children=[(b"d", 1), (b"f", 2), (b"h", 2), (b"s", 3), (b"long", 4), (b"c", 5), (b"b", 6),
                       (b"p", 7), (b"x", 8)], xattrs=[(b"trusted.overlay.overlay.opaque", b"y")]),
        Node(DIR, 70000, 70001, -5_000_000_000, nlink=2, parent=0),
        Node(REG, 1, 2, 3, size=(1 << 33) + 5, nlink=2,
             xattrs=[(b"security.capability", b"\x01\x00\x00\x02" + bytes(16)), (b"user.k", b"v")]),
        Node(LNK, target=b"f"),
        Node(LNK, target=b"t/" * 2000, xattrs=big_x[:3]),
        Node(stat.S_IFCHR | 0o600, rdev=os.makedev(4095, 1 << 19)),
        Node(stat.S_IFBLK | 0o600, rdev=os.makedev(8, 1)),
        Node(stat.S_IFIFO | 0o644),
        Node(REG, size=0, xattrs=big_x),
    ]
    got = _read_back(tmp_path, nodes)
    assert got["."][3] == 1_600_000_000_123_456_789
    assert got["."][8] == {"trusted.overlay.overlay.opaque": b"y"}
    assert got["d"][1:4] == (70000, 70001, -5_000_000_000)
    assert got["f"][4] == (1 << 33) + 5 and got["f"][6] == 2 and got["f"][9] == got["h"][9]
    assert got["f"][8] == {"security.capability": b"\x01\x00\x00\x02" + bytes(16), "user.k": b"v"}
    assert got["s"][7] == "f" and got["long"][7] == "t/" * 2000
    assert got["long"][8] == {k.decode(): v for k, v in big_x[:3]}
    assert got["x"][8] == {k.decode(): v for k, v in big_x}
    assert got["c"][5] == os.makedev(4095, 1 << 19) and stat.S_ISCHR(got["c"][0])
    assert got["b"][5] == os.makedev(8, 1) and stat.S_ISBLK(got["b"][0])
    assert stat.S_ISFIFO(got["p"][0])
    with open(f"{tmp_path}/img.erofs", "rb") as f:
        assert len(f.read()) % BLKSZ == 0


names = st.binary(min_size=1, max_size=255).filter(lambda b: b"/" not in b and b"\0" not in b
                                                   and b not in (b".", b".."))


@needs_erofs
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(names, st.integers(0, 3)), min_size=0, max_size=400, unique_by=lambda t: t[0]))
def test_directories_of_any_names_and_sizes(tmp_path, entries):
    """Multi-block directories: the kernel finds every name by binary search."""
    nodes = [Node(DIR, nlink=2, children=[])]
    for name, kind in entries:
        nodes[0].children.append((name, len(nodes)))
        if kind == 0:
            nodes.append(Node(DIR, nlink=2, parent=0))
            nodes[0].nlink += 1
        elif kind == 1:
            nodes.append(Node(LNK, target=name))
        else:
            nodes.append(Node(REG, size=kind * 1000, mtime_ns=len(name)))
    image = tmp_path / "img.erofs"
    image.write_bytes(write_image(nodes, b""))
    fd = kernel.mount_erofs(str(image))
    try:
        root = f"/proc/self/fd/{fd}".encode()
        assert sorted(os.listdir(root)) == sorted(n for n, _ in entries)
        for name, kind in entries:
            s = os.lstat(root + b"/" + name)  # a lookup, not a readdir
            assert stat.S_IFMT(s.st_mode) == stat.S_IFMT([DIR, LNK, REG, REG][kind])
    finally:
        os.close(fd)


def test_xattr_namespaces_erofs_cannot_hold_are_refused():
    with pytest.raises(Unsupported, match="namespace"):
        write_image([Node(DIR, nlink=2, xattrs=[(b"btrfs.compression", b"zstd")])], b"")


def test_backend_choice(tmp_path, monkeypatch):
    monkeypatch.delenv(backend.ENV, raising=False)
    root = str(tmp_path)
    assert backend.resolve(root) == "fuse"
    (tmp_path / "config.json").write_text('{"backend": "kernel"}')
    assert backend.resolve(root) == "kernel"
    monkeypatch.setenv(backend.ENV, "fuse")
    assert backend.resolve(root) == "fuse"
    assert backend.resolve(root, "kernel") == "kernel"
    with pytest.raises(InvalidInput, match="--backend: unknown backend 'fast'"):
        backend.resolve(root, "fast")
    monkeypatch.delenv(backend.ENV)
    (tmp_path / "config.json").write_text('{"backend": "zfs"}')
    with pytest.raises(InvalidInput, match="config.json: unknown backend 'zfs'"):
        backend.resolve(root)
