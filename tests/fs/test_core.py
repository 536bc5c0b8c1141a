"""The union core driven in-process, without a FUSE mount (as s3ql's
tests/t3_fs_api.py drives its Operations): operations against
:class:`layerfs.fs.union.Union` over the three-layer test image and an
upper dir, then consistency checks of the inode table (the kernel's
lookup counts as the core keeps them, nothing left after every forget),
the upper dir imported as a layer (what the store makes of it must be
what the core showed) and an fsck of the store.

Root, not /dev/fuse: the upper dir holds trusted.* xattrs and 0/0
character-device whiteouts.
"""

from __future__ import annotations

import collections
import errno
import functools
import os
import stat

import blake3
import pytest
import trio

from layerfs.fs.daemon import prepare_upper
from layerfs.fs.index import LowerIndex
from layerfs.fs.inodes import ROOT, Attr, SetAttr
from layerfs.fs.union import Union
from layerfs.fs.upper import OPAQUE, RENAME_EXCHANGE, RENAME_NOREPLACE, UpperDir, work_dir_for
from layerfs.store import fsck, transfer
from layerfs.store import images as img
from layerfs.store.objects import ObjectStore
from layerfs.store.store import Store
from tests.fs.conftest import T0, build_layers, make_image

pytestmark = [pytest.mark.root]


def in_trio(fn):
    """Run an async test in trio (the core's lock and worker threads need it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return trio.run(functools.partial(fn, *args, **kwargs))

    return wrapper


@pytest.fixture(scope="module")
def image_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("core")
    root = str(base / "store")
    with Store(root) as store:
        image = make_image(store, build_layers(str(base / "src")), "coretest:latest")
    return root, image


class Kernel:
    """What the kernel would hold of one union: its lookup counts.

    Every reply that hands over an entry is counted here as the kernel
    counts it; :meth:`check` compares with the core's own table."""

    def __init__(self, u: Union) -> None:
        self.u = u
        self.held: collections.Counter[int] = collections.Counter()

    def take(self, a: Attr | None) -> Attr | None:
        if a is not None:
            self.held[a.ino] += 1
        return a

    def lookup(self, parent: int, name: bytes) -> Attr | None:
        return self.take(self.u.lookup(parent, name))

    def path(self, path: str) -> Attr | None:
        """Resolve *path* component by component, as a path walk does."""
        a = self.u.attr(ROOT)
        for name in os.fsencode(path).split(b"/") if path else []:
            a = self.lookup(a.ino, name)
            if a is None:
                return None
        return a

    def ino(self, path: str) -> int:
        a = self.path(path)
        assert a is not None, path
        return a.ino

    def listdir(self, ino: int) -> dict[bytes, Attr]:
        fh = self.u.opendir(ino)
        try:
            return self.readdir(fh, 0)[0]
        finally:
            self.u.releasedir(fh)

    def readdir(self, fh: int, start: int, room: int = 1 << 30) -> tuple[dict[bytes, Attr], int]:
        """The entries one readdir hands over, at most *room* (the kernel's
        buffer), "." and ".." left out; and the offset to go on from."""
        out: dict[bytes, Attr] = {}
        next_off = start

        def add(name: bytes, a: Attr, after: int) -> bool:
            nonlocal room, next_off
            if room == 0:
                return False
            room -= 1
            if name not in (b".", b".."):
                self.held[a.ino] += 1  # readdirplus hands each entry over
                out[name] = a
            next_off = after
            return True

        self.u.readdir(fh, start, add)
        return out, next_off

    async def read(self, ino: int) -> bytes:
        fh = (await self.u.open(ino, os.O_RDONLY)).fh
        try:
            out, off = b"", 0
            while chunk := bytes(await self.u.read(fh, off, 1 << 17)):
                out += chunk
                off += len(chunk)
            return out
        finally:
            self.u.release(fh)

    def forget_all(self) -> None:
        for ino, n in self.held.items():
            self.u.forget(ino, n)
        self.held.clear()

    def check(self) -> None:
        """The core counts what the kernel holds; after every forget, it
        holds no node that is unlinked, open, or no longer at its path."""
        assert self.u.table.lookups == dict(self.held)
        self.forget_all()
        u = self.u
        assert u.table.lookups == {}
        assert not u.handles
        for ino, node in list(u.table.nodes.items()):
            assert node.ino == ino
            assert not node.unlinked, f"unlinked inode {ino} outlived its last forget"
            assert node.opens == 0
            for parent, name in node.all_links() if ino != ROOT else ():
                assert u.child(u.node(parent), name) == ino, (ino, parent, name)


