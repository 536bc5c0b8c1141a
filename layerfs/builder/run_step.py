"""RUN: one command in a container on a layerfs mount of the parent image.

The parent is mounted (read-write, its own upper dir) by the forkserver's
helper, the command runs there under the thin runtime with the step's
``--mount``s, its output goes line by line to ``output``, and the upper
dir becomes the step's layer, less the mountpoint stubs the runtime made
(:mod:`layerfs.builder.mount_stubs`).

A failing command raises :class:`BuildError`; Ctrl-C kills the container
(a ``/bin/sh -c`` PID 1 would ignore a forwarded SIGINT).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from layerfs.builder import config as image_config
from layerfs.builder import dockerfile as dfm
from layerfs.builder import run_mounts
from layerfs.errors import LayerfsError, Unsupported
from layerfs.fs.helper import mount_for_owner
from layerfs.fs.registry import force_unmount
from layerfs.procfs import is_mountpoint
from layerfs.store import scratch
from layerfs.store.images import Image
from layerfs.store.store import Store

__all__ = ["BuildError", "heredoc_script", "run"]


class BuildError(LayerfsError):
    """A build step failed. The CLI exits with the class's ``exit_code``
    (1, as ``docker build`` does), never with the step's own status: 3
    would read as "damaged store". ``step_exit_code`` keeps a RUN step's
    status, which the message also shows."""

    def __init__(self, message: str, step_exit_code: int | None = None):
        super().__init__(message)
        self.step_exit_code = step_exit_code


def run(store: Store, image: Image, e: dfm.Run, rc: Mapping[str, Any], shell: Sequence[str],
        variables: Mapping[str, str], mounts: Sequence[run_mounts.RunMount], *, network: str,
        secrets: Mapping[str, run_mounts.SecretSource], fill: run_mounts.Filler, backend: str | None = None,
        from_ids: Mapping[str, str], output: Callable[[str], None]) -> str:
    """Run ``e`` on ``image`` with runtime config ``rc``; returns the new
    layer's id. ``variables`` are the build args and ENV the step sees;
    ``network`` is the build's (``RUN --network`` overrides it); ``backend``
    mounts the step's rootfs (``fs.backend``; None: the store's default)."""
    try:
        from layerfs.fs.mount import unmount
        from layerfs.runtime import ContainerSpec, run_container
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise Unsupported(f"RUN needs the layerfs FUSE filesystem and runtime: {exc}") from None
    from layerfs.builder.mount_stubs import MountStubs, prune_unchanged_dirs
    from layerfs.runtime.spec import Tmpfs, Volume
    from layerfs.store import transfer

    argv = list(e.command.args) if e.command.exec_form else list(shell) + list(e.command.args)
    if e.heredocs and not e.command.exec_form:
        argv = list(shell) + heredoc_script(e.command.args[0] if e.command.args else "", e.heredocs)
    env = image_config.env_dict(rc.get("Env"))
    env.update(variables)  # (PATH, HOSTNAME, HOME default as in any container: runtime.spec.container_env)
    tmp = scratch.mkdtemp(store.tmp_dir, "build-run")
    mp = os.path.join(tmp, "rootfs")
    upper = os.path.join(tmp, "upper")
    state = os.path.join(tmp, "state")
    os.mkdir(mp)
    os.mkdir(state)
    mounted = False
    w_fd = -1
    pump: threading.Thread | None = None
    prepared: run_mounts.PreparedMounts | None = None
    try:
        prepared = run_mounts.prepare(mounts, store_root=store.root, tmp_dir=tmp,
                                      secrets=secrets, fill=fill, from_ids=from_ids)
        env.update(prepared.env)
        mount_for_owner(store.root, image.id, mp, upper, scratch=tmp, backend=backend)
        mounted = True
        stubs = MountStubs.make(mp, prepared.mountpoints())
        # The pipe is made after the FUSE daemon forked, so only the
        # container holds its write end and EOF means the step ended.
        r_fd, w_fd = os.pipe()
        pump = threading.Thread(target=_pump, args=(r_fd, output), daemon=True)
        pump.start()
        spec = ContainerSpec(rootfs=mp, args=tuple(argv), env=tuple(f"{k}={v}" for k, v in env.items()),
                             cwd=rc.get("WorkingDir") or "/", user=rc.get("User") or "",
                             network=network if e.network in (None, "default") else e.network,
                             hostname="buildkitsandbox",
                             volumes=tuple(Volume(h, t, ro) for h, t, ro in prepared.binds),
                             tmpfs=tuple(Tmpfs(t, size) for t, size in prepared.tmpfs))
        result = _run_interruptibly(run_container, spec, state, w_fd)
        os.close(w_fd)
        w_fd = -1
        pump.join()
        if result.exit_code != 0 or result.exec_error:
            why = result.exec_error or f"returned a non-zero code: {result.exit_code}"
            raise BuildError(f"The command '{' '.join(argv)}' {why}", step_exit_code=result.exit_code)
        stubs.remove()
        unmount(store.root, mp)
        mounted = False
        if stubs.created:
            prune_unchanged_dirs(upper, store.merged_tree(image))
        return transfer.import_layer(store, upper, image, as_layer=True)
    finally:
        if w_fd >= 0:
            os.close(w_fd)
        if pump is not None:
            pump.join(timeout=5)
        if mounted:
            force_unmount(store.root, mp)
        if prepared is not None:
            prepared.close()
        # Never recurse into a mount that is still there: rmtree would
        # delete through it (or hang on a wedged daemon).
        if not is_mountpoint(mp):
            shutil.rmtree(tmp, ignore_errors=True)


def _pump(fd: int, output: Callable[[str], None]) -> None:
    buf = b""
    with os.fdopen(fd, "rb", buffering=0) as f:
        while True:
            chunk = f.read(65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                output(line.decode(errors="replace"))
    if buf:
        output(buf.decode(errors="replace"))


def _run_interruptibly(run_container: Callable[..., Any], spec: Any, state: str, out_fd: int) -> Any:
    """run_container in a worker thread; Ctrl-C (KeyboardInterrupt in the
    main thread) kills the container instead of being forwarded to it --
    a ``/bin/sh -c`` PID 1 ignores SIGINT, so forwarding would do nothing."""
    box: dict[str, Any] = {}
    cancelled = threading.Event()
    started: list[Any] = []

    def on_start(proc: Any) -> None:
        started.append(proc)
        if cancelled.is_set():
            raise KeyboardInterrupt

    def target() -> None:
        try:
            box["result"] = run_container(spec, state, stdout=out_fd, stderr=out_fd, on_start=on_start)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="build-run", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except BaseException:
        cancelled.set()
        for proc in started:
            proc.kill()
        worker.join()
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def heredoc_script(command: str, docs: Sequence[dfm.Heredoc]) -> list[str]:
    """The shell arguments for a RUN with heredocs (BuildKit's rules).

    ``RUN <<EOF`` alone runs the document as the script (a ``#!`` line
    picks the interpreter: the document goes to a temporary file that is
    executed and removed). Otherwise the shell gets the command followed by
    the documents and their delimiters, so it does the redirection itself,
    and expansion as the (quoted or not) delimiter says.
    """
    words = command.strip()
    if len(docs) == 1 and words.replace("'", "").replace('"', "") in (f"<<{docs[0].name}", f"<<-{docs[0].name}"):
        body = docs[0].content
        if body.startswith("#!"):
            runner = ('t=$(mktemp) && printf %s "$1" > "$t" && chmod 700 "$t" && "$t"; '
                      'rc=$?; rm -f "$t"; exit $rc')
            return [runner, "sh", body]
        return [body]
    text = command
    for doc in docs:
        text += "\n" + doc.content + doc.name
    return [text + "\n"]
