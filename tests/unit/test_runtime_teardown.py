"""The runtime's half of delete without its heavier imports: `remove_tree` removes what
`shutil.rmtree(ignore_errors=True)` would, through directory fds, never following a link."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hanabi_runtime.teardown import remove_tree


def _populate(root: Path, outside: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "state.json").write_text("{}")
    (root / "sub" / "deeper" / "exec-1.json").write_text("{}")
    os.mkfifo(root / "start.fifo")
    (root / "link-to-outside").symlink_to(outside)
    (root / "sub" / "dangling").symlink_to(root / "nowhere")


def test_remove_tree_removes_everything_and_follows_no_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("kept")
    for remover in (remove_tree, lambda p: shutil.rmtree(p, ignore_errors=True)):
        root = tmp_path / "sandbox"
        _populate(root, outside)
        remover(str(root))
        assert not root.exists() and not os.path.lexists(root)
        assert (outside / "keep").read_text() == "kept"


def test_remove_tree_of_nothing_or_a_link_is_silent(tmp_path):
    remove_tree(str(tmp_path / "missing"))
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "alias").symlink_to(target)
    remove_tree(str(tmp_path / "alias"))  # O_NOFOLLOW: a link is not taken for the directory
    assert target.is_dir() and (tmp_path / "alias").is_symlink()
