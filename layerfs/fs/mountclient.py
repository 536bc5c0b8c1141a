"""Talking to the warm mount server (``fs.mountserver``), cheaply.

This is what ``layerfs mount`` runs instead of the click CLI when the
server can answer, so it imports nothing beyond the interpreter's start-up
but ``marshal``, ``_socket`` and ``fcntl`` (``socket`` would add 5 ms,
``store.layout`` 20 ms: measured with ``python -X importtime``).

Protocol, over ``ROOT/mount-server/sock``: the client sends one frame (4
bytes big-endian length, then a marshal-encoded dict), the side that takes
the request (the server, or the worker it forked) sends one byte ``A``,
then one frame with the answer. The server reads a frame only from a peer
with its own uid (``SO_PEERCRED``), so marshal never sees a stranger's
bytes. A connection closed before ``A`` was not taken (a server that went
away meanwhile) and is retried once with a new server. A request with
``"reply": "plain"`` (the C client, bin/layerfs.c) is answered with
:func:`plain_reply` instead: what the command prints and its exit code.

Starting (:func:`connect`): a server holds ``ROOT/mount-server/lock``
(flock) for its whole life. A client that cannot connect takes the lock
itself (non-blocking): if it gets it, no server lives, so it removes a
stale socket and starts one (double fork + setsid + exec, the locked fd
handed down, its output to ``ROOT/logs/mount-server.log``) and waits for
"ok" on a pipe; if the lock is taken, a server lives or is starting, and
the client polls for its socket. Two racing clients thus end with one
server. :class:`Unavailable` means no server could be had: the caller
then does the work itself.
"""

from __future__ import annotations

import _socket
import marshal
import os
import sys
import time

from layerfs.store.rootdir import MOUNT_SERVER

IDLE_ENV = "LAYERFS_MOUNT_SERVER_IDLE"
START_TIMEOUT = 60.0  # a cold interpreter importing trio and pyfuse3 on a busy machine
_MAX_FRAME = 1 << 20


class Unavailable(Exception):
    """No server took the request (none could be started, or it went away):
    nothing was done, the caller may do the work itself."""


class Failed(Exception):
    """The server took the request but no answer came (its worker died):
    what was done is unknown, so the request must not be repeated.
    (Not a LayerfsError: importing ``layerfs.errors`` costs the fast path.)"""

    exit_code = 1


# -- paths -------------------------------------------------------------------
def server_dir(root: str) -> str:
    return os.path.join(os.path.abspath(root), MOUNT_SERVER)


def socket_path(root: str) -> str:
    return os.path.join(server_dir(root), "sock")


def lock_path(root: str) -> str:
    return os.path.join(server_dir(root), "lock")


def log_path(root: str) -> str:
    return os.path.join(os.path.abspath(root), "logs", "mount-server.log")


