"""The Dockerfile parser: directives, lines, every instruction, errors, stages."""

from __future__ import annotations

import textwrap

import pytest

from layerfs.builder import dockerfile as df
from layerfs.builder.dockerfile import (
    Add,
    Arg,
    ArgDecl,
    Cmd,
    Command,
    Copy,
    DockerfileError,
    Entrypoint,
    Env,
    Expose,
    From,
    Healthcheck,
    Heredoc,
    Label,
    Maintainer,
    Onbuild,
    Run,
    Shell,
    Stopsignal,
    User,
    Volume,
    Workdir,
    parse,
    required_stages,
)
from layerfs.builder.instruction_parser import go_duration
from layerfs.builder.substitution import expand_instruction
from layerfs.errors import InvalidInput, LayerfsError, NotFound


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def one(body: str, **kw: object) -> df.Instruction:
    """The single instruction after a FROM line."""
    parsed = parse("FROM scratch\n" + body, **kw)  # type: ignore[arg-type]
    (instr,) = parsed.stages[0].instructions
    return instr


def error_of(text: str) -> DockerfileError:
    with pytest.raises(DockerfileError) as info:
        parse(text)
    return info.value


# --------------------------------------------------------------------------
# errors


def test_error_is_invalid_input_and_formats_file_line_text() -> None:
    err = DockerfileError("unknown instruction: FOO", file="Dockerfile", line=3, text="FOO bar")
    assert isinstance(err, InvalidInput) and isinstance(err, LayerfsError)
    assert str(err) == "Dockerfile:3: unknown instruction: FOO: FOO bar"
    assert (err.file, err.line, err.text) == ("Dockerfile", 3, "FOO bar")


