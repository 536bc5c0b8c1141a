"""Variable substitution (lex rules) and build-arg scoping."""

from __future__ import annotations

import textwrap

import pytest

from layerfs.builder.dockerfile import DockerfileError, parse
from layerfs.builder.substitution import (
    Scope,
    SubstitutionError,
    expand_instruction,
    expand_raw,
    expand_word,
    expand_words,
    global_arg_values,
    split_words,
    unused_build_args,
)

ENV = {"V": "val", "EMPTY": "", "SP": "a b", "N1": "one", "_x9": "under"}


@pytest.mark.parametrize(
    "word, expected",
    [
        ("plain", "plain"),
        ("$V", "val"),
        ("${V}", "val"),
        ("pre${V}post", "prevalpost"),
        ("$V/x", "val/x"),
        ("$Vx", ""),  # the name is Vx
        ("$_x9-", "under-"),
        ("$UNSET", ""),
        ("${UNSET}", ""),
        ("${V:-def}", "val"),
        ("${EMPTY:-def}", "def"),
        ("${UNSET:-def}", "def"),
        ("${V-def}", "val"),
        ("${EMPTY-def}", ""),
        ("${UNSET-def}", "def"),
        ("${V:+alt}", "alt"),
        ("${EMPTY:+alt}", ""),
        ("${UNSET:+alt}", ""),
        ("${V+alt}", "alt"),
        ("${EMPTY+alt}", "alt"),
        ("${UNSET+alt}", ""),
        ("${V:?oops}", "val"),
        ("${EMPTY?oops}", ""),
        ("${UNSET:-$V}", "val"),  # the word itself expands
        ("${UNSET:-${EMPTY:-deep}}", "deep"),
        ("${UNSET:-a b}", "a b"),
        ('${UNSET:-"q}"}', "q}"),
        ("\\$V", "$V"),
        ("\\${V}", "${V}"),
        ("a\\ b", "a b"),
        ("trailing\\", "trailing"),
        ("$", "$"),
        ("a$", "a$"),
        ("$/", "$/"),
        ("$1x", "x"),  # positional parameters are never set
        ("'$V'", "$V"),
        ("'a\\b'", "a\\b"),
        ('"$V"', "val"),
        ('"${V:-x} and $SP"', "val and a b"),
        ('"\\$V"', "$V"),
        ('"a\\"b"', 'a"b'),
        ('"a\\b"', "a\\b"),  # only " $ and the escape itself are escapable in ""
        ('"a\\\\b"', "a\\b"),
        ("x'y'\"z\"", "xyz"),
        ('""', ""),
    ],
)
def test_expand_word(word: str, expected: str) -> None:
    assert expand_word(word, ENV) == expected


@pytest.mark.parametrize(
    "word, expected",
    [("`$V", "$V"), ("a`b", "ab"), ("c:\\dir\\$V", "c:\\dir\\val"), ('"`"x"', '"x')],
)
def test_expand_word_with_backtick_escape(word: str, expected: str) -> None:
    assert expand_word(word, ENV, escape="`") == expected


