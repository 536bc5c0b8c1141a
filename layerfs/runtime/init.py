"""The processes between the caller and the container's command.

::

    caller         start_container(): prepares, then answers the handshake
     └─ shim       binds the host paths into a new mount namespace (as
        |          host root), unshares the other namespaces, forks init,
        |          waits for it and reports its wait status; stays outside
        |          the container's cgroup so an OOM kill or a pids limit
        |          never hits it
        └─ init    PID 1 of the new pid namespace (unshare(CLONE_NEWPID)
                   only applies to children, hence the shim): new cgroup and
                   mount namespaces, kernel mounts, pivot_root, privileges,
                   execve

The shim and init talk to the caller over one SOCK_SEQPACKET socket, one
message per packet::

    shim -> caller  b"userns"            (user ns only) write my id maps
    caller -> shim  b"mapped"
    shim -> caller  b"pid N"             init's pid in the caller's pid ns
    caller -> init  b"joined"            init is in the container cgroup
    init -> caller  b"console" + fd      (tty only) the pty master
    caller -> init  b"go"                window size set
    shim -> caller  b"status N"          init's raw wait status, at the end
    shim -> caller  b"error MSG"         the shim itself failed

Init reports failures on a separate close-on-exec pipe that only it holds:
EOF on that pipe means execve succeeded, a JSON record means it did not
(``{"kind": "setup"|"exec", "message": ...}``), so exec failures (126/127)
are told apart from a command that exits 126/127 by itself.

If the caller disappears (its end of the socket hangs up), the shim kills
init, and with it the whole pid namespace, then removes the cgroup that
the caller can no longer remove.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
from dataclasses import dataclass
from typing import NoReturn

from layerfs.errors import LayerfsError
from layerfs.runtime import syscalls
from layerfs.runtime.caps import apply_rlimits, drop_privileges
from layerfs.runtime.cgroups import remove_cgroup_paths
from layerfs.runtime.network import loopback_up
from layerfs.runtime.pty import make_controlling_terminal, open_pty
from layerfs.runtime.rootfs import (
    MountPlan,
    bind_console,
    make_root_readonly,
    mount_host_side,
    mount_namespace_side,
    pivot_into,
    rebind_cwd,
)
from layerfs.runtime.spec import Rlimit
from layerfs.runtime.users import ExecUser

EXIT_SETUP_FAILED = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
# Signals the caller forwards; the shim must survive them (a Ctrl-C reaches
# the whole foreground process group) so it can still report the status.
SHIM_IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                signal.SIGUSR1, signal.SIGUSR2, signal.SIGTSTP, signal.SIGTTIN,
                signal.SIGTTOU)
_MAX_REPORT = 3000  # below PIPE_BUF, so a report is written atomically


@dataclass(frozen=True)
class LaunchPlan:
    """Everything the shim and init need, resolved by the caller."""

    mounts: MountPlan
    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    user: ExecUser
    hostname: str
    namespaces: int
    tty: bool
    stdio: tuple[int, int, int] | None
    rlimits: tuple[Rlimit, ...]
    cgroup_dirs: tuple[str, ...] = ()


def expect(sock: socket.socket, wanted: bytes) -> None:
    message = sock.recv(4096)
    if message != wanted:
        raise RuntimeError(f"handshake: expected {wanted!r}, got {message!r}")


def run_shim(plan: LaunchPlan, sync: socket.socket, report_fd: int) -> NoReturn:
    """Body of the shim process; never returns."""
    code = 1
    try:
        for sig in SHIM_IGNORED:
            signal.signal(sig, signal.SIG_IGN)
        syscalls.unshare(syscalls.CLONE_NEWNS)
        mount_host_side(plan.mounts)
        syscalls.unshare(plan.namespaces & ~syscalls.CLONE_NEWNS)
        if plan.namespaces & syscalls.CLONE_NEWUSER:
            sync.send(b"userns")
            expect(sync, b"mapped")
            # Become the namespace's root so files we create are owned by it.
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        pid = os.fork()
        if pid == 0:
            run_init(plan, sync, report_fd)
        os.close(report_fd)
        sync.send(b"pid %d" % pid)
        status, abandoned = _wait_for(pid, sync)
        if abandoned:
            _remove_cgroup_dirs(plan.cgroup_dirs)
        else:
            sync.send(b"status %d" % status)
        code = 0
    except BaseException as exc:  # noqa: BLE001 - report anything, then exit
        try:
            sync.send(b"error " + str(exc).encode(errors="replace")[:_MAX_REPORT])
        except OSError:
            pass
    finally:
        os._exit(code)


def _wait_for(pid: int, sync: socket.socket) -> tuple[int, bool]:
    """Wait for init; kill it if the caller hangs up first.

    Returns init's wait status and whether the caller was gone.
    """
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(sync.fileno(), 0)  # 0: only hang-ups and errors
    killed = False
    while True:
        events = dict(poller.poll())
        if pidfd in events:
            break
        if not killed:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            killed = True
        poller.unregister(sync.fileno())
    os.close(pidfd)
    return os.waitpid(pid, 0)[1], killed


def _remove_cgroup_dirs(dirs: tuple[str, ...]) -> None:
    """Best effort for an abandoned container: nobody else will rmdir them.

    Init is reaped, so the pid namespace and the cgroups are empty. Fails
    quietly inside a user namespace, which may not touch host cgroups.
    """
    try:
        remove_cgroup_paths(dirs)
    except (LayerfsError, OSError):
        pass


def run_init(plan: LaunchPlan, sync: socket.socket, report_fd: int) -> NoReturn:
    """Body of the container's PID 1 until execve; never returns."""
    try:
        slave = _setup(plan, sync)
        drop_privileges(plan.user.uid, plan.user.gid, plan.user.groups)
        if slave is not None:
            make_controlling_terminal(slave)
        try:
            os.chdir(plan.cwd)
        except OSError as exc:
            raise OSError(exc.errno, f"chdir to working directory {plan.cwd}: "
                                     f"{exc.strerror}") from None
        _close_fds_except(report_fd)
        _reset_signals()
    except BaseException as exc:  # noqa: BLE001 - must never return to the caller's code
        _report(report_fd, "setup", str(exc))
        os._exit(EXIT_SETUP_FAILED)
    _exec(plan, report_fd)