def make_union(root: str, image, upper: str) -> Union:
    from layerfs.fs.index import ensure_index_cache, read_index_cache
    from layerfs.store.layout import StoreLayout

    with Store(root) as store:
        index = read_index_cache(root, image.id, ensure_index_cache(store, image))
    prepare_upper(upper, index.meta[0], False)  # what the daemon does before it mounts
    layout = StoreLayout(root)
    objects = ObjectStore(layout.objects, layout.tmp)
    return Union(index, objects, UpperDir(upper, work_dir_for(upper), objects))


@pytest.fixture
def core(image_env, tmp_path):
    root, image = image_env
    upper = str(tmp_path / "upper")
    u = make_union(root, image, upper)
    yield Kernel(u)
    os.close(u.upper.fd)


def _errno(fn, *args) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


async def _aerrno(fn, *args, **kwargs) -> int:
    with pytest.raises(OSError) as exc:
        await fn(*args, **kwargs)
    return exc.value.errno


def view(k: Kernel, ino: int = ROOT, prefix: str = "") -> dict[str, tuple]:
    """path -> what a reader sees, through readdir, getattr, readlink, getxattr."""
    out = {}
    for name, a in sorted(k.listdir(ino).items()):
        path = prefix + os.fsdecode(name)
        xattrs = tuple(sorted((os.fsdecode(n), k.u.getxattr(a.ino, n)) for n in k.u.listxattr(a.ino)))
        extra = k.u.readlink(a.ino) if stat.S_ISLNK(a.mode) else b""
        out[path] = (a.mode, a.uid, a.gid, a.size if not stat.S_ISDIR(a.mode) else 0, a.rdev, xattrs, extra)
        if stat.S_ISDIR(a.mode):
            out.update(view(k, a.ino, path + "/"))
    return out


def tree_view(tree) -> dict[str, tuple]:
    """The same shape, from a store's merged tree."""
    out = {}
    for path, e in tree.entries.items():
        if not path:
            continue
        extra = os.fsencode(e.target) if stat.S_ISLNK(e.st_mode) else b""
        size = e.size if stat.S_ISREG(e.st_mode) else (len(extra) if extra else 0)
        out[path] = (e.st_mode, e.uid, e.gid, size, e.rdev, tuple(sorted(e.xattrs)), extra)
    return out


async def finish(k: Kernel, image_env, upper: str) -> None:
    """The end of every test: the inode table is consistent, the upper dir
    imports as a layer that shows what the core showed, the store is clean."""
    seen = view(k)
    contents = {p: blake3.blake3(await k.read(k.ino(p))).hexdigest()
                for p, v in seen.items() if stat.S_ISREG(v[0])}
    k.check()
    root, image = image_env
    with Store(root) as store:
        with store.writing():
            lid = transfer.import_layer(store, upper, as_layer=True)
            new = store.put_image(img.new_config(image.layers + [lid]))
        tree = store.merged_tree(new)
        assert tree_view(tree) == seen
        assert {p: tree.entries[p].digest for p in contents} == contents
        report = fsck.check(store)
        assert report.clean, report.problems[:5]
    # and a new union over the same upper (a remount) shows the same
    again = Kernel(make_union(root, image, upper))
    assert view(again) == seen
    again.check()
    os.close(again.u.upper.fd)


def upper_path(k: Kernel, rel: str) -> str:
    return os.path.join(os.fsdecode(k.u.upper.root), rel)


