#!/usr/bin/env python3
"""Generate a deterministic, distro-shaped directory tree for benchmarks.

    python benchmarks/gen_tree.py DEST [--files 25000] [--mb 500] [--seed 1] [--scale 1.0]

The same arguments always give the same tree: same paths, bytes, modes and
mtimes (ctime/inode numbers are the filesystem's business). DEST must not
exist, or be empty, unless ``--force`` (which deletes it first).

Shape, modelled on a Debian/Ubuntu ``/usr`` (``--files`` regular files of
about ``--mb`` MB in total, both multiplied by ``--scale``):

======  =========  ===============  =========================================
files   bytes      sizes            content, where
======  =========  ===============  =========================================
 30 %    ~0.7 %    0 B .. 1 KiB     text (docs, conf, dpkg info, __init__.py)
 35 %    ~7 %      1 .. 8 KiB       text (headers, .py, .pm, READMEs)
 10 %    ~14 %     8 .. 256 KiB     text (changelogs, big modules, locales)
 12 %    ~2 %      256 B .. 32 KiB  already compressed (man .gz, doc .gz)
 13 %    ~26 %     8 KiB .. 2 MiB   binaries, compress ~2x (.so, bin, .mo)
 ~16     ~22 %     2 .. 16 MiB      binaries, compress ~2x (big .so)
 ~4      ~28 %     20 .. 50 MiB     incompressible (firmware, fonts, jmods)
======  =========  ===============  =========================================

Plus: ~5 % of the regular files are duplicates of another file's content
(same copyright texts, identical .mo/.py under several paths), ~1 symlink
per 25 files (``libfoo.so -> libfoo.so.1.2``, alternatives, usr-merge
``bin -> usr/bin``), and a few hardlink groups (``perl``/``perl5.36``).

Importable: ``from gen_tree import generate`` (benchmarks/ on sys.path)
returns a :class:`TreeInfo` with per-class counts and the file list, which
the benchmarks use to pick "the files of a size class" or "1 % of files".
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

MiB = 1 << 20
KiB = 1 << 10
BASE_MTIME = 1_704_067_200  # 2024-01-01T00:00:00Z

# name, share of files, share of bytes, min size, max size, content kind.
# Shares of the two big classes are set by bytes (count = bytes / mean).
CLASSES = [
    ("text_tiny", 0.30, 0.007, 0, 1 * KiB, "text"),
    ("text_small", 0.35, 0.07, 1 * KiB, 8 * KiB, "text"),
    ("text_mid", 0.10, 0.14, 8 * KiB, 256 * KiB, "text"),
    ("packed_small", 0.12, 0.02, 256, 32 * KiB, "random"),
    ("bin_mid", 0.13, 0.26, 8 * KiB, 2 * MiB, "binary"),
    ("bin_large", None, 0.22, 2 * MiB, 16 * MiB, "binary"),
    ("huge", None, 0.28, 20 * MiB, 50 * MiB, "random"),
]
MEAN_OF_BYTE_CLASSES = {"bin_large": 7 * MiB, "huge": 35 * MiB}
DUP_SHARE = 0.05
SYMLINK_PER_FILE = 1 / 25
HARDLINK_GROUPS = 12


@dataclass
class FileSpec:
    path: str
    cls: str
    size: int
    seed: str            # content seed; duplicates share their source's
    mode: int = 0o644
    dup_of: str | None = None


@dataclass
class TreeInfo:
    root: str
    seed: int
    files: list[FileSpec]
    symlinks: list[tuple[str, str]]
    hardlinks: list[tuple[str, str]]           # (new path, existing path)
    dirs: int = 0
    seconds: float = 0.0
    by_class: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def summary(self) -> dict:
        return {
            "root": self.root, "seed": self.seed, "regular_files": len(self.files),
            "bytes": self.total_bytes, "dirs": self.dirs, "symlinks": len(self.symlinks),
            "hardlinks": len(self.hardlinks),
            "duplicates": sum(1 for f in self.files if f.dup_of),
            "classes": self.by_class, "seconds": round(self.seconds, 2),
        }


# -- names ------------------------------------------------------------------
_SYL = ["ba", "ce", "di", "fo", "gu", "ka", "le", "mi", "no", "pu", "ra", "se", "ti", "vo", "xu",
        "zy", "an", "el", "in", "on", "ur", "st", "gl", "pr", "tr", "cr", "bl", "x", "z", "q"]
_LANGS = ["af", "am", "ar", "ast", "az", "be", "bg", "bn", "br", "bs", "ca", "cs", "cy", "da", "de",
          "el", "en_AU", "en_CA", "en_GB", "eo", "es", "et", "eu", "fa", "fi", "fr", "ga", "gd", "gl",
          "gu", "he", "hi", "hr", "hu", "hy", "id", "is", "it", "ja", "ka", "kk", "km", "kn", "ko",
          "ku", "ky", "lt", "lv", "mk", "ml", "mr", "ms", "my", "nb", "ne", "nl", "nn", "oc", "pa",
          "pl", "pt", "pt_BR", "ro", "ru", "si", "sk", "sl", "sq", "sr", "sv", "ta", "te", "th", "tr",
          "ug", "uk", "ur", "uz", "vi", "zh_CN", "zh_HK", "zh_TW"]


def _word(rng: random.Random, lo: int = 1, hi: int = 4) -> str:
    return "".join(rng.choice(_SYL) for _ in range(rng.randint(lo, hi)))


class _Names:
    """Package names and the path templates of each size class."""

    def __init__(self, rng: random.Random, n_pkgs: int) -> None:
        self.rng = rng
        seen: set[str] = set()
        pkgs = []
        while len(pkgs) < n_pkgs:
            w = _word(rng, 2, 4) + rng.choice(["", "", "", "-utils", "-common", "-data", "-bin", "2", "3"])
            if w not in seen:
                seen.add(w)
                pkgs.append(w)
        self.pkgs = pkgs
        # Zipf-ish: a few packages own many files (like libc6, python3, perl).
        self.pkg_w = list(_accumulate([1 / (i + 1) ** 0.8 for i in range(n_pkgs)]))
        self.pydirs = [f"usr/lib/python3/dist-packages/{p.replace('-', '_')}" for p in pkgs[: max(1, n_pkgs // 6)]]
        self.langs = _LANGS
        self._subdirs: dict[tuple[str, int], list[str]] = {}

    def pkg(self) -> str:
        return self.pkgs[bisect.bisect(self.pkg_w, self.rng.random() * self.pkg_w[-1])]

    def big_pkg(self) -> str:
        """One of the 15 % of packages that own a usr/share/<pkg> tree etc."""
        top = self.pkg_w[max(0, len(self.pkgs) * 15 // 100 - 1)]
        return self.pkgs[bisect.bisect(self.pkg_w, self.rng.random() * top)]

    def subpath(self, depth_max: int, base: str = "") -> str:
        """A subdirectory of *base*: mostly an existing one (so dirs hold
        several files, ~8 per dir as in /usr), sometimes a new child."""
        r = self.rng
        known = self._subdirs.setdefault((base, depth_max), [""])
        d = r.choice(known)
        if r.random() < 0.12 and d.count("/") < depth_max - 1:
            d = _join(d, _word(r, 1, 3))
            known.append(d)
        return d

    def path(self, cls: str) -> tuple[str, int]:
        """A path for a file of class *cls*, and its mode."""
        r, p, bp, w = self.rng, self.pkg, self.big_pkg, lambda: _word(self.rng)
        c = r.random()
        if cls == "text_tiny":
            opts = [
                (0.25, lambda: (f"usr/share/doc/{p()}/copyright", 0o644)),
                (0.15, lambda: (f"var/lib/dpkg/info/{p()}.{r.choice(['md5sums', 'list', 'postinst', 'prerm', 'conffiles', 'triggers'])}", 0o644)),
                (0.15, lambda: (f"etc/{bp()}/{w()}.conf", 0o644)),
                (0.15, lambda: (_py(self, 3, "__init__.py"), 0o644)),
                (0.10, lambda: (f"usr/share/applications/{p()}.desktop", 0o644)),
                (0.10, lambda: (f"usr/share/{bp()}/{self.subpath(2)}/{w()}.{r.choice(['txt', 'json', 'xml', 'svg'])}", 0o644)),
                (0.10, lambda: (f"usr/lib/systemd/system/{w()}.service", 0o644)),
            ]
        elif cls == "text_small":
            opts = [
                (0.25, lambda: (_py(self, 3, f"{w()}.py"), 0o644)),
                (0.20, lambda: (f"usr/include/{r.choice(['', bp() + '/', 'x86_64-linux-gnu/', 'linux/'])}{w()}.h", 0o644)),
                (0.15, lambda: (_join("usr/share/perl5", self.subpath(3, "perl5").title(), w().title() + ".pm"), 0o644)),
                (0.15, lambda: (f"usr/share/doc/{p()}/{r.choice(['README', 'NEWS', 'TODO', 'AUTHORS', 'README.Debian'])}", 0o644)),
                (0.10, lambda: (f"usr/share/zoneinfo/{r.choice(['Europe', 'America', 'Asia', 'Africa', 'Pacific'])}/{w().title()}", 0o644)),
                (0.15, lambda: (f"usr/share/{bp()}/{self.subpath(3)}/{w()}.{r.choice(['xml', 'html', 'css', 'js', 'sh', 'pl'])}", 0o644)),
            ]
        elif cls == "text_mid":
            opts = [
                (0.30, lambda: (f"usr/share/doc/{p()}/changelog", 0o644)),
                (0.30, lambda: (_py(self, 3, f"{w()}.py"), 0o644)),
                (0.15, lambda: (f"usr/share/i18n/locales/{r.choice(self.langs)}_{w()[:2].upper()}", 0o644)),
                (0.10, lambda: (f"usr/share/X11/xkb/{r.choice(['symbols', 'keycodes', 'geometry'])}/{w()}", 0o644)),
                (0.15, lambda: (f"usr/share/{bp()}/{self.subpath(2)}/{w()}.{r.choice(['html', 'js', 'json'])}", 0o644)),
            ]
        elif cls == "packed_small":
            opts = [
                (0.55, lambda: (f"usr/share/man/{r.choice(['', '', '', r.choice(self.langs) + '/'])}man{r.choice('11111123455578')}/{w()}.{r.randint(1, 8)}.gz", 0o644)),
                (0.30, lambda: (f"usr/share/doc/{p()}/changelog.Debian.gz", 0o644)),
                (0.15, lambda: (f"usr/share/{bp()}/{self.subpath(2)}/{w()}.{r.choice(['png', 'gz', 'jpg'])}", 0o644)),
            ]
        elif cls == "bin_mid":
            opts = [
                (0.25, lambda: (f"usr/lib/x86_64-linux-gnu/lib{w()}.so.{r.randint(0, 9)}.{r.randint(0, 30)}.{r.randint(0, 9)}", 0o644)),
                (0.20, lambda: (f"usr/bin/{w()}{r.choice(['', '', '-' + w()])}", 0o755)),
                (0.05, lambda: (f"usr/sbin/{w()}", 0o755)),
                (0.15, lambda: (f"usr/share/locale/{r.choice(self.langs)}/LC_MESSAGES/{p()}.mo", 0o644)),
                (0.15, lambda: (f"usr/lib/x86_64-linux-gnu/{r.choice(['gconv', 'dri', 'gio/modules', 'gdk-pixbuf-2.0/2.10.0/loaders', 'perl5/5.36/auto/' + w().title(), bp()])}/{w()}.so", 0o644)),
                (0.10, lambda: (_py(self, 2, f"_{w()}.cpython-311-x86_64-linux-gnu.so"), 0o644)),
                (0.10, lambda: (f"usr/lib/{bp()}/{w()}", 0o755)),
            ]
        elif cls == "bin_large":
            opts = [
                (0.6, lambda: (f"usr/lib/x86_64-linux-gnu/lib{w().title()}.so.{r.randint(1, 20)}", 0o644)),
                (0.4, lambda: (f"usr/bin/{w()}", 0o755)),
            ]
        else:  # huge
            opts = [
                (0.4, lambda: (f"usr/lib/firmware/{w()}/{w()}.bin", 0o644)),
                (0.3, lambda: (f"usr/share/fonts/truetype/{w()}/{w().title()}ColorEmoji.ttf", 0o644)),
                (0.3, lambda: (f"usr/lib/jvm/java-17-{w()}/lib/modules", 0o644)),
            ]
        acc = 0.0
        for wgt, fn in opts:
            acc += wgt
            if c < acc:
                return fn()
        return opts[-1][1]()


def _py(names: "_Names", depth: int, name: str) -> str:
    base = names.rng.choice(names.pydirs)
    return _join(base, names.subpath(depth, base), name)


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _accumulate(xs):
    s = 0.0
    for x in xs:
        s += x
        yield s


# -- sizes ------------------------------------------------------------------
def _sizes(rng: random.Random, n: int, budget: int, lo: int, hi: int) -> list[int]:
    """n sizes in [lo, hi], log-uniform-ish, scaled to sum close to budget."""
    if n == 0:
        return []
    llo, lhi = math.log(max(lo, 16)), math.log(hi)
    raw = [math.exp(rng.uniform(llo, lhi)) for _ in range(n)]
    sizes = raw
    for _ in range(8):  # rescale, clamp, repeat: converges in a few rounds
        s = sum(sizes)
        f = budget / s if s else 1.0
        sizes = [min(hi, max(lo, x * f)) for x in sizes]
        if abs(sum(sizes) - budget) < budget * 0.005:
            break
    return [int(x) for x in sizes]


# -- content ----------------------------------------------------------------
class _Content:
    """Deterministic bytes for a (kind, size, seed)."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(f"vocab:{seed}")
        vocab = set()
        while len(vocab) < 6000:
            vocab.add("".join(rng.choice("etaoinshrdlcumwfgypbvkjxqz_") for _ in range(max(1, int(rng.expovariate(1 / 5.5))))))
        words = sorted(vocab)
        rng.shuffle(words)
        words += ["\n", "\n\t", " =", "();", "{", "}", "#", "the", "of", "a", "to", "0", "1", "NULL", "return"]
        weights = [1 / (i + 1) ** 1.05 for i in range(len(words))]
        for i in range(len(words) - 15, len(words)):  # punctuation/newlines are frequent
            weights[i] = 0.06
        self.words = words
        self.cum = list(_accumulate(weights))
        # Symbol-table / string-table material binaries are half made of.
        self.strtab = self.text(random.Random(f"strtab:{seed}"), 1 * MiB).replace(b" ", b"\0")

    def text(self, rng: random.Random, size: int) -> bytes:
        if size == 0:
            return b""
        n = size // 5 + 8
        out = " ".join(rng.choices(self.words, cum_weights=self.cum, k=n)).encode()
        while len(out) < size:
            out += b" " + " ".join(rng.choices(self.words, cum_weights=self.cum, k=n)).encode()
        return out[:size]

    def binary(self, rng: random.Random, size: int) -> bytes:
        """ELF-ish: random code-like runs interleaved with string tables,
        small-alphabet tables and zero padding; zstd -3 gets ~2x."""
        parts = []
        left = size
        st = self.strtab
        while left > 0:
            k = rng.random()
            n = min(left, rng.randint(256, 8192))
            if k < 0.46:
                parts.append(rng.randbytes(n))                      # code / data: incompressible
            elif k < 0.74:
                off = rng.randrange(0, len(st) - n)
                parts.append(st[off:off + n])                       # strings / symbols
            elif k < 0.94:                                           # relocation-like tables
                parts.append(bytes(rng.choice(b"\x00\x00\x00\x01\x02\x04\x08\x10\x20\x40\xff") for _ in range(n // 16)) * 16)
            else:
                parts.append(bytes(n))                               # alignment padding
            left -= len(parts[-1])
        return b"".join(parts)[:size]

    def make(self, kind: str, size: int, seed: str) -> bytes:
        rng = random.Random(seed)
        if kind == "text":
            return self.text(rng, size)
        if kind == "binary":
            return self.binary(rng, size)
        return rng.randbytes(size)

    def write(self, path: str, kind: str, size: int, seed: str) -> None:
        with open(path, "wb") as f:
            if kind == "random" and size > 8 * MiB:   # stream big ones
                rng = random.Random(seed)
                left = size
                while left:
                    n = min(left, 8 * MiB)
                    f.write(rng.randbytes(n))
                    left -= n
            else:
                f.write(self.make(kind, size, seed))


# -- planning ---------------------------------------------------------------
def plan(files: int = 25000, mb: float = 500, seed: int = 1, scale: float = 1.0, root: str = "") -> TreeInfo:
    """Decide every path, size and content seed; writes nothing."""
    files = max(10, int(files * scale))
    total = int(mb * scale * 1_000_000)
    rng = random.Random(f"plan:{seed}")
    names = _Names(random.Random(f"names:{seed}"), max(20, files // 20))
    byte_share = sum(c[2] for c in CLASSES)
    counts: dict[str, int] = {}
    for name, fshare, bshare, lo, hi, _ in CLASSES:
        if fshare is None:
            budget = total * bshare / byte_share
            counts[name] = max(1, round(budget / MEAN_OF_BYTE_CLASSES[name]))
    rest = files - sum(counts.values())
    fsum = sum(c[1] for c in CLASSES if c[1] is not None)
    for name, fshare, *_ in CLASSES:
        if fshare is not None:
            counts[name] = round(rest * fshare / fsum)
    counts["text_small"] += files - sum(counts.values())  # rounding leftovers

    specs: list[FileSpec] = []
    used: set[str] = set()
    by_class = {}
    for name, fshare, bshare, lo, hi, kind in CLASSES:
        n = counts[name]
        budget = int(total * bshare / byte_share)
        if name == "huge" and budget / n < lo:   # small --mb: keep them big, just fewer bytes
            lo = max(1 * MiB, budget // n // 2)
        sizes = _sizes(rng, n, budget, lo, hi)
        if name == "text_tiny":  # some empty files (__init__.py, .keep)
            sizes = [0 if rng.random() < 0.06 else s for s in sizes]
        for i, size in enumerate(sizes):
            path, mode = names.path(name)
            path = path.replace("//", "/")
            while path in used:  # unique
                path = f"{path}.{rng.randint(1, 999)}"
            used.add(path)
            specs.append(FileSpec(path, name, size, f"{seed}:{name}:{i}", mode))
        by_class[name] = {"files": n, "bytes": sum(sizes), "kind": kind}
    # A path may not be both a file and a directory.
    dirs_needed = {p.rsplit("/", 1)[0] for p in used if "/" in p}
    all_dirs = set()
    for d in dirs_needed:
        while d and d not in all_dirs:
            all_dirs.add(d)
            d = d.rsplit("/", 1)[0] if "/" in d else ""
    for s in specs:
        if s.path in all_dirs:
            s.path += ".f"
            used.add(s.path)

    # Duplicates: same content, different path (copyright texts, .mo, .py).
    dup_pool = [s for s in specs if s.cls in ("text_tiny", "text_small", "packed_small", "bin_mid", "text_mid")]
    sources: set[str] = set()
    for s in rng.sample(dup_pool, min(len(dup_pool), int(len(specs) * DUP_SHARE))):
        same = [t for t in rng.sample(dup_pool, 16) if t.cls == s.cls and t is not s and not t.dup_of]
        if not same or s.path in sources:
            continue
        src = same[0]
        sources.add(src.path)
        by_class[s.cls]["bytes"] += src.size - s.size
        s.size, s.seed, s.dup_of = src.size, src.seed, src.path

    # Symlinks.
    symlinks: list[tuple[str, str]] = [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                                       ("lib64", "usr/lib64")]
    sos = [s for s in specs if ".so." in s.path]
    bins = [s for s in specs if s.path.startswith("usr/bin/")]
    n_links = int(len(specs) * SYMLINK_PER_FILE)
    link_used = set(used) | all_dirs | {a for a, _ in symlinks}
    for _ in range(n_links):
        k = rng.random()
        if k < 0.5 and sos:
            s = rng.choice(sos)
            base, _, ver = s.path.partition(".so.")
            src, dst = f"{base}.so.{ver.split('.')[0]}", os.path.basename(s.path)
            if rng.random() < 0.5:
                src, dst = f"{base}.so", os.path.basename(s.path)
        elif k < 0.8 and bins:
            s = rng.choice(bins)
            src, dst = f"usr/bin/{_word(rng)}", f"/etc/alternatives/{os.path.basename(s.path)}"
        else:
            s = rng.choice(specs)
            d = os.path.dirname(s.path)
            src, dst = _join(d, _word(rng) + ".link"), os.path.basename(s.path)
        if src in link_used:
            continue
        link_used.add(src)
        symlinks.append((src, dst))
    symlinks.append(("usr/lib64/ld-linux-x86-64.so.2", "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"))

    # Hardlinks: a few binaries under a second name (perl/perl5.36.0).
    hardlinks = []
    for s in rng.sample(bins or specs, min(HARDLINK_GROUPS, len(bins or specs))):
        for _ in range(rng.choice([1, 1, 2])):
            new = f"{s.path}{rng.choice(['5.36', '.real', '-' + _word(rng)])}"
            if new in link_used:
                continue
            link_used.add(new)
            hardlinks.append((new, s.path))
    return TreeInfo(root, seed, specs, symlinks, hardlinks, by_class=by_class)


def generate(dest: str, files: int = 25000, mb: float = 500, seed: int = 1, scale: float = 1.0,
             force: bool = False, quiet: bool = True) -> TreeInfo:
    """Create the tree at *dest*; returns what was made."""
    t0 = time.perf_counter()
    if os.path.lexists(dest):
        if force:
            shutil.rmtree(dest)
        elif os.listdir(dest):
            raise SystemExit(f"gen_tree: {dest} exists and is not empty (use --force)")
    info = plan(files, mb, seed, scale, os.path.abspath(dest))
    content = _Content(seed)
    os.makedirs(dest, exist_ok=True)
    made_dirs: set[str] = set()

    def mkdirs(d: str) -> None:
        if d and d not in made_dirs:
            os.makedirs(os.path.join(dest, d), exist_ok=True)
            while d and d not in made_dirs:
                made_dirs.add(d)
                d = os.path.dirname(d)

    for i, s in enumerate(info.files):
        mkdirs(os.path.dirname(s.path))
        p = os.path.join(dest, s.path)
        content.write(p, CLASSES_KIND[s.cls], s.size, s.seed)
        os.chmod(p, s.mode)
        t = BASE_MTIME + (hash_int(s.path) % (300 * 86400))
        os.utime(p, (t, t))
        if not quiet and i and i % 5000 == 0:
            print(f"gen_tree: {i}/{len(info.files)} files", file=sys.stderr)
    for new, old in info.hardlinks:
        os.link(os.path.join(dest, old), os.path.join(dest, new))
    for src, dst in info.symlinks:
        mkdirs(os.path.dirname(src))
        os.symlink(dst, os.path.join(dest, src))
        t = BASE_MTIME
        os.utime(os.path.join(dest, src), (t, t), follow_symlinks=False)
    for d in sorted(made_dirs, key=lambda d: -d.count("/")):
        os.chmod(os.path.join(dest, d), 0o755)
        os.utime(os.path.join(dest, d), (BASE_MTIME, BASE_MTIME))
    os.utime(dest, (BASE_MTIME, BASE_MTIME))
    info.dirs = len(made_dirs)
    info.seconds = time.perf_counter() - t0
    return info


CLASSES_KIND = {c[0]: c[5] for c in CLASSES}


def hash_int(s: str) -> int:
    """A stable (not PYTHONHASHSEED-dependent) small hash."""
    h = 2166136261
    for b in s.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dest")
    ap.add_argument("--files", type=int, default=25000, help="regular files (default 25000)")
    ap.add_argument("--mb", type=float, default=500, help="total bytes of regular files, in MB (default 500)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply --files and --mb (default 1.0)")
    ap.add_argument("--force", action="store_true", help="delete DEST first if it exists")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = ap.parse_args(argv)
    info = generate(a.dest, a.files, a.mb, a.seed, a.scale, a.force, quiet=a.json)
    s = info.summary()
    if a.json:
        print(json.dumps(s, indent=1))
        return
    print(f"gen_tree: {s['regular_files']} files ({s['duplicates']} duplicates), {s['bytes'] / 1e6:.1f} MB, "
          f"{s['dirs']} dirs, {s['symlinks']} symlinks, {s['hardlinks']} hardlinks in {s['seconds']:.1f}s -> {a.dest}")
    for name, c in s["classes"].items():
        print(f"  {name:13s} {c['files']:6d} files {c['bytes'] / 1e6:8.1f} MB  ({c['kind']})")


if __name__ == "__main__":
    main()
