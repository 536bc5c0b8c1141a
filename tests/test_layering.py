"""The package layering is the architecture: check it on every run.

procfs (what /proc says) and errors sit below everything; store is the
bottom; fs mounts what the store holds; runtime runs processes on fs
mounts; the builder drives runtime and fs; oci moves images in and out
of the store. Nothing in layerfs/ imports the CLI. Imports inside functions
count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "layerfs")

# What each package (or top-level module) of layerfs may import from layerfs.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "__init__": set(),
    "procfs": {"errors"},
    "store": {"errors", "procfs", "store", "__init__"},
    "fs": {"errors", "procfs", "store", "fs"},
    "runtime": {"errors", "procfs", "store", "fs", "runtime"},
    "builder": {"errors", "procfs", "store", "fs", "runtime", "builder"},
    "oci": {"errors", "store", "oci", "__init__"},
    "snapshotter": {"errors", "procfs", "store", "fs", "runtime", "snapshotter"},
    "bootstrap": {"errors", "store"},
}


def _layer_of(path: str) -> str:
    rel = os.path.relpath(path, PKG)
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".py") else first


def _is_part(name: str) -> bool:
    return os.path.isdir(os.path.join(PKG, name)) or os.path.isfile(os.path.join(PKG, name + ".py"))


def _imported_layers(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "layerfs":
                # `from layerfs import x`: a sub-package, or a name of the package itself
                names = [f"layerfs.{a.name}" if _is_part(a.name) else "layerfs" for a in node.names]
            else:
                names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "layerfs_cli" or parts[0] == "cli":
                found.add("cli")
            elif parts[0] == "layerfs":
                found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def _modules() -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(PKG):
        out += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
    return sorted(out)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: os.path.relpath(p, PKG))
def test_imports_follow_the_layering(path: str) -> None:
    layer = _layer_of(path)
    assert layer in ALLOWED, f"new top-level part {layer!r}: add it to ALLOWED with its dependencies"
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    imported = _imported_layers(tree)
    wrong = sorted(imported - ALLOWED[layer])
    assert not wrong, f"{os.path.relpath(path, PKG)} ({layer}) imports {wrong}"
