"""A hypothesis state machine over the union core, against a plain directory.

Random sequences of namespace and data operations go to the core
(in-process, no FUSE mount) and to a plain copy of the image's tree (the
model: what any filesystem does); both must answer with the same errno
and show the same tree after every step, the core's lookup counts must
be what its replies handed over, and at the end the upper dir imported as
a layer must give the model's tree back, with a clean fsck.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

import pytest
import trio
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from layerfs.fs.inodes import SetAttr
from layerfs.store import fsck, transfer
from layerfs.store import images as img
from layerfs.store.store import Store
from tests.fs.conftest import build_layers, make_image
from tests.fs.test_core import Kernel, make_union, view

pytestmark = [pytest.mark.root]

NAMES = st.sampled_from(["f1", "sub", "g", "hl1", "n1", "n2", "many", "x"])
DATA = st.binary(max_size=64)


def model_view(top: str) -> dict[str, tuple]:
    """:func:`tests.fs.test_core.view`'s shape, read from a plain directory."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            s = os.lstat(path)
            xattrs = () if stat.S_ISLNK(s.st_mode) else tuple(sorted(
                (n, os.getxattr(path, n, follow_symlinks=False))
                for n in os.listxattr(path, follow_symlinks=False)))
            extra = os.fsencode(os.readlink(path)) if stat.S_ISLNK(s.st_mode) else b""
            out[os.path.relpath(path, top)] = (s.st_mode, s.st_uid, s.st_gid,
                                               0 if stat.S_ISDIR(s.st_mode) else s.st_size,
                                               s.st_rdev, xattrs, extra)
    return out


