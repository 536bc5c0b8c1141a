"""config.apply: each instruction's effect on the runtime config, with no
root, store or mount (docker's dispatchers are the reference)."""

from __future__ import annotations

import copy

import pytest

from layerfs.builder import config
from layerfs.builder import dockerfile as dfm
from layerfs.builder.substitution import expand_instruction


def _instr(line: str, variables: dict[str, str] | None = None) -> dfm.Instruction:
    parsed = dfm.parse(f"FROM scratch\n{line}\n").stages[0].instructions[0]
    return expand_instruction(parsed, variables or {})


def _apply(cfg: dict, *lines: str, cmd_set: bool = False) -> dict:
    for line in lines:
        cfg = config.apply(cfg, _instr(line), cmd_set=cmd_set)
    return cfg


def test_input_is_never_modified():
    before = {"Env": ["A=1"], "Labels": {"x": "1"}, "ExposedPorts": {"80/tcp": {}}, "OnBuild": ["RUN a"]}
    snapshot = copy.deepcopy(before)
    for line in ("ENV B=2", "LABEL y=2", "EXPOSE 81", "ONBUILD RUN b", "VOLUME /v", "CMD x"):
        out = config.apply(before, _instr(line))
        assert out is not before
    assert before == snapshot


def test_env_adds_and_replaces_in_order():
    out = _apply({"Env": ["PATH=/bin", "A=1"]}, "ENV A=2 B=3", "ENV C 4 5")
    assert out["Env"] == ["PATH=/bin", "A=2", "B=3", "C=4 5"]


def test_env_sees_expanded_values():
    out = config.apply({}, _instr("ENV X=$Y", {"Y": "why"}))
    assert out["Env"] == ["X=why"]


def test_label_merges():
    out = _apply({"Labels": {"a": "1"}}, 'LABEL a=2 "b c"=3')
    assert out["Labels"] == {"a": "2", "b c": "3"}


def test_expose_defaults_to_tcp():
    out = _apply({}, "EXPOSE 80 53/udp 8080/tcp")
    assert out["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}, "8080/tcp": {}}


def test_volume_json_and_plain():
    out = _apply({}, "VOLUME /a /b", 'VOLUME ["/c"]')
    assert out["Volumes"] == {"/a": {}, "/b": {}, "/c": {}}


def test_workdir_is_relative_to_the_current_one():
    assert _apply({}, "WORKDIR a")["WorkingDir"] == "/a"
    assert _apply({"WorkingDir": "/x"}, "WORKDIR y/../z", "WORKDIR w")["WorkingDir"] == "/x/z/w"
    assert _apply({"WorkingDir": "/x"}, "WORKDIR /abs")["WorkingDir"] == "/abs"


def test_user_and_stopsignal():
    out = _apply({}, "USER 1000:1000", "STOPSIGNAL SIGTERM")
    assert out["User"] == "1000:1000"
    assert out["StopSignal"] == "SIGTERM"


def test_cmd_shell_form_uses_the_current_shell():
    assert _apply({}, "CMD echo hi")["Cmd"] == ["/bin/sh", "-c", "echo hi"]
    assert _apply({}, 'SHELL ["/bin/bash", "-e", "-c"]', "CMD echo hi")["Cmd"] == ["/bin/bash", "-e", "-c", "echo hi"]
    assert _apply({}, 'CMD ["a", "b"]')["Cmd"] == ["a", "b"]


def test_entrypoint_clears_an_inherited_cmd_but_not_one_of_this_stage():
    base = {"Cmd": ["from-base"]}
    out = config.apply(base, _instr('ENTRYPOINT ["/e"]'))
    assert out["Entrypoint"] == ["/e"]
    assert "Cmd" not in out
    out = config.apply(base, _instr('ENTRYPOINT ["/e"]'), cmd_set=True)
    assert out["Cmd"] == ["from-base"]


def test_healthcheck_forms():
    out = _apply({}, "HEALTHCHECK --interval=5s --retries=2 CMD curl -f http://x/")
    assert out["Healthcheck"] == {"Test": ["CMD-SHELL", "curl -f http://x/"],
                                  "Interval": 5_000_000_000, "Retries": 2}
    assert _apply({}, 'HEALTHCHECK CMD ["true"]')["Healthcheck"] == {"Test": ["CMD", "true"]}
    assert _apply({}, "HEALTHCHECK NONE")["Healthcheck"] == {"Test": ["NONE"]}


def test_onbuild_keeps_the_trigger_unexpanded():
    out = _apply({"OnBuild": ["RUN a"]}, "ONBUILD RUN echo $X")
    assert out["OnBuild"] == ["RUN a", "RUN echo $X"]


@pytest.mark.parametrize("line", ["ARG A=1", "RUN true", "COPY a b", "ADD a b", "MAINTAINER me"])
def test_instructions_without_a_config_effect(line):
    before = {"Env": ["A=0"], "Cmd": ["c"]}
    assert config.apply(before, _instr(line)) == before


def test_env_dict_keeps_order_and_empty_values():
    assert list(config.env_dict(["B=1", "A=", "C=x=y"]).items()) == [("B", "1"), ("A", ""), ("C", "x=y")]
