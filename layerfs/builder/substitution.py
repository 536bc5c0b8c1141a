"""Variable substitution and build-arg scoping, as the Dockerfile reference says.

Two layers live here:

* the word lexer (:func:`expand_word`, :func:`expand_words`,
  :func:`expand_raw`) -- a port of the rules BuildKit's ``shell/lex.go``
  applies: ``$V``, ``${V}``, ``${V:-w}``, ``${V-w}``, ``${V:+w}``,
  ``${V+w}``, ``${V:?msg}``, ``${V?msg}``, single and double quotes, and
  the escape character (``\\`` or the one set by ``# escape=``);
* the scoping rules (:class:`Scope`, :func:`global_arg_values`,
  :func:`unused_build_args`): global ARGs only reach FROM lines unless a
  stage re-declares them, ``--build-arg`` beats a default, ENV beats ARG,
  the proxy args need no declaration.

Substitution applies to ADD COPY ENV EXPOSE FROM LABEL STOPSIGNAL USER VOLUME
WORKDIR (and ARG defaults, and the flags of RUN/COPY/ADD); never to the
command of RUN/CMD/ENTRYPOINT/HEALTHCHECK, whose shell expands it at run
time, nor to ONBUILD triggers, which expand in the child build.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from layerfs.errors import InvalidInput

if TYPE_CHECKING:  # the records import this module, so only for type hints
    from layerfs.builder.dockerfile import Dockerfile, Instruction, Stage

__all__ = [
    "AUTOMATIC_PLATFORM_ARGS",
    "PREDEFINED_ARGS",
    "Scope",
    "SubstitutionError",
    "expand_instruction",
    "expand_raw",
    "expand_word",
    "expand_words",
    "global_arg_values",
    "unused_build_args",
]

_PROXY = ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
#: Usable as --build-arg without an ARG line; docker keeps them out of history.
PREDEFINED_ARGS: frozenset[str] = frozenset(_PROXY + tuple(p.lower() for p in _PROXY))
#: BuildKit declares these in the global scope itself; a stage still has to
#: say ``ARG TARGETARCH`` to see one, but passing them never warns.
AUTOMATIC_PLATFORM_ARGS: frozenset[str] = frozenset(
    f"{who}{what}"
    for who in ("TARGET", "BUILD")
    for what in ("PLATFORM", "OS", "ARCH", "VARIANT")
)

_SPECIAL_PARAMS = frozenset("@*#?-$!0")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


class SubstitutionError(InvalidInput):
    """A word could not be expanded (bad ``${...}``, unmatched quote, ``:?``,
    or a result over :func:`max_expansion` bytes)."""


#: How much longer than itself an expanded word may get, in characters
#: (bytes for ASCII); the variables of a stage together are held to it too. ``ENV
#: A=${A}${A}`` doubles A on every line; without a limit 40 such lines ask
#: for a terabyte. 1 MiB is 8x what Linux lets one environment string be
#: (MAX_ARG_STRLEN, 128 KiB), so no word a build can use is refused.
MAX_EXPANSION_ENV = "LAYERFS_BUILD_MAX_EXPANSION"
DEFAULT_MAX_EXPANSION = 1 << 20


def max_expansion() -> int:
    """The limit in force: ``$LAYERFS_BUILD_MAX_EXPANSION`` or 1 Mi characters."""
    text = os.environ.get(MAX_EXPANSION_ENV, "")
    if not text:
        return DEFAULT_MAX_EXPANSION
    if not text.isdigit() or int(text) < 1:
        raise InvalidInput(f"{MAX_EXPANSION_ENV}={text!r}: expected a positive number of characters")
    return int(text)


# --------------------------------------------------------------------------
# the word lexer


class _Lexer:
    """One pass over one word; mirrors lex.go's processStopOn & friends."""

    def __init__(self, text: str, variables: Mapping[str, str], escape: str, quotes: bool,
                 limit: int | None = None):
        self.text = text
        self.pos = 0
        self.limit = max_expansion() if limit is None else limit
        self.variables = variables
        self.escape = escape
        # JSON-form arguments are already unquoted by the JSON decoder, so
        # quote characters in them are data, not syntax.
        self.quotes = quotes

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def next(self) -> str:
        ch = self.peek()
        self.pos += 1 if ch else 0
        return ch

    def run(self, stop: str = "") -> str:
        """Process until ``stop`` (consumed) or the end of the text."""
        out = _Output(self.limit, len(self.text))
        while self.pos < len(self.text):
            ch = self.next()
            if stop and ch == stop:
                return out.text()
            if ch == self.escape:
                out.append(self._escaped())
            elif ch == "'" and self.quotes:
                out.append(self._single_quoted())
            elif ch == '"' and self.quotes:
                out.append(self._double_quoted())
            elif ch == "$":
                out.append(self._dollar())
            else:
                out.append(ch)
        if stop:
            raise SubstitutionError(f"syntax error: missing '{stop}'")
        return out.text()

    def _escaped(self) -> str:
        if not self.quotes:
            # Raw mode only honours the escape that protects a '$'.
            if self.peek() == "$":
                return self.next()
            return self.escape
        return self.next()  # a trailing escape disappears, like lex.go

    def _single_quoted(self) -> str:
        end = self.text.find("'", self.pos)
        if end < 0:
            raise SubstitutionError(
                "unexpected end of statement while looking for matching single-quote"
            )
        chunk = self.text[self.pos : end]
        self.pos = end + 1
        return chunk

    def _double_quoted(self) -> str:
        out = _Output(self.limit, len(self.text))
        while self.pos < len(self.text):
            ch = self.next()
            if ch == '"':
                return out.text()
            if ch == "$":
                out.append(self._dollar())
            elif ch == self.escape and self.peek() in ('"', "$", self.escape) and self.peek():
                out.append(self.next())
            else:
                out.append(ch)
        raise SubstitutionError(
            "unexpected end of statement while looking for matching double-quote"
        )

    def _name(self) -> str:
        start = self.pos
        ch = self.peek()
        if ch.isdigit() and ch.isascii():
            while self.peek().isdigit() and self.peek().isascii():
                self.pos += 1
            return self.text[start : self.pos]
        if ch and ch in _SPECIAL_PARAMS:
            self.pos += 1
            return ch
        while self.peek() and self.peek() in _NAME_CHARS:
            self.pos += 1
        return self.text[start : self.pos]

    def _dollar(self) -> str:
        if self.peek() != "{":
            name = self._name()
            return self.variables.get(name, "") if name else "$"
        self.pos += 1
        name = self._name()
        if not name:
            raise SubstitutionError("bad substitution")
        ch = self.next()
        if ch == "}":
            return self.variables.get(name, "")
        colon = ch == ":"
        if colon:
            ch = self.next()
        if ch not in ("-", "+", "?") or not ch:
            raise SubstitutionError(f"unsupported modifier ({ch or 'EOF'}) in substitution")
        word = self.run(stop="}")
        return self._modify(name, ch, colon, word)

    def _modify(self, name: str, op: str, colon: bool, word: str) -> str:
        value = self.variables.get(name)
        present = value is not None and (value != "" or not colon)
        if op == "-":
            return value if present and value is not None else word
        if op == "+":
            return word if present else ""
        if not present:
            raise SubstitutionError(f"{name}: {word or 'is not allowed to be unset'}")
        return value or ""


