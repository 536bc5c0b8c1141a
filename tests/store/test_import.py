"""Layers as differences, overlay-format layers, and hostile tarballs."""

from __future__ import annotations

import io
import os
import stat
import tarfile

import pytest

from layerfs.errors import InvalidInput, NotFound
from layerfs.store import images as img
from layerfs.store import manifest as mf
from layerfs.store import transfer
from tests.conftest import needs_root
from tests.treeutil import describe


def _image(store, lids, tag):
    im = store.put_image(img.new_config(lids))
    store.tag(im.id, tag)
    return im


def test_full_tree_on_base_becomes_a_diff_with_whiteouts(store, tmp_path, busybox_tree):
    base = _image(store, [transfer.import_layer(store, busybox_tree)], "bb:1")
    changed = tmp_path / "changed"
    os.system(f"cp -a {busybox_tree} {changed}")
    (changed / "etc/hostname").write_text("changed\n")
    os.unlink(changed / "bin/ls")
    os.system(f"rm -rf {changed}/var")
    (changed / "newdir").mkdir()
    (changed / "newdir/f").write_text("new")
    lid = transfer.import_layer(store, str(changed), base)
    entries = {e.path: e for e in store.layer_entries(lid)}
    assert entries["bin/ls"].kind == mf.WHITEOUT
    assert entries["var"].kind == mf.WHITEOUT
    assert "var/tmp" not in entries, "only the top of a removed subtree is whited out"
    assert entries["etc/hostname"].kind == mf.FILE
    assert entries["newdir/f"].kind == mf.FILE
    assert "bin/sh" not in entries, "unchanged paths stay out of the layer"
    assert len(entries) < 20
    top = _image(store, base.layers + [lid], "bb:2")
    out = tmp_path / "out"
    transfer.export_image(store, top, str(out))
    assert describe(str(out)) == describe(str(changed))


@needs_root
def test_overlay_upper_dir_as_layer(store, tmp_path, busybox_tree):
    base = _image(store, [transfer.import_layer(store, busybox_tree)], "bb:1")
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    os.mknod(upper / "etc/hostname", stat.S_IFCHR, 0)
    (upper / "var").mkdir()
    os.setxattr(upper / "var", "trusted.overlay.opaque", b"y")
    (upper / "var/only").write_text("x")
    lid = transfer.import_layer(store, str(upper), base, as_layer=True)
    entries = {e.path: e for e in store.layer_entries(lid)}
    assert entries["etc/hostname"].kind == mf.WHITEOUT
    assert entries["var"].opaque and not entries["var"].xattrs
    tree = store.merged_tree(_image(store, base.layers + [lid], "bb:3"))
    assert "etc/hostname" not in tree.entries
    assert sorted(tree.children["var"]) == ["only"]
    # extracting the layer gives the same overlay upper back
    back = tmp_path / "back"
    transfer.extract_layer(store, lid, str(back))
    assert os.stat(back / "etc/hostname").st_rdev == 0
    assert os.getxattr(back / "var", "trusted.overlay.opaque") == b"y"


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name, data=b"x", **kw):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, data


def _write(tmp_path, data, name="bad.tar"):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def _assert_untouched(store, tmp_path):
    assert store.db.all("SELECT id FROM layers") == []
    assert not os.path.exists(tmp_path / "escaped")


@pytest.mark.parametrize("name", ["../escaped", "a/../../escaped", "./../escaped"])
def test_tar_dotdot_rejected(store, tmp_path, name):
    with pytest.raises(InvalidInput, match="escapes"):
        transfer.import_layer(store, _write(tmp_path, _tar([_file(name)])))
    _assert_untouched(store, tmp_path)


def test_tar_absolute_names_stay_inside(store, tmp_path):
    lid = transfer.import_layer(store, _write(tmp_path, _tar([_file("/etc/abs")])))
    assert [e.path for e in store.layer_entries(lid)] == ["", "etc", "etc/abs"]


def test_tar_hardlink_outside_rejected(store, tmp_path):
    link = tarfile.TarInfo("h")
    link.type, link.linkname = tarfile.LNKTYPE, "../../etc/passwd"
    with pytest.raises(InvalidInput):
        transfer.import_layer(store, _write(tmp_path, _tar([(link, None)])))
    link.linkname = "/etc/passwd"
    with pytest.raises(InvalidInput, match="not an earlier file"):
        transfer.import_layer(store, _write(tmp_path, _tar([(link, None)])))
    _assert_untouched(store, tmp_path)


def test_tar_symlink_out_then_file_through_it_is_safe(store, tmp_path):
    """A symlink pointing outside, then a file 'through' it: stored as data,
    and export never writes through the link."""
    sym = tarfile.TarInfo("link")
    sym.type, sym.linkname = tarfile.SYMTYPE, str(tmp_path)
    data = _tar([(sym, None), _file("link/escaped")])
    lid = transfer.import_layer(store, _write(tmp_path, data))
    im = _image(store, [lid], "evil:1")
    transfer.export_image(store, im, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "escaped")
    assert os.path.isdir(tmp_path / "out/link") and not os.path.islink(tmp_path / "out/link")


@needs_root
def test_tar_device_nodes_are_stored_as_entries(store, tmp_path):
    dev = tarfile.TarInfo("dev/sda")
    dev.type, dev.devmajor, dev.devminor = tarfile.BLKTYPE, 8, 0
    lid = transfer.import_layer(store, _write(tmp_path, _tar([(dev, None)])))
    (e,) = [e for e in store.layer_entries(lid) if e.path == "dev/sda"]
    assert e.kind == mf.BLOCK and e.rdev == os.makedev(8, 0)


def test_tar_whiteouts_become_whiteouts(store, tmp_path):
    d = tarfile.TarInfo("etc")
    d.type = tarfile.DIRTYPE
    data = _tar([(d, None), _file("etc/.wh..wh..opq", b""), _file("etc/.wh.passwd", b""), _file("etc/new")])
    entries = {e.path: e for e in store.layer_entries(transfer.import_layer(store, _write(tmp_path, data)))}
    assert entries["etc"].opaque
    assert entries["etc/passwd"].kind == mf.WHITEOUT
    assert ".wh..wh..opq" not in "".join(entries)


def test_truncated_tar_rejected_nothing_committed(store, tmp_path, busybox_tree):
    tar = tmp_path / "full.tar"
    os.system(f"tar -cf {tar} -C {busybox_tree} .")
    data = tar.read_bytes()
    for cut in (100, 700, len(data) // 2, len(data) - 2000):
        with pytest.raises(InvalidInput):
            transfer.import_layer(store, _write(tmp_path, data[:cut], "cut.tar"))
    _assert_untouched(store, tmp_path)


def test_garbage_is_not_a_tar(store, tmp_path):
    p = tmp_path / "garbage"
    p.write_bytes(os.urandom(5000))
    with pytest.raises(InvalidInput):
        transfer.import_layer(store, str(p))
    gz = tmp_path / "bad.tar.gz"
    gz.write_bytes(b"\x1f\x8b" + os.urandom(3000))
    with pytest.raises(InvalidInput):
        transfer.import_layer(store, str(gz))


def test_missing_source(store, tmp_path):
    with pytest.raises(NotFound):
        transfer.import_layer(store, str(tmp_path / "nope"))


def test_import_of_the_store_itself_refused(store):
    with pytest.raises(InvalidInput):
        transfer.import_layer(store, store.root)
