"""The gRPC front end: containerd's snapshots service on a unix socket.

containerd reaches it as a proxy plugin::

    [proxy_plugins.layerfs]
      type = "snapshot"
      address = "/run/layerfs/snapshotter.sock"

Library errors become gRPC status codes containerd's errdefs understands
(NotFound -> NOT_FOUND, AlreadyExists, FailedPrecondition, InvalidInput ->
INVALID_ARGUMENT, anything else UNKNOWN with the message), so ``ctr`` and
the CRI report them as their own. :func:`serve` runs until SIGTERM/SIGINT,
then stops taking calls, lets running ones finish and returns; the layerfs
daemons behind active snapshots keep running (containers keep their root
filesystems) and are re-established at the next start if they died.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from concurrent import futures

from layerfs.errors import InvalidInput, LayerfsError, NotFound
from layerfs.snapshotter import proto
from layerfs.snapshotter.mounts import Mount
from layerfs.snapshotter.records import ACTIVE, COMMITTED, VIEW, AlreadyExists, FailedPrecondition, Snapshot
from layerfs.snapshotter.service import Snapshotter

# The server forks layerfs daemons; they never use gRPC, so gRPC's fork
# handlers (and their warnings about busy threads) have nothing to do.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
log = logging.getLogger("layerfs.snapshotter")
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with its NUL
_KINDS = {VIEW: 1, ACTIVE: 2, COMMITTED: 3}


def _code(exc: LayerfsError):
    import grpc

    for cls, code in ((NotFound, grpc.StatusCode.NOT_FOUND), (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
                      (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
                      (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT)):
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def _rpc(method):
    """Turn library errors into gRPC statuses; log unexpected ones."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except LayerfsError as exc:
            log.info("%s: %s", method.__name__, exc)
            context.abort(_code(exc), str(exc))
        except OSError as exc:
            log.exception("%s failed", method.__name__)
            import grpc

            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: {exc}")
    return wrapper


class Servicer:
    """Maps each RPC onto :class:`Snapshotter` (built per server)."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.s = snapshotter
        self.pb, _ = proto.snapshots()
        from google.protobuf import empty_pb2

        self.empty = empty_pb2.Empty

    def _mounts(self, ms: list[Mount]) -> list:
        mod = proto.mount_messages()
        return [mod.Mount(type=m.type, source=m.source, options=list(m.options)) for m in ms]

    def _info(self, snap: Snapshot):
        info = self.pb.Info(name=snap.key, parent=snap.parent, kind=_KINDS[snap.kind], labels=snap.labels)
        info.created_at.FromNanoseconds(snap.created)
        info.updated_at.FromNanoseconds(snap.updated)
        return info

    @_rpc
    def Prepare(self, req, ctx):
        mounts = self._mounts(self.s.prepare(req.key, req.parent, dict(req.labels)))
        return self.pb.PrepareSnapshotResponse(mounts=mounts)

    @_rpc
    def View(self, req, ctx):
        return self.pb.ViewSnapshotResponse(mounts=self._mounts(self.s.view(req.key, req.parent, dict(req.labels))))

    @_rpc
    def Mounts(self, req, ctx):
        return self.pb.MountsResponse(mounts=self._mounts(self.s.mounts(req.key)))

    @_rpc
    def Commit(self, req, ctx):
        self.s.commit(req.name, req.key, dict(req.labels))
        return self.empty()

    @_rpc
    def Remove(self, req, ctx):
        self.s.remove(req.key)
        return self.empty()

    @_rpc
    def Stat(self, req, ctx):
        return self.pb.StatSnapshotResponse(info=self._info(self.s.stat(req.key)))

    @_rpc
    def Update(self, req, ctx):
        snap = self.s.update(req.info.name, dict(req.info.labels), list(req.update_mask.paths))
        return self.pb.UpdateSnapshotResponse(info=self._info(snap))

    @_rpc
    def Usage(self, req, ctx):
        size, inodes = self.s.usage(req.key)
        return self.pb.UsageResponse(size=size, inodes=inodes)

    @_rpc
    def Cleanup(self, req, ctx):
        self.s.cleanup()
        return self.empty()

    def List(self, req, ctx):
        try:
            snaps = self.s.list(list(req.filters))
        except LayerfsError as exc:
            ctx.abort(_code(exc), str(exc))
        # containerd's own server sends 100 infos per message.
        for i in range(0, len(snaps), 100):
            yield self.pb.ListSnapshotsResponse(info=[self._info(s) for s in snaps[i:i + 100]])


def check_address(address: str) -> str:
    path = os.path.abspath(address)
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise InvalidInput(f"socket path {path} is {len(path.encode())} bytes; unix sockets allow {MAX_SOCKET_PATH}")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise NotFound(f"directory {parent} does not exist")
    if os.path.exists(path) and not _is_socket(path):
        raise InvalidInput(f"{path} exists and is not a socket")
    return path


def _is_socket(path: str) -> bool:
    import stat

    return stat.S_ISSOCK(os.lstat(path).st_mode)


def serve(root: str, address: str, ready: threading.Event | None = None, workers: int = 8) -> None:
    """Serve the snapshots API for store *root* on unix socket *address*
    until SIGTERM or SIGINT; *ready* is set once it listens."""
    server = Server(root, address, workers)
    server.start()
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    if ready is not None:
        ready.set()
    stop.wait()
    server.stop()


class Server:
    """One running gRPC server (start/stop), for :func:`serve` and tests."""

    def __init__(self, root: str, address: str, workers: int = 8) -> None:
        self.address = check_address(address)
        self.snapshotter = Snapshotter(root)
        self.workers = workers
        self._server = None

    def start(self) -> list[str]:
        """Restore mounts, then listen; returns snapshots not restored."""
        import grpc

        from layerfs.fs.mount import preload

        preload()  # layerfs daemons forked from here start with nothing to import
        failed = self.snapshotter.restore()
        for line in failed:
            log.warning("not restored: %s", line)
        _, services = proto.snapshots()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.workers))
        services.add_SnapshotsServicer_to_server(Servicer(self.snapshotter), server)
        if os.path.exists(self.address):
            os.unlink(self.address)  # a socket left by a killed server
        server.add_insecure_port(f"unix://{self.address}")
        server.start()
        os.chmod(self.address, 0o600)
        self._server = server
        log.info("serving %s on %s", self.snapshotter.root, self.address)
        return failed

    def stop(self, grace: float = 10.0) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        try:
            os.unlink(self.address)
        except FileNotFoundError:
            pass
        log.info("stopped")
