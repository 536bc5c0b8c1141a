"""Start a container and wait for it: the runtime's public entry points.

``run_container(spec, state_dir)`` is ``docker run`` in the foreground: it
starts the container, forwards signals, relays the terminal when
``spec.tty``, waits, cleans up and returns a ``ContainerResult``.

``start_container(spec, state_dir)`` returns a ``ContainerProcess`` as soon
as the command has been exec'd (or failed to be), for callers that manage
the container's life themselves (detached mode, build steps)::

    proc = start_container(spec, state_dir, stdout=log_fd, stderr=log_fd)
    proc.pid               # host pid of the container's PID 1
    proc.console_fd        # pty master when spec.tty, else None
    proc.kill(signal.SIGTERM)
    proc.stats()           # cgroup usage while it runs
    proc.poll()            # ContainerResult, or None while running
    proc.cgroup            # its Cgroup (paths, oom_killed, stats)
    result = proc.wait()   # blocks; removes the cgroup

Contract for lifecycle code: the ``ContainerProcess`` must be waited for by
the process that started it (the shim is its child); a detached container
therefore needs a long-lived owner process (like containerd's shim) that
calls ``start_container`` and ``wait``. Until ``wait``/``poll`` returns a
result, the cgroup exists. ``state_dir`` is the caller's: the runtime writes
hosts, hostname and resolv.conf there and never deletes it.

Exit codes follow docker: the command's own; 126 if it is not executable,
127 if it is not found (``exec_error`` then says which); 128+N if killed by
signal N (137 for SIGKILL, including OOM kills; ``oom_killed`` says whether
the memory cgroup killed something). Setup failures raise
``ContainerSetupError`` instead of producing an exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import select
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Union

from layerfs.errors import NotFound
from layerfs.runtime import syscalls
from layerfs.runtime.cgroups import Cgroup, CgroupLimits, CgroupStats, create_cgroup
from layerfs.runtime.errors import ContainerSetupError
from layerfs.runtime.hostfiles import write_host_files
from layerfs.runtime.init import LaunchPlan, run_shim
from layerfs.runtime.pty import copy_winsize, drain_wakeup, get_winsize, raw_mode, relay, set_winsize
from layerfs.runtime.rootfs import prepare_mountpoints
from layerfs.runtime.rootpath import make_mountpoint
from layerfs.runtime.spec import ContainerSpec, UserNamespace, check_name, check_volume_sources, container_env
from layerfs.runtime.users import resolve_user

Stream = Union[int, IO[bytes], IO[str], None]

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)
_BASE_NAMESPACES = (syscalls.CLONE_NEWNS | syscalls.CLONE_NEWUTS | syscalls.CLONE_NEWIPC
                    | syscalls.CLONE_NEWPID)
_TTY_GID = 5


@dataclass(frozen=True)
class ContainerResult:
    """How a container ended."""

    exit_code: int
    oom_killed: bool
    signal: int | None
    exec_error: str | None = None


class ContainerProcess:
    """A started container; see the module docstring for the contract."""

    def __init__(self, container_id: str, pid: int, pidfd: int, shim_pid: int,
                 sync: socket.socket, cgroup: Cgroup, console_fd: int | None,
                 exec_error: str | None, early_status: int | None = None) -> None:
        self.id = container_id
        self.pid = pid
        self.console_fd = console_fd
        self.exec_error = exec_error
        self._pidfd: int | None = pidfd
        self._shim_pid = shim_pid
        self._sync = sync
        self._cgroup = cgroup
        self._early_status = early_status
        self._result: ContainerResult | None = None

    @property
    def cgroup(self) -> Cgroup:
        """The container's cgroup (gone once ``wait`` returned)."""
        return self._cgroup

    @property
    def done(self) -> bool:
        """True once ``wait`` or ``poll`` has collected the result."""
        return self._result is not None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the container's PID 1; a no-op once it has exited.

        Like docker without --init, PID 1 only receives signals it handles
        (plus SIGKILL and SIGSTOP): the kernel protects a namespace's init.
        """
        if self._pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)

    def stats(self) -> CgroupStats | None:
        """Resource usage so far; None after the container was reaped."""
        return None if self._result else self._cgroup.stats()

    def poll(self) -> ContainerResult | None:
        """The result if the container has exited, else None (never blocks)."""
        if self._result is None:
            readable, _, _ = select.select([self._sync], [], [], 0)
            if readable or self._early_status is not None:
                return self.wait()
        return self._result

    def wait(self, wakeup_fd: int | None = None) -> ContainerResult:
        """Block until the container exits; reap it and remove its cgroup.
        *wakeup_fd*: the one :func:`signal_wakeup` gives a caller whose
        signal handlers must run while it waits (they forward signals)."""
        if self._result is not None:
            return self._result
        status = self._early_status
        if status is None:
            status = _receive_status(self._sync, wakeup_fd)
        _, shim_status = os.waitpid(self._shim_pid, 0)
        if status is None:
            status = shim_status  # the shim died before reporting
        self._close()
        oom = self._cgroup.oom_killed()
        self._cgroup.remove()
        self._result = _result(status, oom, self.exec_error)
        return self._result

    def _close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self.console_fd is not None:
            os.close(self.console_fd)
            self.console_fd = None
        self._sync.close()


def _receive_status(sync: socket.socket, wakeup_fd: int | None) -> int | None:
    while True:
        if wakeup_fd is not None:
            _wait_readable(sync, wakeup_fd)
        message = sync.recv(4096)
        if not message:
            return None
        if message.startswith(b"status "):
            return int(message.split()[1])


def _wait_readable(sync: socket.socket, wakeup_fd: int) -> None:
    """Until *sync* has a message, running signal handlers as signals come
    (they run in the main thread between two bytecodes, so a select woken
    by the wakeup fd returns to the interpreter and lets them run)."""
    while sync not in select.select([sync, wakeup_fd], [], [])[0]:
        drain_wakeup(wakeup_fd)


@contextlib.contextmanager
def signal_wakeup() -> Iterator[int | None]:
    """A pipe the interpreter writes a byte to for every signal
    (``signal.set_wakeup_fd``), for the time of the block: its read end,
    for :meth:`ContainerProcess.wait`; None off the main thread. Without
    it, a signal that lands just before a blocking ``recv`` has its
    Python handler wait until the ``recv`` returns (the C-level handler
    only sets a flag): a forwarded signal that would end the container is
    then never forwarded, and the wait never ends."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        yield read_fd
    finally:
        signal.set_wakeup_fd(old)
        os.close(read_fd)
        os.close(write_fd)


