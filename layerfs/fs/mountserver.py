"""The warm mount server: one long-lived process per store root that has
imported everything a FUSE mount needs and forks one worker per mount.

A ``layerfs mount`` in a fresh interpreter spends most of a second
importing click, the store, trio and pyfuse3 and loading the image's
index. The server pays that once: ``layerfs mount`` (``fs.mountclient``,
called before click is imported) sends its request over
``ROOT/mount-server/sock`` and the server forks a *worker* that runs what
the CLI would have run (``mount.check_image`` then ``mount.mount_image``,
in the caller's cwd, umask and ``LAYERFS_*`` environment) and answers the
client directly. The FUSE daemon is forked by the worker as always (double
fork + setsid, its registry record, owner watch and log: ``fs.daemon``),
so it owes the server nothing: killing the server never touches a mount.

The *spare*: the next request's worker is forked ahead (at start and when
a worker ends) and has already forked its daemon (``mount.prefork``, which
also runs trio once) and opened the store; the server hands it the
request and the client's connection over a socketpair (SCM_RIGHTS). It
answers the client before closing the store (whose last close may
checkpoint the WAL). A spare forked before an index was kept is replaced;
one that finds the database file replaced opens it again. It exits on EOF
of its socketpair: retired, or the server gone (even by kill -9), and its
unused daemon with it. Without a spare (two requests at once) the server
forks a worker per request as before.

Life: started by the first client that finds none (``fs.mountclient``),
detached, logging to ``ROOT/logs/mount-server.log``; it holds the flock on
``ROOT/mount-server/lock`` for its whole life (one server per store root)
and exits after ``$LAYERFS_MOUNT_SERVER_IDLE`` seconds without a request
(default 600), when layerfs's code changes on disk (``fs.codewatch``: an
upgrade or an edit; the next mount starts a server with the new code) or
on SIGTERM, exit code 0 all. On the way out it unlinks
its socket first, then serves what was already queued, so no request is
dropped; a killed server leaves a stale socket that the next client
replaces. Only peers with the server's uid are served (``SO_PEERCRED``;
the socket is 0600 in a 0700 dir anyway), and only from the server's own
mount namespace and root: a caller elsewhere is told to mount itself.

Fork safety: the server never opens a Store (SQLite connections do not
survive a fork) and never hashes (blake3's thread pool does not either):
workers open the store themselves, after forking their daemon. What it
keeps are the merged indexes of recently mounted images (``fs.indexmemory``,
a small LRU keyed by the cache file's identity, so a rebuilt cache is never
served stale); a daemon forked from a worker finds its index already in
memory (``daemon.find_loaded_index``) instead of unmarshalling it.
"""

from __future__ import annotations

import gc
import logging
import marshal
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from dataclasses import dataclass

from layerfs.fs import codewatch, mountclient
from layerfs.fs.indexmemory import IndexMemory
from layerfs.fs.mountclient import recv_frame, send_frame, send_reply

log = logging.getLogger("layerfs.mountserver")

DEFAULT_IDLE = 600.0
SOCKET_CHECK = 5.0  # seconds between checks that our socket is still there
_MAX_REQUEST = 1 << 20
#: The server's process name (``ps -o comm``, /proc/PID/comm). Its workers
#: and the daemons they fork share its command line (a fork does not change
#: it) but are named ``layerfs``, as when the CLI forked them.
COMM = "layerfs-mserver"


memory = IndexMemory()


class _Stop(Exception):
    pass


def _on_sigterm(signum, frame) -> None:
    raise _Stop()


@dataclass(frozen=True)
class Spare:
    """A worker forked ahead, waiting on *sock* for its request."""

    sock: socket.socket  # the server's end of a SOCK_SEQPACKET pair: closing it retires the spare
    report_fd: int
    generation: int  # memory.generation when it was forked