def test_error_names_the_file_passed() -> None:
    with pytest.raises(DockerfileError) as info:
        parse("FROM a\nBOGUS x\n", file="sub/Dockerfile.dev")
    assert str(info.value) == "sub/Dockerfile.dev:2: unknown instruction: BOGUS: BOGUS x"


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("", 0, "cannot be empty"),
        ("# only a comment\n\n", 0, "cannot be empty"),
        ("ARG A\n", 0, "no build stage"),
        ("RUN echo\n", 1, "no build stage"),
        ("ENV A=b\nFROM x\n", 1, "no build stage"),
        ("FROM a\nFROB x\n", 2, "unknown instruction: FROB"),
        ("FROM\n", 1, "FROM requires either one or three arguments"),
        ("FROM a b\n", 1, "one or three"),
        ("FROM a IS b\n", 1, "expected AS"),
        ("FROM a AS 1st\n", 1, "invalid name for build stage"),
        ("FROM a AS x\nFROM b AS X\n", 2, "duplicate name x"),
        ("FROM a\nSHELL /bin/sh -c\n", 2, "SHELL requires the arguments to be in JSON form"),
        ("FROM a\nSHELL []\n", 2, "SHELL requires at least one argument"),
        ("FROM a\nSHELL [\"a\", 1]\n", 2, "JSON form"),
        ("FROM a\nENV\n", 2, "ENV requires at least one argument"),
        ("FROM a\nENV ONLYNAME\n", 2, "ENV must have two arguments"),
        ("FROM a\nENV A=1 B\n", 2, "can't find = in 'B'"),
        ("FROM a\nENV =x\n", 2, "ENV names can not be blank"),
        ("FROM a\nLABEL a=b c\n", 2, "can't find = in 'c'"),
        ("FROM a\nLABEL\n", 2, "LABEL requires at least one argument"),
        ("FROM a\nARG\n", 2, "ARG requires"),
        ("FROM a\nARG 1A=b\n", 2, "invalid ARG name"),
        ("FROM a\nCOPY onlyone\n", 2, "COPY requires at least two arguments"),
        ("FROM a\nADD [\"x\"]\n", 2, "ADD requires at least two arguments"),
        ("FROM a\nCOPY --bogus=1 a b\n", 2, "unknown flag: --bogus"),
        ("FROM a\nCOPY --from a b\n", 2, "missing a value on flag: --from"),
        ("FROM a\nCOPY --from=x --from=y a b\n", 2, "duplicate flag specified: --from"),
        ("FROM a\nCOPY --link=maybe a b\n", 2, "expecting boolean value for flag link"),
        ("FROM a\nRUN --mount\n", 2, "missing a value on flag: --mount"),
        ("FROM --platform linux/amd64 a\n", 1, "missing a value"),
        ("FROM --bogus=1 a\n", 1, "unknown flag: --bogus"),
        ("FROM a\nWORKDIR --x=1 /a\n", 2, "unknown flag: --x"),
        ("FROM a\nCMD --help\n", 2, "unknown flag: --help"),
        ("FROM a\nRUN\n", 2, "RUN requires at least one argument"),
        ("FROM a\nCMD\n", 2, "CMD requires at least one argument"),
        ("FROM a\nEXPOSE\n", 2, "EXPOSE requires"),
        ("FROM a\nEXPOSE 80/xyz\n", 2, "invalid port specification"),
        ("FROM a\nEXPOSE http\n", 2, "invalid port specification"),
        ("FROM a\nVOLUME [\"\"]\n", 2, "VOLUME specified can not be an empty string"),
        ("FROM a\nSTOPSIGNAL\n", 2, "STOPSIGNAL requires"),
        ("FROM a\nSTOPSIGNAL A B\n", 2, "exactly one argument"),
        ("FROM a\nWORKDIR\n", 2, "WORKDIR requires"),
        ("FROM a\nUSER\n", 2, "USER requires"),
        ("FROM a\nMAINTAINER\n", 2, "MAINTAINER requires"),
        ("FROM a\nONBUILD\n", 2, "ONBUILD requires"),
        ("FROM a\nONBUILD ONBUILD RUN x\n", 2, "ONBUILD ONBUILD"),
        ("FROM a\nONBUILD FROM x\n", 2, "FROM isn't allowed as an ONBUILD trigger"),
        ("FROM a\nONBUILD maintainer me\n", 2, "MAINTAINER isn't allowed"),
        ("FROM a\nONBUILD NOPE x\n", 2, "unknown instruction: NOPE"),
        ("FROM a\nHEALTHCHECK\n", 2, "HEALTHCHECK requires"),
        ("FROM a\nHEALTHCHECK NONE x\n", 2, "NONE takes no arguments"),
        ("FROM a\nHEALTHCHECK --retries=1 NONE\n", 2, "NONE takes no arguments"),
        ("FROM a\nHEALTHCHECK RUN x\n", 2, "unknown type 'RUN' in HEALTHCHECK"),
        ("FROM a\nHEALTHCHECK CMD\n", 2, "missing command after HEALTHCHECK CMD"),
        ("FROM a\nHEALTHCHECK --interval=5 CMD x\n", 2, "invalid duration"),
        ("FROM a\nHEALTHCHECK --interval=1us CMD x\n", 2, "cannot be less than 1ms"),
        ("FROM a\nHEALTHCHECK --timeout=-1s CMD x\n", 2, "cannot be negative"),
        ("FROM a\nHEALTHCHECK --retries=-1 CMD x\n", 2, "cannot be negative"),
        ("FROM a\nHEALTHCHECK --retries=x CMD x\n", 2, "invalid --retries"),
        ("FROM a\nHEALTHCHECK --bogus=1 CMD x\n", 2, "unknown flag"),
        ("FROM a\nRUN <<EOF\necho\n", 2, "unterminated heredoc EOF"),
        ("# escape=x\nFROM a\n", 1, "invalid escape token"),
        ("# escape=\\\n# escape=`\nFROM a\n", 2, "only one escape parser directive"),
        ("# syntax=a\n# SYNTAX=b\nFROM a\n", 2, "only one syntax parser directive"),
    ],
)
def test_errors(text: str, line: int, fragment: str) -> None:
    err = error_of(text)
    assert fragment in err.message
    assert err.line == line
    if line:
        assert err.text == text.splitlines()[line - 1].strip()
    # No line number for whole-file errors (an empty Dockerfile).
    assert str(err).startswith(f"Dockerfile:{line}: " if line else "Dockerfile: ")


def test_error_text_is_the_joined_logical_line() -> None:
    err = error_of("FROM a\nBAD one \\\n  two\n")
    assert err.line == 2
    assert err.text == "BAD one   two"


# --------------------------------------------------------------------------
# directives, comments, continuations


def test_escape_directive_backtick() -> None:
    parsed = parse(dedent("""
        # escape=`
        FROM windows
        RUN dir `
            c:\\
        COPY a\\b c:\\dst\\
    """))
    assert parsed.escape == "`"
    run, copy = parsed.stages[0].instructions
    assert isinstance(run, Run) and run.command.args == ("dir     c:\\",)
    assert isinstance(copy, Copy) and copy.sources == ("a\\b",) and copy.dest == "c:\\dst\\"


