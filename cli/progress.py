"""Progress of pull, push, load and bootstrap on stderr, the way docker shows it.

On a terminal: one line per layer, redrawn in place at most ten times a
second (``a1b2c3d4e5f6: Downloading [=====>    ] 12.3MB/45.6MB 5.1MB/s``),
finished layers keep their final line. Otherwise (a pipe, a CI log): one
plain line when a layer starts and one when it ends, with its size and
rate, and nothing in between. The library reports events through the
:class:`layerfs.oci.types.Progress` protocol (and ``step`` lines for
bootstrap); only this module writes them.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from layerfs.oci.media import Descriptor
from layerfs.oci.store_transport import PREPARING
from layerfs.oci.types import NoProgress
from layerfs_cli.common import human_size

BAR = 25
REDRAW = 0.1    # seconds between redraws on a terminal


@dataclass(frozen=True)
class Verbs:
    """What one command calls a layer in flight and a finished one."""

    active: str
    done: str


PULL = Verbs("Downloading", "Pull complete")
PUSH = Verbs("Pushing", "Pushed")
LOAD = Verbs("Loading", "Loaded")
BOOTSTRAP = Verbs("Importing", "Imported")
NOTES = {"already in store": "Already exists", "already exists": "Layer already exists",
         "exists": "Already exists", "prepared": "Prepared"}


@dataclass
class _Row:
    label: str
    status: str
    total: int
    got: int = 0
    start: float = field(default_factory=time.monotonic)
    final: bool = False


class TransferView:
    """Implements the library's Progress protocol for one command."""

    def __init__(self, verbs: Verbs, tty: bool, out=None) -> None:
        self.verbs, self.tty = verbs, tty
        self.out = out or sys.stderr
        self.rows: dict[str, _Row] = {}
        self.lock = threading.Lock()
        self.drawn = 0          # lines of the last redraw (tty)
        self.last = 0.0
        self.status = ""        # the current step (tty)
        self.phase: list[str] = []   # the last step's first words (plain)

    # -- the Progress protocol ------------------------------------------
    def start(self, desc: Descriptor, what: str) -> None:
        status = "Preparing" if desc.media_type == PREPARING else self.verbs.active
        with self.lock:
            row = self.rows[desc.digest] = _Row(desc.short, status, desc.size)
            if not self.tty:
                self._line(f"{row.label}: {status} ({human_size(desc.size)})")
        self._redraw(force=True)

    def advance(self, desc: Descriptor, n: int) -> None:
        with self.lock:
            row = self.rows.get(desc.digest)
            if row is not None:
                row.got += n
        self._redraw()

    def done(self, desc: Descriptor, note: str) -> None:
        with self.lock:
            row = self.rows.get(desc.digest)
            if row is None:      # reused without a transfer
                row = self.rows[desc.digest] = _Row(desc.short, "", desc.size)
            row.final = True
            row.status = self.verbs.done if note == "done" else NOTES.get(note, note[:1].upper() + note[1:])
            if not self.tty:
                self._line(f"{row.label}: {row.status}{self._summary(row)}")
        self._redraw(force=True)

    # -- bootstrap and other phases ---------------------------------------
    def step(self, text: str) -> None:
        """A phase of work with no byte count (debootstrap's steps). On a
        terminal it is one status line, replaced by the next step; in a
        log only a change of phase ("debootstrap: Retrieving", then
        "debootstrap: Extracting") gets a line, not each package."""
        with self.lock:
            if not self.tty:
                phase = text.split()[:2]
                if phase != self.phase:
                    self.phase = phase
                    self._line(text)
                return
            self.status = text
        self._redraw(force=True)

    def close(self) -> None:
        self._redraw(force=True)

    # -- drawing ------------------------------------------------------------
    def _summary(self, row: _Row) -> str:
        if not row.got:
            return ""
        secs = max(time.monotonic() - row.start, 1e-3)
        return f" ({human_size(row.got)} in {secs:.1f}s, {human_size(row.got / secs)}/s)"

    def _render(self, row: _Row) -> str:
        if row.final:
            return f"{row.label}: {row.status}"
        secs = max(time.monotonic() - row.start, 1e-3)
        total = max(row.total, row.got)
        fill = int(BAR * row.got / total) if total else 0
        bar = "=" * fill + (">" if fill < BAR else "") + " " * (BAR - fill - 1)
        rate = f"{human_size(row.got / secs)}/s" if row.got else ""
        return f"{row.label}: {row.status} [{bar[:BAR]}] {human_size(row.got)}/{human_size(total)} {rate}".rstrip()

    def _redraw(self, force: bool = False) -> None:
        if not self.tty:
            return
        with self.lock:
            now = time.monotonic()
            if not force and now - self.last < REDRAW:
                return
            self.last = now
            self._clear()
            # Finished rows above the first active one are written once and
            # left behind: the redrawn block stays small enough for the
            # screen however many layers an image has.
            for key in list(self.rows):
                if not self.rows[key].final:
                    break
                self.out.write(self._render(self.rows.pop(key)) + "\n")
            lines = [self._render(r) for r in self.rows.values()] + ([self.status] if self.status else [])
            self.out.write("".join(line + "\n" for line in lines))
            self.out.flush()
            self.drawn = len(lines)

    def _clear(self) -> None:
        if self.drawn:
            # Up to the first line drawn, then erase to the end of the screen.
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


class Quiet(NoProgress):
    """-q: no progress at all."""

    def step(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def view(verbs: Verbs, quiet: bool):
    """The progress reporter for a command: silent with -q."""
    if quiet:
        return Quiet()
    return TransferView(verbs, sys.stderr.isatty())
