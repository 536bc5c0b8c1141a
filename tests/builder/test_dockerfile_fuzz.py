"""Fuzz: whatever text comes in, the parser either parses or raises DockerfileError.

Dockerfiles are untrusted input; a traceback from any other exception would
reach the user as a crash. The same holds for the word lexer and the
.dockerignore compiler with their own error classes.
"""

from __future__ import annotations

import textwrap

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerfs.builder.dockerfile import DockerfileError, parse, required_stages
from layerfs.builder.dockerignore import IgnoreMatcher, PatternError, parse_ignore_file
from layerfs.builder.substitution import (
    Scope,
    SubstitutionError,
    expand_instruction,
    expand_word,
    global_arg_values,
)
from layerfs.errors import NotFound

SEED = textwrap.dedent("""
    # syntax=docker/dockerfile:1
    # escape=\\
    ARG BASE=alpine:3.19
    FROM --platform=$BUILDPLATFORM ${BASE} AS build
    ARG BASE
    ENV A=1 B="two words" C='x y'
    ENV OLD style value
    LABEL "k"="v" k2=v2
    RUN --mount=type=cache,target=/c --network=none echo $A \\
        # comment inside
        && echo done
    RUN ["sh", "-c", "echo hi"]
    RUN <<EOF
    echo heredoc
    EOF
    COPY --chown=1:1 --chmod=755 --link a b* /dst/
    COPY ["with space", "/x y/"]
    ADD --checksum=sha256:00 --keep-git-dir=true https://x/y.tgz /opt/
    EXPOSE 80 443/tcp 53/udp
    VOLUME ["/data"]
    VOLUME /a /b
    WORKDIR /app
    USER app:app
    ONBUILD RUN echo child
    STOPSIGNAL SIGTERM
    HEALTHCHECK --interval=30s --timeout=3s --start-period=1s --retries=3 CMD curl -f x
    HEALTHCHECK NONE
    SHELL ["/bin/bash", "-c"]
    MAINTAINER me
    ENTRYPOINT ["app"]
    CMD ["--x"]
    FROM build AS final
    COPY --from=build /out /out
    COPY --from=0 /x /y
""").lstrip()

SEED_LINES = SEED.splitlines()

# Characters that matter to the grammar, so random text hits interesting paths.
ALPHABET = st.sampled_from(
    list("\\`$#{}[]\"'=:-+?/ \t\n\r<>,.0123456789abcAZ_") + ["FROM ", "RUN ", "--", "<<EOF", "EOF"]
)
KEYWORDS = [
    "FROM", "RUN", "CMD", "ENTRYPOINT", "ENV", "ARG", "LABEL", "EXPOSE", "VOLUME",
    "WORKDIR", "USER", "COPY", "ADD", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
    "MAINTAINER", "onbuild onbuild", "# escape=`", "# escape=x",
]  # fmt: skip


def check_parse(text: str) -> None:
    try:
        parsed = parse(text)
    except DockerfileError as err:
        assert str(err).startswith("Dockerfile:")
        return
    # What parses must also survive the later stages that read it.
    try:
        values = global_arg_values(parsed, {})
        for stage in parsed.stages:
            expand_instruction(stage.from_, values, escape=parsed.escape)
            scope = Scope.for_stage(parsed)
            for instr in stage.instructions:
                _, scope = scope.apply(instr)
        required_stages(parsed)
    except (DockerfileError, NotFound):
        pass


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.text(max_size=400))
def test_random_unicode_text(text: str) -> None:
    check_parse(text)


@settings(max_examples=400, deadline=None)
@given(st.lists(ALPHABET, max_size=120).map("".join))
def test_random_grammar_soup(text: str) -> None:
    check_parse(text)


@st.composite
def mutated_dockerfile(draw: st.DrawFn) -> str:
    lines = list(SEED_LINES)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["delete", "duplicate", "insert", "splice", "truncate", "swap"]))
        i = draw(st.integers(0, len(lines) - 1)) if lines else 0
        if not lines:
            lines.append(draw(st.text(max_size=30)))
        elif op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "insert":
            keyword = draw(st.sampled_from(KEYWORDS))
            lines.insert(i, keyword + " " + draw(st.lists(ALPHABET, max_size=20).map("".join)))
        elif op == "splice":
            line = lines[i]
            at = draw(st.integers(0, len(line)))
            junk = draw(st.lists(ALPHABET, max_size=8).map("".join))
            lines[i] = line[:at] + junk + line[at:]
        elif op == "truncate":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        else:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def test_seed_is_valid() -> None:
    parsed = parse(SEED)
    assert [s.name for s in required_stages(parsed)] == ["build", "final"]


@settings(max_examples=600, deadline=None)
@given(mutated_dockerfile())
def test_mutated_valid_dockerfile(text: str) -> None:
    check_parse(text)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(ALPHABET, max_size=40).map("".join),
    st.dictionaries(st.sampled_from(["a", "A", "_", "V1"]), st.text(max_size=5)),
    st.sampled_from(["\\", "`"]),
)
def test_lexer_raises_only_substitution_error(
    word: str, variables: dict[str, str], escape: str
) -> None:
    try:
        expand_word(word, variables, escape)
    except SubstitutionError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(ALPHABET, max_size=12).map("".join), max_size=6), st.text(max_size=20))
def test_ignore_patterns_raise_only_pattern_error(lines: list[str], path: str) -> None:
    try:
        matcher = IgnoreMatcher.from_patterns(parse_ignore_file("\n".join(lines)))
    except PatternError:
        return
    matcher.excluded(path)
    matcher.may_include_under(path or "x")
