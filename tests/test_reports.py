"""The report helpers: a markdown table, the geometric-mean ratio, files written whole or not at all."""

import json
import math
import os

import pytest

from sharp_mlx.reports import geomean, geomean_ratio, markdown_table, write_atomic, write_report


def test_markdown_table_lines():
    text = markdown_table(["model", "ppl", "note"], [["a", 1.5, ""], ("b", "2.00", "x|y")])
    assert text.splitlines() == [
        "| model | ppl | note |",
        "|---|---|---|",
        "| a | 1.5 |  |",
        "| b | 2.00 | x|y |",
    ]
    assert markdown_table(["a", "b"], []) == "| a | b |\n|---|---|"


def test_markdown_table_align():
    text = markdown_table(["a", "b", "c", "d"], [[1, 2, 3, 4]], align=[None, "l", "c", "r"])
    assert text.splitlines()[1] == "|---|:---|:---:|---:|"
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [], align=["r"])


def test_geomean_and_ratio():
    assert geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert geomean([3.0]) == pytest.approx(3.0)
    geo, worst = geomean_ratio({"chat": 9.0, "code": 4.0, "extra": 1.0}, {"chat": 3.0, "code": 2.0})
    assert geo == pytest.approx(math.sqrt(6.0)) and worst == 3.0  # over the base's domains only
    # the summed-logs form the committed reports were made with, to the last bit
    ratios = [1.3719, 1.1873, 1.5122, 1.2601, 1.4407]
    assert geomean(ratios) == math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def test_write_atomic_kinds(tmp_path):
    assert write_atomic(tmp_path / "sub" / "a.md", "é\n").read_bytes() == "é\n".encode()
    assert write_atomic(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    write_atomic(tmp_path / "c.txt", lambda p: p.write_text("by a function"))
    assert (tmp_path / "c.txt").read_text() == "by a function"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "c.txt", "sub"]  # no temporary files left


def test_write_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")

    def half(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(path, half)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.md"]


def test_write_report(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    write_report(tmp_path / "out" / "r", md="# r\n", record={"x": [1, 2]}, fig=fig)
    assert (tmp_path / "out" / "r.md").read_text() == "# r\n"
    assert json.loads((tmp_path / "out" / "r.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "out" / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)  # closed
