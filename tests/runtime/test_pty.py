"""tty mode driven through a real pseudo-terminal, the way a user's terminal would."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import sys
import termios
import time
from pathlib import Path

from tests.runtime.conftest import root_tests

pytestmark = root_tests

RUNNER = """
import sys
from layerfs.runtime import ContainerSpec, run_container
spec = ContainerSpec(rootfs=sys.argv[1], args=["sh"], tty=True, interactive=True)
sys.exit(run_container(spec, sys.argv[2]).exit_code)
"""


class Terminal:
    """The far side of a pty running the runner script, like a terminal emulator."""

    def __init__(self, script: Path, rootfs: Path, state_dir: str, rows: int, cols: int):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # pragma: no cover - replaced by exec
            os.execv(sys.executable, [sys.executable, str(script), str(rootfs), state_dir])
        self.resize(rows, cols)
        self.output = b""

    def resize(self, rows: int, cols: int) -> None:
        # On a pty master this also sends SIGWINCH to the runner.
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def read_until(self, marker: bytes, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(remaining):
                break
        return self.output

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the runner exited
            return False
        self.output += data
        return bool(data)

    def wait(self) -> int:
        while self._read(0.5):
            pass
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        if self.pid:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
            os.close(self.fd)


def test_tty_session(rootfs: Path, state_dir: str, tmp_path: Path) -> None:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    term = Terminal(script, rootfs, state_dir, rows=33, cols=77)
    try:
        term.read_until(b"# ")
        term.send(b"stty size; tty; echo $((6*7))\n")
        assert b"33 77\r\n/dev/pts/0\r\n42\r\n" in term.read_until(b"42\r\n")
        term.resize(40, 100)  # propagated on SIGWINCH
        term.send(b"stty size\n")
        assert b"40 100\r\n" in term.read_until(b"40 100\r\n")
        # Ctrl-C goes through the pty to the container's foreground job.
        term.send(b"sleep 30\n")
        time.sleep(0.3)
        term.send(b"\x03")
        term.send(b"echo after=$?\n")
        assert b"after=130" in term.read_until(b"after=130")
        term.send(b"exit 3\n")
        assert term.wait() == 3
    finally:
        term.kill()  # no-op after a clean exit; the runner's death kills the container