class _Output:
    """The pieces of one expansion, refused as soon as they outgrow the word
    by more than the limit (a long literal word, a heredoc, is fine; growth
    is what is bounded), before they are joined: the join is what would
    exhaust memory."""

    def __init__(self, limit: int, word: int):
        self.parts: list[str] = []
        self.size = 0
        self.limit = limit
        self.most = limit + word

    def append(self, piece: str) -> None:
        self.size += len(piece)
        if self.size > self.most:
            raise SubstitutionError(
                f"expansion grows the word by more than {self.limit} characters "
                f"(the limit; {MAX_EXPANSION_ENV} sets it)")
        self.parts.append(piece)

    def text(self) -> str:
        return "".join(self.parts)


def expand_word(word: str, variables: Mapping[str, str], escape: str = "\\") -> str:
    """Expand one shell word: variables, quotes and escapes, as one string.

    Raises:
        SubstitutionError: on a malformed ``${...}``, an unmatched quote or a
            ``${V:?msg}`` whose V is unset.
    """
    return _Lexer(word, variables, escape, quotes=True).run()


def expand_raw(word: str, variables: Mapping[str, str], escape: str = "\\") -> str:
    """Expand variables in an already-unquoted string (a JSON-form argument)."""
    return _Lexer(word, variables, escape, quotes=False).run()


