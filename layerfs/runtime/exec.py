"""``layerfs exec``: a new process in a running container.

Like ``runc exec``/``nsenter``: a helper child joins the container's cgroup,
then its ipc, uts, net, cgroup, pid and mount namespaces (setns), enters the
container's root, and forks the command, which becomes a member of the
container's pid namespace. The command gets the container's identity and
limits: docker's capability set, no_new_privs, the container's user (or
``--user``), environment, working directory and rlimits. With ``tty`` it gets
a pty from the container's own devpts, relayed by the helper.

The caller waits for the helper, whose exit status is the command's (126
not executable, 127 not found, 128+N killed by signal N). Setup failures
come back on a pipe and are raised as ``ContainerSetupError``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
from collections.abc import Sequence
from typing import NoReturn

from layerfs.errors import Conflict
from layerfs.runtime import syscalls
from layerfs.runtime.caps import apply_rlimits, drop_privileges
from layerfs.runtime.containers import Container, read_state
from layerfs.runtime.errors import ContainerSetupError
from layerfs.runtime.pty import copy_winsize, make_controlling_terminal, open_pty, raw_mode, relay
from layerfs.runtime.spec import container_env
from layerfs.runtime.users import resolve_user

# Joined in this order; mnt last, since it changes what paths mean.
_NAMESPACES = (("ipc", syscalls.CLONE_NEWIPC), ("uts", syscalls.CLONE_NEWUTS),
               ("net", syscalls.CLONE_NEWNET), ("cgroup", syscalls.CLONE_NEWCGROUP),
               ("pid", syscalls.CLONE_NEWPID), ("mnt", syscalls.CLONE_NEWNS))
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def exec_in_container(c: Container, args: Sequence[str], *, tty: bool = False,
                      interactive: bool = False, user: str | None = None,
                      env: Sequence[str] = (), cwd: str | None = None) -> int:
    """Run ``args`` in the running container ``c``; return its exit status."""
    if not args:
        raise ContainerSetupError("no command given to exec")
    state = read_state(c.root, c.id)
    if state.status != "running" or state.pid is None:
        raise Conflict(f"container {c.name} is not running")
    spec = c.spec()
    exec_user = resolve_user(c.rootfs, c.config.user if user is None else user)
    hostname = c.config.hostname or c.id[:12]
    merged = dict(item.split("=", 1) for item in container_env(spec, hostname, exec_user.home))
    merged.update(item.split("=", 1) for item in env)
    if tty:
        merged.setdefault("TERM", "xterm")
    env_list = [f"{k}={v}" for k, v in merged.items()]
    try:
        ns_fds = [(os.open(f"/proc/{state.pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), kind)
                  for name, kind in _NAMESPACES]
        root_fd = os.open(f"/proc/{state.pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Conflict(f"container {c.name} is not running") from None
    report_r, report_w = os.pipe()
    try:
        helper = os.fork()
        if helper == 0:  # pragma: no cover - runs in the child
            os.close(report_r)
            _helper(state.cgroup_paths, ns_fds, root_fd, report_w, list(args), env_list,
                    cwd or spec.cwd, exec_user, spec, tty, interactive)
    finally:
        os.close(report_w)
        for fd, _ in ns_fds:
            os.close(fd)
        os.close(root_fd)
    with os.fdopen(report_r, "rb") as report:
        data = report.read()
    _, status = _waitpid(helper)
    if data:
        raise ContainerSetupError(f"exec failed: {json.loads(data)['message']}")
    return _exit_code(status)


def _waitpid(pid: int) -> tuple[int, int]:
    # Our caller may have Ctrl-C delivered to it too; the helper decides.
    saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGINT, saved)


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _helper(cgroup_paths, ns_fds, root_fd, report_w, args, env, cwd, user, spec, tty,
            interactive) -> NoReturn:  # type: ignore[no-untyped-def]
    """The setns child: join, fork the command, relay its tty, exit with its status."""
    try:
        for path in cgroup_paths:
            with open(os.path.join(path, "cgroup.procs"), "w", encoding="ascii") as handle:
                handle.write(str(os.getpid()))
        for fd, kind in ns_fds:
            _setns(fd, kind)
        os.fchdir(root_fd)
        os.chroot(".")
        os.chdir("/")
        master = slave = None
        if tty:
            master, slave, _ = open_pty("/dev/pts")
            if os.isatty(0):
                copy_winsize(0, master)
        pid = os.fork()
        if pid == 0:
            _command(args, env, cwd, user, spec, slave, interactive, report_w)
        if slave is not None:
            os.close(slave)
    except BaseException as exc:  # noqa: BLE001 - report it, never return
        _report(report_w, str(exc))
        os._exit(125)
    os.close(report_w)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if master is not None:
        signal.signal(signal.SIGWINCH, lambda *_: copy_winsize(0, master) if os.isatty(0) else None)
        relay_in = 0 if interactive else None
        try:
            with raw_mode(relay_in):
                relay(master, relay_in, 1)
        except OSError:
            pass
    _, status = os.waitpid(pid, 0)
    os._exit(_exit_code(status))


def _command(args, env, cwd, user, spec, slave, interactive, report_w) -> NoReturn:  # type: ignore[no-untyped-def]
    try:
        if slave is None and not interactive:
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
        apply_rlimits(spec.rlimits)
        if slave is not None:
            os.fchown(slave, user.uid, user.gid)
        drop_privileges(user.uid, user.gid, user.groups)
        if slave is not None:
            make_controlling_terminal(slave)
            os.close(slave)
        try:
            os.chdir(cwd)
        except OSError as exc:
            raise OSError(exc.errno, f"chdir to {cwd}: {exc.strerror}") from None
        for sig in (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGWINCH):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
    except BaseException as exc:  # noqa: BLE001
        _report(report_w, str(exc))
        os._exit(125)
    environ = dict(item.split("=", 1) for item in env)
    try:
        os.execvpe(args[0], args, environ)
    except OSError as exc:
        code, message = _exec_failure(args[0], exc)
    except BaseException as exc:  # noqa: BLE001
        code, message = 126, f"exec {args[0]}: {exc}"
    os.write(2, f"layerfs exec: {message}\n".encode())
    os._exit(code)


def _exec_failure(command: str, exc: OSError) -> tuple[int, str]:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        if "/" in command:
            return 127, f"{command}: no such file or directory"
        return 127, f'"{command}": executable file not found in $PATH'
    return 126, f"{command}: {os.strerror(exc.errno or errno.EACCES).lower()}"


def _report(fd: int, message: str) -> None:
    try:
        os.write(fd, json.dumps({"message": message[:3000]}).encode())
    except OSError:
        pass
