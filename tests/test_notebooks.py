"""The notebooks run top to bottom on CPU (their `!pip` / `%` lines are Colab setup)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def code_cells(path: Path):
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            lines = [line for line in cell["source"] if not line.lstrip().startswith(("!", "%"))]
            yield "".join(lines)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files the notebook writes land here
    namespace = {"__name__": "__notebook__"}
    for number, source in enumerate(code_cells(path)):
        exec(compile(source, f"{path.name}[cell {number}]", "exec"), namespace)
    assert (tmp_path / "taxonomy.html").stat().st_size > 10_000


def test_there_is_a_notebook():
    assert NOTEBOOKS, "notebooks/ should hold the quick-start notebook"
