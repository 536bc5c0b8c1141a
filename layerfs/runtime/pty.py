"""Pseudo-terminals for ``tty=True`` containers.

The pty is allocated inside the container's own devpts instance (the way
runc's console socket works), so ``tty`` and ``/proc/self/fd/0`` name a
device the container can see. The child sends the master to the caller;
the caller then

* sets the initial window size from its own terminal (``copy_winsize``),
* puts its terminal in raw mode (``raw_mode``) so Ctrl-C, Ctrl-Z and
  friends reach the container's line discipline instead of the caller's,
* copies bytes both ways (``relay``) until the container side closes,
* copies the size again on SIGWINCH; the kernel then signals the
  container's foreground process group itself.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import struct
import termios
import tty
from collections.abc import Iterator

_TIOCGPTN = 0x80045430
_TIOCSPTLCK = 0x40045431
_WINSIZE = "HHHH"
_CHUNK = 65536


def open_pty(devpts_dir: str) -> tuple[int, int, str]:
    """Open a new pty pair in the devpts mounted at ``devpts_dir``.

    Returns (master_fd, slave_fd, slave_path), both fds close-on-exec.
    """
    master = os.open(os.path.join(devpts_dir, "ptmx"), os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
        number = struct.unpack("I", fcntl.ioctl(master, _TIOCGPTN, b"\0" * 4))[0]
        slave_path = os.path.join(devpts_dir, str(number))
        slave = os.open(slave_path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except BaseException:
        os.close(master)
        raise
    return master, slave, slave_path


def make_controlling_terminal(slave_fd: int) -> None:
    """Start a session with ``slave_fd`` as its controlling tty and stdio."""
    os.setsid()
    fcntl.ioctl(slave_fd, termios.TIOCSCTTY, 0)
    for target in (0, 1, 2):
        os.dup2(slave_fd, target)


def get_winsize(fd: int) -> tuple[int, int] | None:
    """(rows, cols) of the terminal on ``fd``; None if it is not a terminal."""
    try:
        rows, cols, _, _ = struct.unpack(
            _WINSIZE, fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return rows, cols


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack(_WINSIZE, rows, cols, 0, 0))


def copy_winsize(source_fd: int, master_fd: int) -> None:
    """Give the container's pty the size of the caller's terminal, if any."""
    size = get_winsize(source_fd)
    if size is not None:
        set_winsize(master_fd, *size)


@contextlib.contextmanager
def raw_mode(fd: int | None) -> Iterator[None]:
    """Raw mode on ``fd`` if it is a terminal; restored however we leave."""
    if fd is None or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def relay(master_fd: int, in_fd: int | None, out_fd: int, wakeup_fd: int | None = None) -> None:
    """Copy in_fd -> master and master -> out_fd until the container side closes.

    Writes to the master are non-blocking and buffered so a container that
    stops reading cannot stall its own output. *wakeup_fd*: the signal
    wakeup fd of a caller whose handlers forward signals
    (``process.signal_wakeup``), so they run while nothing else moves.
    """
    os.set_blocking(master_fd, False)
    pending = b""
    reading_input = in_fd is not None
    wakeup = [] if wakeup_fd is None else [wakeup_fd]
    while True:
        readers = [master_fd] + ([in_fd] if reading_input and len(pending) < _CHUNK else []) + wakeup
        writers = [master_fd] if pending else []
        readable, writable, _ = select.select(readers, writers, [])
        if wakeup_fd in readable:  # (the handlers run as this returns to the interpreter)
            drain_wakeup(wakeup_fd)
        if master_fd in readable and not _drain(master_fd, out_fd):
            return
        if in_fd is not None and in_fd in readable:
            data = os.read(in_fd, _CHUNK)
            if data:
                pending += data
            else:
                reading_input = False
        if master_fd in writable:
            pending = pending[_write_some(master_fd, pending):]


def drain_wakeup(fd: int) -> None:
    """Empty a signal wakeup fd (``process.signal_wakeup``) once select
    said it was readable."""
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 512)


def _drain(master_fd: int, out_fd: int) -> bool:
    """Copy what the master has; False once the slave side is gone."""
    try:
        data = os.read(master_fd, _CHUNK)
    except BlockingIOError:
        return True
    except OSError as exc:
        if exc.errno == errno.EIO:  # every slave fd closed: the container is done
            return False
        raise
    if not data:
        return False
    _write_all(out_fd, data)
    return True


def _write_some(fd: int, data: bytes) -> int:
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