def test_backslash_is_default_and_a_backslash_line_end_continues() -> None:
    parsed = parse("FROM a\nRUN echo \\\n  hi\n")
    assert parsed.escape == "\\"
    (run,) = parsed.stages[0].instructions
    assert run.command.args == ("echo   hi",)  # type: ignore[attr-defined]


def test_directives_case_and_spacing_and_syntax_recorded() -> None:
    parsed = parse("#  ESCAPE =  `\n# syntax=docker/dockerfile:1\nFROM a\n")
    assert parsed.escape == "`"
    assert parsed.syntax == "docker/dockerfile:1"


@pytest.mark.parametrize(
    "prefix",
    [
        "# a comment\n# escape=`\n",  # a comment ends the directives
        "\n# escape=`\n",  # so does a blank line
        "FROM a\n# escape=`\n",  # and an instruction
        "# unknown=1\n# escape=`\n",  # an unknown directive is a comment
    ],
)
def test_directive_only_at_the_top(prefix: str) -> None:
    text = prefix if prefix.startswith("FROM") else prefix + "FROM a\n"
    assert parse(text).escape == "\\"


def test_bom_is_ignored() -> None:
    assert parse("\ufeff# escape=`\nFROM a\n").escape == "`"


def test_comments_and_blank_lines_and_indentation() -> None:
    parsed = parse(dedent("""
        # leading comment

          # indented comment
        FROM a
            RUN echo one # not a comment
        \t
        run echo two
    """))
    r1, r2 = parsed.stages[0].instructions
    assert r1.command.args == ("echo one # not a comment",)  # type: ignore[attr-defined]
    assert r2.command.args == ("echo two",)  # type: ignore[attr-defined]
    assert (r1.line, r2.line) == (5, 7)


def test_comment_and_empty_lines_inside_continuation_are_dropped() -> None:
    parsed = parse(dedent("""
        FROM a
        RUN apt-get update && \\
            # install things
            apt-get install -y \\

            curl \\
          # trailing comment
            git
        LABEL done=yes
    """))
    run, label = parsed.stages[0].instructions
    assert run.command.args == (  # type: ignore[attr-defined]
        "apt-get update &&     apt-get install -y     curl     git",
    )
    assert run.line == 2 and label.line == 9
    assert run.original.startswith("RUN apt-get update && ")


def test_trailing_whitespace_after_escape_still_continues() -> None:
    (run,) = parse("FROM a\nRUN a \\  \t\nb\n").stages[0].instructions
    assert run.command.args == ("a b",)  # type: ignore[attr-defined]


def test_continuation_at_end_of_file() -> None:
    (run,) = parse("FROM a\nRUN echo \\").stages[0].instructions
    assert run.command.args == ("echo",)  # type: ignore[attr-defined]


def test_crlf_line_endings() -> None:
    parsed = parse("FROM a\r\nRUN echo \\\r\n hi\r\nENV A=b\r\n")
    run, env = parsed.stages[0].instructions
    assert run.command.args == ("echo  hi",)  # type: ignore[attr-defined]
    assert env.pairs == (("A", "b"),)  # type: ignore[attr-defined]


def test_keywords_are_case_insensitive() -> None:
    parsed = parse("from a As Build\nrUn x\ncopy a b\nfrom build\n")
    assert parsed.stages[0].name == "build"
    assert [type(i) for i in parsed.stages[0].instructions] == [Run, Copy]
    assert parsed.stages[1].base == "build"


def test_keyword_followed_by_tab() -> None:
    (run,) = parse("FROM a\nRUN\techo hi\n").stages[0].instructions
    assert run.command.args == ("echo hi",)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# FROM and ARG


def test_from_forms() -> None:
    parsed = parse(dedent("""
        ARG VERSION=3.19
        ARG REG
        FROM --platform=$BUILDPLATFORM alpine:${VERSION} AS Builder
        FROM builder
        FROM scratch
    """))
    first, second, third = parsed.stages
    assert first.from_ == From(
        original="FROM --platform=$BUILDPLATFORM alpine:${VERSION} AS Builder",
        line=3, image="alpine:${VERSION}", name="builder", platform="$BUILDPLATFORM",
    )  # fmt: skip
    assert (first.index, first.name, first.base) == (0, "builder", "alpine:${VERSION}")
    assert second.name is None and second.base == "builder"
    assert third.index == 2
    assert [a.decls for a in parsed.global_args] == [
        (ArgDecl("VERSION", "3.19"),),
        (ArgDecl("REG", None),),
    ]


