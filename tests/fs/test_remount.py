"""Remounting an existing upper dir, as a restarted container does.

Regression tests for issue 9 items 1 and 2: a directory that is both in
the upper dir and below must stay one directory after a remount (no
ENOTEMPTY from a phantom copy-up, no metadata replaced by the lower
one's), over any number of remounts of the same upper. At the end the
kernel's overlayfs mounts the same upper over the same layers and must
show the same tree.
"""

from __future__ import annotations

import os
import stat

import pytest

from layerfs.store import transfer
from layerfs.store.store import Store
from tests.fs.conftest import _fix_times, _touch, kernel_overlay, layerfs_mount, make_image, needs_fuse
from tests.treeutil import describe

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.root]

ROUNDS = 10


@pytest.fixture(scope="module")
def usr_env(tmp_path_factory):
    """The issue's image (usr/lib/f, usr/lib/h, usr/share/g) plus one
    untouched directory per remount round."""
    base = tmp_path_factory.mktemp("remount")
    src = str(base / "l")
    _touch(f"{src}/usr/lib/f", b"1\n")
    _touch(f"{src}/usr/share/g", b"2\n")
    _touch(f"{src}/usr/lib/h", b"3\n")
    for i in range(ROUNDS):
        _touch(f"{src}/srv/d{i}/sub/gone", b"gone\n")
        _touch(f"{src}/srv/d{i}/sub/keep", b"keep\n", 0o640, 7, 8)
        _touch(f"{src}/srv/d{i}/sub/moved", b"moved\n")
        _touch(f"{src}/srv/d{i}/sub/linked", b"linked\n")
        os.makedirs(f"{src}/srv/d{i}/sub/empty")
    _fix_times(src)
    root = str(base / "store")
    with Store(root) as store:
        image = make_image(store, [src], "remount:1")
        lower = str(base / "lower")
        transfer.extract_layer(store, image.layers[0], lower)
    return {"root": root, "image": "remount:1", "lower": lower, "base": base}


def _mount(env, tmp_path, upper):
    return layerfs_mount(env["root"], env["image"], str(tmp_path / "m"), upper=upper)


def _changes_in_untouched_dir(m: str, i: int) -> None:
    """Everything the issue lists as failing, in a directory that only
    the lower layer has (its parents are in the upper already)."""
    d = f"{m}/srv/d{i}/sub"
    os.unlink(f"{d}/gone")
    open(f"{d}/new", "w").close()
    os.chmod(f"{d}/keep", 0o600)
    os.rename(f"{d}/moved", f"{d}/moved2")
    os.link(f"{d}/linked", f"{d}/linked2")
    os.symlink("keep", f"{d}/sym")
    os.mkdir(f"{d}/newdir", 0o750)
    os.rmdir(f"{d}/empty")
    os.setxattr(f"{d}/keep", "user.round", b"%d" % i)
    with open(f"{d}/linked", "a") as f:
        f.write("appended\n")


def _check_round(m: str, i: int) -> None:
    d = f"{m}/srv/d{i}/sub"
    assert sorted(os.listdir(d)) == ["keep", "linked", "linked2", "moved2", "new", "newdir", "sym"]
    st = os.lstat(f"{d}/keep")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 7, 8)
    assert os.getxattr(f"{d}/keep", "user.round") == b"%d" % i
    assert open(f"{d}/linked2").read() == "linked\nappended\n"
    assert os.lstat(f"{d}/linked").st_ino == os.lstat(f"{d}/linked2").st_ino
    assert stat.S_IMODE(os.lstat(f"{d}/newdir").st_mode) == 0o750


