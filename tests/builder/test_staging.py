"""COPY/ADD layers as entries (build/staging.py): hostile archives, devices,
modes, symlink times, destinations through links in the image.

Every hostile archive is generated here; each test ends with a clean fsck.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile

import pytest

from layerfs.builder.context import BuildContextError
from layerfs.builder.executor import BuildOptions, build
from layerfs.errors import InvalidInput, NotFound
from layerfs.store import fsck
from layerfs.store import manifest as mf
from tests.builder.helpers import make_context
from tests.conftest import layerfs_cmd

pytestmark = [pytest.mark.root, pytest.mark.tools("busybox")]


def _build(store, ctx, **kw):
    lines: list[str] = []
    return build(store, BuildOptions(context=ctx, **kw), lines.append), lines


def _clean(store) -> None:
    report = fsck.check(store)
    assert report.clean, report
    assert not os.listdir(store.tmp_dir)


def _add(t: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, *, link: str = "",
         data: bytes = b"", mode: int = 0o644, mtime: int = 1_600_000_000, dev: tuple[int, int] = (0, 0),
         uid: int = 0, gid: int = 0) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, link, mode, mtime
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.devmajor, info.devminor = dev
    info.uid, info.gid = uid, gid
    t.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _poc_tar(path: str, target: str) -> None:
    """The issue's archive: 16 levels of 240-byte dirs and 1-letter links to
    them, a link climbing out of all of them, and ``escape/PWNED`` behind a
    link meant to land in ``target`` on the host."""
    long_dir, letters = "d" * 240, "abcdefghijklmnop"
    deep_link = "/".join(letters) + "/" + "l" * 254
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        prefix = ""
        for letter in letters:
            _add(t, prefix + long_dir, tarfile.DIRTYPE, mode=0o755)
            _add(t, prefix + letter, tarfile.SYMTYPE, link=long_dir)
            prefix += long_dir + "/"
        _add(t, deep_link, tarfile.SYMTYPE, link="../" * 16)
        _add(t, "escape", tarfile.SYMTYPE, link=deep_link + "/" + "../" * 17 + target.lstrip("/"))
        _add(t, "escape/PWNED", data=b"x\n")


def _found_outside(top: str, name: str, store_root: str) -> list[str]:
    hits = []
    for d, dirs, files in os.walk(top):
        if d.startswith(store_root):
            continue
        hits += [os.path.join(d, f) for f in files if f == name]
    return hits


def test_add_poc_archive_touches_nothing_on_the_host(tmp_path, store_root):
    layerfs_cmd("bootstrap", "busybox", "-t", "bb:1", root=store_root, check=True)
    target = tmp_path / "r" / "target"
    target.mkdir(parents=True)
    ctx = make_context(tmp_path, "FROM bb:1\nADD poc.tar /opt/\n")
    _poc_tar(os.path.join(ctx, "poc.tar"), str(target))
    proc = layerfs_cmd("build", "--progress", "plain", "-t", "poc:1", ctx, root=store_root)
    err = proc.stderr.decode()
    assert "Traceback" not in err
    assert os.listdir(target) == []
    assert _found_outside(str(tmp_path), "PWNED", store_root) == []
    from layerfs.store.store import Store

    with Store(store_root) as store:
        if proc.returncode != 0:
            assert len(err.strip().splitlines()) == 1 and err.startswith("Error: "), err
        else:
            tree = store.merged_tree(store.image("poc:1"))
            # The links are links of the image, not followed on the host ...
            assert tree.entries["opt/a"].kind == mf.SYMLINK and tree.entries["opt/a"].target == "d" * 240
            assert tree.entries["opt/escape"].kind == mf.SYMLINK
            # ... and what lies behind them stays under the destination,
            # which is the root the archive is resolved in (Docker's chroot).
            pwned = [p for p in tree.entries if p.endswith("/PWNED")]
            assert pwned == ["opt/" + str(target).lstrip("/") + "/PWNED"]
        _clean(store)


def _wipe_tar(path: str, member: tarfile.TarInfo) -> None:
    with tarfile.open(path, "w") as t:
        t.addfile(member)


@pytest.mark.parametrize("name, kind, expected", [
    ("etc/passwd", tarfile.CHRTYPE, "0/0 character device"),
    ("etc/.wh.passwd", tarfile.REGTYPE, "whiteout"),
    ("etc/.wh..wh..opq", tarfile.REGTYPE, "opaque-directory marker"),
])
def test_add_never_deletes_files_of_the_image(store, base, tmp_path, name, kind, expected):
    ctx = make_context(tmp_path, "FROM busybox:latest\nADD wipe.tar /\n")
    member = tarfile.TarInfo(name)
    member.type = kind
    _wipe_tar(os.path.join(ctx, "wipe.tar"), member)
    with pytest.raises(InvalidInput, match=expected):
        _build(store, ctx, tags=("wiped:1",))
    with pytest.raises(NotFound):
        store.image("wiped:1")
    assert "etc/passwd" in store.merged_tree(base).entries
    _clean(store)


def test_add_device_refusal_is_one_line(tmp_path, store_root):
    layerfs_cmd("bootstrap", "busybox", root=store_root, check=True)
    ctx = make_context(tmp_path, "FROM busybox:latest\nADD wipe.tar /\n")
    member = tarfile.TarInfo("etc/passwd")
    member.type = tarfile.CHRTYPE
    _wipe_tar(os.path.join(ctx, "wipe.tar"), member)
    proc = layerfs_cmd("build", "--progress", "plain", ctx, root=store_root)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "Error: Dockerfile:2: ADD wipe.tar: member 'etc/passwd' is a 0/0 character device, "
        "which overlay filesystems reserve for whiteouts"]
    assert layerfs_cmd("fsck", root=store_root).returncode == 0


def _truncated(path: str) -> None:
    with tarfile.open(path, "w") as t:
        _add(t, "big", data=b"z" * 10_000)
    with open(path, "r+b") as f:
        f.truncate(4096)


def _relinked(path: str) -> None:
    with tarfile.open(path, "w") as t:
        _add(t, "holder", data=b"h")
        _add(t, "link", tarfile.LNKTYPE, link="holder")
        _add(t, "holder", tarfile.SYMTYPE, link="elsewhere")


@pytest.mark.parametrize("make, expected", [
    (_truncated, "ADD bad.tar: tar archive is truncated"),
    (_relinked, "ADD bad.tar: hardlink 'link' names 'holder', which a later member replaced"),
])
def test_broken_archives_are_one_clean_error(store, base, tmp_path, make, expected):
    ctx = make_context(tmp_path, "FROM busybox:latest\nADD bad.tar /x/\n")
    make(os.path.join(ctx, "bad.tar"))
    with pytest.raises(InvalidInput) as info:
        _build(store, ctx)
    assert str(info.value).startswith("Dockerfile:2: " + expected)
    _clean(store)


def test_the_archive_root_member_sets_the_destination(store, base, tmp_path):
    ctx = make_context(tmp_path, "FROM busybox:latest\nADD r.tar /srv/\n")
    with tarfile.open(os.path.join(ctx, "r.tar"), "w") as t:
        _add(t, "./", tarfile.DIRTYPE, mode=0o700, uid=33, gid=33)
        _add(t, "./index.html", data=b"hi")
    result, _ = _build(store, ctx)
    e = store.merged_tree(result.image).entries
    assert (e["srv"].mode, e["srv"].uid) == (0o700, 33)   # as Docker's extraction does
    assert e["srv/index.html"].kind == mf.FILE
    _clean(store)


def test_add_keeps_modes_devices_links_and_times(store, base, tmp_path):
    ctx = make_context(tmp_path, "FROM busybox:latest\nADD t.tar.gz /x/\n")
    with tarfile.open(os.path.join(ctx, "t.tar.gz"), "w:gz") as t:
        _add(t, "sbin/", tarfile.DIRTYPE, mode=0o755)
        _add(t, "sbin/su", data=b"su", mode=0o4755, uid=0, gid=0)
        _add(t, "sbin/wall", data=b"wall", mode=0o2755, gid=5)
        _add(t, "shared", data=b"w", mode=0o666, uid=1000, gid=1000)
        _add(t, "tmp/", tarfile.DIRTYPE, mode=0o1777, mtime=1_500_000_000)
        _add(t, "null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
        _add(t, "fifo", tarfile.FIFOTYPE, mode=0o600)
        _add(t, "link", tarfile.LNKTYPE, link="shared")
        _add(t, "sym", tarfile.SYMTYPE, link="shared", mtime=1_234_567_890)
    result, _ = _build(store, ctx)
    tree = store.merged_tree(result.image)
    e = tree.entries
    assert (e["x/sbin/su"].mode, e["x/sbin/wall"].mode, e["x/shared"].mode) == (0o4755, 0o2755, 0o666)
    assert (e["x/sbin/wall"].gid, e["x/shared"].uid) == (5, 1000)
    assert e["x/tmp"].mode == 0o1777 and e["x/tmp"].mtime_ns == 1_500_000_000 * 10**9
    assert e["x/null"].kind == mf.CHAR and e["x/null"].rdev == os.makedev(1, 3)
    assert e["x/fifo"].kind == mf.FIFO
    assert tree.links.get("x/link") is not None and tree.links["x/link"] == tree.links["x/shared"]
    assert e["x/sym"].kind == mf.SYMLINK and e["x/sym"].mtime_ns == 1_234_567_890 * 10**9
    _clean(store)


def test_add_of_a_file_that_only_looks_compressed_copies_it(store, base, tmp_path):
    import gzip

    ctx = make_context(tmp_path, "FROM busybox:latest\nADD notes.gz /n.gz\n")
    with open(os.path.join(ctx, "notes.gz"), "wb") as f:
        f.write(gzip.compress(b"not a tar\n"))
    result, _ = _build(store, ctx)
    ent = store.merged_tree(result.image).entries["n.gz"]
    assert ent.kind == mf.FILE and gzip.decompress(store.objects.read(ent.digest)) == b"not a tar\n"
    _clean(store)


def _usrmerge_base(store, base, tmp_path) -> None:
    """busybox with /lib -> usr/lib, /lib64 -> /usr/lib and /up -> ../../.."""
    ctx = make_context(tmp_path, "FROM busybox:latest\nADD merge.tar /\n", name="merge")
    with tarfile.open(os.path.join(ctx, "merge.tar"), "w") as t:
        _add(t, "usr/lib/", tarfile.DIRTYPE, mode=0o755)
        _add(t, "usr/lib/libc.so", data=b"libc")
        _add(t, "lib", tarfile.SYMTYPE, link="usr/lib")
        _add(t, "lib64", tarfile.SYMTYPE, link="/usr/lib")
        _add(t, "up", tarfile.SYMTYPE, link="../../..")
    result, _ = _build(store, ctx, tags=("merged:1",))
    assert store.merged_tree(result.image).entries["lib"].kind == mf.SYMLINK


def test_destinations_follow_links_inside_the_image(store, base, tmp_path):
    _usrmerge_base(store, base, tmp_path)
    ctx = make_context(tmp_path, "FROM merged:1\nADD x.tar /lib/\nCOPY f /lib/\nCOPY g /lib64\n"
                                 "COPY h /up/etc/\nADD y.tar /\nWORKDIR /lib/work\nADD x.tar /plain\n",
                       {"f": "f\n", "g": "g\n", "h": "h\n"})
    with tarfile.open(os.path.join(ctx, "x.tar"), "w") as t:
        _add(t, "modules/", tarfile.DIRTYPE, mode=0o755)
        _add(t, "modules/m.ko", data=b"m")
    with tarfile.open(os.path.join(ctx, "y.tar"), "w") as t:
        _add(t, "lib/from-root.so", data=b"r")   # the parent is followed, as Docker does
    result, _ = _build(store, ctx)
    e = store.merged_tree(result.image).entries
    assert e["lib"].kind == mf.SYMLINK and e["lib"].target == "usr/lib"
    assert e["lib64"].kind == mf.SYMLINK
    for path in ("usr/lib/modules/m.ko", "usr/lib/f", "usr/lib/g", "usr/lib/from-root.so", "etc/h"):
        assert e[path].kind == mf.FILE, path
    assert e["usr/lib/work"].kind == mf.DIR
    assert e["plain/modules/m.ko"].kind == mf.FILE   # an archive unpacks into a dest without '/', too
    assert e["usr/lib/libc.so"].kind == mf.FILE    # not hidden under a new /lib dir
    assert result.image.runtime_config["WorkingDir"] == "/lib/work"
    _clean(store)


def test_a_directory_meeting_a_link_to_a_directory_merges_into_it(store, base, tmp_path):
    """A rootfs-style archive or source tree with a real lib/ on a
    usr-merged base keeps /lib a link and fills /usr/lib."""
    _usrmerge_base(store, base, tmp_path)
    ctx = make_context(tmp_path, "FROM merged:1\nADD rootfs.tar /\nCOPY tree/ /\n",
                       {"tree/lib/copied.so": "c"})
    with tarfile.open(os.path.join(ctx, "rootfs.tar"), "w") as t:
        _add(t, "lib/", tarfile.DIRTYPE, mode=0o755)
        _add(t, "lib/added.so", data=b"a")
    result, _ = _build(store, ctx)
    e = store.merged_tree(result.image).entries
    assert e["lib"].kind == mf.SYMLINK
    for path in ("usr/lib/added.so", "usr/lib/copied.so", "usr/lib/libc.so"):
        assert e[path].kind == mf.FILE, path
    _clean(store)


def test_copy_from_an_image_reads_its_tree(store, base, tmp_path):
    """Sources of COPY --from are found in the image, links followed inside
    it (an absolute link is the image's path, not the host's)."""
    _usrmerge_base(store, base, tmp_path)
    ctx = make_context(tmp_path, "FROM busybox:latest\n"
                                 "COPY --from=merged:1 /lib64/libc.so /a\n"
                                 "COPY --from=merged:1 /up/usr/l*/ /b/\n"
                                 "COPY --from=merged:1 --chown=5:6 --exclude=lib/*.so /usr /c/\n"
                                 "COPY --from=merged:1 / /d/\n")
    result, _ = _build(store, ctx)
    e = store.merged_tree(result.image).entries
    libc = store.merged_tree(store.image("merged:1")).entries["usr/lib/libc.so"]
    assert e["a"].kind == mf.FILE and e["a"].digest == libc.digest and e["a"].mtime_ns == libc.mtime_ns
    assert e["b/libc.so"].digest == libc.digest
    assert e["c/lib"].kind == mf.DIR and (e["c/lib"].uid, e["c/lib"].gid) == (5, 6)
    assert "c/lib/libc.so" not in e
    assert e["d/lib64"].kind == mf.SYMLINK and e["d/lib64"].target == "/usr/lib"   # links inside stay links
    assert e["d/bin/busybox"].digest == e["bin/busybox"].digest
    bad = make_context(tmp_path, "FROM busybox:latest\nCOPY --from=merged:1 /nope /x\n", name="bad")
    with pytest.raises(BuildContextError, match="Dockerfile:2: COPY failed: file not found in the source image: /nope"):
        _build(store, bad)
    _clean(store)


def test_copy_onto_a_file_path_is_one_clean_error(store, base, tmp_path):
    ctx = make_context(tmp_path, "FROM busybox:latest\nCOPY f /etc/passwd/x\n", {"f": "f\n"})
    with pytest.raises(InvalidInput, match="/etc/passwd: a file"):
        _build(store, ctx)
    _clean(store)


def _symlink_context(tmp_path, name: str) -> str:
    ctx = make_context(tmp_path, "FROM busybox:latest\nCOPY tree /tree/\nADD l.tar /t/\n",
                       {"tree/file": "f\n"}, name=name)
    os.symlink("file", os.path.join(ctx, "tree", "link"))
    os.utime(os.path.join(ctx, "tree", "link"), ns=(1_000_000_000_000_000_000,) * 2, follow_symlinks=False)
    with tarfile.open(os.path.join(ctx, "l.tar"), "w") as t:
        _add(t, "in-tar", tarfile.SYMTYPE, link="elsewhere", mtime=1_100_000_000)
    return ctx


def test_symlink_times_are_kept_and_builds_reproduce(store, base, tmp_path):
    ctx = _symlink_context(tmp_path, "one")
    first, _ = _build(store, ctx)
    e = store.merged_tree(first.image).entries
    assert e["tree/link"].kind == mf.SYMLINK and e["tree/link"].mtime_ns == 10**18
    assert e["t/in-tar"].mtime_ns == 1_100_000_000 * 10**9
    again, _ = _build(store, ctx, no_cache=True)
    assert again.image.layers == first.image.layers
    # A copy of the context with its times (as a checkout would restore
    # them) gives the same layers too.
    copy = str(tmp_path / "two")
    shutil.copytree(ctx, copy, symlinks=True)
    os.utime(os.path.join(copy, "tree", "link"), ns=(10**18,) * 2, follow_symlinks=False)
    for rel in ("tree", "tree/file"):
        st = os.stat(os.path.join(ctx, rel))
        os.utime(os.path.join(copy, rel), ns=(st.st_atime_ns, st.st_mtime_ns))
    third, _ = _build(store, copy, no_cache=True)
    assert third.image.layers == first.image.layers
    _clean(store)


def test_add_archive_swapped_after_hashing_is_refused(store, base, tmp_path, monkeypatch):
    """The archive unpacked is the one the cache key hashed."""
    from layerfs.builder import staging

    ctx = make_context(tmp_path, "FROM busybox:latest\nADD a.tar /a/\n")
    for name, member in (("a.tar", "mine"), ("other.tar", "theirs")):
        with tarfile.open(os.path.join(ctx, name), "w") as t:
            _add(t, member, data=b"x")
    real = staging.Staging.add_archive

    def swap_then_add(self, path, *args):
        os.replace(os.path.join(ctx, "other.tar"), path)
        return real(self, path, *args)

    monkeypatch.setattr(staging.Staging, "add_archive", swap_then_add)
    with pytest.raises(InvalidInput, match="a.tar changed during the build"):
        _build(store, ctx)
    _clean(store)


def test_chown_names_come_from_the_image(store, base, tmp_path):
    ctx = make_context(tmp_path, "FROM busybox:latest\nCOPY --chown=nobody f /f\nCOPY --chown=123 f /g\n",
                       {"f": "f\n"})
    result, _ = _build(store, ctx)
    e = store.merged_tree(result.image).entries
    assert (e["f"].uid, e["f"].gid) == (65534, 65534) and (e["g"].uid, e["g"].gid) == (123, 123)
    bad = make_context(tmp_path, "FROM busybox:latest\nCOPY --chown=nosuch f /f\n", {"f": "f\n"}, name="bad")
    with pytest.raises(InvalidInput, match="--chown=nosuch: unable to find user nosuch"):
        _build(store, bad)
    _clean(store)


def test_copy_file_swapped_for_a_link_is_refused(store, base, tmp_path, monkeypatch):
    """The bytes stored are the ones the cache key hashed: a source replaced
    by a link to a host file between hashing and storing is refused."""
    from layerfs.builder import staging

    ctx = make_context(tmp_path, "FROM busybox:latest\nCOPY secret.txt /s\n", {"secret.txt": "mine\n"})
    (tmp_path / "host-secret").write_text("host only\n")
    real = staging.Staging.store_contents

    def swap_then_store(self, items):
        path = os.path.join(ctx, "secret.txt")
        os.unlink(path)
        os.symlink(str(tmp_path / "host-secret"), path)
        return real(self, items)

    monkeypatch.setattr(staging.Staging, "store_contents", swap_then_store)
    with pytest.raises(InvalidInput, match="changed during the build"):
        _build(store, ctx)
    assert stat.S_ISLNK(os.lstat(os.path.join(ctx, "secret.txt")).st_mode)
    _clean(store)
