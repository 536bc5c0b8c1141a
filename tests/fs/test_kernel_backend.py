"""The kernel backend: metadata layer (EROFS) + objects as a data-only layer.

Every test mounts for real with kernel overlayfs and compares with the
FUSE daemon (the reference) or with plain kernel overlayfs of the
extracted layers; every mount is unmounted again.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess

import pytest

from layerfs.errors import NotFound, Unsupported
from layerfs.fs import kernel, metalayer
from layerfs.fs import mount as fsmount
from layerfs.store import images as img
from layerfs.store import transfer
from layerfs.store.store import Store
from tests.fs.conftest import FUSE_SKIP, layerfs_mount
from tests.treeutil import describe

pytestmark = [pytest.mark.root, pytest.mark.skipif(FUSE_SKIP is not None, reason=FUSE_SKIP or "")]


def _kernel_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "kernel mounts need root"
    s = kernel._probe_now()
    return None if s.usable and s.data_only else f"kernel backend unsupported here: {s.reason}"


KERNEL_SKIP = _kernel_skip_reason() if FUSE_SKIP is None else FUSE_SKIP
needs_kernel = pytest.mark.skipif(KERNEL_SKIP is not None, reason=KERNEL_SKIP or "")


@contextlib.contextmanager
def kmount(root: str, image: str, mp: str, upper: str | None = None, read_only: bool = False,
           container: str | None = None):
    os.makedirs(mp, exist_ok=True)
    handle = fsmount.mount_image(root, image, mp, upper_dir=upper, read_only=read_only, container=container,
                                 backend="kernel")
    try:
        yield handle
    finally:
        try:
            fsmount.unmount(root, mp)
        finally:
            if fsmount.mounted_fstype(mp) is not None:
                subprocess.run(["umount", "-l", mp], capture_output=True)


def _image_of(root: str, dirs: list[str], tag: str, overlay: bool = False) -> str:
    """An image of *dirs* (full trees unless *overlay*: content xattrs kept as they are)."""
    with Store(root) as store:
        lids = [transfer.import_layer(store, d, as_layer=overlay) for d in dirs]
        image = store.put_image(img.new_config(lids))
        store.tag(image.id, tag)
    return tag


# -- the tree ------------------------------------------------------------------
@needs_kernel
def test_kernel_tree_equals_fuse_tree(fs_env, tmp_path):
    with kmount(fs_env["root"], fs_env["image"], str(tmp_path / "k"), read_only=True):
        got = describe(str(tmp_path / "k"))
    with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / "f"), read_only=True):
        want = describe(str(tmp_path / "f"))
    assert got == want
    assert got["b/big"][5] == 2 * (1 << 20) + 1000


@needs_kernel
def test_metadata_layer_is_cached_by_chain_and_reused(fs_env, tmp_path):
    with Store(fs_env["root"]) as store:
        image = store.image(fs_env["image"])
        path = metalayer.ensure_metalayer(store, image)
        again = store.put_image(img.new_config(image.layers, {"Env": ["X=1"]}))
        assert metalayer.ensure_metalayer(store, again) == path
    before = os.stat(path)
    with kmount(fs_env["root"], fs_env["image"], str(tmp_path / "k"), read_only=True):
        pass
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert os.path.basename(path).startswith(image.chain_key + ".")


@needs_kernel
def test_a_damaged_metadata_layer_is_rebuilt_not_trusted(tmp_path):
    root = str(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"content\n")
    image = _image_of(root, [str(src)], "damaged:1")
    with Store(root) as store:
        path = metalayer.ensure_metalayer(store, store.image(image))
    with open(path, "r+b") as f:
        f.seek(1024)
        f.write(b"\0" * 128)                      # the superblock
    with kmount(root, image, str(tmp_path / "k"), read_only=True):
        with open(tmp_path / "k" / "f", "rb") as f:
            assert f.read() == b"content\n"
    with open(path, "rb") as f:
        assert f.read()[1024:1028] == (0xE0F5E1E2).to_bytes(4, "little")


@needs_kernel
def test_compressed_objects_get_raw_copies(fs_env):
    with Store(fs_env["root"]) as store:
        entry = next(e for e in store.merged_tree(store.image(fs_env["image"])).entries.values()
                     if e.path == "b/h")
        metalayer.ensure_metalayer(store, store.image(fs_env["image"]))
        raw = store.objects.raw_path(entry.digest)
        assert os.path.exists(raw + ".zst") and os.path.exists(raw)
        with open(raw, "rb") as f:
            assert f.read() == b"compressible line\n" * 2000
        assert store.objects.verify(entry.digest)


@needs_kernel
def test_gc_drops_the_metadata_layer_with_the_last_image_of_its_chain(tmp_path):
    from layerfs.store import gc

    root = str(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"content\n")
    image = _image_of(root, [str(src)], "gcme:1")
    mp = str(tmp_path / "k")
    with kmount(root, image, mp) as h:
        with Store(root) as store:
            path = metalayer.cache_path(root, store.image(image))
            store.remove_image(image, force=True)     # a mounted image is only untagged
            gc.collect(store)
        assert os.path.exists(path)
        with open(f"{mp}/f", "rb") as f:
            assert f.read() == b"content\n"
        assert h.image_id
    with Store(root) as store:
        store.remove_image(h.image_id)
        gc.collect(store)
        assert not os.path.exists(path)
        assert not any(n.endswith(".erofs") for n in os.listdir(os.path.dirname(path)))
        assert list(store.objects.iter_on_disk()) == []


# -- writes --------------------------------------------------------------------
@needs_kernel
def test_writes_make_an_importable_overlay_upper(fs_env, tmp_path):
    upper = str(tmp_path / "c" / "upper")
    mp = str(tmp_path / "k")
    with kmount(fs_env["root"], fs_env["image"], mp, upper=upper):
        os.chmod(f"{mp}/a/f1", 0o600)            # a metacopy mount would copy up metadata only
        with open(f"{mp}/xf", "ab") as f:
            f.write(b"more\n")
        os.unlink(f"{mp}/top")
        os.mkdir(f"{mp}/newdir")
    assert stat.S_IMODE(os.lstat(f"{upper}/a/f1").st_mode) == 0o600
    with open(f"{upper}/a/f1", "rb") as f:
        assert f.read() == b"one v2\n"           # the data was copied up, not left behind
    assert "trusted.overlay.metacopy" not in os.listxattr(f"{upper}/a/f1")
    st = os.lstat(f"{upper}/top")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    with Store(fs_env["root"]) as store:
        entries = {e.path: e for e in store.scan_dir(upper, overlay=True)[0]}
    assert entries["top"].kind == "whiteout"
    assert entries["xf"].size == len(b"x\nmore\n")
    assert entries["newdir"].kind == "dir" and not entries["newdir"].opaque
    # the FUSE daemon mounts the same upper and sees the same tree
    with kmount(fs_env["root"], fs_env["image"], str(tmp_path / "k2"), upper=upper, read_only=True):
        got = describe(str(tmp_path / "k2"))
    with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / "f"), upper=upper, read_only=True):
        want = describe(str(tmp_path / "f"))
    assert got == want


@needs_kernel
@pytest.mark.parametrize("writer", ["kernel", "fuse"])
def test_overlay_xattr_set_through_the_mount_is_content(fs_env, tmp_path, writer):
    """A user's trusted.overlay.* xattr is content on both backends: kept
    escaped in the upper (overlayfs's format), shown unescaped by both,
    read back unescaped by the scanner."""
    upper = str(tmp_path / "c" / "upper")
    mp = str(tmp_path / "w")
    with layerfs_mount(fs_env["root"], fs_env["image"], mp, upper=upper, backend=writer):
        os.mkdir(f"{mp}/newdir")
        os.setxattr(f"{mp}/newdir", "trusted.overlay.opaque", b"y")
        os.setxattr(f"{mp}/xf", "trusted.overlay.redirect", b"/a")
        assert os.getxattr(f"{mp}/newdir", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(f"{upper}/newdir", "trusted.overlay.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(f"{upper}/newdir")
    for reader in ("kernel", "fuse"):
        with layerfs_mount(fs_env["root"], fs_env["image"], str(tmp_path / reader), upper=upper,
                           read_only=True, backend=reader):
            assert os.getxattr(tmp_path / reader / "newdir", "trusted.overlay.opaque") == b"y"
            assert os.getxattr(tmp_path / reader / "xf", "trusted.overlay.redirect") == b"/a"
    with Store(fs_env["root"]) as store:
        entries = {e.path: e for e in store.scan_dir(upper, overlay=True)[0]}
    assert not entries["newdir"].opaque
    assert dict(entries["newdir"].xattrs) == {"trusted.overlay.opaque": b"y"}
    assert dict(entries["xf"].xattrs)["trusted.overlay.redirect"] == b"/a"


@needs_kernel
def test_copy_up_keeps_content_overlay_xattrs_escaped(tmp_path):
    """Copying up a directory whose image content has trusted.overlay.opaque
    must not make it opaque: both backends copy the xattr escaped."""
    root = str(tmp_path / "store")
    low, top = tmp_path / "low", tmp_path / "top"
    (low / "d").mkdir(parents=True)
    (low / "d" / "below").write_bytes(b"below\n")
    (top / "d").mkdir(parents=True)
    os.setxattr(top / "d", "trusted.overlay.opaque", b"y")
    image = _image_of(root, [str(low), str(top)], "cu:1")
    for backend in ("kernel", "fuse"):
        upper = str(tmp_path / backend / "upper")
        mp = str(tmp_path / backend / "mnt")
        with layerfs_mount(root, image, mp, upper=upper, backend=backend):
            os.chmod(f"{mp}/d", 0o700)                        # copies d up
        assert os.getxattr(f"{upper}/d", "trusted.overlay.overlay.opaque") == b"y"
        assert "trusted.overlay.opaque" not in os.listxattr(f"{upper}/d")
        for reader in ("kernel", "fuse"):
            rmp = str(tmp_path / backend / f"r-{reader}")
            with layerfs_mount(root, image, rmp, upper=upper, read_only=True, backend=reader):
                assert sorted(os.listdir(f"{rmp}/d")) == ["below"]
                assert os.getxattr(f"{rmp}/d", "trusted.overlay.opaque") == b"y"


@needs_kernel
def test_private_upper_is_removed_at_unmount(fs_env, tmp_path):
    mp = str(tmp_path / "k")
    with kmount(fs_env["root"], fs_env["image"], mp) as h:
        with open(f"{mp}/scratch", "w") as f:
            f.write("x")
        assert h.upper.startswith(os.path.join(fs_env["root"], "uppers"))
        assert fsmount.mounted_fstype(mp) == "overlay"
    assert not os.path.exists(os.path.dirname(h.upper))
    assert fsmount.mounted_fstype(mp) is None
    with Store(fs_env["root"]) as store:
        assert store.get_ref(fsmount.REF_KIND, os.path.realpath(mp)) is None


@needs_kernel
def test_the_mount_dies_with_its_owner(fs_env, tmp_path):
    mp = str(tmp_path / "k")
    os.makedirs(mp)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    owner = subprocess.Popen(["sleep", "600"])
    try:
        h = fsmount.mount_image(fs_env["root"], fs_env["image"], mp, owner=owner.pid, owner_scratch=str(scratch),
                                backend="kernel")
        info = {m.mountpoint: m for m in fsmount.list_mounts(fs_env["root"])}[os.path.realpath(mp)]
        assert info.alive and info.pid == h.pid and fsmount.mounted_fstype(mp) == "overlay"
    finally:
        owner.kill()
        owner.wait()
    _wait_gone(h.pid)
    assert fsmount.mounted_fstype(mp) is None
    assert not scratch.exists() and not os.path.exists(os.path.dirname(h.upper))
    with Store(fs_env["root"]) as store:
        assert store.get_ref(fsmount.REF_KIND, os.path.realpath(mp)) is None


@needs_kernel
def test_a_killed_keeper_leaves_a_stale_record_that_is_cleaned(fs_env, tmp_path):
    mp = str(tmp_path / "k")
    os.makedirs(mp)
    h = fsmount.mount_image(fs_env["root"], fs_env["image"], mp, backend="kernel")
    os.kill(h.pid, 9)
    _wait_gone(h.pid)
    assert fsmount.mounted_fstype(mp) == "overlay"
    assert fsmount.list_mounts(fs_env["root"]) == []  # cleans up
    assert fsmount.mounted_fstype(mp) is None
    assert not os.path.exists(os.path.dirname(h.upper))


def _wait_gone(pid: int) -> None:
    import time

    from layerfs import procfs

    for _ in range(500):
        if not procfs.alive(pid, None):
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} is still there")


# -- hostile and bad input -----------------------------------------------------
@needs_kernel
def test_overlay_xattrs_in_image_content_do_not_steer_the_kernel(tmp_path):
    root = str(tmp_path / "store")
    low, top = tmp_path / "low", tmp_path / "top"
    (low / "d").mkdir(parents=True)
    (low / "d" / "hidden").write_bytes(b"still here\n")
    (low / "secret").write_bytes(b"secret\n")
    (top / "d").mkdir(parents=True)
    os.setxattr(top / "d", "trusted.overlay.opaque", b"y")
    (top / "f").write_bytes(b"mine\n")
    os.setxattr(top / "f", "trusted.overlay.redirect", b"/secret")
    os.setxattr(top / "f", "trusted.overlay.metacopy", b"")
    os.setxattr(top / "f", "trusted.overlay.overlay.x", b"nested")
    (top / "w").mkdir()
    os.setxattr(top / "w", "trusted.overlay.whiteouts", b"y")
    (top / "w" / "gone").write_bytes(b"")
    os.setxattr(top / "w" / "gone", "trusted.overlay.whiteout", b"y")
    image = _image_of(root, [str(low), str(top)], "hostile:1")
    with kmount(root, image, str(tmp_path / "k"), read_only=True):
        got = describe(str(tmp_path / "k"))
    with layerfs_mount(root, image, str(tmp_path / "fu"), read_only=True):
        want = describe(str(tmp_path / "fu"))
    assert got == want
    with Store(root) as store:
        content = {e.path or ".": tuple(sorted(e.xattrs))
                   for e in store.merged_tree(store.image(image)).entries.values()}
    assert {p: v[8] for p, v in got.items()} == content
    assert got["f"][6] == b"mine\n"
    assert got["d/hidden"][6] == b"still here\n"
    assert "w/gone" in got
    assert dict(got["f"][8])["trusted.overlay.overlay.x"] == b"nested"
    assert dict(got["f"][8])["trusted.overlay.redirect"] == b"/secret"


@needs_kernel
def test_whiteout_device_in_image_content_is_refused(tmp_path):
    root = str(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    os.mknod(src / "wh", stat.S_IFCHR | 0o600, 0)
    image = _image_of(root, [str(src)], "wh:1")
    with pytest.raises(Unsupported, match="0/0 character device at /wh"):
        with kmount(root, image, str(tmp_path / "k"), read_only=True):
            pass
    assert fsmount.mounted_fstype(str(tmp_path / "k")) is None


@needs_kernel
@pytest.mark.damages_store
def test_missing_object_is_an_error_at_mount_time(tmp_path):
    root = str(tmp_path / "store")
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    (src / "dir" / "file").write_bytes(b"lost content\n")
    image = _image_of(root, [str(src)], "lost:1")
    with Store(root) as store:
        e = store.merged_tree(store.image(image)).entries["dir/file"]
        store.objects.remove(e.digest)
    with pytest.raises(NotFound, match=r"object [0-9a-f]{12} of /dir/file is missing"):
        with kmount(root, image, str(tmp_path / "k"), read_only=True):
            pass
    assert fsmount.mounted_fstype(str(tmp_path / "k")) is None


@needs_kernel
def test_upper_on_overlayfs_is_refused_with_the_reason(fs_env, tmp_path):
    mp = str(tmp_path / "k")
    with kmount(fs_env["root"], fs_env["image"], mp):
        with pytest.raises(Unsupported, match="is overlayfs"):
            with kmount(fs_env["root"], fs_env["image"], str(tmp_path / "k2"), upper=f"{mp}/up/upper"):
                pass


@needs_kernel
def test_store_on_a_filesystem_without_trusted_xattrs(tmp_path):
    fsdir = tmp_path / "ramfs"
    fsdir.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(fsdir)], check=True)
    try:
        root = str(fsdir / "store")
        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_bytes(b"on ramfs\n")
        image = _image_of(root, [str(src)], "ram:1")
        with pytest.raises(Unsupported, match=r"\(.*ramfs/store/uppers/\w+\) cannot hold trusted"):
            with kmount(root, image, str(tmp_path / "k")):
                pass
        assert fsmount.mounted_fstype(str(tmp_path / "k")) is None
        assert os.listdir(os.path.join(root, "uppers")) == []
        with kmount(root, image, str(tmp_path / "k"), read_only=True):  # no upper: fine
            with open(tmp_path / "k" / "f", "rb") as f:
                assert f.read() == b"on ramfs\n"
    finally:
        subprocess.run(["umount", str(fsdir)], check=True)


def test_refusal_says_why():
    old = kernel.Support("6.1.0", True, False, False, False, "this kernel cannot mount EROFS from a file")
    with pytest.raises(Unsupported, match="cannot work on kernel 6.1.0: this kernel cannot mount EROFS"):
        kernel.require(old, writable=False)
    ro_only = kernel.Support("6.8.0", True, True, False, True)
    kernel.require(ro_only, writable=False)
    with pytest.raises(Unsupported, match="read-only only.*metacopy"):
        kernel.require(ro_only, writable=True)


def test_a_store_configured_for_the_kernel_backend_stores_objects_raw(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "text").write_bytes(b"compressible line\n" * 2000)
    for name, config in (("zstd", None), ("raw", '{"backend": "kernel"}')):
        root = tmp_path / name
        root.mkdir()
        if config:
            (root / "config.json").write_text(config)
        with Store(str(root)) as store:
            transfer.import_layer(store, str(src))
            files = [n for _d, _s, names in os.walk(store.objects.root) for n in names]
        assert len(files) == 1
        assert files[0].endswith(".zst") == (name == "zstd")


def _tar(path, members: list[tuple[str, bytes | None]]) -> str:
    """A layer tar: (name, data) files, (name/, None) dirs."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime = 1_600_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@needs_kernel
def test_whiteouts_and_opaque_markers_in_odd_places(tmp_path):
    """OCI whiteouts of nothing, opaque markers in new dirs and beside
    files, a whiteout under a path that was a file: both backends show the
    tree the store's flattening made."""
    root = str(tmp_path / "store")
    low = _tar(tmp_path / "low.tar", [("a/", None), ("a/keep", b"k\n"), ("a/sub/", None), ("a/sub/x", b"x\n"),
                                      ("f", b"file\n"), ("d/", None), ("d/y", b"y\n")])
    top = _tar(tmp_path / "top.tar", [(".wh.nothing-here", b""), ("a/.wh..wh..opq", b""), ("a/new", b"n\n"),
                                      ("new/", None), ("new/.wh..wh..opq", b""), ("new/z", b"z\n"),
                                      ("f/.wh.inside", b""), ("d/.wh.y", b""), ("d/.wh.y2", b""),
                                      ("e/.wh.deep", b"")])
    with Store(root) as store:
        lids = [transfer.import_layer(store, t) for t in (low, top)]
        image = store.put_image(img.new_config(lids))
        store.tag(image.id, "odd:1")
    with kmount(root, "odd:1", str(tmp_path / "k"), read_only=True):
        got = describe(str(tmp_path / "k"))
    with layerfs_mount(root, "odd:1", str(tmp_path / "fu"), read_only=True):
        want = describe(str(tmp_path / "fu"))
    assert got == want
    assert "a/keep" not in got and got["a/new"][6] == b"n\n" and "d/y" not in got
    assert not any(".wh." in p for p in got)


@needs_kernel
def test_a_store_on_tmpfs_mounts_its_metadata_layer_through_a_loop_device(tmp_path):
    """EROFS cannot read a file on tmpfs directly: a read-only loop device
    serves it, and goes away with the mount."""
    fsdir = tmp_path / "tmpfs"
    fsdir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(fsdir)], check=True)
    try:
        root = str(fsdir / "store")
        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_bytes(b"on tmpfs\n")
        image = _image_of(root, [str(src)], "tmp:1")
        mp = str(tmp_path / "k")
        with kmount(root, image, mp) as h:
            with open(f"{mp}/f", "rb") as f:
                assert f.read() == b"on tmpfs\n"
            with open(f"{mp}/new", "wb") as f:
                f.write(b"written\n")
            with Store(root) as store:
                meta = metalayer.cache_path(root, store.image(image))
            bound = subprocess.run(["losetup", "-j", meta], capture_output=True, text=True).stdout
            assert "/dev/loop" in bound
            assert h.upper.startswith(root)
        # the kernel lets go of the detached EROFS mount, then of the loop
        # device (autoclear), a moment after the overlay's umount returns
        assert _eventually(lambda: subprocess.run(["losetup", "-j", meta], capture_output=True,
                                                  text=True).stdout == "")
    finally:
        _eventually(lambda: subprocess.run(["umount", str(fsdir)], capture_output=True).returncode == 0)


def _eventually(check, seconds: float = 20.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
