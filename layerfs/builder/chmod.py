"""``COPY --chmod`` / ``ADD --chmod``: octal or chmod(1)'s symbolic modes.

BuildKit accepts both (``755``, ``u+x``, ``go-w,a+rX``, ``u=rw,g=r,o=``);
the parsed mode is a function of the source's mode and whether it is a
directory, because ``X`` adds execute only to directories and to files
that already have it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from layerfs.errors import InvalidInput

__all__ = ["parse_chmod"]


def parse_chmod(spec: str, keyword: str) -> Callable[[int, bool], int]:
    """``--chmod``: octal (``755``) or symbolic like chmod(1) (``u+x``,
    ``go-w,a+rX``, ``u=rw,g=r,o=``); returns mode(old_mode, is_dir)."""
    if spec.isdigit():
        try:
            value = int(spec, 8)
        except ValueError:
            raise InvalidInput(f"{keyword} --chmod={spec}: invalid mode") from None
        if value > 0o7777:
            raise InvalidInput(f"{keyword} --chmod={spec}: invalid mode")
        return lambda _mode, _is_dir: value
    clauses = []
    for clause in spec.split(","):
        m = re.fullmatch(r"([ugoa]*)((?:[-+=][rwxXst]*)+)", clause)
        if not m:
            raise InvalidInput(f"{keyword} --chmod={spec}: invalid mode (octal, or symbolic like u+x,go-w)")
        clauses.append((m.group(1) or "a", re.findall(r"([-+=])([rwxXst]*)", m.group(2))))

    def apply(mode: int, is_dir: bool) -> int:
        mode &= 0o7777
        for who, ops in clauses:
            mask = 0
            for w, bits in (("u", 0o4700), ("g", 0o2070), ("o", 0o0007)):
                if w in who or "a" in who:
                    mask |= bits
            for op, perms in ops:
                bits = 0
                for p in perms:
                    if p == "r":
                        bits |= 0o444
                    elif p == "w":
                        bits |= 0o222
                    elif p == "x" or (p == "X" and (is_dir or mode & 0o111)):
                        bits |= 0o111
                    elif p == "s":
                        bits |= 0o6000
                    elif p == "t":
                        bits |= 0o1000
                bits &= mask | (0o1000 if "t" in perms and ("o" in who or "a" in who) else 0)
                if op == "+":
                    mode |= bits
                elif op == "-":
                    mode &= ~bits
                else:
                    mode = (mode & ~(mask & 0o777 | mask & 0o6000)) | bits
        return mode

    return apply
