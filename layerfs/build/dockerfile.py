"""Parse a Dockerfile into frozen records.

The grammar follows docs.docker.com/reference/dockerfile and the behaviour of
BuildKit's parser (``frontend/dockerfile/parser``) where the reference is
silent:

* parser directives (``# escape=``, ``# syntax=``, ``# check=``) only at
  the very top; the first comment, blank line or instruction ends them;
* ``#`` starts a comment only at the start of a line;
* a line ending in the escape character continues on the next; comment
  lines and empty lines inside a continuation are dropped;
* heredocs (``<<EOF`` ... ``EOF``) in RUN, COPY and ADD;
* flags (``--name=value``) directly after the keyword, checked per
  instruction.

Arguments are kept *raw*: quotes and ``$VAR`` references are resolved later
by :func:`layerfs.build.substitution.expand_instruction`, because their
values depend on ARG/ENV in effect at that line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from layerfs.build import substitution
from layerfs.errors import InvalidInput, NotFound

__all__ = [
    "Add",
    "Arg",
    "ArgDecl",
    "Cmd",
    "Command",
    "Copy",
    "Dockerfile",
    "DockerfileError",
    "Entrypoint",
    "Env",
    "Expose",
    "From",
    "Healthcheck",
    "Heredoc",
    "Instruction",
    "Label",
    "Maintainer",
    "Onbuild",
    "Run",
    "Shell",
    "Stage",
    "Stopsignal",
    "User",
    "Volume",
    "Workdir",
    "parse",
    "required_stages",
    "stage_dependencies",
]


class DockerfileError(InvalidInput):
    """A Dockerfile is malformed; says where and what.

    ``str()`` is ``"<file>:<line>: <message>: <text>"`` so the CLI can print it
    as is, like a compiler error.
    """

    def __init__(self, message: str, *, file: str = "Dockerfile", line: int = 0, text: str = ""):
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.text = text

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}: {self.text}" if self.text else f"{where}: {self.message}"


# --------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Command:
    """A command of RUN/CMD/ENTRYPOINT/HEALTHCHECK.

    Exec (JSON) form: ``args`` is the argv. Shell form: ``args`` is
    ``(script,)``, to be run as ``SHELL + [script]``.
    """

    args: tuple[str, ...]
    exec_form: bool


@dataclass(frozen=True)
class Heredoc:
    """A here-document attached to RUN/COPY/ADD.

    ``expand`` is False when the delimiter was quoted (no ``$`` expansion);
    ``strip_tabs`` for ``<<-``; ``fd`` when written as ``3<<EOF``.
    """

    name: str
    content: str
    expand: bool = True
    strip_tabs: bool = False
    fd: int | None = None


@dataclass(frozen=True)
class ArgDecl:
    """One name of an ARG line; ``default`` is None when none is given."""

    name: str
    default: str | None = None


@dataclass(frozen=True, kw_only=True)
class Instruction:
    """Base of every instruction.

    Attributes:
        original: the logical line as written, continuations joined (what
            docker shows as history ``created_by``).
        line: the 1-based line the instruction starts on.
    """

    keyword: ClassVar[str] = ""
    original: str
    line: int


@dataclass(frozen=True, kw_only=True)
class From(Instruction):
    keyword: ClassVar[str] = "FROM"
    image: str
    name: str | None = None
    platform: str | None = None


@dataclass(frozen=True, kw_only=True)
class Run(Instruction):
    keyword: ClassVar[str] = "RUN"
    command: Command
    mounts: tuple[str, ...] = ()
    network: str | None = None
    security: str | None = None
    heredocs: tuple[Heredoc, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Cmd(Instruction):
    keyword: ClassVar[str] = "CMD"
    command: Command


@dataclass(frozen=True, kw_only=True)
class Entrypoint(Instruction):
    keyword: ClassVar[str] = "ENTRYPOINT"
    command: Command


@dataclass(frozen=True, kw_only=True)
class Env(Instruction):
    keyword: ClassVar[str] = "ENV"
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True, kw_only=True)
class Label(Instruction):
    keyword: ClassVar[str] = "LABEL"
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True, kw_only=True)
class Maintainer(Instruction):
    """Deprecated; a builder records it as the image's ``author``."""

    keyword: ClassVar[str] = "MAINTAINER"
    name: str