def expand_words(text: str, variables: Mapping[str, str], escape: str = "\\") -> list[str]:
    """Expand ``text`` and split the result on unquoted whitespace.

    Used where one argument may become several (``EXPOSE $PORTS``), like
    lex.go's ProcessWords. Quoted whitespace does not split.
    """
    words: list[str] = []
    for raw in split_words(text, escape):
        lexed = _Lexer(raw, variables, escape, quotes=True)
        if any(c in raw for c in "'\"") or escape in raw:
            words.append(lexed.run())
        else:
            # Unquoted expansion results split on whitespace, like a shell.
            words.extend(lexed.run().split())
    return words


def split_words(text: str, escape: str = "\\") -> list[str]:
    """Split on whitespace outside quotes, keeping quotes and escapes.

    A port of the parser's parseWords: the words keep their quoting so
    the lexer can remove it later, after variables are known.
    """
    words: list[str] = []
    word: list[str] = []
    quote = ""
    blank_ok = False
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if not quote and ch.isspace():
            if word or blank_ok:
                words.append("".join(word))
            word, blank_ok = [], False
        else:
            if quote and ch == quote:
                quote = ""
            elif not quote and ch in ("'", '"'):
                quote, blank_ok = ch, True
            elif ch == escape and quote != "'":
                if i + 1 == n:
                    break
                word.append(ch)
                i += 1
                ch = text[i]
            word.append(ch)
        i += 1
    if word or blank_ok:
        words.append("".join(word))
    return words


# --------------------------------------------------------------------------
# instructions


def expand_instruction(
    instr: Instruction,
    variables: Mapping[str, str],
    *,
    escape: str = "\\",
    file: str = "Dockerfile",
) -> Instruction:
    """Return ``instr`` with substitution applied where the reference says.

    ``variables`` is what is in effect at that line (see :meth:`Scope.variables`;
    for FROM, :func:`global_arg_values`). Instructions that are not
    substituted come back unchanged (the same object).

    Raises:
        DockerfileError: the expansion failed; carries the line and text.
    """
    expander = _EXPANDERS.get(instr.keyword)
    if expander is None:
        return instr
    try:
        return expander(instr, _Words(variables, escape))
    except SubstitutionError as exc:
        from layerfs.builder.dockerfile import DockerfileError

        raise DockerfileError(str(exc), file=file, line=instr.line, text=instr.original) from exc


@dataclass(frozen=True)
class _Words:
    """The expansions one instruction's fields need, bound to its variables."""

    variables: Mapping[str, str]
    escape: str

    def word(self, text: str) -> str:
        return expand_word(text, self.variables, self.escape)

    def opt(self, text: str | None) -> str | None:
        return None if text is None else self.word(text)

    def raw(self, text: str) -> str:
        return expand_raw(text, self.variables, self.escape)

    def split(self, text: str) -> list[str]:
        return expand_words(text, self.variables, self.escape)


def _from(i: Any, x: _Words) -> Any:
    return dataclasses.replace(i, image=x.word(i.image), platform=x.opt(i.platform))


def _pairs(i: Any, x: _Words) -> Any:
    return dataclasses.replace(i, pairs=tuple((x.word(k), x.word(v)) for k, v in i.pairs))