def test_arg_forms() -> None:
    arg = one('ARG A B=2 C="x y" D=')
    assert isinstance(arg, Arg)
    assert arg.decls == (
        ArgDecl("A"), ArgDecl("B", "2"), ArgDecl("C", '"x y"'), ArgDecl("D", ""),
    )  # fmt: skip
    assert expand_instruction(arg, {}).decls[2].default == "x y"  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# RUN, CMD, ENTRYPOINT, SHELL


@pytest.mark.parametrize("cls, kw", [(Run, "RUN"), (Cmd, "CMD"), (Entrypoint, "ENTRYPOINT")])
def test_shell_and_exec_forms(cls: type, kw: str) -> None:
    shell = one(f"{kw} echo $HOME  &&  ls")
    assert isinstance(shell, cls)
    assert shell.command == Command(("echo $HOME  &&  ls",), exec_form=False)
    exec_ = one(f'{kw} ["/bin/echo", "$HOME", "a b"]')
    assert exec_.command == Command(("/bin/echo", "$HOME", "a b"), exec_form=True)


@pytest.mark.parametrize(
    "body, expected",
    [
        ("CMD ['single', 'quotes']", Command(("['single', 'quotes']",), False)),
        ('CMD ["a", 1]', Command(('["a", 1]',), False)),
        ('CMD ["unterminated"', Command(('["unterminated"',), False)),
        ("CMD []", Command((), True)),
        ('ENTRYPOINT ["a\\"b", "\\u00e9"]', Command(('a"b', "é"), True)),
    ],
)
def test_json_form_edge_cases(body: str, expected: Command) -> None:
    assert one(body).command == expected  # type: ignore[attr-defined]


def test_run_flags() -> None:
    run = one(
        "RUN --mount=type=cache,target=/root/.cache --mount=type=secret,id=tok "
        "--network=none --security=insecure pip install x"
    )
    assert isinstance(run, Run)
    assert run.mounts == ("type=cache,target=/root/.cache", "type=secret,id=tok")
    assert run.network == "none" and run.security == "insecure"
    assert run.command.args == ("pip install x",)


def test_quoted_flag_value_and_double_dash_ends_flags() -> None:
    run = one('RUN --network="no ne" -- --not-a-flag')
    assert run.network == "no ne"  # type: ignore[attr-defined]
    assert run.command.args == ("--not-a-flag",)  # type: ignore[attr-defined]


def test_shell() -> None:
    shell = one('SHELL ["powershell", "-command"]')
    assert shell == Shell(
        original='SHELL ["powershell", "-command"]', line=2, args=("powershell", "-command")
    )


# --------------------------------------------------------------------------
# heredocs


def test_heredoc_run() -> None:
    parsed = parse(dedent("""
        FROM a
        RUN <<EOF
        apt-get update
        apt-get install -y curl
        EOF
        RUN echo after
    """))
    run, after = parsed.stages[0].instructions
    assert run.heredocs == (  # type: ignore[attr-defined]
        Heredoc("EOF", "apt-get update\napt-get install -y curl\n"),
    )
    assert after.line == 6


def test_heredoc_variants() -> None:
    parsed = parse(
        "FROM a\n"
        "RUN 3<<'A' <<-B cat /dev/fd/3 -\n"
        "raw $X\n"
        "A\n"
        "\tstripped\n"
        "\tB\n"
        'COPY <<"one" <<two /dst/\n'
        "1\n"
        "one\n"
        "2\n"
        "two\n"
    )
    run, copy = parsed.stages[0].instructions
    assert run.heredocs == (  # type: ignore[attr-defined]
        Heredoc("A", "raw $X\n", expand=False, fd=3),
        Heredoc("B", "stripped\n", strip_tabs=True),
    )
    assert isinstance(copy, Copy)
    assert copy.sources == ('<<"one"', "<<two") and copy.dest == "/dst/"
    assert [h.name for h in copy.heredocs] == ["one", "two"]
    assert copy.heredocs[0].expand is False and copy.heredocs[1].content == "2\n"