class UnionVsDirectory(RuleBasedStateMachine):
    env: tuple[str, object] = ("", None)  # (store root, image), set by the test

    def __init__(self) -> None:
        super().__init__()
        self.umask = os.umask(0)  # the daemon runs with umask 0; so does the model here
        self.base = tempfile.mkdtemp(prefix="core-model-")
        root, image = self.env
        self.model = os.path.join(self.base, "model")
        with Store(root) as store:
            transfer.export_image(store, image, self.model)
        self.upper = os.path.join(self.base, "upper")
        self.k = Kernel(make_union(root, image, self.upper))

    # -- choosing paths ---------------------------------------------------
    def _paths(self, want=None) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.model):
            for name in dirnames + filenames:
                p = os.path.relpath(os.path.join(dirpath, name), self.model)
                if want is None or want(os.lstat(os.path.join(self.model, p)).st_mode):
                    out.append(p)
        return sorted(out)

    def _dirs(self) -> list[str]:
        return [""] + self._paths(stat.S_ISDIR)

    def _parent(self, path: str) -> tuple[int, bytes]:
        head, name = os.path.split(path)
        return self.k.ino(head), os.fsencode(name)

    def _both(self, on_model, on_core) -> None:
        """Run one operation on both sides: the same errno, or both succeed."""
        try:
            on_model()
            want = 0
        except OSError as exc:
            want = exc.errno
        try:
            trio.run(on_core)
            got = 0
        except OSError as exc:
            got = exc.errno
        assert got == want, f"core errno {got}, model errno {want}"

    # -- rules ---------------------------------------------------------------
    @rule(data=st.data(), name=NAMES, content=DATA)
    def create(self, data, name, content) -> None:
        d = data.draw(st.sampled_from(self._dirs()))
        path = os.path.join(d, name)

        def model():
            fd = os.open(os.path.join(self.model, path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
            os.write(fd, content)
            os.close(fd)

        async def core():
            parent, n = self._parent(path)
            fh, a = await self.k.u.create_file(parent, n, 0o640, os.O_WRONLY, 0, 0)
            self.k.take(a)
            try:
                await self.k.u.write(fh, 0, content)
            finally:
                self.k.u.release(fh)

        self._both(model, core)

    @rule(data=st.data(), name=NAMES)
    def mkdir(self, data, name) -> None:
        path = os.path.join(data.draw(st.sampled_from(self._dirs())), name)

        async def core():
            parent, n = self._parent(path)
            self.k.take(await self.k.u.mkdir(parent, n, 0o751, 0, 0))

        self._both(lambda: os.mkdir(os.path.join(self.model, path), 0o751), core)

    @rule(data=st.data())
    def unlink(self, data) -> None:
        path = data.draw(st.sampled_from(self._paths()))

        async def core():
            parent, n = self._parent(path)
            await self.k.u.unlink(parent, n, want_dir=False)

        self._both(lambda: os.unlink(os.path.join(self.model, path)), core)

    @rule(data=st.data())
    def rmdir(self, data) -> None:
        path = data.draw(st.sampled_from(self._paths()))

        async def core():
            parent, n = self._parent(path)
            await self.k.u.unlink(parent, n, want_dir=True)

        self._both(lambda: os.rmdir(os.path.join(self.model, path)), core)

    @rule(data=st.data(), name=NAMES)
    def rename(self, data, name) -> None:
        src = data.draw(st.sampled_from(self._paths()))
        dst = os.path.join(data.draw(st.sampled_from(self._dirs())), name)
        # the kernel refuses a dir into itself before the filesystem is asked
        assume(not (dst + "/").startswith(src + "/") and not (src + "/").startswith(dst + "/"))

        async def core():
            op, on = self._parent(src)
            np_, nn = self._parent(dst)
            await self.k.u.rename(op, on, np_, nn, 0)

        self._both(lambda: os.rename(os.path.join(self.model, src), os.path.join(self.model, dst)), core)

    @rule(data=st.data(), name=NAMES)
    def link(self, data, name) -> None:
        src = data.draw(st.sampled_from(self._paths()))
        dst = os.path.join(data.draw(st.sampled_from(self._dirs())), name)

        async def core():
            np_, nn = self._parent(dst)
            self.k.take(await self.k.u.link(self.k.ino(src), np_, nn))

        self._both(lambda: os.link(os.path.join(self.model, src), os.path.join(self.model, dst),
                                   follow_symlinks=False), core)

    @precondition(lambda self: self._paths(stat.S_ISREG))
    @rule(data=st.data(), offset=st.integers(0, 100), content=DATA)
    def write(self, data, offset, content) -> None:
        path = data.draw(st.sampled_from(self._paths(stat.S_ISREG)))

        def model():
            fd = os.open(os.path.join(self.model, path), os.O_WRONLY)
            os.pwrite(fd, content, offset)
            os.close(fd)

        async def core():
            fh = (await self.k.u.open(self.k.ino(path), os.O_WRONLY)).fh
            try:
                await self.k.u.write(fh, offset, content)
            finally:
                self.k.u.release(fh)

        self._both(model, core)

    @rule(data=st.data(), size=st.integers(0, 50), mode=st.sampled_from([0o600, 0o755, 0o4755, 0o1777]))
    def setattr(self, data, size, mode) -> None:
        path = data.draw(st.sampled_from(self._paths(lambda m: not stat.S_ISLNK(m))))
        regular = stat.S_ISREG(os.lstat(os.path.join(self.model, path)).st_mode)

        def model():
            if regular:
                os.truncate(os.path.join(self.model, path), size)
            os.chmod(os.path.join(self.model, path), mode)

        async def core():
            ino = self.k.ino(path)
            if regular:
                await self.k.u.setattr(ino, SetAttr(size=size))
            await self.k.u.setattr(ino, SetAttr(mode=mode))

        self._both(model, core)

    @rule(data=st.data(), name=st.sampled_from(["user.a", "user.b"]), value=st.binary(max_size=8),
          remove=st.booleans())
    def xattr(self, data, name, value, remove) -> None:
        # user.* xattrs of other kinds the kernel refuses itself, before a filesystem is asked
        path = data.draw(st.sampled_from(self._paths(lambda m: stat.S_ISREG(m) or stat.S_ISDIR(m))))
        full = os.path.join(self.model, path)

        def model():
            if remove:
                os.removexattr(full, name, follow_symlinks=False)
            else:
                os.setxattr(full, name, value, follow_symlinks=False)

        async def core():
            ino = self.k.ino(path)
            if remove:
                await self.k.u.removexattr(ino, name.encode())
            else:
                await self.k.u.setxattr(ino, name.encode(), value)

        self._both(model, core)

    # -- checks ------------------------------------------------------------------
    @invariant()
    def same_tree(self) -> None:
        assert view(self.k) == model_view(self.model)
        assert self.k.u.table.lookups == dict(self.k.held)

    def teardown(self) -> None:
        try:
            k = self.k
            for path in self._paths(stat.S_ISREG):
                with open(os.path.join(self.model, path), "rb") as f:
                    assert trio.run(k.read, k.ino(path)) == f.read(), path
            k.check()
            os.close(k.u.upper.fd)
            root, image = self.env
            with Store(root) as store:
                with store.writing():
                    lid = transfer.import_layer(store, self.upper, as_layer=True)
                    new = store.put_image(img.new_config(image.layers + [lid]))
                out = os.path.join(self.base, "out")
                transfer.export_image(store, new, out)
                report = fsck.check(store)
            assert report.clean, report.problems[:5]
            assert model_view(out) == model_view(self.model)
        finally:
            os.umask(self.umask)
            shutil.rmtree(self.base, ignore_errors=True)
            shutil.rmtree(self.upper + ".work", ignore_errors=True)


def test_union_core_against_a_directory(tmp_path):
    root = str(tmp_path / "store")
    with Store(root) as store:
        image = make_image(store, build_layers(str(tmp_path / "src")), "model:latest")
    UnionVsDirectory.env = (root, image)
    run_state_machine_as_test(UnionVsDirectory, settings=settings(
        max_examples=30, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)))