def _result(status: int, oom: bool, exec_error: str | None) -> ContainerResult:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return ContainerResult(128 + sig, oom, sig, exec_error)
    return ContainerResult(os.WEXITSTATUS(status), oom, None, exec_error)


def new_container_id() -> str:
    """A docker-style id: 64 hex digits."""
    return secrets.token_hex(32)


def start_container(spec: ContainerSpec, state_dir: str, *, container_id: str | None = None,
                    stdin: Stream = None, stdout: Stream = None, stderr: Stream = None,
                    console_size: tuple[int, int] | None = None) -> ContainerProcess:
    """Start ``spec``'s command and return once it is exec'd.

    stdin/stdout/stderr are fds or file objects; None inherits the caller's
    stdout/stderr, and stdin too when ``spec.interactive`` (else /dev/null).
    With ``spec.tty`` they are ignored: the container gets a pty whose
    master is ``console_fd``, sized ``console_size`` (rows, cols).
    """
    container_id = check_name(container_id or new_container_id(), "container id")
    check_volume_sources(spec.volumes)
    rootfs = os.path.realpath(spec.rootfs)
    if not os.path.isdir(rootfs):
        raise NotFound(f"rootfs {spec.rootfs!r} is not a directory")
    plan = _plan(spec, rootfs, state_dir, container_id)
    cgroup = create_cgroup(spec.cgroup_name or container_id,
                           CgroupLimits(spec.memory, spec.cpus, spec.pids_limit))
    try:
        with _stdio(spec, stdin, stdout, stderr) as stdio:
            plan = dataclasses.replace(plan, stdio=stdio, cgroup_dirs=cgroup.paths)
            return _launch(container_id, plan, cgroup, spec.userns, console_size)
    except BaseException:
        cgroup.remove()
        raise


def _plan(spec: ContainerSpec, rootfs: str, state_dir: str, container_id: str) -> LaunchPlan:
    user = resolve_user(rootfs, spec.user)
    hostname = spec.hostname or container_id[:12]
    etc_files = write_host_files(state_dir, hostname, spec.network)
    volume_targets = {v.container for v in spec.volumes}
    binds = [(host, target, False) for target, host in etc_files.items()
             if target not in volume_targets]
    binds += [(v.host, v.container, v.readonly) for v in spec.volumes]
    gid = _TTY_GID if spec.userns is None or spec.userns.maps_gid(_TTY_GID) else None
    mounts = prepare_mountpoints(rootfs, binds, spec.read_only, gid, spec.tty,
                                 tuple((t.container, t.size) for t in spec.tmpfs))
    if spec.cwd != "/":
        # docker creates a missing WORKDIR rather than failing the run.
        make_mountpoint(rootfs, spec.cwd, directory=True)
    namespaces = _BASE_NAMESPACES
    if spec.network == "none":
        namespaces |= syscalls.CLONE_NEWNET
    if spec.userns is not None:
        namespaces |= syscalls.CLONE_NEWUSER
    return LaunchPlan(mounts=mounts, args=spec.args, env=container_env(spec, hostname, user.home),
                      cwd=spec.cwd, user=user, hostname=hostname, namespaces=namespaces,
                      tty=spec.tty, stdio=None, rlimits=spec.rlimits)