def _arg(i: Any, x: _Words) -> Any:
    decls = tuple(dataclasses.replace(d, default=x.opt(d.default)) for d in i.decls)
    return dataclasses.replace(i, decls=decls)


_PORT = re.compile(r"^\d+(-\d+)?(/(tcp|udp|sctp))?$", re.IGNORECASE)


def _expose(i: Any, x: _Words) -> Any:
    ports = tuple(p for port in i.ports for p in x.split(port))
    for port in ports:
        if not _PORT.match(port):
            raise SubstitutionError(f"invalid port specification {port!r}")
    return dataclasses.replace(i, ports=ports)


def _volume(i: Any, x: _Words) -> Any:
    each = x.raw if i.json else x.word
    return dataclasses.replace(i, paths=tuple(each(p) for p in i.paths))


def _copy(i: Any, x: _Words) -> Any:
    each = x.raw if i.json else x.word
    changes = dict(
        sources=tuple(each(s) for s in i.sources),
        dest=each(i.dest),
        chown=x.opt(i.chown),
        chmod=x.opt(i.chmod),
        exclude=tuple(x.word(e) for e in i.exclude),
    )
    if i.keyword == "COPY":
        changes["from_"] = x.opt(i.from_)
    else:
        changes["checksum"] = x.opt(i.checksum)
    return dataclasses.replace(i, **changes)


def _run(i: Any, x: _Words) -> Any:
    # Only the flags: the command itself belongs to the shell.
    return dataclasses.replace(
        i,
        mounts=tuple(x.word(m) for m in i.mounts),
        network=x.opt(i.network),
        security=x.opt(i.security),
    )


def _single(attr: str) -> Callable[[Any, _Words], Any]:
    def expand(i: Any, x: _Words) -> Any:
        return dataclasses.replace(i, **{attr: x.word(getattr(i, attr))})

    return expand


_EXPANDERS: dict[str, Callable[[Any, _Words], Any]] = {
    "FROM": _from,
    "ENV": _pairs,
    "LABEL": _pairs,
    "ARG": _arg,
    "EXPOSE": _expose,
    "VOLUME": _volume,
    "COPY": _copy,
    "ADD": _copy,
    "RUN": _run,
    "WORKDIR": _single("path"),
    "USER": _single("user"),
    "STOPSIGNAL": _single("signal"),
}


# --------------------------------------------------------------------------
# build-arg scoping


def global_arg_values(dockerfile: Dockerfile, build_args: Mapping[str, str]) -> dict[str, str]:
    """The values of the ARGs declared before the first FROM.

    These are what FROM lines see. A ``--build-arg`` beats the default; a
    default may use earlier global ARGs. An ARG declared without a default
    and not passed stays unset (absent from the result).
    """
    values: dict[str, str] = {}
    scope_file, escape = dockerfile.file, dockerfile.escape
    for arg in dockerfile.global_args:
        arg = expand_instruction(arg, values, escape=escape, file=scope_file)
        for decl in arg.decls:
            if decl.name in build_args:
                values[decl.name] = build_args[decl.name]
            elif decl.default is not None:
                values[decl.name] = decl.default
    return values


