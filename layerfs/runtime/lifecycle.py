"""Running, stopping and removing recorded containers.

Every running container has one *owner* process that holds its layerfs
mount, starts it (``start_container`` or an OCI runtime), waits for it,
records the exit status in state.json and cleans up (cgroup, mount, and the
whole record with ``--rm``)::

    layerfs run      (foreground)  the CLI process itself is the owner
    layerfs run -d   (detached)    a shim: double fork + setsid, then exec
                                   ``python -m layerfs.runtime.shim``; the
                                   CLI returns once the shim says "started"

The owner writes "exited" only after the mount is gone, so ``wait`` and
``rm`` right after it never race the cleanup. If an owner is killed, the
runtime's own shim kills the container and removes its cgroup when the
owner's socket hangs up, and the mount's daemon, watching the owner,
unmounts; ``rm`` cleans up whatever is still left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from layerfs.errors import Conflict, LayerfsError, NotFound, Unsupported
from layerfs.runtime import containers as records
from layerfs.runtime.cgroups import remove_cgroup_paths
from layerfs.runtime.containers import Container, ContainerState, load, update_state
from layerfs.runtime.errors import ContainerSetupError
from layerfs.runtime.process import (
    ContainerProcess,
    ContainerResult,
    run_container,
    signal_wakeup,
    start_container,
    stream_fileno,
)
from layerfs.runtime.pty import relay
from layerfs.store.store import Store

Ready = Callable[[str | None], None]
_POLL = 0.02
_CHUNK = 65536


# -- the owner ---------------------------------------------------------------------
def run_foreground(root: str, container_id: str, *, stdin: Any = None, stdout: Any = None,
                   stderr: Any = None, store: Store | None = None) -> ContainerResult:
    """``docker run`` / ``start -a``: own the container from this process.

    Output goes to the given streams (default: ours) and to the container's
    log; signals we receive are forwarded; with a tty the terminal is
    relayed. Returns the result once the container is cleaned up.

    ``store``, an open Store of ``root``, is used for the clean-up instead of
    opening another (an open costs ~5 ms: it makes the 256 object dirs).
    """
    return own(root, container_id, foreground=True, stdin=stdin, stdout=stdout, stderr=stderr,
               store=store)


def own(root: str, container_id: str, *, foreground: bool, stdin: Any = None,
        stdout: Any = None, stderr: Any = None, ready: Ready | None = None,
        store: Store | None = None) -> ContainerResult:
    """Mount, start, wait, record, clean up; see the module docstring."""
    from layerfs.fs import mount as fsmount

    c = load(root, container_id)
    if c.running:
        raise Conflict(f"container {c.name} is already running")
    if c.state.status == "exited":
        clean_leftovers(c)
    me = os.getpid()
    update_state(root, c.id, status="starting", owner_pid=me,
                 owner_start=records.process_start_time(me), pid=None, cgroup_paths=(),
                 started=time.time(), finished=None, exit_code=None, oom_killed=False, error=None)
    result: ContainerResult | None = None
    error: str | None = None
    mounted = False
    log_fd = os.open(c.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    try:
        fsmount.mount_image(root, c.config.image_id, c.rootfs, upper_dir=c.upper,
                            container=c.id, owner=me,  # the mount dies with its owner
                            backend=c.config.backend)
        mounted = True
        if c.config.runtime == "builtin":
            result = _run_builtin(c, foreground, stdin, stdout, stderr, log_fd, ready)
        else:
            result = _run_oci(c, foreground, stdin, stdout, stderr, log_fd, ready)
    except BaseException as exc:
        error = str(exc) or type(exc).__name__
        raise
    finally:
        try:
            if mounted:
                _unmount(c)
        finally:
            os.close(log_fd)
            _finish(c, result, error, store)
    return result


def _unmount(c: Container) -> None:
    """Unmount the rootfs; with --rm, delete the container's files meanwhile.

    Most of an unmount is waiting for the mount daemon to exit. With --rm
    nothing reads the upper or the runtime files again (the daemon, shutting
    down, only syncs the upper's filesystem), so they are deleted while it
    does; config.json and state.json stay until ``_finish``, so ``wait`` and
    ``ps`` see the container until the mount is gone.
    """
    from layerfs.fs import mount as fsmount

    if not c.config.auto_remove:
        with contextlib.suppress(LayerfsError):
            fsmount.unmount(c.root, c.rootfs)
        return
    failure: list[BaseException] = []

    def unmount() -> None:
        try:
            with contextlib.suppress(LayerfsError):
                fsmount.unmount(c.root, c.rootfs)
        except BaseException as exc:  # noqa: BLE001 - raised again below
            failure.append(exc)

    thread = threading.Thread(target=unmount, name=f"unmount-{c.id[:12]}", daemon=True)
    thread.start()
    try:
        for path in (c.upper, c.upper + ".work", c.runtime_dir):
            records.remove_tree(path)
    finally:
        thread.join()
    if failure:
        raise failure[0]


def _finish(c: Container, result: ContainerResult | None, error: str | None,
            store: Store | None = None) -> None:
    with contextlib.suppress(NotFound):
        update_state(c.root, c.id, status="exited", pid=None, finished=time.time(),
                     exit_code=result.exit_code if result else 125,
                     oom_killed=bool(result and result.oom_killed),
                     error=(result.exec_error if result else error))
    if c.config.auto_remove:
        if store is not None:
            records.forget_container(store, c)
        else:
            with Store(c.root) as store:
                records.forget_container(store, c)


def _mark_running(c: Container, proc: ContainerProcess | None, ready: Ready | None,
                  **extra: Any) -> None:
    fields: dict[str, Any] = {"status": "running"}
    if proc is not None:
        fields.update(pid=proc.pid, cgroup_paths=tuple(proc.cgroup.paths))
    update_state(c.root, c.id, **fields, **extra)
    if ready is not None:
        ready(proc.exec_error if proc is not None else None)


class _Tee:
    """A pipe whose bytes go both to ``target_fd`` and the container's log."""

    def __init__(self, target_fd: int, log_fd: int) -> None:
        read_fd, self.write_fd = os.pipe()
        self._thread = threading.Thread(target=self._pump, args=(read_fd, target_fd, log_fd),
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def _pump(read_fd: int, target_fd: int | None, log_fd: int) -> None:
        try:
            while data := os.read(read_fd, _CHUNK):
                if target_fd is not None:
                    try:
                        _write_all(target_fd, data)
                    except OSError:
                        target_fd = None  # reader gone (EPIPE): keep logging
                _write_all(log_fd, data)
        finally:
            os.close(read_fd)

    def close(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1
        self._thread.join(timeout=10)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _run_builtin(c: Container, foreground: bool, stdin: Any, stdout: Any, stderr: Any,
                 log_fd: int, ready: Ready | None) -> ContainerResult:
    spec = c.spec()
    if foreground:
        # Pipes are made after the mount daemon forked, so only the
        # container holds their write ends and EOF means it is done.
        out = _Tee(stream_fileno(stdout, 1), log_fd)
        err = None if spec.tty else _Tee(stream_fileno(stderr, 2), log_fd)
        try:
            return run_container(spec, c.runtime_dir, container_id=c.id, stdin=stdin,
                                 stdout=out.write_fd, stderr=err.write_fd if err else None,
                                 on_start=lambda proc: _mark_running(c, proc, ready))
        finally:
            out.close()
            if err is not None:
                err.close()
    proc = start_container(spec, c.runtime_dir, container_id=c.id, stdin=stdin,
                           stdout=log_fd, stderr=log_fd)
    try:
        with _forwarding(proc) as wakeup_fd:
            _mark_running(c, proc, ready)
            if proc.console_fd is not None:
                relay(proc.console_fd, None, log_fd, wakeup_fd)
            return proc.wait(wakeup_fd)
    except BaseException:
        if not proc.done:
            proc.kill(signal.SIGKILL)
            proc.wait()
        raise


@contextlib.contextmanager
def _forwarding(proc: ContainerProcess):  # type: ignore[no-untyped-def]
    """In a shim: SIGTERM/SIGINT to the shim go to the container. Yields
    the signal wakeup fd for ``proc.wait`` (``process.signal_wakeup``)."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    sigs = (signal.SIGTERM, signal.SIGINT)
    saved = {s: signal.signal(s, lambda sig, _frame: proc.kill(sig)) for s in sigs}
    try:
        with signal_wakeup() as wakeup_fd:
            yield wakeup_fd
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def _hybrid_cgroups() -> bool:
    return os.path.ismount("/sys/fs/cgroup/unified")


def _run_oci(c: Container, foreground: bool, stdin: Any, stdout: Any, stderr: Any,
             log_fd: int, ready: Ready | None) -> ContainerResult:
    import subprocess

    from layerfs.runtime.bundle import run_bundle, write_bundle

    spec = c.spec()
    bundle = os.path.join(c.runtime_dir, "bundle")
    write_bundle(spec, bundle, hostname=c.config.hostname or c.id[:12], state_dir=c.runtime_dir)
    runtime_root = os.path.join(c.runtime_dir, "oci-state")
    hide = c.config.runtime == "crun" and _hybrid_cgroups()
    stdin_arg = stdin if c.config.interactive or c.config.tty else subprocess.DEVNULL
    _mark_running(c, None, ready, runtime_root=runtime_root)
    if foreground:
        out = _Tee(stream_fileno(stdout, 1), log_fd)
        err = _Tee(stream_fileno(stderr, 2), log_fd)
        try:
            code = run_bundle(bundle, c.id, c.config.runtime, stdin=stdin_arg, stdout=out.write_fd,
                              stderr=err.write_fd, runtime_root=runtime_root, hide_cgroup2=hide)
        finally:
            out.close()
            err.close()
    else:
        code = run_bundle(bundle, c.id, c.config.runtime, stdin=subprocess.DEVNULL,
                          stdout=log_fd, stderr=log_fd, runtime_root=runtime_root,
                          hide_cgroup2=hide)
    sig = code - 128 if code > 128 else None
    return ContainerResult(code, False, sig, None)


# -- detached: the shim ---------------------------------------------------------
def start_detached(root: str, container_id: str, timeout: float = 120.0) -> str | None:
    """Start the container under a shim; return its exec error, if any.

    Double fork + setsid so the shim outlives us and is never our zombie;
    then exec a fresh interpreter, so the shim inherits none of our state
    (open database, threads). Returns once the command was exec'd.
    """
    c = load(root, container_id)
    if c.running:
        raise Conflict(f"container {c.name} is already running")
    read_fd, write_fd = os.pipe()
    shim_log = os.path.join(c.dir, "shim.log")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_fd)
            os.setsid()
            if os.fork() == 0:
                _exec_shim(root, container_id, write_fd, shim_log)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    os.waitpid(pid, 0)
    # One line, not EOF: the mount daemon the shim forks inherits the pipe.
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.readline()
    try:
        message = json.loads(data) if data else {}
    except ValueError:
        message = {"error": data.decode(errors="replace")}
    if message.get("ok"):
        return message.get("exec_error")
    error = message.get("error") or f"the container shim died during start; see {shim_log}"
    raise ContainerSetupError(error)


def _exec_shim(root: str, container_id: str, ready_fd: int, log: str) -> None:
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(err, 1)
        os.dup2(err, 2)
        os.set_inheritable(ready_fd, True)
        for fd in (null, err):
            if fd != ready_fd and fd > 2:
                os.close(fd)
        os.chdir("/")
        os.execv(sys.executable, [sys.executable, "-m", "layerfs.runtime.shim", root,
                                  container_id, str(ready_fd)])
    finally:
        os._exit(127)


def shim_main(root: str, container_id: str, ready_fd: int) -> int:
    """Body of ``python -m layerfs.runtime.shim``."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sent = False

    def ready(exec_error: str | None) -> None:
        nonlocal sent
        os.write(ready_fd, json.dumps({"ok": True, "exec_error": exec_error}).encode() + b"\n")
        os.close(ready_fd)
        sent = True

    try:
        own(root, container_id, foreground=False, ready=ready)
    except BaseException as exc:
        if not sent:
            message = str(exc) if isinstance(exc, LayerfsError) else f"container shim failed: {exc!r}"
            os.write(ready_fd, json.dumps({"error": message}).encode() + b"\n")
        if isinstance(exc, LayerfsError):
            return 1
        raise
    return 0


# -- signals, stop, wait, rm ------------------------------------------------------
def kill_container(c: Container, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the container's PID 1 (docker kill)."""
    state = _running_state(c)
    if c.config.runtime != "builtin":
        import subprocess

        argv = [c.config.runtime, "--root", state.runtime_root or "", "kill", c.id, str(sig)]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0 and _running_now(c):
            raise ContainerSetupError(f"{c.config.runtime} kill failed: "
                                      f"{done.stderr.strip() or done.returncode}")
        return
    assert state.pid is not None
    try:
        pidfd = os.pidfd_open(state.pid)
    except ProcessLookupError:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, sig)
    finally:
        os.close(pidfd)


def _running_now(c: Container) -> bool:
    try:
        return load(c.root, c.id).running
    except NotFound:
        return False


def _running_state(c: Container, timeout: float = 10.0) -> ContainerState:
    """The state once the container has a pid; Conflict if it is not running."""
    deadline = time.monotonic() + timeout
    while True:
        state = records.read_state(c.root, c.id)
        if state.status not in ("starting", "running"):
            raise Conflict(f"container {c.name} is not running")
        ready = state.pid is not None or (state.status == "running"
                                          and c.config.runtime != "builtin")
        if ready:
            return state
        if time.monotonic() > deadline:
            raise Conflict(f"container {c.name} is still starting")
        time.sleep(_POLL)


def wait_container(root: str, container_id: str,
                   timeout: float | None = None) -> ContainerState | None:
    """Block until the container has exited and been cleaned up.

    Returns its final state, or None on timeout. A container removed
    meanwhile (``--rm``) returns the last state seen.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    last: ContainerState | None = None
    while True:
        try:
            state = records.read_state(root, container_id)
        except NotFound:
            if last is not None:
                return last
            raise
        if state.status == "exited":
            return state
        last = state
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(_POLL)


def stop_container(c: Container, timeout: float = 10.0) -> None:
    """docker stop: the stop signal, then SIGKILL after ``timeout`` seconds."""
    try:
        kill_container(c, records.parse_signal(c.config.stop_signal))
    except Conflict:
        return
    if wait_container(c.root, c.id, timeout) is not None:
        return
    with contextlib.suppress(Conflict):
        kill_container(c, signal.SIGKILL)
    with contextlib.suppress(NotFound):
        wait_container(c.root, c.id, 60)


def remove_container(store: Store, c: Container, force: bool = False) -> None:
    """docker rm: refuse a running container unless ``force`` (then kill it)."""
    if c.running:
        if not force:
            raise Conflict(f"cannot remove running container {c.name}: stop it first "
                           "or use --force")
        with contextlib.suppress(Conflict, NotFound):
            kill_container(c, signal.SIGKILL)
        with contextlib.suppress(NotFound):
            if wait_container(c.root, c.id, 60) is None:
                raise Conflict(f"container {c.name} did not stop")
    clean_leftovers(c)
    records.forget_container(store, c)


def clean_leftovers(c: Container) -> None:
    """Undo what an owner that died left: its mount, its cgroup."""
    from layerfs.fs import mount as fsmount

    with Store(c.root) as store:
        known = store.get_ref(fsmount.REF_KIND, os.path.realpath(c.rootfs)) is not None
    if known or fsmount.mounted_fstype(c.rootfs) is not None:
        with contextlib.suppress(NotFound):
            fsmount.unmount(c.root, c.rootfs)
    with contextlib.suppress(LayerfsError, OSError):
        remove_cgroup_paths([p for p in c.state.cgroup_paths if os.path.isdir(p)])


def copy_log(c: Container, out: IO[bytes], follow: bool = False) -> None:
    """docker logs [-f]: what the container wrote so far, then (-f) as it comes."""
    try:
        handle = open(c.log_path, "rb")
    except FileNotFoundError:
        return
    with handle:
        while True:
            data = handle.read(_CHUNK)
            if data:
                out.write(data)
                out.flush()
                continue
            if not follow:
                return
            try:
                if records.read_state(c.root, c.id).status not in ("starting", "running"):
                    follow = False  # one more read for the last bytes
                    continue
            except NotFound:
                follow = False
                continue
            time.sleep(0.1)


def require_builtin(c: Container, what: str) -> None:
    if c.config.runtime != "builtin":
        raise Unsupported(f"{what} is not supported for containers run by {c.config.runtime}")


# -- bundles for other runtimes ----------------------------------------------------
def make_bundle(store: Store, image_ref: str, bundle_dir: str, *, container: str | None = None,
                cmd: tuple[str, ...] = (), backend: str | None = None) -> str:
    """An OCI runtime bundle whose rootfs is a layerfs mount of the image.

    ``bundle_dir/rootfs`` is mounted (unmount it with ``fs.mount.unmount``
    when done) and ``bundle_dir/config.json`` written; ``runc run`` and
    ``crun run`` start it unchanged. With ``container`` the writes go to
    that container's upper dir (an existing container: its command and
    options too); without, to a private upper dropped at unmount. Returns
    the config path.
    """
    from dataclasses import replace

    from layerfs.fs import mount as fsmount
    from layerfs.runtime.bundle import write_bundle
    from layerfs.runtime.spec import ContainerSpec

    upper = None
    spec_source: Container | None = None
    if container is not None:
        try:
            spec_source = records.find_container(store, container)
        except NotFound:
            upper = fsmount.container_upper(store.root, container)
        else:
            if spec_source.running:
                raise Conflict(f"container {container} is running; its upper dir is in use")
            upper = spec_source.upper
    image = store.image(spec_source.config.image_id if spec_source else image_ref)
    rootfs = os.path.join(os.path.abspath(bundle_dir), "rootfs")
    os.makedirs(rootfs, exist_ok=True)
    if spec_source is not None:
        spec = spec_source.spec()
        if cmd:
            spec = replace(spec, args=tuple(cmd))
    else:
        rc = image.runtime_config
        spec = ContainerSpec(rootfs=rootfs, args=records.resolve_command(rc, cmd, None),
                             env=records.merge_env(rc.get("Env") or [], ()),
                             cwd=rc.get("WorkingDir") or "/", user=rc.get("User") or "")
    if backend is None and spec_source is not None:
        backend = spec_source.config.backend
    fsmount.mount_image(store.root, image.id, rootfs, upper_dir=upper, container=container, backend=backend)
    try:
        return write_bundle(replace(spec, rootfs=rootfs), bundle_dir, hostname="layerfs",
                            state_dir=os.path.join(os.path.abspath(bundle_dir), "etc"))
    except BaseException:
        fsmount.unmount(store.root, rootfs)
        raise
