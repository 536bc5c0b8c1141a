"""dir -> layer -> dir and tar -> layer -> tar keep every bit that matters."""

from __future__ import annotations

import io
import os
import socket
import stat
import subprocess

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerfs.store import images as img
from layerfs.store import transfer
from layerfs.store.tarlayer import write_tar
from tests.treeutil import describe


def _image(store, lid, tag="t:1"):
    im = store.put_image(img.new_config([lid]))
    store.tag(im.id, tag)
    return im


def _roundtrip(store, src, dest):
    lid = transfer.import_layer(store, str(src))
    transfer.export_image(store, _image(store, lid), str(dest))
    return lid


def test_every_file_type_survives(store, tmp_path):
    src = tmp_path / "src"
    (src / "d/sub").mkdir(parents=True)
    (src / "d/file").write_bytes(b"x" * 100_000)
    os.link(src / "d/file", src / "d/hard1")
    os.link(src / "d/file", src / "hard2")
    os.symlink("../outside/../../etc/passwd", src / "d/badlink")
    os.symlink("/absolute/target", src / "abs")
    os.mkfifo(src / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(src / "sock"))
    s.close()
    os.chmod(src / "d/file", 0o4755)
    os.chmod(src / "d/sub", 0o1777)
    os.setxattr(src / "d/file", "user.note", b"\x00\xffbinary")
    with open(src / "sparse", "wb") as f:
        f.seek(50 << 20)
        f.write(b"end")
    (src / "empty").write_bytes(b"")
    (src / "\udcff-bytes-name").write_bytes(b"nonutf8 name")
    if os.geteuid() == 0:
        os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(src / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
        os.chown(src / "d/sub", 1234, 5678)
        os.setxattr(src / "d/hard1", "security.capability",
                    bytes.fromhex("0100000200200000000000000000000000000000"))
        os.setxattr(src / "d", "trusted.foo", b"bar")
    dest = tmp_path / "out"
    _roundtrip(store, src, dest)
    assert describe(str(dest)) == describe(str(src))
    st_sparse = os.stat(dest / "sparse")
    assert st_sparse.st_blocks * 512 < 1 << 20, "holes must survive"


def test_same_tree_twice_same_id_no_bytes(store, tmp_path, busybox_tree):
    lid1 = transfer.import_layer(store, busybox_tree)
    before = _objects_bytes(store)
    lid2 = transfer.import_layer(store, busybox_tree)
    assert lid1 == lid2
    assert _objects_bytes(store) == before
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", busybox_tree, str(copy)], check=True)
    assert transfer.import_layer(store, str(copy)) == lid1, "ids depend on content, not inodes or paths"


def _objects_bytes(store):
    return sum(os.path.getsize(p) for _, p in store.objects.iter_on_disk())


def test_identical_files_stored_once(store, tmp_path):
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / f"lib-{name}.so").write_bytes(os.urandom(1) * 0 + b"same content" * 50_000)
    transfer.import_layer(store, str(tmp_path / "a"))
    transfer.import_layer(store, str(tmp_path / "b"))
    digests = [d for d, _ in store.objects.iter_on_disk()]
    assert len(digests) == 1


def test_tar_round_trip_same_layer_id(store, tmp_path, busybox_tree):
    lid = transfer.import_layer(store, busybox_tree)
    buf = io.BytesIO()
    write_tar(store.layer_entries(lid), buf, store.objects.open)
    tar = tmp_path / "layer.tar"
    tar.write_bytes(buf.getvalue())
    assert transfer.import_layer(store, str(tar)) == lid
    buf2 = io.BytesIO()
    write_tar(store.layer_entries(lid), buf2, store.objects.open)
    assert buf.getvalue() == buf2.getvalue(), "tar output must be deterministic"


def test_gnu_tar_of_a_tree_imports_like_the_tree(store, tmp_path):
    src = tmp_path / "src"
    (src / "a/b").mkdir(parents=True)
    (src / "a/b/f").write_text("hello")
    os.link(src / "a/b/f", src / "a/h")
    os.symlink("b/f", src / "a/l")
    tar = tmp_path / "t.tar.gz"
    subprocess.run(["tar", "--xattrs", "-czf", str(tar), "-C", str(src), "."], check=True)
    dest1, dest2 = tmp_path / "o1", tmp_path / "o2"
    _roundtrip(store, src, dest1)
    lid = transfer.import_layer(store, str(tar))
    transfer.export_image(store, _image(store, lid, "t:2"), str(dest2))
    assert describe(str(dest1)) == describe(str(dest2))


def test_zstd_tar_imports(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("zstd")
    tar = tmp_path / "t.tar.zst"
    subprocess.run(f"tar -cf - -C {src} . | zstd -q -o {tar}", shell=True, check=True)
    lid = transfer.import_layer(store, str(tar))
    assert any(e.path == "f" for e in store.layer_entries(lid))


names = st.sampled_from(["a", "b", "c", "dir", "ü", "x y"])


@st.composite
def trees(draw):
    ops = draw(st.lists(st.tuples(st.lists(names, min_size=1, max_size=3),
                                  st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo"]),
                                  st.binary(max_size=3000), st.integers(0, 0o777)), max_size=12))
    return ops


def _build(root, ops):
    os.makedirs(root)
    files = []
    for parts, kind, data, mode in ops:
        path = os.path.join(root, *parts)
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
            if os.path.lexists(path):
                continue
            if kind == "file":
                with open(path, "wb") as f:
                    f.write(data)
                os.chmod(path, mode | 0o400)
                files.append(path)
            elif kind == "dir":
                os.mkdir(path)
                os.chmod(path, mode | 0o700)
            elif kind == "symlink":
                os.symlink(data.decode("latin-1")[:20] or "t", path)
            elif kind == "hardlink" and files:
                os.link(files[0], path)
            elif kind == "fifo":
                os.mkfifo(path)
        except (OSError, ValueError):
            continue


@given(trees())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_property_dir_layer_dir(tmp_path_factory, ops):
    from layerfs.store.store import Store

    base = tmp_path_factory.mktemp("rt")
    src = str(base / "src")
    _build(src, ops)
    with Store(str(base / "store")) as store:
        dest = base / "out"
        lid = _roundtrip(store, src, dest)
        assert describe(str(dest)) == describe(src)
        assert transfer.import_layer(store, str(dest)) == lid


def test_overlay_xattrs_in_content_stay_content_through_an_overlay_format_dir(store, tmp_path):
    """A layer dir in overlay format keeps an image's own trusted.overlay.*
    xattrs escaped (as overlayfs does), and importing it reads them back."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    os.setxattr(src / "d", "trusted.overlay.opaque", b"y")
    (src / "f").write_bytes(b"f\n")
    os.setxattr(src / "f", "trusted.overlay.redirect", b"/elsewhere")
    lid = transfer.import_layer(store, str(src))          # a full tree: the xattrs are content
    out = str(tmp_path / "layer")
    transfer.extract_layer(store, lid, out)               # overlay format
    assert os.getxattr(f"{out}/d", "trusted.overlay.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(f"{out}/d")
    assert os.getxattr(f"{out}/f", "trusted.overlay.overlay.redirect") == b"/elsewhere"
    assert transfer.import_layer(store, out, as_layer=True) == lid
