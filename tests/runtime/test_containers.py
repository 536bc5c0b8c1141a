"""Container records, docker's command/env rules, status text, diff and commit
of a hand-made upper dir. No containers run here (see test_cli_containers.py)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from layerfs.errors import Conflict, InvalidInput, NotFound
from layerfs.runtime import containers as records
from layerfs.runtime.changes import commit_container, container_changes
from layerfs.runtime.containers import ContainerConfig, ContainerState
from layerfs.runtime.spec import Volume
from layerfs.store import images as img
from layerfs.store import transfer
from layerfs.store.store import Store

ROOT = os.geteuid() == 0


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tree / "etc" / "os-release").write_text("ID=test\n")
    (tree / "bin").mkdir()
    with Store(str(tmp_path / "store")) as s:
        layer = transfer.import_layer(s, str(tree))
        config = img.new_config([layer], {"Env": ["PATH=/bin", "A=image"], "Cmd": ["sh"],
                                          "WorkingDir": "/srv", "User": "root"})
        image = s.put_image(config)
        s.tag(image.id, "base:1")
        noimage = s.put_image(img.new_config([layer], {}))
        s.tag(noimage.id, "nocmd:1")
        yield s


def test_resolve_command_follows_docker() -> None:
    rc = {"Entrypoint": ["/init"], "Cmd": ["serve"]}
    assert records.resolve_command(rc, (), None) == ("/init", "serve")
    assert records.resolve_command(rc, ("debug",), None) == ("/init", "debug")
    # --entrypoint replaces the entrypoint and drops the image's Cmd.
    assert records.resolve_command(rc, (), "sh") == ("sh",)
    assert records.resolve_command(rc, ("-c", "x"), "sh") == ("sh", "-c", "x")
    assert records.resolve_command({"Cmd": ["sh"]}, ("ls",), None) == ("ls",)
    with pytest.raises(InvalidInput, match="no command specified"):
        records.resolve_command(rc, (), "")
    with pytest.raises(InvalidInput):
        records.resolve_command({}, (), None)


def test_merge_env_later_wins() -> None:
    assert records.merge_env(["PATH=/bin", "A=1"], ["A=2", "B=3"]) == ("PATH=/bin", "A=2", "B=3")


@pytest.mark.parametrize("text,number", [("TERM", 15), ("SIGKILL", 9), ("9", 9), ("usr1", 10)])
def test_parse_signal(text: str, number: int) -> None:
    assert records.parse_signal(text) == number


@pytest.mark.parametrize("text", ["NOPE", "0", "999", ""])
def test_parse_signal_rejects(text: str) -> None:
    with pytest.raises(InvalidInput):
        records.parse_signal(text)


@pytest.mark.parametrize("seconds,text", [(0.2, "Less than a second"), (1, "1 second"),
                                          (59, "59 seconds"), (61, "About a minute"),
                                          (600, "10 minutes"), (3600, "About an hour"),
                                          (7200, "2 hours"), (86400 * 3, "3 days")])
def test_human_duration(seconds: float, text: str) -> None:
    assert records.human_duration(seconds) == text


def _container(state: ContainerState) -> records.Container:
    config = ContainerConfig(id="a" * 64, name="n", image="i", image_id="b" * 64, created=0.0,
                             args=("true",))
    return records.Container("/nonexistent", config, state)


def test_status_text() -> None:
    now = 1000.0
    assert records.status_text(_container(ContainerState()), now) == "Created"
    exited = ContainerState(status="exited", exit_code=137, finished=now - 5, oom_killed=True)
    assert records.status_text(_container(exited), now) == "Exited (137) 5 seconds ago (OOM killed)"


def test_dead_owner_reads_as_exited_255(store: Store) -> None:
    c = records.create_container(store, "base:1")
    records.update_state(store.root, c.id, status="running", owner_pid=2**22 + 12345,
                         owner_start="1", started=1.0)
    state = records.load(store.root, c.id).state
    assert (state.status, state.exit_code, state.error) == ("exited", 255, "the owner process died")


def test_config_round_trip() -> None:
    config = ContainerConfig(id="a" * 64, name="n", image="i", image_id="b" * 64, created=1.5,
                             args=("sh", "-c", "x"), volumes=(Volume("/h", "/c", True),),
                             memory=1 << 20)
    assert ContainerConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_create_applies_the_image_config(store: Store) -> None:
    c = records.create_container(store, "base:1", env=["A=cli", "B=2"], name="web")
    assert c.config.args == ("sh",) and c.config.cwd == "/srv" and c.config.user == "root"
    assert c.config.env == ("PATH=/bin", "A=cli", "B=2")
    assert c.state.status == "created"
    assert os.path.isdir(c.rootfs) and os.path.isdir(c.runtime_dir)
    assert store.get_ref(records.REF_KIND, c.id).image_id == store.image("base:1").id
    assert records.cgroup_name(store.root, c.id).startswith(records.store_tag(store.root) + "-")
    assert records.find_container(store, "web").id == c.id
    assert records.find_container(store, c.id[:10]).id == c.id
    assert [x.id for x in records.list_containers(store)] == [c.id]
    # The image is in use: rmi refuses.
    with pytest.raises(Conflict):
        store.remove_image("base:1")


def test_create_rejects_bad_input_and_writes_nothing(store: Store, tmp_path: Path) -> None:
    records.create_container(store, "base:1", name="taken")
    cases = [
        (NotFound, dict(image_ref="nope:1")),
        (InvalidInput, dict(image_ref="nocmd:1")),
        (Conflict, dict(image_ref="base:1", name="taken")),
        (InvalidInput, dict(image_ref="base:1", name="../x")),
        (InvalidInput, dict(image_ref="base:1", cwd="relative")),
        (InvalidInput, dict(image_ref="base:1", network="bridge")),
        (InvalidInput, dict(image_ref="base:1", runtime="docker")),
        (NotFound, dict(image_ref="base:1", volumes=[Volume(str(tmp_path / "missing"), "/d")])),
    ]
    for error, kwargs in cases:
        ref = kwargs.pop("image_ref")
        with pytest.raises(error):
            records.create_container(store, ref, **kwargs)  # type: ignore[arg-type]
    assert len(store.refs(records.REF_KIND)) == 1
    assert len([n for n in os.listdir(records.containers_root(store.root))
                if not n.startswith(".")]) == 1


def test_unknown_container(store: Store) -> None:
    with pytest.raises(NotFound, match="no such container"):
        records.find_container(store, "ghost")


def test_usage_counts_the_image_once(store: Store) -> None:
    for i in range(3):
        c = records.create_container(store, "base:1", name=f"c{i}")
        os.makedirs(c.upper)
        Path(c.upper, "data").write_bytes(os.urandom(10000))
    rows, shared = records.container_usage(store)
    assert len(rows) == 3 and all(r.upper_bytes >= 10000 for r in rows)
    assert shared == sum(store.layer_info(lid)[0] for lid in store.image("base:1").layers)


@pytest.mark.root
def test_diff_and_commit_of_an_upper(store: Store) -> None:
    c = records.create_container(store, "base:1", name="changed")
    upper = Path(c.upper)
    (upper / "etc").mkdir(parents=True)
    os.chmod(upper / "etc", 0o755)
    (upper / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnew:x:1:1::/:/bin/sh\n")
    os.mknod(upper / "etc" / "os-release", stat.S_IFCHR, 0)  # whiteout
    (upper / "etc" / "hosts").write_text("")                # runtime mountpoint: hidden
    (upper / "proc").mkdir()                                 # ditto
    (upper / "added").write_text("a\n")
    changes = [str(x) for x in container_changes(store, c)]
    assert changes == ["A /added", "C /etc", "D /etc/os-release", "C /etc/passwd"]
    image = commit_container(store, c, "changed:1", "msg")
    tree = store.merged_tree(image)
    assert "added" in tree.entries and "etc/os-release" not in tree.entries
    assert "etc/hosts" not in tree.entries and "proc" not in tree.entries
    assert image.history[-1]["created_by"] == "layerfs commit changed"
    assert image.runtime_config["Cmd"] == ["sh"]
    assert store.image("changed:1").id == image.id


# -- the CLI's lazy imports ----------------------------------------------------
def _python(code: str) -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout


def test_cli_containers_module_spells_out_the_runtimes() -> None:
    from layerfs_cli import containers as containers_cli

    assert containers_cli.RUNTIMES == records.RUNTIMES


def test_cli_containers_module_imports_no_runtime() -> None:
    # `layerfs run` forks the mount daemon first and imports the runtime
    # after: importing the command module must stay cheap.
    out = _python("import sys, layerfs_cli.containers\n"
                  "print(sorted(m for m in sys.modules if m.startswith(('layerfs.runtime.',"
                  " 'layerfs_cli.images', 'pyfuse3', 'trio'))))")
    assert out.strip() == "[]"


@pytest.mark.parametrize("first", ["layerfs_cli.containers", "layerfs_cli.images"])
def test_df_has_the_containers_section_whatever_is_imported_first(first: str) -> None:
    # containers.py adds its df -v section to images.py without importing
    # it; either import order (one process running several commands) works.
    second = ({"layerfs_cli.containers", "layerfs_cli.images"} - {first}).pop()
    out = _python(f"import importlib\nimportlib.import_module({first!r})\n"
                  f"importlib.import_module({second!r})\n"
                  "from layerfs_cli import images, containers\n"
                  "titles = [t for t, _ in images.EXTRA_USAGE]\n"
                  "images._load_usage_contributors()\n"
                  "after = [t for t, _ in images.EXTRA_USAGE]\n"
                  "print(titles.count(containers.USAGE_TITLE) == 1 == after.count(containers.USAGE_TITLE)"
                  " and len(after) == len(set(after)))")
    assert out.strip() == "True"


def test_runtime_package_imports_its_names_on_demand() -> None:
    import layerfs.runtime as runtime

    out = _python("import sys, layerfs.runtime\n"
                  "print('layerfs.runtime.process' in sys.modules)\n"
                  "from layerfs.runtime import run_container, ContainerSpec, write_bundle\n"
                  "print(run_container.__module__, ContainerSpec.__module__, write_bundle.__module__)")
    assert out.split("\n")[:2] == ["False", "layerfs.runtime.process layerfs.runtime.spec "
                                   "layerfs.runtime.bundle"]
    assert sorted(runtime.__all__) == sorted(n for names in runtime._EXPORTS.values()
                                             for n in names)
    with pytest.raises(AttributeError):
        runtime.no_such_name  # noqa: B018