@dataclass(frozen=True)
class Scope:
    """What variables mean at one point inside one stage.

    Immutable: :meth:`apply` returns the expanded instruction and the scope
    after it, so a builder can keep the scope of every step (cache keys).

    Attributes:
        build_args: the ``--build-arg`` values the user passed.
        global_args: values of the global ARGs (:func:`global_arg_values`).
        env: the environment so far: the base image's Env, then each ENV.
        args: ARGs declared in this stage; None means declared but unset.
    """

    build_args: Mapping[str, str] = field(default_factory=dict)
    global_args: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    args: Mapping[str, str | None] = field(default_factory=dict)
    escape: str = "\\"
    file: str = "Dockerfile"

    @classmethod
    def for_stage(
        cls,
        dockerfile: Dockerfile,
        build_args: Mapping[str, str] | None = None,
        base_env: Mapping[str, str] | None = None,
    ) -> Scope:
        """The scope at the top of a stage whose base image has ``base_env``."""
        build_args = dict(build_args or {})
        return cls(
            build_args=build_args,
            global_args=global_arg_values(dockerfile, build_args),
            env=dict(base_env or {}),
            escape=dockerfile.escape,
            file=dockerfile.file,
        )

    def variables(self) -> dict[str, str]:
        """The mapping ``$NAME`` reads from: declared ARGs, then ENV over them."""
        merged = {k: v for k, v in self.args.items() if v is not None}
        merged.update(self.env)
        return merged

    def run_env(self) -> dict[str, str]:
        """The environment a RUN step gets: ARG values, proxies, then ENV.

        Proxy args come from ``--build-arg`` without a declaration; docker
        keeps them out of the image's history and config.
        """
        merged = {k: v for k, v in self.build_args.items() if k in PREDEFINED_ARGS}
        merged.update(self.variables())
        return merged

    def apply(self, instr: Instruction) -> tuple[Instruction, Scope]:
        """Expand ``instr`` in this scope; return it and the scope after it."""
        expanded = expand_instruction(instr, self.variables(), escape=self.escape, file=self.file)
        if expanded.keyword == "ENV":
            env = dict(self.env)
            env.update(expanded.pairs)  # type: ignore[attr-defined]
            return expanded, dataclasses.replace(self, env=env)._within_limit(instr)
        if expanded.keyword == "ARG":
            return expanded, dataclasses.replace(self, args=self._declare(expanded))._within_limit(instr)
        return expanded, self

    def _within_limit(self, instr: Instruction) -> Scope:
        """Refuse variables that together pass :func:`max_expansion`:
        ``ENV B1=$A B2=$A ...`` stays within the per-word limit but would
        grow without one (a RUN could not take them anyway: Linux limits
        a whole environment to about 2 MiB)."""
        limit = max_expansion()
        size = sum(len(k) + len(v) + 2 for k, v in self.variables().items())
        if size > limit:
            from layerfs.builder.dockerfile import DockerfileError

            raise DockerfileError(f"the variables in scope hold more than {limit} characters "
                                  f"(the limit; {MAX_EXPANSION_ENV} sets it)",
                                  file=self.file, line=instr.line, text=instr.original)
        return self

    def _declare(self, arg: Instruction) -> dict[str, str | None]:
        args = dict(self.args)
        for decl in arg.decls:  # type: ignore[attr-defined]
            if decl.name in self.build_args:
                args[decl.name] = self.build_args[decl.name]
            elif decl.default is not None:
                args[decl.name] = decl.default
            elif decl.name in self.global_args:
                # Re-declaring a global ARG without a default brings its value in.
                args[decl.name] = self.global_args[decl.name]
            else:
                # A bare re-declaration keeps what the stage already had.
                args.setdefault(decl.name, None)
        return args


def unused_build_args(
    dockerfile: Dockerfile,
    build_args: Iterable[str],
    stages: Iterable[Stage] | None = None,
) -> list[str]:
    """Warnings for ``--build-arg`` names no ARG consumed (docker's wording).

    ``stages`` are the stages actually built (default: all). Global ARGs,
    predefined proxy args and the automatic platform args count as consumed.
    Returns an empty list or one message.
    """
    consumed = set(PREDEFINED_ARGS | AUTOMATIC_PLATFORM_ARGS)
    consumed.update(d.name for a in dockerfile.global_args for d in a.decls)
    for stage in dockerfile.stages if stages is None else stages:
        for instr in stage.instructions:
            if instr.keyword == "ARG":
                consumed.update(d.name for d in instr.decls)  # type: ignore[attr-defined]
    unused = sorted(set(build_args) - consumed)
    if not unused:
        return []
    return [f"[Warning] One or more build-args [{' '.join(unused)}] were not consumed"]