@dataclass(frozen=True, kw_only=True)
class Arg(Instruction):
    keyword: ClassVar[str] = "ARG"
    decls: tuple[ArgDecl, ...]


@dataclass(frozen=True, kw_only=True)
class Expose(Instruction):
    keyword: ClassVar[str] = "EXPOSE"
    ports: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Volume(Instruction):
    keyword: ClassVar[str] = "VOLUME"
    paths: tuple[str, ...]
    json: bool = False


@dataclass(frozen=True, kw_only=True)
class Workdir(Instruction):
    keyword: ClassVar[str] = "WORKDIR"
    path: str


@dataclass(frozen=True, kw_only=True)
class User(Instruction):
    keyword: ClassVar[str] = "USER"
    user: str


@dataclass(frozen=True, kw_only=True)
class Stopsignal(Instruction):
    keyword: ClassVar[str] = "STOPSIGNAL"
    signal: str


@dataclass(frozen=True, kw_only=True)
class _CopyLike(Instruction):
    sources: tuple[str, ...]
    dest: str
    json: bool = False
    chown: str | None = None
    chmod: str | None = None
    link: bool = False
    exclude: tuple[str, ...] = ()
    heredocs: tuple[Heredoc, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Copy(_CopyLike):
    """COPY; ``from_`` is a stage name, stage index or image reference."""

    keyword: ClassVar[str] = "COPY"
    from_: str | None = None
    parents: bool = False


@dataclass(frozen=True, kw_only=True)
class Add(_CopyLike):
    keyword: ClassVar[str] = "ADD"
    checksum: str | None = None
    keep_git_dir: bool = False
    unpack: bool | None = None


@dataclass(frozen=True, kw_only=True)
class Onbuild(Instruction):
    """ONBUILD; ``trigger`` is parsed now, expanded in the child build."""

    keyword: ClassVar[str] = "ONBUILD"
    trigger: Instruction


@dataclass(frozen=True, kw_only=True)
class Healthcheck(Instruction):
    """HEALTHCHECK; ``test`` None means NONE. Durations in nanoseconds
    (the OCI config's unit); None means "inherit / default"."""

    keyword: ClassVar[str] = "HEALTHCHECK"
    test: Command | None
    interval: int | None = None
    timeout: int | None = None
    start_period: int | None = None
    start_interval: int | None = None
    retries: int | None = None


@dataclass(frozen=True, kw_only=True)
class Shell(Instruction):
    keyword: ClassVar[str] = "SHELL"
    args: tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    """One FROM and what follows it up to the next FROM.

    ``name`` is lower-cased (stage names are case-insensitive); ``base`` is
    the raw image expression (may hold ``$ARG`` of the global scope).
    """

    index: int
    name: str | None
    from_: From
    instructions: tuple[Instruction, ...]

    @property
    def base(self) -> str:
        return self.from_.image


@dataclass(frozen=True)
class Dockerfile:
    """A parsed Dockerfile: directives, global ARGs and stages."""

    file: str
    escape: str
    syntax: str | None
    global_args: tuple[Arg, ...]
    stages: tuple[Stage, ...]

    def stage(
        self, ref: str | int, *, before: int | None = None, by_index: bool = True
    ) -> Stage | None:
        """The stage ``ref`` names (name, case-insensitive, or index).

        ``before`` limits the search to stages with a lower index, the way a
        FROM or ``--from`` may only name an earlier stage; ``by_index=False``
        for FROM, where "0" is an image name, not a stage. Returns None when
        no stage matches (the reference is then an image).
        """
        limit = len(self.stages) if before is None else min(before, len(self.stages))
        if isinstance(ref, int) or (by_index and ref.isdecimal() and ref.isascii()):
            idx = int(ref)
            return self.stages[idx] if 0 <= idx < limit else None
        wanted = ref.lower()
        for stage in self.stages[:limit]:
            if stage.name == wanted:
                return stage
        return None

    def target(self, ref: str | int | None = None) -> Stage:
        """The stage ``--target`` selects; the last stage when None.

        Raises:
            NotFound: no stage has that name or index.
        """
        if ref is None:
            return self.stages[-1]
        stage = self.stage(ref)
        if stage is None:
            raise NotFound(f"target stage {ref!r} could not be found")
        return stage


# --------------------------------------------------------------------------
# lines


_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_KNOWN_DIRECTIVES = frozenset({"escape", "syntax", "check"})
_HEREDOC = re.compile(r"^(\d*)<<(-?)(['\"]?)([A-Za-z0-9_][A-Za-z0-9_.\-]*)\3$")


@dataclass(frozen=True)
class _Line:
    """A logical line: continuations joined, comments dropped."""

    number: int
    text: str
    heredocs: tuple[Heredoc, ...] = ()


class _Reader:
    """Turns the text into logical lines; owns directives and heredocs."""

    def __init__(self, text: str, file: str):
        self.lines = text.splitlines()
        self.pos = 0
        self.file = file
        self.escape = "\\"
        self.syntax: str | None = None

    def fail(self, message: str, number: int, text: str) -> DockerfileError:
        return DockerfileError(message, file=self.file, line=number, text=text)

    def read_directives(self) -> None:
        seen: set[str] = set()
        while self.pos < len(self.lines):
            raw = self.lines[self.pos].strip()
            match = _DIRECTIVE.match(raw)
            if not match or match.group(1).lower() not in _KNOWN_DIRECTIVES:
                return
            name, value = match.group(1).lower(), match.group(2)
            if name in seen:
                raise self.fail(f"only one {name} parser directive can be used", self.pos + 1, raw)
            seen.add(name)
            if name == "escape":
                if value not in ("\\", "`"):
                    raise self.fail("invalid escape token (must be \\ or `)", self.pos + 1, raw)
                self.escape = value
            elif name == "syntax":
                self.syntax = value  # recorded; we have one frontend
            self.pos += 1

    def logical_lines(self) -> list[_Line]:
        out: list[_Line] = []
        while self.pos < len(self.lines):
            start = self.pos
            raw = self.lines[self.pos].lstrip()
            self.pos += 1
            if not raw or raw.startswith("#"):
                continue
            text, more = self._strip_continuation(raw)
            while more and self.pos < len(self.lines):
                nxt = self.lines[self.pos]
                self.pos += 1
                stripped = nxt.strip()
                if stripped.startswith("#") or not stripped:
                    continue  # comments and empty lines inside a continuation vanish
                part, more = self._strip_continuation(nxt)
                text += part
            text = text.strip()
            if text:
                out.append(_Line(start + 1, text, self._heredocs(text, start + 1)))
        return out

    def _strip_continuation(self, line: str) -> tuple[str, bool]:
        trimmed = line.rstrip(" \t")
        if trimmed.endswith(self.escape):
            return trimmed[: -len(self.escape)], True
        return line, False

    def _heredocs(self, text: str, number: int) -> tuple[Heredoc, ...]:
        keyword = text.split(None, 1)[0].upper()
        if keyword not in ("RUN", "COPY", "ADD") or text.split(None, 1)[-1].lstrip().startswith("["):
            return ()
        docs = []
        for word in substitution.split_words(text, self.escape)[1:]:
            match = _HEREDOC.match(word)
            if match:
                docs.append(self._read_heredoc(match, number, text))
        return tuple(docs)

    def _read_heredoc(self, match: re.Match[str], number: int, text: str) -> Heredoc:
        fd, dash, quote, name = match.groups()
        body: list[str] = []
        while self.pos < len(self.lines):
            line = self.lines[self.pos]
            self.pos += 1
            candidate = line.lstrip("\t") if dash else line
            if candidate == name:
                content = "".join(part + "\n" for part in body)
                return Heredoc(name, content, not quote, bool(dash), int(fd) if fd else None)
            body.append(candidate)
        raise self.fail(f"unterminated heredoc {name}", number, text)


# --------------------------------------------------------------------------
# flags


_BOOL, _STR, _LIST = "bool", "str", "list"
_FLAGS: dict[str, dict[str, str]] = {
    "FROM": {"platform": _STR},
    "RUN": {"mount": _LIST, "network": _STR, "security": _STR},
    "COPY": {
        "from": _STR, "chown": _STR, "chmod": _STR, "link": _BOOL,
        "parents": _BOOL, "exclude": _LIST,
    },
    "ADD": {
        "chown": _STR, "chmod": _STR, "link": _BOOL, "checksum": _STR,
        "keep-git-dir": _BOOL, "exclude": _LIST, "unpack": _BOOL,
    },
    "HEALTHCHECK": {
        "interval": _STR, "timeout": _STR, "start-period": _STR,
        "start-interval": _STR, "retries": _STR,
    },
}  # fmt: skip


def _extract_flag_words(rest: str) -> tuple[list[str], str]:
    """Split leading ``--flag`` words off ``rest`` (parser.extractBuilderFlags).

    Quotes in a flag word group and vanish; ``\\`` escapes one character;
    a bare ``--`` ends the flags.
    """
    words: list[str] = []
    i, n = 0, len(rest)
    while True:
        while i < n and rest[i].isspace():
            i += 1
        if i >= n or not rest.startswith("--", i):
            return words, rest[i:]
        word, quote, blank_ok = [], "", False
        while i < n and (quote or not rest[i].isspace()):
            ch = rest[i]
            if quote and ch == quote:
                quote = ""
            elif not quote and ch in "'\"":
                quote, blank_ok = ch, True
            elif ch == "\\":
                i += 1
                if i < n:
                    word.append(rest[i])
            else:
                word.append(ch)
            i += 1
        joined = "".join(word)
        if joined == "--":
            return words, rest[i:]
        if joined or blank_ok:
            words.append(joined)


@dataclass(frozen=True)
class _Flags:
    values: dict[str, object]

    def get_str(self, name: str) -> str | None:
        value = self.values.get(name)
        return value if isinstance(value, str) else None

    def get_bool(self, name: str) -> bool | None:
        value = self.values.get(name)
        return value if isinstance(value, bool) else None

    def get_list(self, name: str) -> tuple[str, ...]:
        return tuple(self.values.get(name, ()))  # type: ignore[arg-type]


def _parse_flags(keyword: str, words: list[str]) -> _Flags:
    """Check flag words against what ``keyword`` accepts (BuildKit's BFlags)."""
    allowed = _FLAGS.get(keyword, {})
    values: dict[str, object] = {}
    for word in words:
        name, eq, value = word[2:].partition("=")
        kind = allowed.get(name)
        if not word.startswith("--"):
            raise ValueError(f"arg should start with --: {word}")
        if kind is None:
            raise ValueError(f"unknown flag: --{name}")
        if kind == _BOOL:
            if eq and value.lower() not in ("true", "false"):
                raise ValueError(f"expecting boolean value for flag {name}, not: {value}")
            values[name] = not eq or value.lower() == "true"
        elif not eq:
            raise ValueError(f"missing a value on flag: --{name}")
        elif kind == _LIST:
            values.setdefault(name, [])
            values[name].append(value)  # type: ignore[union-attr]
        elif name in values:
            raise ValueError(f"duplicate flag specified: --{name}")
        else:
            values[name] = value
    return _Flags(values)


# --------------------------------------------------------------------------
# argument forms


def _json_list(rest: str) -> list[str] | None:
    """``rest`` as a JSON array of strings, or None if it is not one."""
    rest = rest.strip()
    if not rest.startswith("["):
        return None
    try:
        value = json.loads(rest)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return value


def _command(rest: str) -> Command:
    args = _json_list(rest)
    if args is not None:
        return Command(tuple(args), exec_form=True)
    return Command((rest,), exec_form=False)


_GO_DURATION_UNITS = {
    "ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000,
    "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000,
}  # fmt: skip
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def _go_duration(text: str) -> int:
    """Parse Go's time.ParseDuration syntax ("1m30s", "300ms") into ns."""
    sign, body = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
    if body == "0":
        return 0
    pos, total = 0, 0.0
    while pos < len(body):
        match = _GO_DURATION_PART.match(body, pos)
        if not match:
            raise ValueError(f"invalid duration {text!r}")
        total += float(match.group(1)) * _GO_DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not body:
        raise ValueError(f"invalid duration {text!r}")
    return sign * round(total)


# --------------------------------------------------------------------------
# instructions


@dataclass(frozen=True)
class _Req:
    """What an instruction parser gets: keyword, text after flags, context."""

    keyword: str
    rest: str
    flags: _Flags
    line: _Line
    escape: str


def _require(req: _Req) -> str:
    if not req.rest:
        raise ValueError(f"{req.keyword} requires at least one argument")
    return req.rest


def _common(req: _Req) -> dict[str, object]:
    return {"original": req.line.text, "line": req.line.number}


_STAGE_NAME = re.compile(r"^[a-z][a-z0-9\-_.]*$")


def _p_from(req: _Req) -> From:
    words = req.rest.split()
    if len(words) not in (1, 3):
        raise ValueError("FROM requires either one or three arguments")
    name = None
    if len(words) == 3:
        if words[1].lower() != "as":
            raise ValueError("FROM requires either one or three arguments (expected AS)")
        name = words[2].lower()
        if not _STAGE_NAME.match(name):
            raise ValueError(
                f"invalid name for build stage: {words[2]!r}, "
                "name can't start with a number or contain symbols"
            )
    return From(image=words[0], name=name, platform=req.flags.get_str("platform"), **_common(req))


def _p_run(req: _Req) -> Run:
    if not req.rest and not req.line.heredocs:
        raise ValueError("RUN requires at least one argument")
    return Run(
        command=_command(req.rest),
        mounts=req.flags.get_list("mount"),
        network=req.flags.get_str("network"),
        security=req.flags.get_str("security"),
        heredocs=req.line.heredocs,
        **_common(req),
    )


def _p_cmd(req: _Req) -> Cmd:
    return Cmd(command=_command(_require(req)), **_common(req))


def _p_entrypoint(req: _Req) -> Entrypoint:
    return Entrypoint(command=_command(_require(req)), **_common(req))


def _name_values(req: _Req) -> tuple[tuple[str, str], ...]:
    """ENV/LABEL arguments: ``K V`` (legacy) or ``K=V K2="a b" ...``."""
    words = substitution.split_words(_require(req), req.escape)
    if "=" not in words[0]:
        parts = req.rest.split(None, 1)
        if len(parts) < 2:
            raise ValueError(f"{req.keyword} must have two arguments")
        pairs = [(parts[0], parts[1])]
    else:
        pairs = []
        for word in words:
            if "=" not in word:
                raise ValueError(
                    f"Syntax error - can't find = in {word!r}. Must be of the form: name=value"
                )
            key, _, value = word.partition("=")
            pairs.append((key, value))
    for key, _ in pairs:
        if not key:
            raise ValueError(f"{req.keyword} names can not be blank")
    return tuple(pairs)


def _p_env(req: _Req) -> Env:
    return Env(pairs=_name_values(req), **_common(req))


def _p_label(req: _Req) -> Label:
    return Label(pairs=_name_values(req), **_common(req))


def _p_maintainer(req: _Req) -> Maintainer:
    return Maintainer(name=_require(req), **_common(req))


_ARG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _p_arg(req: _Req) -> Arg:
    decls = []
    for word in substitution.split_words(_require(req), req.escape):
        name, eq, default = word.partition("=")
        if not _ARG_NAME.match(name):
            raise ValueError(f"invalid ARG name {name!r}")
        decls.append(ArgDecl(name, default if eq else None))
    return Arg(decls=tuple(decls), **_common(req))


_PORT = re.compile(r"^\d+(-\d+)?(/(tcp|udp|sctp))?$", re.IGNORECASE)


def _p_expose(req: _Req) -> Expose:
    ports = tuple(_require(req).split())
    for port in ports:
        # With a variable in it, a port can only be checked after expansion.
        if "$" not in port and not _PORT.match(port):
            raise ValueError(f"invalid port specification {port!r}")
    return Expose(ports=ports, **_common(req))


def _p_volume(req: _Req) -> Volume:
    json_args = _json_list(_require(req))
    paths = tuple(json_args) if json_args is not None else tuple(req.rest.split())
    if not paths or any(not p.strip() for p in paths):
        raise ValueError("VOLUME specified can not be an empty string")
    return Volume(paths=paths, json=json_args is not None, **_common(req))


def _p_workdir(req: _Req) -> Workdir:
    return Workdir(path=_require(req), **_common(req))


def _p_user(req: _Req) -> User:
    return User(user=_require(req), **_common(req))


def _p_stopsignal(req: _Req) -> Stopsignal:
    if len(_require(req).split()) != 1:
        raise ValueError("STOPSIGNAL requires exactly one argument")
    return Stopsignal(signal=req.rest, **_common(req))


def _copy_args(req: _Req) -> dict[str, object]:
    json_args = _json_list(req.rest)
    if json_args is not None:
        args = json_args
    else:
        args = substitution.split_words(req.rest, req.escape)
    if len(args) < 2:
        raise ValueError(
            f"{req.keyword} requires at least two arguments, but only one was provided. "
            "Destination could not be determined"
        )
    return dict(
        sources=tuple(args[:-1]),
        dest=args[-1],
        json=json_args is not None,
        chown=req.flags.get_str("chown"),
        chmod=req.flags.get_str("chmod"),
        link=bool(req.flags.get_bool("link")),
        exclude=req.flags.get_list("exclude"),
        heredocs=req.line.heredocs,
        **_common(req),
    )


def _p_copy(req: _Req) -> Copy:
    return Copy(
        from_=req.flags.get_str("from"),
        parents=bool(req.flags.get_bool("parents")),
        **_copy_args(req),  # type: ignore[arg-type]
    )


def _p_add(req: _Req) -> Add:
    return Add(
        checksum=req.flags.get_str("checksum"),
        keep_git_dir=bool(req.flags.get_bool("keep-git-dir")),
        unpack=req.flags.get_bool("unpack"),
        **_copy_args(req),  # type: ignore[arg-type]
    )


def _p_shell(req: _Req) -> Shell:
    args = _json_list(_require(req))
    if args is None:
        raise ValueError("SHELL requires the arguments to be in JSON form")
    if not args:
        raise ValueError("SHELL requires at least one argument")
    return Shell(args=tuple(args), **_common(req))


_MIN_DURATION_NS = 1_000_000  # docker refuses anything below 1ms


def _duration_flag(req: _Req, name: str) -> int | None:
    text = req.flags.get_str(name)
    if text is None:
        return None
    value = _go_duration(text)
    if value < 0:
        raise ValueError(f"{name} {text!r} cannot be negative")
    if 0 < value < _MIN_DURATION_NS:
        raise ValueError(f"{name} {text!r} cannot be less than 1ms")
    return value


def _p_healthcheck(req: _Req) -> Healthcheck:
    kind, *tail = _require(req).split(None, 1)
    rest = tail[0].strip() if tail else ""
    if kind.upper() == "NONE":
        if rest or req.flags.values:
            raise ValueError("HEALTHCHECK NONE takes no arguments")
        return Healthcheck(test=None, **_common(req))
    if kind.upper() != "CMD":
        raise ValueError(f"unknown type {kind!r} in HEALTHCHECK (try CMD)")
    if not rest:
        raise ValueError("missing command after HEALTHCHECK CMD")
    retries_text = req.flags.get_str("retries")
    retries = None
    if retries_text is not None:
        if not re.fullmatch(r"[+-]?\d+", retries_text):
            raise ValueError(f"invalid --retries value {retries_text!r}")
        retries = int(retries_text)
        if retries < 0:
            raise ValueError(f"--retries cannot be negative ({retries})")
    return Healthcheck(
        test=_command(rest),
        interval=_duration_flag(req, "interval"),
        timeout=_duration_flag(req, "timeout"),
        start_period=_duration_flag(req, "start-period"),
        start_interval=_duration_flag(req, "start-interval"),
        retries=retries,
        **_common(req),
    )


_NOT_TRIGGERS = frozenset({"ONBUILD", "FROM", "MAINTAINER"})


def _p_onbuild(req: _Req) -> Onbuild:
    rest = _require(req)
    keyword = rest.split(None, 1)[0].upper()
    if keyword == "ONBUILD":
        raise ValueError("chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
    if keyword in _NOT_TRIGGERS:
        raise ValueError(f"{keyword} isn't allowed as an ONBUILD trigger")
    trigger = _instruction(_Line(req.line.number, rest), req.escape)
    return Onbuild(trigger=trigger, **_common(req))


_PARSERS: dict[str, Callable[[_Req], Instruction]] = {
    "FROM": _p_from,
    "RUN": _p_run,
    "CMD": _p_cmd,
    "ENTRYPOINT": _p_entrypoint,
    "ENV": _p_env,
    "LABEL": _p_label,
    "MAINTAINER": _p_maintainer,
    "ARG": _p_arg,
    "EXPOSE": _p_expose,
    "VOLUME": _p_volume,
    "WORKDIR": _p_workdir,
    "USER": _p_user,
    "STOPSIGNAL": _p_stopsignal,
    "COPY": _p_copy,
    "ADD": _p_add,
    "SHELL": _p_shell,
    "HEALTHCHECK": _p_healthcheck,
    "ONBUILD": _p_onbuild,
}


def _instruction(line: _Line, escape: str) -> Instruction:
    """Parse one logical line; ValueError carries the reason."""
    head, *tail = line.text.split(None, 1)
    rest = tail[0] if tail else ""
    keyword = head.upper()
    parser = _PARSERS.get(keyword)
    if parser is None:
        raise ValueError(f"unknown instruction: {head}")
    flag_words, rest = _extract_flag_words(rest)
    flags = _parse_flags(keyword, flag_words)
    return parser(_Req(keyword, rest.strip(), flags, line, escape))


# --------------------------------------------------------------------------
# the file


def parse(text: str, *, file: str = "Dockerfile") -> Dockerfile:
    """Parse Dockerfile ``text``; ``file`` names it in errors.

    Raises:
        DockerfileError: any syntax error, with the line and its text.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = _Reader(text, file)
    reader.read_directives()
    global_args: list[Arg] = []
    stages: list[Stage] = []
    current: list[Instruction] = []
    for line in reader.logical_lines():
        try:
            instr = _instruction(line, reader.escape)
        except ValueError as exc:
            raise reader.fail(str(exc), line.number, line.text) from None
        if isinstance(instr, From):
            if stages:
                stages[-1] = _with_instructions(stages[-1], current)
            _check_stage_name(reader, stages, instr)
            stages.append(Stage(len(stages), instr.name, instr, ()))
            current = []
        elif not stages:
            if not isinstance(instr, Arg):
                raise reader.fail("no build stage in current context", line.number, line.text)
            global_args.append(instr)
        else:
            current.append(instr)
    if not stages:
        if global_args:
            raise reader.fail("no build stage in current context", 0, "")
        raise reader.fail("the Dockerfile cannot be empty (no instructions)", 0, "")
    stages[-1] = _with_instructions(stages[-1], current)
    return Dockerfile(file, reader.escape, reader.syntax, tuple(global_args), tuple(stages))


def _with_instructions(stage: Stage, instructions: list[Instruction]) -> Stage:
    return Stage(stage.index, stage.name, stage.from_, tuple(instructions))


def _check_stage_name(reader: _Reader, stages: list[Stage], instr: From) -> None:
    if instr.name and any(s.name == instr.name for s in stages):
        raise reader.fail(f"duplicate name {instr.name}", instr.line, instr.original)


# --------------------------------------------------------------------------
# stages


def _mount_from(mount: str) -> str | None:
    """The ``from=`` of a ``--mount`` spec (a stage it depends on), if any."""
    for part in mount.split(","):
        key, _, value = part.partition("=")
        if key.strip().lower() == "from" and value:
            return value
    return None


def stage_dependencies(
    dockerfile: Dockerfile, stage: Stage, build_args: Mapping[str, str] | None = None
) -> tuple[Stage, ...]:
    """Earlier stages ``stage`` uses: FROM <stage>, COPY --from, RUN --mount from=.

    References are expanded first (FROM with the global ARGs; flags with
    the stage's ARGs, not knowing the base image's ENV).
    """
    scope = substitution.Scope.for_stage(dockerfile, build_args)
    base = substitution.expand_instruction(
        stage.from_, scope.global_args, escape=dockerfile.escape, file=dockerfile.file
    )
    assert isinstance(base, From)
    # FROM names stages only by name: "FROM 0" is an image called 0.
    base_stage = dockerfile.stage(base.image, before=stage.index, by_index=False)
    deps = [base_stage] if base_stage is not None else []
    refs: list[tuple[str, Instruction]] = []
    for instr in stage.instructions:
        expanded, scope = scope.apply(instr)
        if isinstance(expanded, Copy) and expanded.from_:
            refs.append((expanded.from_, instr))
        elif isinstance(expanded, Run):
            refs.extend((ref, instr) for m in expanded.mounts if (ref := _mount_from(m)))
    for ref, instr in refs:
        dep = dockerfile.stage(ref, before=stage.index)
        if dep is None and ref.isdecimal():
            raise DockerfileError(
                f"invalid from flag value {ref}: refers to current or future build stage",
                file=dockerfile.file, line=instr.line, text=instr.original,
            )  # fmt: skip
        if dep is not None and dep not in deps:
            deps.append(dep)
    return tuple(deps)


def required_stages(
    dockerfile: Dockerfile,
    target: str | int | None = None,
    build_args: Mapping[str, str] | None = None,
) -> tuple[Stage, ...]:
    """The stages a build of ``target`` needs, dependencies first, by index.

    Only stages reachable from the target through FROM <stage>, COPY
    --from=<stage|index> and RUN --mount=from=<stage> are built, as BuildKit
    does; ``target`` None means the last stage.

    Raises:
        NotFound: ``target`` names no stage.
        DockerfileError: a ``--from`` index points at a later stage.
    """
    wanted: dict[int, Stage] = {}
    todo = [dockerfile.target(target)]
    while todo:
        stage = todo.pop()
        if stage.index in wanted:
            continue
        wanted[stage.index] = stage
        todo.extend(stage_dependencies(dockerfile, stage, build_args))
    return tuple(wanted[i] for i in sorted(wanted))
