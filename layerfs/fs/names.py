"""Changing names in the union: create, link, unlink, rename.

:class:`NameOps` is the namespace half of :class:`layerfs.fs.union.Union`
(a mixin over its nodes, upper dir and write lock), with the overlayfs
rules for names: deleting a name the lower layers have leaves a whiteout;
a node made over a whiteout is built in the work dir and swapped in (a
directory made there is opaque); a directory that moves is copied up
whole first and made opaque where the lower layers have its new name.

Checks come in the kernel's order: the name's length (ENAMETOOLONG, before
anything else), then its existence (EEXIST), then the kind (EPERM for a
0/0 character device, which would read back as a whiteout), and only then
is anything copied up.
"""

from __future__ import annotations

import errno
import os
import stat

from layerfs.fs.inodes import Attr, Children, Node
from layerfs.fs.upper import NAME_MAX, OPAQUE, RENAME_EXCHANGE, RENAME_NOREPLACE, discard


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _join(base: bytes, name: bytes) -> bytes:
    return base + b"/" + name if base else name


def check_name(name: bytes) -> None:
    """ENAMETOOLONG for a name no backing filesystem takes (FUSE passes up to 1024 bytes)."""
    if len(name) > NAME_MAX:
        raise _err(errno.ENAMETOOLONG)