@contextlib.contextmanager
def _stdio(spec: ContainerSpec, stdin: Stream, stdout: Stream,
           stderr: Stream) -> Iterator[tuple[int, int, int] | None]:
    if spec.tty:
        yield None
        return
    devnull = None
    if spec.interactive:
        in_fd = stream_fileno(stdin, 0)
    else:
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        in_fd = devnull
    try:
        yield in_fd, stream_fileno(stdout, 1), stream_fileno(stderr, 2)
    finally:
        if devnull is not None:
            os.close(devnull)


def stream_fileno(stream: Stream, default: int) -> int:
    """The fd behind *stream* (flushed first), or *default* for None."""
    if stream is None:
        return default
    if isinstance(stream, int):
        return stream
    stream.flush()
    return stream.fileno()


def _launch(container_id: str, plan: LaunchPlan, cgroup: Cgroup, userns: UserNamespace | None,
            console_size: tuple[int, int] | None) -> ContainerProcess:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    report_r, report_w = os.pipe()
    try:
        shim_pid = os.fork()
    except OSError as exc:
        for fd in (report_r, report_w):
            os.close(fd)
        ours.close()
        theirs.close()
        raise ContainerSetupError(f"cannot fork: {exc.strerror}") from None
    if shim_pid == 0:
        ours.close()
        os.close(report_r)
        run_shim(plan, theirs, report_w)
    theirs.close()
    os.close(report_w)
    with os.fdopen(report_r, "rb") as report:
        try:
            return _handshake(container_id, plan, cgroup, userns, console_size,
                              ours, shim_pid, report)
        except BaseException:
            _abandon(ours, shim_pid)
            raise


def _handshake(container_id: str, plan: LaunchPlan, cgroup: Cgroup,
               userns: UserNamespace | None, console_size: tuple[int, int] | None,
               sync: socket.socket, shim_pid: int, report: IO[bytes]) -> ContainerProcess:
    if userns is not None:
        _expect_from_shim(sync, b"userns")
        _write_id_maps(shim_pid, userns)
        sync.send(b"mapped")
    message = _expect_from_shim(sync, b"pid ")
    pid = int(message.split()[1])
    pidfd = os.pidfd_open(pid)
    try:
        _join_cgroup(cgroup, pid)
        sync.send(b"joined")
        console_fd, early_status = None, None
        if plan.tty:
            console_fd, early_status = _receive_console(sync, console_size)
        failure = _read_report(report)
    except BaseException:
        os.close(pidfd)
        raise
    proc = ContainerProcess(container_id, pid, pidfd, shim_pid, sync, cgroup, console_fd,
                            failure["message"] if failure else None, early_status)
    if failure and failure["kind"] != "exec":
        proc.wait()
        raise ContainerSetupError(f"container setup failed: {failure['message']}")
    return proc


def _join_cgroup(cgroup: Cgroup, pid: int) -> None:
    try:
        cgroup.add(pid)
    except OSError as exc:
        raise ContainerSetupError(f"cannot join cgroup {cgroup.name}: {exc}") from None


def _expect_from_shim(sync: socket.socket, prefix: bytes) -> bytes:
    message = sync.recv(4096)
    if message.startswith(prefix):
        return message
    if message.startswith(b"error "):
        raise ContainerSetupError(f"container setup failed: {message[6:].decode(errors='replace')}")
    raise ContainerSetupError(f"container setup failed: unexpected {message[:80]!r} from shim")


def _receive_console(sync: socket.socket,
                     size: tuple[int, int] | None) -> tuple[int | None, int | None]:
    """(pty master, None), or (None, init's wait status) if init died first."""
    message, fds, _, _ = socket.recv_fds(sync, 4096, 1)
    if message != b"console" or not fds:
        # init failed before it had a pty; its report says why.
        for fd in fds:
            os.close(fd)
        status = int(message.split()[1]) if message.startswith(b"status ") else None
        return None, status
    master = fds[0]
    os.set_inheritable(master, False)
    if size is not None:
        set_winsize(master, *size)
    sync.send(b"go")
    return master, None


