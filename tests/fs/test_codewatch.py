"""fs/codewatch.py: what makes the mount server notice new code on disk."""

from __future__ import annotations

import os

import layerfs.fs.mountserver  # noqa: F401 - loaded, so its directory is among the watched
from layerfs.fs import codewatch


def test_python_files_written_replaced_created_or_removed_count(tmp_path):
    d = tmp_path / "pkg"
    d.mkdir()
    (d / "mod.py").write_text("x = 1\n")
    watch = codewatch.CodeWatch({str(d)})
    try:
        assert not watch.changed()
        (d / "notes.txt").write_text("not code")
        (d / "__pycache__").mkdir()  # bytecode caches come and go
        assert not watch.changed()
        (d / "mod.py").write_text("x = 2\n")  # an edit in place
        assert watch.changed() and not watch.changed()
        (d / "new.py.tmp").write_text("y = 1\n")
        os.rename(d / "new.py.tmp", d / "new.py")  # an installer renaming a file in
        assert watch.changed()
        os.unlink(d / "mod.py")
        assert watch.changed()
    finally:
        watch.close()


def test_the_watched_dirs_are_those_of_loaded_layerfs_modules():
    dirs = codewatch.module_dirs()
    assert os.path.dirname(codewatch.__file__) in dirs
    assert all(os.path.isdir(d) and "layerfs" in d for d in dirs)
