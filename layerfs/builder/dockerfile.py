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
by :func:`layerfs.builder.substitution.expand_instruction`, because their
values depend on ARG/ENV in effect at that line.

The work is split: :mod:`~layerfs.builder.dockerfile_lines` reads logical
lines, :mod:`~layerfs.builder.instruction_parser` makes one record of each
(:mod:`~layerfs.builder.instructions`, re-exported here), and this module
groups them into stages and finds which stages a target needs.
"""

from __future__ import annotations

from collections.abc import Mapping

from layerfs.builder import substitution
from layerfs.builder.dockerfile_lines import Reader
from layerfs.builder.instruction_parser import mount_fields, parse_instruction
from layerfs.builder.instructions import (
    Add,
    Arg,
    ArgDecl,
    Cmd,
    Command,
    Copy,
    Dockerfile,
    DockerfileError,
    Entrypoint,
    Env,
    Expose,
    From,
    Healthcheck,
    Heredoc,
    Instruction,
    Label,
    Maintainer,
    Onbuild,
    Run,
    Shell,
    Stage,
    Stopsignal,
    User,
    Volume,
    Workdir,
)
from layerfs.errors import InvalidInput

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


# --------------------------------------------------------------------------
# the file


def parse(text: str, *, file: str = "Dockerfile") -> Dockerfile:
    """Parse Dockerfile ``text``; ``file`` names it in errors.

    Raises:
        DockerfileError: any syntax error, with the line and its text.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = Reader(text, file)
    reader.read_directives()
    global_args: list[Arg] = []
    stages: list[Stage] = []
    current: list[Instruction] = []
    for line in reader.logical_lines():
        try:
            instr = parse_instruction(line, reader.escape)
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


def _check_stage_name(reader: Reader, stages: list[Stage], instr: From) -> None:
    if instr.name and any(s.name == instr.name for s in stages):
        raise reader.fail(f"duplicate name {instr.name}", instr.line, instr.original)


# --------------------------------------------------------------------------
# stages


def _mount_from(mount: str) -> str | None:
    """The ``from=`` of a ``--mount`` spec (a stage it depends on), if any
    (fields split as the step itself will split them; a malformed spec is
    reported by the step)."""
    try:
        fields = mount_fields(mount)
    except InvalidInput:
        return None
    for part in fields:
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
