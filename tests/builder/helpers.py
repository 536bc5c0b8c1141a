"""Shared by the executor tests: a build context on disk."""

from __future__ import annotations


def make_context(tmp_path, dockerfile: str, files: dict[str, str] | None = None, name: str = "ctx") -> str:
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    (root / "Dockerfile").write_text(dockerfile)
    for rel, text in (files or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return str(root)