# -- tests ------------------------------------------------------------------
@in_trio
async def test_lookup_shows_the_merged_layers(core, image_env):
    k = core
    assert k.path("a/f2") is None          # a whiteout in layer 1
    assert k.path("a/sub/deep") is None    # a whiteout of a dir in layer 2
    assert set(k.listdir(k.ino("d"))) == {b"new"}    # opaque in layer 1
    assert set(k.listdir(k.ino("e"))) == {b"e2"}     # opaque in layer 2
    assert stat.S_ISREG(k.path("c").mode)            # a file over a dir
    assert await k.read(k.ino("a/f1")) == b"one v2\n"
    big = await k.read(k.ino("b/big"))
    assert len(big) == (2 << 20) + 1000 and big[1 << 20:2 << 20] == bytes(1 << 20)
    hl = [k.path(p) for p in ("hl1", "hl2", "a/hl3")]
    assert len({a.ino for a in hl}) == 1 and hl[0].nlink == 3
    assert k.path("a").nlink == 2 + 1      # sub
    assert k.u.readlink(k.ino("link1")) == b"a/f1"
    assert _errno(k.u.lookup, ROOT, b"x" * 256) == errno.ENAMETOOLONG
    assert _errno(k.u.lookup, ROOT, b"..") == errno.ENOENT
    assert _errno(k.u.attr, 10**9) == errno.ESTALE
    assert os.listdir(k.u.upper.root) == []  # reading wrote nothing
    await finish(k, image_env, os.fsdecode(k.u.upper.root))


@in_trio
async def test_create_write_mkdir_symlink_mknod(core, image_env):
    k, u = core, core.u
    d = k.take(await u.mkdir(ROOT, b"newdir", 0o750, 1000, 1001))
    assert stat.S_IMODE(d.mode) == 0o750 and (d.uid, d.gid) == (1000, 1001)
    fh, a = await u.create_file(d.ino, b"f", 0o640, os.O_WRONLY, 0, 0)
    k.take(a)
    assert await u.write(fh, 0, b"hello ") == 6
    assert await u.write(fh, 6, b"world\n") == 6
    u.release(fh)
    assert await k.read(a.ino) == b"hello world\n"
    assert k.path("newdir/f").size == 12
    s = k.take(await u.symlink(ROOT, b"sl", b"newdir/f", 0, 0))
    assert u.readlink(s.ino) == b"newdir/f"
    k.take(await u.mknod(ROOT, b"null2", stat.S_IFCHR | 0o666, os.makedev(1, 3), 0, 0))
    k.take(await u.mknod(ROOT, b"fifo2", stat.S_IFIFO | 0o644, 0, 0, 0))
    # a 0/0 character device would read back as a whiteout
    assert await _aerrno(u.mknod, ROOT, b"wh", stat.S_IFCHR | 0o644, 0, 0, 0) == errno.EPERM
    assert await _aerrno(u.mkdir, ROOT, b"a", 0o755, 0, 0) == errno.EEXIST
    assert await _aerrno(u.mkdir, ROOT, b"n" * 256, 0o755, 0, 0) == errno.ENAMETOOLONG
    assert await _aerrno(u.mkdir, 10**9, b"x", 0o755, 0, 0) == errno.ESTALE
    # a new file in a lower dir copies the dir up, leaving its times alone
    before = k.path("a/sub")
    k.take(await u.mkdir(k.ino("a/sub"), b"nd", 0o755, 0, 0))
    assert os.lstat(upper_path(k, "a/sub")).st_mtime_ns > before.mtime_ns  # the new entry changed it
    assert os.lstat(upper_path(k, "a")).st_mtime_ns == T0 * 10**9
    assert k.path("a/sub").nlink == 2 + 1   # deep is whited out; nd is new
    await finish(k, image_env, os.fsdecode(u.upper.root))