class Server:
    def __init__(self, root: str, lock_fd: int, idle: float) -> None:
        self.root, self.lock_fd, self.idle = os.path.abspath(root), lock_fd, idle
        self.path = mountclient.socket_path(self.root)
        self.workers: dict[int, int] = {}  # report pipe fd -> worker pid (the spare's too)
        self.pending_reports: dict[int, bytes] = {}
        self.zombies: set[int] = set()
        self.spare: Spare | None = None
        self.closing = False
        self.last = time.monotonic()
        self.uid = os.geteuid()
        self.mntns = mountclient.caller_namespace()
        self.listener = self._listen()
        self.poller = select.poll()
        self.code = codewatch.CodeWatch(codewatch.module_dirs())  # after _preload: every module is in

    def _listen(self) -> socket.socket:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        os.chmod(os.path.dirname(self.path), 0o700)
        try:
            os.unlink(self.path)  # stale: we hold the lock, so its server is gone
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        address, dfd = mountclient.short_address(self.path)
        old = os.umask(0o177)
        try:
            sock.bind(address)
        finally:
            os.umask(old)
            if dfd >= 0:
                os.close(dfd)
        os.chmod(self.path, 0o600)
        self.bound = os.stat(self.path).st_ino
        sock.listen(64)
        return sock

    # -- the loop ------------------------------------------------------------
    def run(self) -> int:
        self.poller.register(self.listener.fileno(), select.POLLIN)
        self.poller.register(self.code.fd, select.POLLIN)
        try:
            self._fork_spare()
            while True:
                self._reap()
                busy = len(self.workers) > (self.spare is not None) or self.zombies
                timeout = 1.0 if busy else self.last + self.idle - time.monotonic()
                if timeout <= 0:
                    log.info("idle for %gs: exiting", self.idle)
                    break
                if not self._socket_is_ours():
                    log.info("%s was removed: exiting", self.path)  # clients that cannot reach us start another
                    break
                events = self.poller.poll(min(timeout, SOCKET_CHECK) * 1000)
                if any(fd == self.code.fd for fd, _ in events) and self.code.changed():
                    log.info("layerfs's code changed on disk: exiting (the next mount starts a server with it)")
                    break
                # reports first: a request that came with one sees its index kept
                for fd, _ in sorted(events, key=lambda event: event[0] == self.listener.fileno()):
                    if fd == self.code.fd:
                        continue
                    if fd != self.listener.fileno():
                        self._report(fd)
                        continue
                    try:
                        self._accept()
                    except OSError as exc:  # out of fds or processes: this request fails, not the server
                        log.error("cannot take a request: %s", exc)
        except _Stop:
            log.info("SIGTERM: exiting")
        self._close()
        return 0

    def _socket_is_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.bound
        except OSError:
            return False

    def _close(self) -> None:
        """Unlink the socket first (new clients start a new server), then
        serve what is queued, so no accepted connection goes unanswered."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.closing = True
        self._retire_spare()
        if self._socket_is_ours():
            os.unlink(self.path)
        self.listener.setblocking(False)
        while True:
            try:
                self._accept()
            except OSError:  # BlockingIOError: nothing left
                break
        self.listener.close()
        self.code.close()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.setblocking(True)
        with conn:
            self.last = time.monotonic()
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != self.uid:
                log.warning("refused a request from pid %d: uid %d is not the server's (%d)", pid, uid, self.uid)
                return
            conn.settimeout(10.0)
            try:
                request = recv_frame(conn)
            except (OSError, EOFError, ValueError) as exc:
                log.warning("bad request from pid %d: %s", pid, exc)
                return
            conn.settimeout(None)
            try:
                self._answer(conn, request)
            except OSError as exc:  # the client went away
                log.warning("request from pid %d: %s", pid, exc)

    def _answer(self, conn: socket.socket, request: dict) -> None:
        op = request.get("op")
        if op == "status":
            from layerfs import procfs

            conn.sendall(b"A")
            send_frame(conn, {"pid": os.getpid(), "start": procfs.start_time(os.getpid()), "root": self.root,
                              "indexes": len(memory)})
        elif op == "mount":
            if (request.get("mntns"), request.get("rootdir")) != (self.mntns["mntns"], self.mntns["rootdir"]):
                conn.sendall(b"A")
                send_reply(conn, request, {"fallback": "the caller is in another mount namespace or root"})
                return
            if not self._hand_to_spare(conn, request):
                self._fork(lambda report_w: _worker(self.root, conn, request, report_w))
        else:
            conn.sendall(b"A")
            send_frame(conn, {"error": f"unknown request {op!r}", "code": 2})

    # -- workers ---------------------------------------------------------------
    def _fork(self, job) -> int:
        """Fork a worker that runs ``job(report_w)`` (its exit code) and
        reports on that pipe; returns the pipe's read end, polled here."""
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            os.close(report_r)
            os.close(report_w)
            raise
        if pid == 0:
            code = 1
            try:
                # the signal dispositions of a fresh `layerfs mount`, which forked daemons before
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
                os.close(report_r)
                self._leave()
                code = job(report_w)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(report_w)
        self.workers[report_r] = pid
        self.pending_reports[report_r] = b""
        self.poller.register(report_r, select.POLLIN)
        return report_r

    def _leave(self) -> None:
        """In a fresh worker: drop what is the server's."""
        gc.disable()  # short-lived: a collection would only copy the server's pages
        _set_comm("layerfs")
        self.listener.close()
        if self.spare is not None:
            self.spare.sock.close()  # else the spare would not see the server go
        for fd in (self.lock_fd, self.code.fd, *self.workers):
            try:
                os.close(fd)
            except OSError:
                pass

    def _fork_spare(self) -> None:
        """Fork the next request's worker now, so that the request finds it
        forked, its daemon forked and the store open (``_spare``)."""
        if self.spare is not None or self.closing:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)

        def job(report_w: int) -> int:
            ours.close()  # the server's end: the spare sees EOF when the server closes it or dies
            return _spare(self.root, theirs, report_w)

        try:
            report_fd = self._fork(job)
        except OSError as exc:
            log.error("cannot fork a spare worker: %s", exc)
            ours.close()
            return
        finally:
            theirs.close()
        self.spare = Spare(ours, report_fd, memory.generation)

    def _retire_spare(self) -> None:
        if self.spare is not None:
            self.spare.sock.close()  # EOF: it exits, and its daemon with it
            self.spare = None

    def _hand_to_spare(self, conn: socket.socket, request: dict) -> bool:
        """Give the request and its connection to the spare; False if there
        is none (or it died): the caller forks a worker."""
        spare, self.spare = self.spare, None
        if spare is None:
            return False
        try:
            socket.send_fds(spare.sock, [marshal.dumps(request)], [conn.fileno()])
        except (OSError, ValueError) as exc:
            log.warning("the spare worker did not take a request: %s", exc)
            return False
        finally:
            spare.sock.close()
        return True

    def _report(self, fd: int) -> None:
        """A worker's report: the image id it mounted (one line, sent once
        its client has the answer: kept at once), then EOF when it ends."""
        chunk = os.read(fd, 4096)
        if chunk:
            self.pending_reports[fd] += chunk
            if chunk.endswith(b"\n"):
                image_id = self.pending_reports[fd].decode(errors="replace").strip()
                self.pending_reports[fd] = b""
                memory.load(self.root, image_id)
            return
        self.poller.unregister(fd)
        os.close(fd)
        self.zombies.add(self.workers.pop(fd))
        del self.pending_reports[fd]
        if self.spare is not None and self.spare.report_fd == fd:
            # died waiting (killed, or its set-up failed): the next
            # request forks a worker, whose end forks the next spare
            self._retire_spare()
            return
        self.last = time.monotonic()
        if self.spare is not None and self.spare.generation != memory.generation:
            self._retire_spare()  # forked before that index was kept
        self._fork_spare()

    def _reap(self) -> None:
        for pid in list(self.zombies):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.zombies.discard(pid)