def _read_report(report: IO[bytes]) -> dict[str, str] | None:
    data = report.read()  # EOF: init exec'd (close-on-exec) or died
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return {"kind": "setup", "message": data.decode(errors="replace")}


def _write_id_maps(pid: int, userns: UserNamespace) -> None:
    for name, maps in (("uid_map", userns.uid_map), ("gid_map", userns.gid_map)):
        text = "".join(f"{m.container_id} {m.host_id} {m.size}\n" for m in maps)
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())  # the kernel takes one write only
        except OSError as exc:
            raise ContainerSetupError(f"cannot write {name}: {exc.strerror}") from None
        finally:
            os.close(fd)


def _abandon(sync: socket.socket, shim_pid: int) -> None:
    """Tear a half-started container down: the shim kills init on hang-up."""
    sync.close()
    with contextlib.suppress(ChildProcessError):
        os.waitpid(shim_pid, 0)


def run_container(spec: ContainerSpec, state_dir: str, *, container_id: str | None = None,
                  stdin: Stream = None, stdout: Stream = None, stderr: Stream = None,
                  on_start: Callable[[ContainerProcess], None] | None = None) -> ContainerResult:
    """Run ``spec`` in the foreground, like ``docker run`` without ``-d``.

    ``on_start(proc)``, if given, is called once the command has been
    exec'd, before the container is waited for (lifecycle code records the
    pid there); if it raises, the container is killed.

    Signals the caller receives (TERM, INT, HUP, QUIT, USR1, USR2, and
    WINCH without a tty) are forwarded to the container when called from
    the main thread. With ``spec.tty`` the caller's terminal is put in raw
    mode (when ``spec.interactive``) and relayed through the container's pty.
    """
    in_fd, out_fd = stream_fileno(stdin, 0), stream_fileno(stdout, 1)
    size = (get_winsize(in_fd) or get_winsize(out_fd)) if spec.tty else None
    forwarder = _SignalForwarder(in_fd if spec.tty else None)
    # Handlers go in before the start, so a signal that arrives while the
    # container starts is delivered to it rather than killing the caller.
    with forwarder.installed():
        proc = start_container(spec, state_dir, container_id=container_id, stdin=stdin,
                               stdout=stdout, stderr=stderr, console_size=size)
        try:
            forwarder.attach(proc)
            if on_start is not None:
                on_start(proc)
            if proc.console_fd is not None:
                relay_in = in_fd if spec.interactive else None
                with raw_mode(relay_in):
                    relay(proc.console_fd, relay_in, out_fd, forwarder.wakeup_fd)
            return proc.wait(forwarder.wakeup_fd)
        except BaseException:
            # Interrupted (a relay error, an exception from a handler):
            # never leave the container running behind the caller's back.
            if not proc.done:
                proc.kill(signal.SIGKILL)
                proc.wait()
            raise


class _SignalForwarder:
    """Forwards the caller's signals to the container, queueing early ones."""

    def __init__(self, tty_fd: int | None) -> None:
        self._tty_fd = tty_fd
        self._proc: ContainerProcess | None = None
        self._pending: list[int] = []
        self.wakeup_fd: int | None = None  # while installed (see signal_wakeup)

    def attach(self, proc: ContainerProcess) -> None:
        self._proc = proc
        if proc.console_fd is not None and self._tty_fd is not None:
            copy_winsize(self._tty_fd, proc.console_fd)  # may have changed meanwhile
        while self._pending:
            proc.kill(self._pending.pop(0))

    def _forward(self, sig: int, _frame: object) -> None:
        if self._proc is None:
            self._pending.append(sig)
        else:
            self._proc.kill(sig)

    def _resize(self, _sig: int, _frame: object) -> None:
        proc = self._proc
        if proc is not None and proc.console_fd is not None and self._tty_fd is not None:
            copy_winsize(self._tty_fd, proc.console_fd)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        # signal.signal only works in the main thread; elsewhere the caller
        # forwards by calling ContainerProcess.kill itself.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handlers = {sig: self._forward for sig in FORWARDED_SIGNALS}
        handlers[signal.SIGWINCH] = self._resize if self._tty_fd is not None else self._forward
        saved = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            with signal_wakeup() as self.wakeup_fd:
                yield
        finally:
            self.wakeup_fd = None
            for sig, handler in saved.items():
                signal.signal(sig, handler)