def test_untouched_dirs_under_an_upper_dir_after_remounts(usr_env, tmp_path):
    upper = str(tmp_path / "u")
    with _mount(usr_env, tmp_path, upper) as h:
        with open(f"{h.mountpoint}/usr/lib/f", "a") as f:
            f.write("x\n")
    # The repro: each of these failed with ENOTEMPTY.
    with _mount(usr_env, tmp_path, upper) as h:
        m = h.mountpoint
        usr_ino = os.lstat(f"{m}/usr").st_ino
        os.unlink(f"{m}/usr/share/g")
        open(f"{m}/usr/share/new", "w").close()
        os.chmod(f"{m}/usr/lib/h", 0o600)
        assert os.lstat(f"{m}/usr").st_ino == usr_ino  # still the one node it was
        assert sorted(os.listdir(f"{m}/usr/share")) == ["new"]
        assert open(f"{m}/usr/lib/f").read() == "1\nx\n"
    for i in range(ROUNDS):
        with _mount(usr_env, tmp_path, upper) as h:
            m = h.mountpoint
            _changes_in_untouched_dir(m, i)
            for j in range(i + 1):
                _check_round(m, j)
            assert stat.S_IMODE(os.lstat(f"{m}/usr/lib/h").st_mode) == 0o600
            got = describe(m)
    with kernel_overlay([usr_env["lower"]], upper, str(tmp_path / "kw"), str(tmp_path / "km")) as km:
        want = describe(km)
    assert got == want


def test_dir_metadata_survives_remounts(usr_env, tmp_path):
    upper = str(tmp_path / "u2")
    with _mount(usr_env, tmp_path, upper) as h:
        os.chmod(f"{h.mountpoint}/usr", 0o700)
        os.chown(f"{h.mountpoint}/srv", 5, 6)
    with _mount(usr_env, tmp_path, upper) as h:
        open(f"{h.mountpoint}/usr/share/new", "w").close()  # the repro
    for i in range(ROUNDS):
        with _mount(usr_env, tmp_path, upper) as h:
            m = h.mountpoint
            st = os.lstat(f"{m}/usr")
            assert stat.S_IMODE(st.st_mode) == 0o700, f"round {i}: usr is {stat.S_IMODE(st.st_mode):o}"
            st = os.lstat(f"{m}/srv")
            assert (st.st_uid, st.st_gid) == (5, 6), f"round {i}"
            open(f"{m}/srv/d{i}/sub/new", "w").close()
            os.mkdir(f"{m}/usr/lib/n{i}")
    st = os.lstat(f"{upper}/usr")
    assert stat.S_IMODE(st.st_mode) == 0o700 and sorted(os.listdir(f"{upper}/usr")) == ["lib", "share"]


def test_copy_up_never_replaces_what_the_upper_has(usr_env, tmp_path):
    """The last line of defence, without FUSE: a node that (wrongly)
    believes it is lower only is copied up over an upper dir that has it.
    The directory there is kept as it is; anything else there is EIO."""
    import errno

    import trio

    from layerfs.fs.index import LowerIndex
    from layerfs.fs.union import Union
    from layerfs.fs.upper import UpperDir

    upper = tmp_path / "u"
    (upper / "usr" / "lib").mkdir(parents=True)
    os.chmod(upper / "usr", 0o700)
    (upper / "usr" / "lib" / "f").write_bytes(b"upper\n")
    with Store(usr_env["root"]) as store:
        index = LowerIndex.from_tree(store.merged_tree(store.image(usr_env["image"])))
        union = Union(index, store.objects, UpperDir(str(upper), str(tmp_path / "u.work"), store.objects))
    usr = union.table.get(index.ino(index.child(0, b"usr")))       # a phantom: made from the index alone
    lib = union.table.get(index.ino(index.child(usr.lower, b"lib")))
    f = union.table.get(index.ino(index.child(lib.lower, b"f")))
    assert not usr.upper and not f.upper
    trio.run(union.copy_up, usr)
    assert usr.upper and stat.S_IMODE(os.lstat(upper / "usr").st_mode) == 0o700
    with pytest.raises(OSError) as exc:
        trio.run(union.copy_up, f)                                   # upper/usr/lib/f is there
    assert exc.value.errno == errno.EIO
    assert (upper / "usr" / "lib" / "f").read_bytes() == b"upper\n"