def test_heredoc_not_in_exec_form_or_other_instructions() -> None:
    parsed = parse('FROM a\nRUN ["cat", "<<EOF"]\nENV X=<<EOF\n')
    run, env = parsed.stages[0].instructions
    assert run.heredocs == ()  # type: ignore[attr-defined]
    assert env.pairs == (("X", "<<EOF"),)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# ENV, LABEL, MAINTAINER


@pytest.mark.parametrize(
    "body, raw, expanded",
    [
        ("ENV A B", (("A", "B"),), (("A", "B"),)),
        ("ENV A  hello   world ", (("A", "hello   world"),), (("A", "hello   world"),)),
        ('ENV A "quoted value"', (("A", '"quoted value"'),), (("A", "quoted value"),)),
        ("ENV A=1", (("A", "1"),), (("A", "1"),)),
        ("ENV A=", (("A", ""),), (("A", ""),)),
        (
            'ENV A=1 B="a b" C=\'c d\' D=e\\ f',
            (("A", "1"), ("B", '"a b"'), ("C", "'c d'"), ("D", "e\\ f")),
            (("A", "1"), ("B", "a b"), ("C", "c d"), ("D", "e f")),
        ),
        ('ENV X="a=b" Y=c=d', (("X", '"a=b"'), ("Y", "c=d")), (("X", "a=b"), ("Y", "c=d"))),
        ('ENV A="in \\"quotes\\""', (("A", '"in \\"quotes\\""'),), (("A", 'in "quotes"'),)),
    ],
)
def test_env(body: str, raw: tuple, expanded: tuple) -> None:
    env = one(body)
    assert isinstance(env, Env)
    assert env.pairs == raw
    assert expand_instruction(env, {}).pairs == expanded  # type: ignore[attr-defined]


def test_env_continued_over_lines() -> None:
    env = one('ENV A=1 \\\n    B="two words" \\\n    C=3')
    assert expand_instruction(env, {}).pairs == (  # type: ignore[attr-defined]
        ("A", "1"), ("B", "two words"), ("C", "3"),
    )  # fmt: skip


def test_label() -> None:
    label = one('LABEL "com.example.vendor"="ACME Inc" version=1.0 description="multi\\\n word"')
    assert isinstance(label, Label)
    assert expand_instruction(label, {}).pairs == (  # type: ignore[attr-defined]
        ("com.example.vendor", "ACME Inc"), ("version", "1.0"), ("description", "multi word"),
    )  # fmt: skip
    legacy = one("LABEL key some value")
    assert legacy.pairs == (("key", "some value"),)  # type: ignore[attr-defined]


def test_maintainer() -> None:
    assert one("MAINTAINER Jane Doe <jane@example.com>") == Maintainer(
        original="MAINTAINER Jane Doe <jane@example.com>",
        line=2,
        name="Jane Doe <jane@example.com>",
    )


# --------------------------------------------------------------------------
# EXPOSE, VOLUME, WORKDIR, USER, STOPSIGNAL


def test_expose() -> None:
    expose = one("EXPOSE 80 443/tcp 53/udp 132/SCTP 8000-8010/tcp $PORT")
    assert isinstance(expose, Expose)
    assert expose.ports == ("80", "443/tcp", "53/udp", "132/SCTP", "8000-8010/tcp", "$PORT")


def test_volume_forms() -> None:
    assert one('VOLUME ["/data", "/var/log x"]') == Volume(
        original='VOLUME ["/data", "/var/log x"]', line=2, paths=("/data", "/var/log x"), json=True
    )
    plain = one("VOLUME /data /logs")
    assert plain.paths == ("/data", "/logs") and not plain.json  # type: ignore[attr-defined]


def test_single_string_instructions() -> None:
    assert one("WORKDIR /path to/app") == Workdir(
        original="WORKDIR /path to/app", line=2, path="/path to/app"
    )
    assert one("USER app:staff") == User(original="USER app:staff", line=2, user="app:staff")
    assert one("STOPSIGNAL SIGKILL") == Stopsignal(
        original="STOPSIGNAL SIGKILL", line=2, signal="SIGKILL"
    )


# --------------------------------------------------------------------------
# COPY / ADD


