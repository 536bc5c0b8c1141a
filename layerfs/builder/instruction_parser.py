"""One logical line to one instruction record: flags and argument forms.

Flags (``--name=value``) come directly after the keyword and are checked
against what that keyword accepts (BuildKit's ``BFlags``); each keyword's
arguments are then parsed by its own function (``_p_<keyword>``): JSON
(exec) or shell form, ``key=value`` pairs, Go durations. Errors are
``ValueError`` with the reason; :func:`layerfs.builder.dockerfile.parse`
adds the file, line and text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from layerfs.builder import substitution
from layerfs.builder.dockerfile_lines import Line
from layerfs.builder.instructions import (
    Add,
    Arg,
    ArgDecl,
    Cmd,
    Command,
    Copy,
    Entrypoint,
    Env,
    Expose,
    From,
    Healthcheck,
    Instruction,
    Label,
    Maintainer,
    Onbuild,
    Run,
    Shell,
    Stopsignal,
    User,
    Volume,
    Workdir,
)
from layerfs.errors import InvalidInput

__all__ = ["go_duration", "mount_fields", "parse_instruction"]


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


def go_duration(text: str) -> int:
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
    line: Line
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
    value = go_duration(text)
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
    trigger = parse_instruction(Line(req.line.number, rest), req.escape)
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


def parse_instruction(line: Line, escape: str) -> Instruction:
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


def mount_fields(spec: str) -> list[str]:
    """The ``key=value`` fields of a ``RUN --mount`` value: comma-separated,
    quoted as CSV (BuildKit's syntax)."""
    import csv

    try:
        rows = list(csv.reader([spec], strict=True))
    except csv.Error as exc:
        raise InvalidInput(f"--mount={spec}: {exc}") from None
    return [f for f in (rows[0] if rows else []) if f != ""]