@pytest.mark.parametrize(
    "word, message",
    [
        ("${", "bad substitution"),
        ("${}", "bad substitution"),
        ("${V", "unsupported modifier (EOF)"),
        ("${V:-x", "missing '}'"),
        ("${V%x}", "unsupported modifier (%)"),
        ("${V:x}", "unsupported modifier (x)"),
        ("'open", "matching single-quote"),
        ('"open', "matching double-quote"),
        ("${UNSET:?must be set}", "UNSET: must be set"),
        ("${EMPTY:?}", "EMPTY: is not allowed to be unset"),
        ("${UNSET?}", "UNSET: is not allowed to be unset"),
    ],
)
def test_expand_word_errors(word: str, message: str) -> None:
    with pytest.raises(SubstitutionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        expand_word(word, ENV)


def test_expand_raw_keeps_quotes_and_other_escapes() -> None:
    assert expand_raw('"$V" \'x\' \\n \\$V', ENV) == '"val" \'x\' \\n $V'


def test_expand_words_splits_unquoted_results() -> None:
    assert expand_words("$PORTS 22", {"PORTS": "80/tcp  443"}) == ["80/tcp", "443", "22"]
    assert expand_words('"$SP" x', ENV) == ["a b", "x"]


def test_split_words_keeps_quotes() -> None:
    assert split_words('a "b c" d\\ e \'f g\' ""') == ["a", '"b c"', "d\\ e", "'f g'", '""']


# --------------------------------------------------------------------------
# which instructions expand


def first(body: str, escape_directive: str = ""):  # type: ignore[no-untyped-def]
    parsed = parse(escape_directive + "FROM scratch\n" + body)
    return parsed.stages[0].instructions[0]


VARS = {"A": "alpha", "P": "8080", "D": "/data", "SP": "x y"}


@pytest.mark.parametrize(
    "body, attr, expected",
    [
        ("ENV K=$A K2=${A}2", "pairs", (("K", "alpha"), ("K2", "alpha2"))),
        ("ENV K $A and more", "pairs", (("K", "alpha and more"),)),
        ("LABEL l.$A=$A", "pairs", (("l.alpha", "alpha"),)),
        ("EXPOSE $P ${P}/udp", "ports", ("8080", "8080/udp")),
        ("VOLUME $D ${D}2", "paths", ("/data", "/data2")),
        ('VOLUME ["$D", "\\"q\\""]', "paths", ("/data", '"q"')),
        ("WORKDIR $D/app", "path", "/data/app"),
        ("USER ${A}:${A}", "user", "alpha:alpha"),
        ("STOPSIGNAL ${SIG:-SIGTERM}", "signal", "SIGTERM"),
        ("COPY $A ${D}/", "sources", ("alpha",)),
        ("COPY $A ${D}/", "dest", "/data/"),
        ('COPY ["$A", "$D"]', "sources", ("alpha",)),
        ("COPY --from=$A --chown=$A --chmod=${P} x y", "from_", "alpha"),
        ("COPY --from=$A --chown=$A --chmod=${P} x y", "chown", "alpha"),
        ("COPY --from=$A --chown=$A --chmod=${P} x y", "chmod", "8080"),
        ("ADD --checksum=$A x y", "checksum", "alpha"),
        ("ARG X=$A", "decls", None),
        ("RUN --mount=target=$D --network=$A echo $A", "mounts", ("target=/data",)),
        ("RUN --mount=target=$D --network=$A echo $A", "network", "alpha"),
    ],
)
def test_expanding_instructions(body: str, attr: str, expected: object) -> None:
    instr = first(body)
    out = expand_instruction(instr, VARS)
    if attr == "decls":
        assert out.decls[0].default == "alpha"
    else:
        assert getattr(out, attr) == expected
    assert out.original == instr.original  # history keeps what was written


@pytest.mark.parametrize(
    "body",
    [
        "RUN echo $A",
        'RUN ["echo", "$A"]',
        "CMD echo $A",
        'CMD ["$A"]',
        "ENTRYPOINT $A",
        'SHELL ["$A"]',
        "HEALTHCHECK CMD $A",
        "ONBUILD ENV X=$A",
        "MAINTAINER $A",
    ],
)
def test_not_expanded(body: str) -> None:
    instr = first(body)
    out = expand_instruction(instr, VARS)
    assert out == instr
    if body.startswith("RUN"):
        assert "$A" in out.command.args[-1]


def test_run_command_untouched_even_with_expanded_flags() -> None:
    out = expand_instruction(first("RUN --network=$A echo $A"), VARS)
    assert out.command.args == ("echo $A",)


def test_from_expands() -> None:
    parsed = parse("ARG TAG=3\nFROM --platform=${PLAT:-linux/amd64} alpine:$TAG AS b\n")
    out = expand_instruction(parsed.stages[0].from_, global_arg_values(parsed, {}))
    assert (out.image, out.platform, out.name) == ("alpine:3", "linux/amd64", "b")


def test_escape_directive_applies_to_substitution() -> None:
    instr = first("WORKDIR c:\\$A\\`$A\n", "# escape=`\n")
    assert expand_instruction(instr, VARS, escape="`").path == "c:\\alpha\\$A"


def test_expansion_error_becomes_dockerfile_error_with_line() -> None:
    instr = first("WORKDIR ${A")
    with pytest.raises(DockerfileError) as info:
        expand_instruction(instr, VARS, file="Dfile")
    assert str(info.value).startswith("Dfile:2: ")
    assert info.value.text == "WORKDIR ${A"


def test_env_on_one_line_sees_previous_values() -> None:
    # Reference: "ENV abc=bye def=$abc" gives def=hello, not bye.
    parsed = parse("FROM a\nENV abc=hello\nENV abc=bye def=$abc\nENV ghi=$abc\n")
    scope = Scope.for_stage(parsed)
    for instr in parsed.stages[0].instructions:
        _, scope = scope.apply(instr)
    assert scope.env == {"abc": "bye", "def": "hello", "ghi": "bye"}


# --------------------------------------------------------------------------
# build-arg scoping


DOCKERFILE = textwrap.dedent("""
    ARG GLOBAL=gdefault
    ARG NODEFAULT
    FROM base:$GLOBAL
    ARG GLOBAL
    ARG LOCAL=ldefault
    ARG FROMGLOBAL=${GLOBAL}-x
    ARG UNSETARG
    ENV FROMENV=$LOCAL
    ARG LOCAL
    FROM other
    ARG LATE=late
""").lstrip()


def walk(build_args: dict[str, str], base_env: dict[str, str] | None = None) -> Scope:
    parsed = parse(DOCKERFILE)
    scope = Scope.for_stage(parsed, build_args, base_env)
    for instr in parsed.stages[0].instructions:
        _, scope = scope.apply(instr)
    return scope


def test_global_args_feed_from_lines() -> None:
    parsed = parse(DOCKERFILE)
    assert global_arg_values(parsed, {}) == {"GLOBAL": "gdefault"}
    assert global_arg_values(parsed, {"GLOBAL": "cli", "NODEFAULT": "n"}) == {
        "GLOBAL": "cli",
        "NODEFAULT": "n",
    }


def test_global_arg_defaults_see_earlier_globals() -> None:
    parsed = parse("ARG A=1\nARG B=${A}2\nFROM x\n")
    assert global_arg_values(parsed, {"A": "9"}) == {"A": "9", "B": "92"}


def test_stage_scope_defaults() -> None:
    scope = walk({})
    assert scope.variables() == {
        "GLOBAL": "gdefault",
        "LOCAL": "ldefault",
        "FROMGLOBAL": "gdefault-x",
        "FROMENV": "ldefault",
    }
    assert scope.args["UNSETARG"] is None


def test_build_arg_overrides_defaults() -> None:
    scope = walk({"GLOBAL": "g", "LOCAL": "l", "UNSETARG": "u"})
    variables = scope.variables()
    assert variables["GLOBAL"] == "g"
    assert variables["LOCAL"] == "l"
    assert variables["FROMGLOBAL"] == "g-x"
    assert variables["UNSETARG"] == "u"


def test_global_arg_invisible_in_stage_without_redeclaration() -> None:
    parsed = parse("ARG G=1\nFROM x\nENV E=${G:-unset}\n")
    scope = Scope.for_stage(parsed, {"G": "2"})
    env, _ = scope.apply(parsed.stages[0].instructions[0])
    assert env.pairs == (("E", "unset"),)


def test_env_overrides_arg_of_same_name() -> None:
    parsed = parse("FROM x\nARG V=arg\nENV V=env\nWORKDIR /$V\n")
    scope = Scope.for_stage(parsed, {"V": "cli"})
    outs = []
    for instr in parsed.stages[0].instructions:
        out, scope = scope.apply(instr)
        outs.append(out)
    assert outs[-1].path == "/env"


def test_base_image_env_is_visible() -> None:
    scope = walk({}, base_env={"PATH": "/usr/bin", "LOCAL": "fromimage"})
    assert scope.variables()["PATH"] == "/usr/bin"
    # ENV (here from the base image) beats ARG.
    assert scope.variables()["LOCAL"] == "fromimage"


def test_run_env_includes_proxies_without_declaration() -> None:
    scope = walk({"http_proxy": "http://p:3128", "NO_PROXY": "x", "RANDOM": "r"})
    env = scope.run_env()
    assert env["http_proxy"] == "http://p:3128" and env["NO_PROXY"] == "x"
    assert "RANDOM" not in env
    assert env["LOCAL"] == "ldefault"


def test_arg_declared_later_in_stage_not_visible_before() -> None:
    parsed = parse("FROM x\nWORKDIR /$A\nARG A=1\nWORKDIR /$A\n")
    scope = Scope.for_stage(parsed)
    first_out, scope = scope.apply(parsed.stages[0].instructions[0])
    _, scope = scope.apply(parsed.stages[0].instructions[1])
    second_out, _ = scope.apply(parsed.stages[0].instructions[2])
    assert (first_out.path, second_out.path) == ("/", "/1")


def test_scope_is_immutable() -> None:
    parsed = parse("FROM x\nENV A=1\n")
    start = Scope.for_stage(parsed)
    _, after = start.apply(parsed.stages[0].instructions[0])
    assert start.env == {} and after.env == {"A": "1"}


@pytest.mark.parametrize(
    "build_args, stages, expected",
    [
        ({}, None, []),
        ({"GLOBAL": "1", "LOCAL": "2", "LATE": "3"}, None, []),
        ({"NOPE": "1"}, None, ["[Warning] One or more build-args [NOPE] were not consumed"]),
        (
            {"ZED": "1", "ALPHA": "2", "LOCAL": "x"},
            None,
            ["[Warning] One or more build-args [ALPHA ZED] were not consumed"],
        ),
        ({"HTTP_PROXY": "p", "https_proxy": "p", "TARGETARCH": "arm64"}, None, []),
        ({"LATE": "1"}, [0], ["[Warning] One or more build-args [LATE] were not consumed"]),
        ({"NODEFAULT": "1"}, [1], []),  # global ARGs count as consumed
    ],
)
def test_unused_build_args(
    build_args: dict[str, str], stages: list[int] | None, expected: list[str]
) -> None:
    parsed = parse(DOCKERFILE)
    chosen = None if stages is None else [parsed.stages[i] for i in stages]
    assert unused_build_args(parsed, build_args, chosen) == expected


def test_expose_checks_ports_after_expansion() -> None:
    instr = first("EXPOSE $P")
    with pytest.raises(DockerfileError, match="invalid port specification 'http'"):
        expand_instruction(instr, {"P": "http"})
    assert expand_instruction(instr, {"P": "80 81/udp"}).ports == ("80", "81/udp")


def test_expansion_limit(monkeypatch):
    from layerfs.builder.substitution import SubstitutionError, expand_word

    big = {"A": "x" * 600_000}
    assert len(expand_word("${A}", big)) == 600_000
    with pytest.raises(SubstitutionError, match="grows the word by more than 1048576 characters"):
        expand_word("${A}${A}", big)
    with pytest.raises(SubstitutionError, match="grows the word"):
        expand_word('"${A}${A}"', big)   # inside quotes too
    monkeypatch.setenv("LAYERFS_BUILD_MAX_EXPANSION", "2000000")
    assert len(expand_word("${A}${A}", big)) == 1_200_000
