"""Read-only access to the files of an archive or a directory, and a writer
that builds one; shared by the OCI layout and docker-archive transports.

Readers never follow a path outside their root: tar member names are
normalised and ``..`` rejected, directory lookups refuse symlinks.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import threading
from typing import BinaryIO

from layerfs.errors import InvalidInput, NotFound
from layerfs.oci import media
from layerfs.store import scratch, streams


def _clean(name: str) -> str:
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            raise InvalidInput(f"path escapes the archive: {name!r}")
        parts.append(p)
    return "/".join(parts)


class Bundle:
    """Files by relative path."""

    description: str

    def exists(self, name: str) -> bool: ...

    def open(self, name: str) -> BinaryIO: ...

    def size(self, name: str) -> int: ...

    def read(self, name: str, limit: int) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise InvalidInput(f"{self.description}: {name} is larger than {limit} bytes")
        return data

    def close(self) -> None:
        pass


class DirBundle(Bundle):
    def __init__(self, path: str) -> None:
        self.root = os.path.abspath(path)
        self.description = path

    def _path(self, name: str) -> str:
        return os.path.join(self.root, _clean(name))

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def size(self, name: str) -> int:
        try:
            return os.stat(self._path(name)).st_size
        except FileNotFoundError:
            raise NotFound(f"{self.description}: {name} is missing") from None

    def open(self, name: str) -> BinaryIO:
        path = self._path(name)
        real = os.path.realpath(path)
        if real != path and not real.startswith(self.root + os.sep):
            raise InvalidInput(f"{self.description}: {name} points outside the directory")
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"{self.description}: {name} is missing") from None
        except OSError as exc:
            raise InvalidInput(f"{self.description}: cannot read {name}: {exc.strerror}") from None


def _plain_tar(path: str, tmp_dir: str | None) -> BinaryIO:
    """The archive as a seekable plain tar. A compressed one is unpacked
    first, within the unpack limits (a bomb stops early), into an unnamed
    temp file: members are read in any order, and every backward seek in
    a gzip stream would decompress it again from the start."""
    f = open(path, "rb")
    if streams.sniff(f.read(6)) == streams.NONE:
        f.seek(0)
        return f
    f.seek(0)
    spool = tempfile.TemporaryFile(dir=tmp_dir)
    try:
        with f:
            plain = streams.unpack(f).stream
            while chunk := plain.read(media.CHUNK):
                spool.write(chunk)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool


class TarBundle(Bundle):
    def __init__(self, path: str, tmp_dir: str | None = None) -> None:
        self.description = path
        self.fileobj = _plain_tar(path, tmp_dir)
        try:
            self.tf = tarfile.open(fileobj=self.fileobj, mode="r:")
            members = self.tf.getmembers()
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            self.fileobj.close()
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InvalidInput(f"{path}: not a readable tar archive ({reason})") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            try:
                name = _clean(m.name)
            except InvalidInput:
                continue  # never used: we only look up names we construct or validate
            if m.isreg():
                self.members[name] = m

    def exists(self, name: str) -> bool:
        return _clean(name) in self.members

    def size(self, name: str) -> int:
        m = self.members.get(_clean(name))
        if m is None:
            raise NotFound(f"{self.description}: {name} is missing from the archive")
        return m.size

    def open(self, name: str) -> BinaryIO:
        m = self.members.get(_clean(name))
        if m is None:
            raise NotFound(f"{self.description}: {name} is missing from the archive")
        if m.sparse:  # (not in OCI or docker archives: blobs are plain files)
            raise InvalidInput(f"{self.description}: {name} is a sparse tar member")
        return _TarMember(self.fileobj.fileno(), m.offset_data, m.size)

    def close(self) -> None:
        self.tf.close()
        self.fileobj.close()


class _TarMember(io.RawIOBase):
    """A member's bytes, read at their offsets in the archive (pread), so
    that several members are read at once, from several threads (blobs are
    copied in parallel), without sharing a file position; truncation is an
    error, not short data."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        self.fd, self.start, self.size, self.pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        want = min(len(b), self.size - self.pos)
        if want <= 0:
            return 0
        got = os.preadv(self.fd, [memoryview(b)[:want]], self.start + self.pos)
        if got == 0:
            raise InvalidInput("archive is truncated or corrupt: unexpected end of data")
        self.pos += got
        return got


