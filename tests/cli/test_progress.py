"""The progress view as a terminal shows it: the escape sequences are
played on a small screen model and the final screen is checked."""

from __future__ import annotations

import io
import re

from layerfs.oci.media import Descriptor
from layerfs_cli import progress


def _screen(out: str) -> list[str]:
    """Apply text, newlines, ESC[nF (n lines up, column 0) and ESC[J (erase below)."""
    lines, row = [""], 0
    for tok in re.split(r"(\x1b\[\d*F|\x1b\[J|\n)", out):
        if tok == "\n":
            row += 1
            if row == len(lines):
                lines.append("")
        elif tok == "\x1b[J":
            del lines[row + 1:]
            lines[row] = ""
        elif tok.startswith("\x1b["):
            row = max(0, row - int(tok[2:-1] or 1))
        else:
            lines[row] += tok
    return [x for x in lines if x]


def _desc(n: int, size: int) -> Descriptor:
    return Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", "sha256:" + f"{n:x}" * 64, size)


def test_terminal_view_draws_bars_in_place_and_keeps_finished_lines():
    out = io.StringIO()
    v = progress.TransferView(progress.PULL, tty=True, out=out)
    a, b, c = _desc(1, 4_000_000), _desc(2, 10_000_000), _desc(3, 100)
    v.done(c, "already in store")
    v.start(a, "layer")
    v.start(b, "layer")
    v.advance(a, 1_000_000)
    v.advance(b, 5_000_000)
    v.close()
    screen = _screen(out.getvalue())
    assert screen[0] == "333333333333: Already exists"
    assert re.fullmatch(r"111111111111: Downloading \[======> +\] 1MB/4MB [\d.]+[kMG]?B/s", screen[1]), screen
    assert re.fullmatch(r"222222222222: Downloading \[============> +\] 5MB/10MB [\d.]+[kMG]?B/s", screen[2]), screen
    assert len(screen) == 3
    v.done(a, "done")
    v.step("Verifying")
    v.done(b, "done")
    assert _screen(out.getvalue()) == ["333333333333: Already exists", "111111111111: Pull complete",
                                       "222222222222: Pull complete", "Verifying"]


def test_plain_view_prints_one_line_per_event_and_phase_changes_only():
    out = io.StringIO()
    v = progress.TransferView(progress.BOOTSTRAP, tty=False, out=out)
    for text in ("debootstrap: Retrieving a", "debootstrap: Retrieving b", "debootstrap: Extracting a",
                 "debootstrap: Extracting b", "Importing the root filesystem (2 files, 0.1 MB)"):
        v.step(text)
    assert out.getvalue().splitlines() == ["debootstrap: Retrieving a", "debootstrap: Extracting a",
                                           "Importing the root filesystem (2 files, 0.1 MB)"]
    assert "\x1b" not in out.getvalue()


def test_quiet_view_is_silent(capsys):
    v = progress.view(progress.PUSH, quiet=True)
    v.start(_desc(1, 10), "layer")
    v.advance(_desc(1, 10), 5)
    v.done(_desc(1, 10), "done")
    v.step("x")
    v.close()
    assert capsys.readouterr() == ("", "")