def _spare(root: str, sock: socket.socket, report_w: int) -> int:
    """A spare worker: fork the mount daemon and open the store ahead (in
    that order: no fork with an SQLite connection open), then wait for a
    request; EOF (retired, or the server is gone) ends it."""
    from layerfs.fs import mount

    mount.prefork()
    store = _open_store(root) if mount.has_preforked() else None
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_REQUEST, 1)
    except OSError:
        data, fds = b"", []
    sock.close()
    if not fds:
        if store is not None:
            store[0].close()
        return 0
    request = marshal.loads(data)
    return _worker(root, socket.socket(fileno=fds[0]), request, report_w, store)


def _open_store(root: str) -> tuple | None:
    """(Store, identity of its database file), or None to open it when the
    request comes (a store without its dirs yet: made in the caller's umask;
    errors: reported to the caller then)."""
    from layerfs.store.layout import StoreLayout
    from layerfs.store.store import Store

    layout = StoreLayout(root)
    if not all(os.path.isdir(d) for d in layout.made_on_open):
        return None
    before = _identity(layout.db)  # (stat before and after: the connection's own file is not to be had)
    try:
        store = Store(root)
    except Exception:
        return None
    if before is None or _identity(layout.db) != before:  # replaced meanwhile
        store.close()
        return None
    return store, before


def _identity(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _worker(root: str, conn: socket.socket, request: dict, report_w: int, store: tuple | None = None) -> int:
    """A worker: mount as the CLI would, answer the client, report the image
    id to the server (to keep its index), then close the store (its
    checkpoint is not the client's to wait for). *store*: the spare's."""
    conn.sendall(b"A")
    if store is not None and _identity(store[0].layout.db) != store[1]:
        store[0].close()  # the database was replaced since the spare opened it
        store = None
    stores = [store[0]] if store is not None else []
    try:
        answer, image_id = _mount(root, request, stores)
        send_reply(conn, request, answer)
        conn.close()
        if image_id:
            os.write(report_w, image_id.encode() + b"\n")
    finally:
        for opened in stores:
            opened.close()
    return 0


def _set_comm(name: str) -> None:
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name)
    except OSError:
        pass