def open_bundle(path: str, tmp_dir: str | None = None) -> Bundle:
    """A layout dir, or an archive (plain or compressed; *tmp_dir* holds
    a compressed one unpacked)."""
    if os.path.isdir(path):
        return DirBundle(path)
    if not os.path.exists(path):
        raise NotFound(f"no such file or directory: {path}")
    return TarBundle(path, tmp_dir)


class BundleWriter:
    """Builds a directory, or a tar written aside and renamed into place on
    :meth:`commit`. Blobs are spooled and verified before they are added."""

    def __init__(self, path: str, archive: bool, tmp_dir: str | None = None) -> None:
        self.path, self.archive = os.path.abspath(path), archive
        self.names: set[str] = set()
        # Blobs arrive from several threads; a tar stream takes one at a time.
        self.lock = threading.Lock()
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise NotFound(f"no such directory: {parent}")
        self.tmp_dir = tmp_dir or parent
        if archive:
            fd, self.partial = scratch.partial_beside(self.path)
            self.f = os.fdopen(fd, "wb")
            self.tf = tarfile.open(fileobj=self.f, mode="w|", format=tarfile.PAX_FORMAT)
        else:
            if os.path.exists(self.path) and not os.path.isdir(self.path):
                raise InvalidInput(f"{path} exists and is not a directory")
            os.makedirs(self.path, exist_ok=True)
            self.tmp_dir = self.path

    def has(self, name: str) -> bool:
        return name in self.names or (not self.archive and os.path.isfile(os.path.join(self.path, name)))

    def add_bytes(self, name: str, data: bytes) -> None:
        self._add(name, io.BytesIO(data), len(data))

    def add_stream(self, name: str, stream: BinaryIO, digest: str = "", size: int = -1,
                   what: str = "blob") -> str:
        """Spool *stream*, check it, add it as *name*; returns its sha256."""
        fd, tmp = scratch.mkstemp(self.tmp_dir, ".layerfs-blob")
        if not self.archive:  # renamed into the layout dir
            scratch.chmod_as_created(fd)
        try:
            with os.fdopen(fd, "w+b") as f:
                v = media.VerifyingReader(stream, digest, size, what)
                while chunk := v.read(media.CHUNK):
                    f.write(chunk)
                got = v.finish()
                n = f.tell()
                f.seek(0)
                if self.archive:
                    self._add(name, f, n)
            if not self.archive:
                dst = os.path.join(self.path, name)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        with self.lock:
            self.names.add(name)
        return got

    def _add(self, name: str, f: BinaryIO, size: int) -> None:
        with self.lock:
            self._add_locked(name, f, size)

    def _add_locked(self, name: str, f: BinaryIO, size: int) -> None:
        if name in self.names:
            return
        if self.archive:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = size, 0o644, 0
            self.tf.addfile(ti, f)
        else:
            dst = os.path.join(self.path, name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            fd, tmp = scratch.mkstemp(os.path.dirname(dst), ".layerfs")
            scratch.chmod_as_created(fd)
            with os.fdopen(fd, "wb") as out:
                out.write(f.read())
            os.replace(tmp, dst)
        self.names.add(name)

    def commit(self) -> None:
        if self.archive:
            self.tf.close()
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.partial, self.path)
            self.archive = False  # committed; close() has nothing to undo
            self.partial = ""

    def close(self) -> None:
        if self.archive and self.partial:
            try:
                self.tf.close()
            except Exception:
                pass
            self.f.close()
            if os.path.exists(self.partial):
                os.unlink(self.partial)
            self.partial = ""
