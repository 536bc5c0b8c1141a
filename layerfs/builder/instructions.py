"""The records a Dockerfile parses into: one frozen dataclass per instruction,
the stages they form, and :class:`DockerfileError`.

Fields hold the arguments *raw* (quotes and ``$VAR`` not yet resolved):
:func:`layerfs.builder.substitution.expand_instruction` resolves them with
the variables in effect at that line. :mod:`layerfs.builder.dockerfile`
parses text into these records and re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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