def _mount(root: str, request: dict, stores: list) -> tuple[dict, str | None]:
    """Run the CLI's mount in the caller's environment. *stores*: the open
    store to use (a spare's), or empty: one is opened here and added, for
    the caller to close once the client has its answer."""
    from layerfs.errors import LayerfsError
    from layerfs.fs import backend as backends
    from layerfs.fs import mount
    from layerfs.store.store import Store

    for name in [k for k in os.environ if k.startswith("LAYERFS_")]:
        del os.environ[name]
    os.environ.update(request.get("env") or {})
    os.umask(request["umask"])
    try:
        os.chdir(request["cwd"])
    except OSError:
        return {"fallback": "cannot enter the caller's directory"}, None
    try:
        if not stores:
            mount.prefork()  # first: never fork with an SQLite connection open
            if mount.has_preforked():  # (else no /dev/fuse: mount_image says so)
                stores.append(Store(root))
        store = stores[0] if stores else None
        mount.check_image(root, request["image"], store)
        if backends.resolve(root, request.get("backend")) != backends.FUSE:
            return {"fallback": "kernel backend", "backend": "kernel"}, None
        handle = mount.mount_image(root, request["image"], request["mountpoint"], upper_dir=request.get("upper"),
                                   read_only=bool(request.get("read_only")), debug=bool(request.get("debug")),
                                   container=request.get("container"), backend=request.get("backend"),
                                   store=store)
    except LayerfsError as exc:
        return {"error": str(exc), "code": exc.exit_code, "traceback": traceback.format_exc()}, None
    except Exception:
        log.exception("mount failed")
        return {"error": "internal error", "code": 1, "traceback": traceback.format_exc(), "bug": True}, None
    return {"ok": True, "pid": handle.pid}, handle.image_id


# -- start-up --------------------------------------------------------------------
def _preload() -> None:
    """Import everything a worker and its daemon run, so forks import nothing."""
    import encodings.ascii  # noqa: F401 - looked up at mount time
    import json  # noqa: F401
    import secrets  # noqa: F401
    import shutil  # noqa: F401

    import cryptography.hazmat.primitives.ciphers.aead  # noqa: F401 - chunk sums (store.chunksums)

    import layerfs.fs.backend  # noqa: F401
    import layerfs.fs.index  # noqa: F401
    import layerfs.fs.mount  # noqa: F401
    import layerfs.store.store  # noqa: F401
    from layerfs.fs import daemon

    daemon.preload()
    daemon.find_loaded_index = memory.get


def serve(root: str, lock_fd: int = -1, ready_fd: int = -1) -> int:
    """Run the server of the store at *root*; its exit code.

    *lock_fd* is the server lock, already taken by the client that started
    this process (-1: take it here, exit 1 if another server has it);
    "ok" goes to *ready_fd* once the socket listens."""
    import fcntl

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"%(asctime)s {os.getpid()} %(levelname)s %(name)s: %(message)s")
    if lock_fd < 0:
        os.makedirs(mountclient.server_dir(root), mode=0o700, exist_ok=True)
        lock_fd = os.open(mountclient.lock_path(root), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.error("another mount server runs for %s", root)
            return 1
    os.set_inheritable(lock_fd, False)
    _set_comm(COMM)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        idle = max(1.0, float(os.environ.get(mountclient.IDLE_ENV) or DEFAULT_IDLE))
        _preload()
        gc.freeze()
        server = Server(root, lock_fd, idle)
    except _Stop:
        return 0
    except Exception as exc:
        log.exception("cannot start")
        if ready_fd >= 0:
            os.write(ready_fd, f"error {exc}".encode())
        return 1
    log.info("serving %s (idle exit after %gs)", server.root, idle)
    if ready_fd >= 0:
        os.write(ready_fd, b"ok\n")
        os.close(ready_fd)
    return server.run()


def main(argv: list[str]) -> int:
    root = argv[0]
    lock_fd = int(argv[1]) if len(argv) > 1 else -1
    ready_fd = int(argv[2]) if len(argv) > 2 else -1
    return serve(root, lock_fd, ready_fd)


if __name__ == "__main__":
    # run as ``python -m``: use the module under its own name (its ``memory``
    # is the one ``daemon.find_loaded_index`` reads)
    from layerfs.fs import mountserver

    sys.exit(mountserver.main(sys.argv[1:]))