def _setup(plan: LaunchPlan, sync: socket.socket) -> int | None:
    """Everything init does as root; returns the pty slave in tty mode."""
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    if plan.stdio is not None:
        _install_stdio(plan.stdio)
    expect(sync, b"joined")
    # A cgroup namespace after joining, so the container sees its own cgroup
    # as /. A mount namespace of its own, so pivot_root moves only init (it
    # moves every process of the namespace) and the shim keeps the host's
    # view to clean up; with a user namespace this one is also owned by it.
    syscalls.unshare(syscalls.CLONE_NEWCGROUP | syscalls.CLONE_NEWNS)
    if plan.namespaces & syscalls.CLONE_NEWUSER:
        rebind_cwd()
    mount_namespace_side(plan.mounts)
    slave = None
    if plan.tty:
        master, slave, slave_path = open_pty(os.path.join("dev", "pts"))
        bind_console(slave_path)
        socket.send_fds(sync, [b"console"], [master])
        os.close(master)
        expect(sync, b"go")
        os.fchown(slave, plan.user.uid, plan.user.gid)
    pivot_into()
    if plan.mounts.read_only:
        make_root_readonly()
    socket.sethostname(plan.hostname)
    if plan.namespaces & syscalls.CLONE_NEWNET:
        loopback_up()
    apply_rlimits(plan.rlimits)
    return slave


def _install_stdio(stdio: tuple[int, int, int]) -> None:
    # Duplicate first: a requested fd may itself be 0, 1 or 2.
    copies = [os.dup(fd) for fd in stdio]
    for target, fd in enumerate(copies):
        os.dup2(fd, target)
    for fd in copies:
        os.close(fd)


def _close_fds_except(keep: int) -> None:
    """Close everything but stdio and the report pipe (which is close-on-exec)."""
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))


def _reset_signals() -> None:
    # Python ignores SIGPIPE and SIGXFSZ and installs a SIGINT handler;
    # the command must start with the defaults and nothing blocked.
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # real-time signals Python refuses to touch
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _exec(plan: LaunchPlan, report_fd: int) -> NoReturn:
    env = dict(item.split("=", 1) for item in plan.env)
    command = plan.args[0]
    try:
        # execvpe searches the PATH of ``env``, the container's, as docker does.
        os.execvpe(command, list(plan.args), env)
    except OSError as exc:
        code, message = _exec_failure(command, exc)
    except BaseException as exc:  # noqa: BLE001
        code, message = EXIT_SETUP_FAILED, f"exec {command}: {exc}"
    _report(report_fd, "exec", message)
    os._exit(code)


def _exec_failure(command: str, exc: OSError) -> tuple[int, str]:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        if "/" in command:
            return EXIT_NOT_FOUND, f"exec {command}: no such file or directory"
        return EXIT_NOT_FOUND, f'exec: "{command}": executable file not found in $PATH'
    return EXIT_NOT_EXECUTABLE, f"exec {command}: {os.strerror(exc.errno or errno.EACCES).lower()}"


def _report(fd: int, kind: str, message: str) -> None:
    record = json.dumps({"kind": kind, "message": message[:_MAX_REPORT]})
    try:
        os.write(fd, record.encode())
    except OSError:
        pass
