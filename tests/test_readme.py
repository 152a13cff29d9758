"""The README is a manual: its Python snippet runs exactly as written, and it stays short."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(text: str) -> list:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_is_at_most_150_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_readme_names_every_command():
    from sharp_mlx.__main__ import COMMANDS

    text = (ROOT / "README.md").read_text()
    for name in COMMANDS:
        assert f"`{name}" in text, name


@pytest.mark.real
def test_readme_snippet_runs_as_written(real_model_dir, monkeypatch, capsys):
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert blocks, "the README has a Python snippet"
    monkeypatch.chdir(ROOT)  # its paths are relative to the project, as a user runs it
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()