class NameOps:
    """create/link/unlink/rename of :class:`Union` (see the module docstring).

    The kernel-shaped entry points (``mkdir``, ``mknod``, ``symlink``,
    ``create_file``, ``link``) reply with the new entry's :class:`Attr`
    and count it as a lookup; ``create`` is the shared body.
    """

    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int, umask: int = 0) -> Attr:
        node, _ = await self.create(parent, name, stat.S_IFDIR, mode, uid, gid, umask=umask)
        return self.entry(node.ino)

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int,
                    umask: int = 0) -> Attr:
        node, fd = await self.create(parent, name, stat.S_IFMT(mode), mode, uid, gid, rdev=rdev, umask=umask)
        if fd >= 0:
            os.close(fd)
        return self.entry(node.ino)

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        node, _ = await self.create(parent, name, stat.S_IFLNK, 0o777, uid, gid, target=target)
        return self.entry(node.ino)

    async def create_file(self, parent: int, name: bytes, mode: int, flags: int, uid: int,
                          gid: int, umask: int = 0) -> tuple[int, Attr]:
        """Make and open a regular file: (file handle, entry)."""
        node, fd = await self.create(parent, name, stat.S_IFREG, mode, uid, gid, flags=flags, umask=umask)
        fh = self.adopt_fd(node, fd)
        attr = self.upper_attr(node, os.fstat(fd))  # the new fd: no path walk, no lstat
        self.table.looked_up(node.ino)
        return fh, attr

    async def create(self, parent: int, name: bytes, fmt: int, mode: int, uid: int, gid: int,
                     rdev: int = 0, target: bytes = b"", flags: int = 0, umask: int = 0) -> tuple[Node, int]:
        """Make a new node; returns it and, for regular files, an open fd.

        The mount enforces POSIX ACLs (``ops.Operations.enable_acl``), so
        the kernel leaves *umask* to the filesystem: applied here unless
        the parent has a default ACL, which the upper fs applies instead
        (the daemon's own umask is 0)."""
        check_name(name)
        self._writable()
        async with self.lock:
            d = self.node(parent)
            if self.child(d, name):
                raise _err(errno.EEXIST)
            if fmt == stat.S_IFCHR and rdev == 0:
                raise _err(errno.EPERM)  # would read back as a whiteout; overlayfs refuses it too
            await self.copy_up(d)
            kids = self.children(d)
            base = self.path(d)
            rel = _join(base, name)
            pst = self.upper.lstat(base)
            if pst.st_mode & stat.S_ISGID:
                gid = pst.st_gid
                if fmt == stat.S_IFDIR:
                    mode |= stat.S_ISGID
            perm = stat.S_IMODE(mode)
            over_whiteout = self.lower_has(d, name)
            # the parent's default ACL matters only if the umask would take
            # bits away or the node is made away from it (a getxattr per create)
            masked = perm & umask and fmt != stat.S_IFLNK
            default_acl = self.upper.default_acl(base) if masked or over_whiteout else None
            if masked and default_acl is None:
                perm &= ~umask
            # Over a whiteout the node is made in the work dir and swapped in
            # (inside a dir with the parent's default ACL, if it has one: the
            # node inherits what it would have inherited in place).
            holder = self.upper.acl_holder(default_acl) if over_whiteout else None
            if over_whiteout:
                dst, at = (holder + b"/n" if holder else self.upper.temp()), _at_cwd
            else:
                dst, at = rel, self.upper.at
            fd = -1
            made = False  # on failure, remove only what this call made
            try:
                if fmt == stat.S_IFREG:
                    acc = flags & os.O_ACCMODE if flags & os.O_ACCMODE != os.O_RDONLY else os.O_RDWR
                    fd = at(os.open, dst, os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | acc, perm)
                elif fmt == stat.S_IFDIR:
                    at(os.mkdir, dst, perm)
                elif fmt == stat.S_IFLNK:
                    at(_symlink, dst, target)
                else:
                    at(os.mknod, dst, fmt | perm, rdev)
                made = True
                if fd >= 0:
                    os.fchown(fd, uid, gid)
                else:
                    at(os.chown, dst, uid, gid, follow_symlinks=False)
                if fmt != stat.S_IFLNK and perm & 0o7000:
                    # (the bits an inherited ACL left, with the special ones added)
                    now = os.fstat(fd).st_mode if fd >= 0 else at(os.lstat, dst).st_mode
                    at(os.chmod, dst, stat.S_IMODE(now) & 0o777 | perm & 0o7000)
                if over_whiteout:
                    if fmt == stat.S_IFDIR:
                        os.setxattr(dst, OPAQUE, b"y")
                    self.upper.put_over_whiteout(dst, rel, fmt == stat.S_IFDIR)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                if over_whiteout:
                    discard(dst)
                elif made:
                    self.upper.remove_quiet(rel)
                raise
            finally:
                if holder:
                    discard(holder)
            node = self.table.add(Node(self.table.new_ino(), d.ino, name, fmt, -1, True))
            node.nocaps = fmt == stat.S_IFREG
            if fmt == stat.S_IFDIR:
                node.children = Children()
                d.nsubdirs += 1
            kids[name] = node.ino
            return node, fd

    async def link(self, ino: int, parent: int, name: bytes) -> Attr:
        node = await self._link(ino, parent, name)
        return self.entry(node.ino)

    async def _link(self, ino: int, parent: int, name: bytes) -> Node:
        check_name(name)
        self._writable()
        async with self.lock:
            node = self.node(ino)
            d = self.node(parent)
            if self.child(d, name):
                raise _err(errno.EEXIST)
            if node.is_dir:
                raise _err(errno.EPERM)
            await self.copy_up(node)
            await self.copy_up(d)
            kids = self.children(d)
            rel = _join(self.path(d), name)
            src = self.path(node)
            if self.lower_has(d, name):
                tmp = self.upper.temp()
                self.upper.at(_link_out, src, tmp)
                try:
                    self.upper.place(tmp, rel)
                except BaseException:
                    discard(tmp)
                    raise
            else:
                self.upper.link(src, rel)
            kids[name] = node.ino
            node.add_link(d.ino, name)
            return node

    async def unlink(self, parent: int, name: bytes, want_dir: bool) -> None:
        check_name(name)
        self._writable()
        async with self.lock:
            d = self.node(parent)
            ino = self.child(d, name)
            if not ino:
                raise _err(errno.ENOENT)
            node = self.node(ino)
            if want_dir and not node.is_dir:
                raise _err(errno.ENOTDIR)
            if not want_dir and node.is_dir:
                raise _err(errno.EISDIR)
            if want_dir and not self.is_empty(node):
                raise _err(errno.ENOTEMPTY)
            if not node.upper and node.links:
                await self.copy_up(node)  # keep the rest of the hardlink group one inode
            await self.copy_up(d)
            kids = self.children(d)
            rel = _join(self.path(d), name)
            whiteout = self.lower_has(d, name)
            self._before_last_name_goes(node)
            if node.upper:
                if want_dir:
                    self.upper.clear_whiteouts(rel)
                if whiteout:
                    self.upper.whiteout(rel, replace=True)
                elif want_dir:
                    self.upper.rmdir(rel)
                else:
                    self.upper.unlink(rel)
            else:
                self.upper.whiteout(rel, replace=False)
            del kids[name]
            if node.is_dir:
                d.nsubdirs -= 1
            node.drop_link(d.ino, name)
            self.table.maybe_drop(ino)

    def _before_last_name_goes(self, node: Node) -> None:
        """Keep what a file still open on *node* needs once the name about
        to go is its last: a dir's last attrs, no links (no upper dir is
        left to ask; fstat shows them, as on any fs), and a copied-up
        file's handles opened while it was lower moved to the copy now
        (after this it cannot be opened by name; overlayfs's readers
        follow a copy-up the same way)."""
        if node.links:
            return
        if node.is_dir:
            if node.upper:
                node.gone = self.attr(node.ino)._replace(nlink=0)
        elif node.upper and node.opens:
            self.follow_copy_up(node)

    async def _prepare_move(self, node: Node) -> None:
        if node.is_dir:
            if not node.upper or node.lower >= 0:
                await self.copy_up_tree(node)
        else:
            await self.copy_up(node)

    async def rename(self, op: int, oname: bytes, np_: int, nname: bytes, flags: int) -> None:
        check_name(oname)
        check_name(nname)
        self._writable()
        async with self.lock:
            od, nd = self.node(op), self.node(np_)
            sino = self.child(od, oname)
            if not sino:
                raise _err(errno.ENOENT)
            tino = self.child(nd, nname)
            if flags & RENAME_NOREPLACE and tino:
                raise _err(errno.EEXIST)
            if flags & RENAME_EXCHANGE and not tino:
                raise _err(errno.ENOENT)
            s = self.node(sino)
            t = self.node(tino) if tino else None
            if t is s:
                return
            if t is not None and not flags & RENAME_EXCHANGE:
                if s.is_dir and not t.is_dir:
                    raise _err(errno.ENOTDIR)
                if not s.is_dir and t.is_dir:
                    raise _err(errno.EISDIR)
                if t.is_dir and not self.is_empty(t):
                    raise _err(errno.ENOTEMPTY)
            await self._prepare_move(s)
            if t is not None and (flags & RENAME_EXCHANGE or (not t.upper and t.links)):
                await self._prepare_move(t)
            await self.copy_up(od)
            await self.copy_up(nd)
            okids, nkids = self.children(od), self.children(nd)
            orel, nrel = _join(self.path(od), oname), _join(self.path(nd), nname)
            if flags & RENAME_EXCHANGE:
                self.upper.rename(orel, nrel, RENAME_EXCHANGE)
                for n, (dd, nm, rel) in ((s, (nd, nname, nrel)), (t, (od, oname, orel))):
                    if n.is_dir and self.lower_has(dd, nm):
                        self.upper.set_opaque(rel)
                okids[oname], nkids[nname] = t.ino, s.ino
                if s.is_dir != t.is_dir:
                    delta = 1 if s.is_dir else -1
                    od.nsubdirs -= delta
                    nd.nsubdirs += delta
                s.move_link((od.ino, oname), (nd.ino, nname))
                t.move_link((nd.ino, nname), (od.ino, oname))
                return
            need_whiteout = self.lower_has(od, oname)
            if t is not None:
                self._before_last_name_goes(t)
                if t.is_dir and t.upper:
                    self.upper.clear_whiteouts(nrel)
                self.upper.rename(orel, nrel)
            elif self.lower_has(nd, nname) and s.is_dir:
                # A whiteout sits at the target: swap it with the dir and
                # reuse it at the old place when one is needed there.
                self.upper.rename(orel, nrel, RENAME_EXCHANGE)
                if need_whiteout:
                    need_whiteout = False
                else:
                    self.upper.unlink(orel)
            else:
                self.upper.rename(orel, nrel)
            if need_whiteout:
                self.upper.whiteout(orel, replace=False)
            if s.is_dir and self.lower_has(nd, nname):
                self.upper.set_opaque(nrel)
            del okids[oname]
            nkids[nname] = s.ino
            if s.is_dir:
                od.nsubdirs -= 1
                nd.nsubdirs += 1
            if t is not None:
                if t.is_dir:
                    nd.nsubdirs -= 1
                t.drop_link(nd.ino, nname)
            s.move_link((od.ino, oname), (nd.ino, nname))
            if t is not None:
                self.table.maybe_drop(t.ino)


def _at_cwd(fn, path: bytes, *args, **kwargs):
    """``UpperDir.at`` for an absolute path (a node made in the work dir)."""
    return fn(path, *args, dir_fd=None, **kwargs)


def _symlink(name: bytes, target: bytes, dir_fd: int | None) -> None:
    os.symlink(target, name, dir_fd=dir_fd)


def _link_out(name: bytes, path: bytes, dir_fd: int) -> None:
    """Hard-link *name* (under *dir_fd*) as the absolute *path*."""
    os.link(name, path, src_dir_fd=dir_fd, follow_symlinks=False)