def short_address(path: str) -> tuple[str, int]:
    """An address for *path* that fits sun_path (108 bytes): the path
    itself, or ``/proc/self/fd/N/name`` through an O_PATH fd of its dir
    (returned, to close after bind/connect; -1 if none)."""
    if len(os.fsencode(path)) < 100:
        return path, -1
    head, name = os.path.split(path)
    dfd = os.open(head, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{dfd}/{name}", dfd


# -- frames -------------------------------------------------------------------
def send_frame(sock, obj: dict) -> None:
    _send_bytes(sock, marshal.dumps(obj))


def _send_bytes(sock, data: bytes) -> None:
    sock.sendall(len(data).to_bytes(4, "big") + data)


def recv_exact(sock, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def send_reply(sock, request: dict, answer: dict) -> None:
    """Send *answer* to *request* in the form the client asked for."""
    if request.get("reply") == "plain":
        _send_bytes(sock, plain_reply(answer, bool(request.get("debug"))))
    else:
        send_frame(sock, answer)


def outcome(answer: dict, debug: bool) -> tuple[int, str] | None:
    """What ``layerfs mount`` does with the server's *answer*: (exit code,
    text for stderr); None if the CLI is to do the mount itself."""
    if "fallback" in answer:
        return None
    if "error" in answer:
        if answer.get("bug") or debug:  # as click's path: an uncaught exception
            return 1, answer.get("traceback") or ""
        return answer["code"], f"Error: {answer['error']}\n"
    return 0, ""


def plain_reply(answer: dict, debug: bool) -> bytes:
    """*answer* for a client that is not Python: ``exit CODE\nTEXT``, or
    ``fallback\n``."""
    done = outcome(answer, debug)
    if done is None:
        return b"fallback\n"
    return b"exit %d\n" % done[0] + done[1].encode(errors="replace")


def recv_frame(sock) -> dict:
    n = int.from_bytes(recv_exact(sock, 4), "big")
    if n > _MAX_FRAME:
        raise EOFError("frame too large")
    obj = marshal.loads(recv_exact(sock, n))
    if not isinstance(obj, dict):
        raise EOFError("not a request")
    return obj


# -- asking ---------------------------------------------------------------------
def call(root: str, request: dict, start: bool = True) -> dict:
    """Send *request* to the server of the store at *root* (started if
    need be, unless not *start*) and return its answer. Unavailable: not
    taken by any server; Failed: taken, but no answer came."""
    for _ in range(2):
        sock = connect(root, start)
        try:
            try:
                send_frame(sock, request)
                taken = sock.recv(1)
            except (ConnectionResetError, BrokenPipeError):
                taken = b""
            if not taken:
                continue  # the server went away (or refused us) before taking it: nothing was done
            if taken != b"A":
                raise Unavailable("not a mount server")
            try:
                return recv_frame(sock)
            except (OSError, EOFError, ValueError) as exc:
                raise Failed(f"the mount server's worker died ({exc}); see {log_path(root)}") from None
        finally:
            sock.close()
    raise Unavailable("the mount server did not take the request")


def caller_namespace() -> dict:
    """Where this process sees mounts: the server serves only callers that
    share its mount namespace and root (a mount made elsewhere would be
    invisible to them)."""
    st = os.stat("/")
    return {"mntns": os.readlink("/proc/self/ns/mnt"), "rootdir": (st.st_dev, st.st_ino)}


def connect(root: str, start: bool = True):
    """A connected socket to the server at *root*; see the module docstring."""
    deadline = time.monotonic() + START_TIMEOUT
    delay = 0.002
    while True:
        sock = _try_connect(root)
        if sock is not None:
            return sock
        if not start:
            raise Unavailable("no mount server is running")
        if time.monotonic() > deadline:
            raise Unavailable("the mount server does not answer")
        lock = _lock_if_free(root)
        if lock >= 0:
            try:
                _start_server(root, lock)  # we hold the lock: no server lives
            finally:
                os.close(lock)
            continue
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _try_connect(root: str):
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        address, dfd = short_address(socket_path(root))
    except OSError:
        sock.close()
        return None
    try:
        sock.connect(address)
        return sock
    except OSError:  # ENOENT: never started or gone; ECONNREFUSED: stale (killed)
        sock.close()
        return None
    finally:
        if dfd >= 0:
            os.close(dfd)


def _lock_if_free(root: str) -> int:
    """The server lock's fd, locked, if no server holds it; else -1."""
    import fcntl

    try:
        os.makedirs(server_dir(root), mode=0o700, exist_ok=True)
        fd = os.open(lock_path(root), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise Unavailable(f"cannot use {server_dir(root)}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    return fd


def _start_server(root: str, lock_fd: int) -> None:
    """Start a detached server that inherits *lock_fd*; return once it listens."""
    root = os.path.abspath(root)
    try:
        os.unlink(socket_path(root))  # stale: its server is dead, we hold the lock
    except FileNotFoundError:
        pass
    log = log_path(root)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    from layerfs.fs.mountproc import fork_detached  # (only here: the fast path imports little)

    ready_r, ready_w = os.pipe()
    pid = fork_detached(lambda: _exec_server(root, lock_fd, ready_w, log), (ready_r,))
    os.close(ready_w)
    os.waitpid(pid, 0)
    with os.fdopen(ready_r, "rb") as f:
        msg = f.read().decode(errors="replace")
    if not msg.startswith("ok"):
        raise Unavailable(f"the mount server did not start: {msg.strip() or 'it died'}; see {log}")


def _exec_server(root: str, lock_fd: int, ready_w: int, log: str) -> None:
    os.chdir("/")
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.set_inheritable(lock_fd, True)
    os.set_inheritable(ready_w, True)
    os.execv(sys.executable, [sys.executable, "-m", "layerfs.fs.mountserver", root, str(lock_fd), str(ready_w)])


# -- the server's own commands ----------------------------------------------------
def server_pid(root: str) -> int | None:
    """The pid of the server of the store at *root*, if one runs."""
    try:
        return int(call(root, {"op": "status"}, start=False)["pid"])
    except Unavailable:
        return None


def stop_server(root: str, timeout: float = 10.0) -> int | None:
    """Stop the server at *root* (SIGTERM) and wait until it is gone; its
    pid, or None if none ran. Mounts it made are not touched."""
    import signal

    from layerfs import procfs

    try:
        status = call(root, {"op": "status"}, start=False)
    except Unavailable:
        return None
    pid, start = int(status["pid"]), status.get("start")
    if procfs.alive(pid, start):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while procfs.alive(pid, start) and time.monotonic() < deadline:
        time.sleep(0.01)
    return pid