@in_trio
async def test_unlink_and_rmdir_leave_whiteouts(core, image_env):
    k, u = core, core.u
    await u.unlink(k.ino("a"), b"f1", want_dir=False)
    assert k.path("a/f1") is None
    st = os.lstat(upper_path(k, "a/f1"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert await _aerrno(u.unlink, k.ino("a"), b"sub", want_dir=True) == errno.ENOTEMPTY
    assert await _aerrno(u.unlink, k.ino("a"), b"sub", want_dir=False) == errno.EISDIR
    assert await _aerrno(u.unlink, ROOT, b"top", want_dir=True) == errno.ENOTDIR
    assert await _aerrno(u.unlink, ROOT, b"nothere", want_dir=False) == errno.ENOENT
    many = k.ino("many")
    for name in list(k.listdir(many)):
        await u.unlink(many, name, want_dir=False)
    await u.unlink(ROOT, b"many", want_dir=True)
    assert k.path("many") is None and b"many" not in k.listdir(ROOT)
    assert stat.S_ISCHR(os.lstat(upper_path(k, "many")).st_mode)
    # a dir made over the whiteout is opaque: nothing below shows through
    m = k.take(await u.mkdir(ROOT, b"many", 0o755, 0, 0))
    assert k.listdir(m.ino) == {}
    assert os.getxattr(upper_path(k, "many"), OPAQUE) == b"y"
    assert u.listxattr(m.ino) == []       # trusted.overlay.* stays private
    assert _errno(u.getxattr, m.ino, OPAQUE) == errno.ENODATA
    # a file made over the whiteout of a lower file
    fh, a = await u.create_file(k.ino("a"), b"f1", 0o600, os.O_RDWR, 0, 0)
    k.take(a)
    u.release(fh)
    assert await k.read(a.ino) == b""
    # a new name that never was below leaves no whiteout when it goes
    fh, a = await u.create_file(ROOT, b"tmp", 0o600, os.O_RDWR, 0, 0)
    k.take(a)
    u.release(fh)
    await u.unlink(ROOT, b"tmp", want_dir=False)
    assert not os.path.lexists(upper_path(k, "tmp"))
    await finish(k, image_env, os.fsdecode(u.upper.root))


@in_trio
async def test_rename(core, image_env):
    k, u = core, core.u
    a_ino = k.ino("a")
    f = k.path("a/f1")
    await u.rename(a_ino, b"f1", ROOT, b"moved", 0)
    assert k.path("a/f1") is None
    assert k.path("moved").ino == f.ino   # the same inode at its new name
    assert await k.read(f.ino) == b"one v2\n"
    assert stat.S_ISCHR(os.lstat(upper_path(k, "a/f1")).st_mode)
    # a lower directory moves whole and becomes opaque there
    sub = k.path("a/sub")
    await u.rename(a_ino, b"sub", ROOT, b"sub2", 0)
    assert k.path("sub2").ino == sub.ino
    assert set(k.listdir(sub.ino)) == {b"g", b"k"}
    assert await k.read(k.ino("sub2/g")) == b"g\n"
    assert os.getxattr(upper_path(k, "sub2"), OPAQUE) == b"y"
    # over an existing file, RENAME_NOREPLACE, RENAME_EXCHANGE
    await u.rename(ROOT, b"top", ROOT, b"xf", 0)
    assert await k.read(k.ino("xf")) == b"top\n"
    assert await _aerrno(u.rename, ROOT, b"moved", ROOT, b"xf", RENAME_NOREPLACE) == errno.EEXIST
    await u.rename(ROOT, b"moved", ROOT, b"xf", RENAME_EXCHANGE)
    assert await k.read(k.ino("xf")) == b"one v2\n" and await k.read(k.ino("moved")) == b"top\n"
    assert await _aerrno(u.rename, ROOT, b"sub2", ROOT, b"xf", 0) == errno.ENOTDIR
    assert await _aerrno(u.rename, ROOT, b"xf", ROOT, b"d", 0) == errno.EISDIR
    assert await _aerrno(u.rename, ROOT, b"xf", ROOT, b"e", 0) == errno.EISDIR
    assert await _aerrno(u.rename, ROOT, b"sub2", ROOT, b"d", 0) == errno.ENOTEMPTY
    assert await _aerrno(u.rename, ROOT, b"gone", ROOT, b"x", 0) == errno.ENOENT
    await finish(k, image_env, os.fsdecode(u.upper.root))


@in_trio
async def test_setattr_copies_up(core, image_env):
    k, u = core, core.u
    f2 = k.path("e/e2")
    a = await u.setattr(f2.ino, SetAttr(mode=0o600, uid=7, gid=8))
    assert (stat.S_IMODE(a.mode), a.uid, a.gid, a.ino) == (0o600, 7, 8, f2.ino)
    assert await k.read(f2.ino) == b"e2\n"   # content came along
    a = await u.setattr(f2.ino, SetAttr(size=1, atime_ns=5, mtime_ns=6 * 10**9))
    assert (a.size, a.mtime_ns, a.atime_ns) == (1, 6 * 10**9, 5)
    # truncating a lower file to 0 copies it up empty and sets its mtime
    h = k.path("b/h")
    a = await u.setattr(h.ino, SetAttr(size=0))
    assert a.size == 0 and a.mtime_ns > T0 * 10**9
    # chmod of a symlink changes nothing; a chown clears set-uid, as on any Linux filesystem
    link = k.path("link1")
    await u.setattr(link.ino, SetAttr(mode=0o600))
    assert stat.S_IMODE(k.path("link1").mode) == 0o777
    suid = k.path("suid")
    assert suid.mode & stat.S_ISUID
    await u.setattr(suid.ino, SetAttr(uid=5))
    assert stat.S_IMODE(k.path("suid").mode) == 0o755
    assert (await u.setattr(ROOT, SetAttr(mode=0o700))).mode == stat.S_IFDIR | 0o700
    await finish(k, image_env, os.fsdecode(u.upper.root))


@in_trio
async def test_xattrs(core, image_env):
    k, u = core, core.u
    xf = k.ino("xf")
    assert sorted(u.listxattr(xf)) == [b"trusted.t", b"user.k"]
    assert u.getxattr(xf, b"user.k") == b"v"
    await u.setxattr(xf, b"user.new", b"1")
    assert os.getxattr(upper_path(k, "xf"), "user.k") == b"v"   # copied up with its xattrs
    await u.removexattr(xf, b"trusted.t")
    assert sorted(u.listxattr(xf)) == [b"user.k", b"user.new"]
    assert _errno(u.getxattr, xf, b"trusted.t") == errno.ENODATA
    assert await _aerrno(u.removexattr, k.ino("top"), b"user.none") == errno.ENODATA
    assert not os.path.lexists(upper_path(k, "top"))  # a failed removexattr copies nothing up
    # A user's trusted.overlay.* is kept escaped in the upper, as overlayfs
    # 6.7+ does: it reads back as set and never acts as a marker.
    await u.setxattr(xf, OPAQUE, b"y")
    assert u.getxattr(xf, OPAQUE) == b"y"
    assert os.getxattr(upper_path(k, "xf"), "trusted.overlay.overlay.opaque") == b"y"
    with pytest.raises(OSError):
        os.getxattr(upper_path(k, "xf"), OPAQUE)
    assert await _aerrno(u.removexattr, k.ino("a"), OPAQUE) == errno.ENODATA
    await u.setxattr(k.ino("a/sub/g"), b"security.capability", b"\x01\x00\x00\x02" + bytes(16))
    await finish(k, image_env, os.fsdecode(u.upper.root))


@in_trio
async def test_hardlinks(core, image_env):
    k, u = core, core.u
    ino = k.ino("hl1")
    fh = (await u.open(ino, os.O_WRONLY)).fh
    await u.write(fh, 0, b"HARD")
    u.release(fh)
    # the whole group was copied up as one inode
    sts = [os.lstat(upper_path(k, p)) for p in ("hl1", "hl2", "a/hl3")]
    assert len({st.st_ino for st in sts}) == 1 and sts[0].st_nlink == 3
    assert await k.read(k.ino("a/hl3")) == b"HARD\n"
    a = k.take(await u.link(ino, k.ino("d"), b"hl4"))
    assert a.ino == ino and a.nlink == 4
    await u.unlink(ROOT, b"hl2", want_dir=False)
    assert k.path("hl1").nlink == 3
    assert await _aerrno(u.link, k.ino("a"), ROOT, b"dirlink") == errno.EPERM
    assert await _aerrno(u.link, ino, ROOT, b"top") == errno.EEXIST
    # a link made over the whiteout of a lower name
    await u.unlink(ROOT, b"top", want_dir=False)
    k.take(await u.link(ino, ROOT, b"top"))
    assert await k.read(k.ino("top")) == b"HARD\n"
    await finish(k, image_env, os.fsdecode(u.upper.root))


@in_trio
async def test_unlinked_open_file_lives_until_released(core, image_env):
    k, u = core, core.u
    fh, a = await u.create_file(ROOT, b"scratch", 0o644, os.O_RDWR, 0, 0)
    k.take(a)
    await u.write(fh, 0, b"still here")
    await u.unlink(ROOT, b"scratch", want_dir=False)
    assert k.path("scratch") is None
    assert bytes(await u.read(fh, 0, 100)) == b"still here"
    assert u.attr(a.ino).size == 10          # fstat of the open fd
    assert a.ino in u.table.nodes
    u.release(fh)
    k.forget_all()
    assert a.ino not in u.table.nodes        # gone with the last forget and close
    # a lower file opened, then removed: its handle keeps reading the lower content
    g = k.path("a/sub/g")
    fh = (await u.open(g.ino, os.O_RDONLY)).fh
    await u.unlink(k.ino("a/sub"), b"g", want_dir=False)
    assert bytes(await u.read(fh, 0, 10)) == b"g\n"
    u.release(fh)
    await finish(k, image_env, os.fsdecode(u.upper.root))


@in_trio
async def test_readdir_counts_what_it_hands_over(core, image_env):
    k, u = core, core.u
    many = k.ino("many")
    fresh = k.take(await u.mkdir(ROOT, b"fresh", 0o755, 0, 0)).ino
    for i in range(40):
        fh, a = await u.create_file(fresh, b"n%d" % i, 0o644, os.O_WRONLY, 0, 0)
        k.take(a)
        u.release(fh)
    # a lower-only dir (its replies kept with its listing) and one in the upper dir
    for ino, want in ((many, {b"f%d" % i for i in range(60)}), (fresh, {b"n%d" % i for i in range(40)})):
        for rounds in range(2):  # the second time from the kept listing
            fh = u.opendir(ino)
            batch, at = k.readdir(fh, 0, room=7)  # the kernel's buffer is full after 7: the 8th is not counted
            names = list(batch)
            assert len(names) == 5 and at == 7
            assert u.table.lookups == dict(k.held)
            assert k.readdir(fh, at, room=0) == ({}, at)  # no room for one: nothing is counted
            assert u.table.lookups == dict(k.held)
            while True:  # the next readdirs go on where the last stopped
                batch, at = k.readdir(fh, at, room=11)
                if not batch:
                    break
                names += batch
            u.releasedir(fh)
            assert sorted(names) == sorted(want)
            assert u.table.lookups == dict(k.held)
    await finish(k, image_env, os.fsdecode(u.upper.root))


async def _write_child(k: Kernel, u: Union) -> None:
    fh = (await u.open(k.ino("a/f1"), os.O_WRONLY)).fh
    await u.write(fh, 0, b"longer than before\n")
    u.release(fh)


async def _create_child(k: Kernel, u: Union) -> None:
    fh, a = await u.create_file(k.ino("a"), b"new", 0o644, os.O_WRONLY, 0, 0)
    k.take(a)
    u.release(fh)


async def _rmdir_child(k: Kernel, u: Union) -> None:
    sub = k.ino("a/sub")
    for name in k.listdir(sub):
        await u.unlink(sub, name, want_dir=False)
    await u.unlink(k.ino("a"), b"sub", want_dir=True)


# Changes under the lower dir "a" (f1, hl3 -- a hardlink --, sub) or near it
_CHANGES = {
    "create": _create_child,
    "mkdir": lambda k, u: u.mkdir(k.ino("a"), b"nd", 0o755, 0, 0),
    "symlink": lambda k, u: u.symlink(k.ino("a"), b"sl", b"f1", 0, 0),
    "mknod": lambda k, u: u.mknod(k.ino("a"), b"fifo", stat.S_IFIFO | 0o644, 0, 0, 0),
    "link in": lambda k, u: u.link(k.ino("top"), k.ino("a"), b"top2"),
    "unlink": lambda k, u: u.unlink(k.ino("a"), b"hl3", want_dir=False),
    "rmdir": _rmdir_child,
    "rename within": lambda k, u: u.rename(k.ino("a"), b"f1", k.ino("a"), b"f1b", 0),
    "rename out": lambda k, u: u.rename(k.ino("a"), b"hl3", ROOT, b"hl3b", 0),
    "rename in": lambda k, u: u.rename(ROOT, b"top", k.ino("a"), b"top", 0),
    "rename a subdir": lambda k, u: u.rename(k.ino("a"), b"sub", k.ino("a"), b"sub2", 0),
    "rename the dir": lambda k, u: u.rename(ROOT, b"a", ROOT, b"a2", 0),
    "chmod a child": lambda k, u: u.setattr(k.ino("a/hl3"), SetAttr(mode=0o600)),
    "chmod a hardlink elsewhere": lambda k, u: u.setattr(k.ino("hl1"), SetAttr(mode=0o600)),
    "setxattr on a child": lambda k, u: u.setxattr(k.ino("a/sub"), b"user.x", b"1"),
    "write to a child": _write_child,
    "unlink elsewhere": lambda k, u: u.unlink(k.ino("many"), b"f1", want_dir=False),
}


@pytest.mark.parametrize("change", sorted(_CHANGES))
@in_trio
async def test_kept_listings_show_every_change(core, image_env, change):
    """A lower-only dir's listing is kept with its entries' attributes
    once listed; a change to the dir or to any entry (a copy-up) must show
    in the next readdir, and in the rest of a listing already under way."""
    k, u = core, core.u
    view(k)  # every dir listed: the lower ones are kept from now on
    a = k.ino("a")
    fh = u.opendir(a)
    first, at = k.readdir(fh, 0, room=3)
    assert list(first) == [b"f1"]  # (after . and ..)
    entry = await _CHANGES[change](k, u)
    if isinstance(entry, Attr) and not change.startswith("chmod"):  # an entry handed over
        k.take(entry)
    rest = {}
    while True:
        batch, at = k.readdir(fh, at, room=1)
        if not batch:
            break
        rest.update(batch)
    u.releasedir(fh)
    now = k.listdir(a)
    # every entry not read yet that is still there, none read already; one
    # removed since is left out, one made since may be there (POSIX) ...
    made = set(now) - {b"f1", b"hl3", b"sub"}
    assert {b"hl3", b"sub"} & set(now) <= set(rest) <= {b"hl3", b"sub"} | made
    for name, attrs in rest.items():  # but each entry as it is now
        if name in now:
            assert attrs[:12] == now[name][:12], name
    # finish() compares every listing with a fresh union's over the same upper dir
    await finish(k, image_env, os.fsdecode(u.upper.root))


@in_trio
async def test_forget_drops_lower_nodes(core, image_env):
    k, u = core, core.u
    for p in ("a/f1", "a/sub/g", "b/big", "hl2"):
        k.path(p)
    k.forget_all()
    # lower-only nodes hold nothing the index cannot give back
    assert all(n.upper or n.children is not None or n.ino - 1 != n.lower for n in u.table.nodes.values())
    await finish(k, image_env, os.fsdecode(u.upper.root))


def test_index_is_the_core_root(image_env):
    root, image = image_env
    with Store(root) as store:
        index = LowerIndex.from_tree(store.merged_tree(image))
    assert index.ino(0) == ROOT


def test_the_core_does_not_load_pyfuse3():
    """The core is shared by other data paths: only fs.ops may import pyfuse3."""
    import subprocess
    import sys

    core = ("union", "names", "files", "upper", "inodes", "index")
    code = "import sys\n" + "".join(f"import layerfs.fs.{m}\n" for m in core) + \
        "sys.exit('pyfuse3' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