def test_copy_all_flags() -> None:
    copy = one(
        "COPY --from=builder --chown=app:app --chmod=0755 --link --parents "
        "--exclude=*.tmp --exclude=.git a b* dir/ /dst/"
    )
    assert isinstance(copy, Copy)
    assert copy.from_ == "builder" and copy.chown == "app:app" and copy.chmod == "0755"
    assert copy.link and copy.parents
    assert copy.exclude == ("*.tmp", ".git")
    assert copy.sources == ("a", "b*", "dir/") and copy.dest == "/dst/"
    assert not copy.json


def test_copy_defaults_and_bool_flag_false() -> None:
    copy = one("COPY --link=false a /b")
    assert isinstance(copy, Copy)
    assert (copy.from_, copy.chown, copy.chmod, copy.link, copy.parents) == (
        None, None, None, False, False,
    )  # fmt: skip


def test_copy_json_form_and_quoted_words() -> None:
    copy = one('COPY ["my file", "other", "/dst dir/"]')
    assert copy.sources == ("my file", "other") and copy.dest == "/dst dir/"  # type: ignore
    assert copy.json  # type: ignore[attr-defined]
    plain = one('COPY "my file" /dst')
    assert expand_instruction(plain, {}).sources == ("my file",)  # type: ignore[attr-defined]


def test_add_flags() -> None:
    add = one(
        "ADD --chown=1:2 --chmod=644 --link --checksum=sha256:abc --keep-git-dir=true "
        "--unpack=false --exclude=x https://example.com/a.tgz /opt/"
    )
    assert isinstance(add, Add)
    assert add.chown == "1:2" and add.chmod == "644" and add.link
    assert add.checksum == "sha256:abc" and add.keep_git_dir and add.unpack is False
    assert add.exclude == ("x",)
    assert add.sources == ("https://example.com/a.tgz",) and add.dest == "/opt/"


def test_add_rejects_copy_only_flag() -> None:
    assert "unknown flag: --from" in error_of("FROM a\nADD --from=x a b\n").message


# --------------------------------------------------------------------------
# ONBUILD, HEALTHCHECK


def test_onbuild() -> None:
    onbuild = one("ONBUILD ADD --chown=1 . /app/src")
    assert isinstance(onbuild, Onbuild)
    assert onbuild.original == "ONBUILD ADD --chown=1 . /app/src"
    assert isinstance(onbuild.trigger, Add)
    assert onbuild.trigger.original == "ADD --chown=1 . /app/src"
    assert onbuild.trigger.chown == "1"
    nested = one("onbuild run echo hi")
    assert isinstance(nested.trigger, Run)  # type: ignore[attr-defined]


def test_onbuild_trigger_errors_point_at_the_line() -> None:
    err = error_of("FROM a\nONBUILD COPY x\n")
    assert err.line == 2 and "COPY requires at least two arguments" in err.message


def test_healthcheck_none() -> None:
    assert one("HEALTHCHECK none") == Healthcheck(original="HEALTHCHECK none", line=2, test=None)


def test_healthcheck_full() -> None:
    check = one(
        "HEALTHCHECK --interval=1m30s --timeout=10s --start-period=0 --start-interval=1.5s "
        "--retries=3 CMD curl -f http://localhost/ || exit 1"
    )
    assert isinstance(check, Healthcheck)
    assert check.test == Command(("curl -f http://localhost/ || exit 1",), exec_form=False)
    assert check.interval == 90 * 10**9
    assert check.timeout == 10 * 10**9
    assert check.start_period == 0
    assert check.start_interval == 1_500_000_000
    assert check.retries == 3


def test_healthcheck_exec_form_and_defaults() -> None:
    check = one('HEALTHCHECK cmd ["/bin/check", "--fast"]')
    assert check.test == Command(("/bin/check", "--fast"), exec_form=True)  # type: ignore
    assert check.interval is None and check.retries is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "text, ns",
    [("300ms", 300_000_000), ("1h", 3_600 * 10**9), ("2m", 120 * 10**9), ("1.5ms", 1_500_000),
     ("1000us", 10**6), ("1000µs", 10**6), ("1s500ms", 1_500_000_000), ("0", 0)],
)  # fmt: skip
def test_go_durations(text: str, ns: int) -> None:
    assert go_duration(text) == ns


# --------------------------------------------------------------------------
# stages


MULTI = dedent("""
    ARG BASE=alpine
    FROM $BASE AS deps
    RUN fetch
    FROM deps AS build
    COPY --from=tools /bin/x /x
    RUN make
    FROM golang AS tools
    RUN build-tools
    FROM scratch AS unrelated
    FROM build AS test
    RUN make test
    FROM scratch AS release
    COPY --from=build /out /out
    COPY --from=0 /etc/ssl /etc/ssl
    FROM release AS dev
    RUN --mount=type=bind,from=unrelated,target=/u true
""")


def names(stages: tuple[df.Stage, ...]) -> list[str | None]:
    return [s.name for s in stages]


def test_stage_lookup_by_name_and_index() -> None:
    parsed = parse(MULTI)
    assert parsed.stage("BUILD") is parsed.stages[1]
    assert parsed.stage("1") is parsed.stages[1]
    assert parsed.stage(5) is parsed.stages[5]
    assert parsed.stage("nope") is None
    assert parsed.stage("99") is None
    assert parsed.stage("tools", before=1) is None  # defined later: an image name
    assert parsed.target() is parsed.stages[-1]
    with pytest.raises(NotFound):
        parsed.target("missing")


@pytest.mark.parametrize(
    "target, expected",
    [
        ("deps", ["deps"]),
        ("build", ["deps", "build"]),  # --from=tools is defined later: an image
        ("test", ["deps", "build", "test"]),
        ("release", ["deps", "build", "release"]),
        ("tools", ["tools"]),
        (None, ["deps", "build", "unrelated", "release", "dev"]),
        ("6", ["deps", "build", "unrelated", "release", "dev"]),
        (3, ["unrelated"]),
    ],
)
def test_required_stages(target: str | int | None, expected: list[str]) -> None:
    assert names(required_stages(parse(MULTI), target)) == expected


def test_required_stages_expand_args_in_references() -> None:
    parsed = parse(dedent("""
        ARG SRC=one
        FROM a AS one
        FROM a AS two
        FROM ${SRC}
        ARG FROMSTAGE=two
        COPY --from=$FROMSTAGE /x /x
    """))
    assert names(required_stages(parsed)) == ["one", "two", None]
    assert names(required_stages(parsed, build_args={"SRC": "two"})) == ["two", None]
    assert names(required_stages(parsed, build_args={"FROMSTAGE": "one"})) == ["one", None]


def test_copy_from_future_index_is_an_error() -> None:
    parsed = parse("FROM a\nCOPY --from=1 /x /x\nFROM b\n")
    with pytest.raises(DockerfileError, match="refers to current or future build stage"):
        required_stages(parsed, 0)


def test_instructions_are_frozen_and_hashable() -> None:
    instr = one("RUN x")
    with pytest.raises(AttributeError):
        instr.line = 5  # type: ignore[misc]
    assert hash(instr) == hash(one("RUN x"))
    assert instr.keyword == "RUN"


def test_full_reference_example_round_trip() -> None:
    parsed = parse(dedent("""
        # syntax=docker/dockerfile:1
        ARG CODE_VERSION=latest
        FROM base:${CODE_VERSION} AS base
        LABEL org.opencontainers.image.title="demo" \\
              org.opencontainers.image.version="1"
        ENV PATH=/usr/local/bin:$PATH \\
            LANG=C.UTF-8
        ARG USERNAME=app
        WORKDIR /app
        COPY --chown=${USERNAME} requirements.txt ./
        RUN pip install -r requirements.txt
        COPY . .
        EXPOSE 8080
        VOLUME ["/data"]
        USER ${USERNAME}
        HEALTHCHECK --interval=30s CMD ["./health"]
        STOPSIGNAL SIGTERM
        ENTRYPOINT ["python", "-m", "app"]
        CMD ["--serve"]
        ONBUILD RUN echo child
        SHELL ["/bin/bash", "-c"]
        MAINTAINER someone
    """))
    kinds = [i.keyword for i in parsed.stages[0].instructions]
    assert kinds == [
        "LABEL", "ENV", "ARG", "WORKDIR", "COPY", "RUN", "COPY", "EXPOSE", "VOLUME", "USER",
        "HEALTHCHECK", "STOPSIGNAL", "ENTRYPOINT", "CMD", "ONBUILD", "SHELL", "MAINTAINER",
    ]  # fmt: skip
    assert parsed.syntax == "docker/dockerfile:1"


def test_from_digit_is_an_image_not_a_stage_index() -> None:
    parsed = parse("FROM a AS first\nFROM 0\n")
    assert names(required_stages(parsed)) == [None]
    assert names(required_stages(parse("FROM a AS first\nFROM first\n"))) == ["first", None]
