"""experiments/sft_scaling.py: the power-law fit, and one report written by several invocations at once."""

import json
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def scaling():
    return load_script("sft_scaling")


def test_fit_recovers_a_power_law(scaling):
    tokens = [2e4, 4e4, 8e4, 1.6e5]
    a, b = scaling.fit_power(tokens, [1 + 3.0 * t**-0.2 for t in tokens])
    assert a == pytest.approx(3.0) and b == pytest.approx(0.2)
    assert scaling.fit_power([2e4], [1.5]) is None


def test_invocations_merge_their_points_into_one_report(scaling, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the lock goes to runs/
    args = Namespace(out=tmp_path / "report", target=1.25, learning_rate=1e-4, windows=8)
    base = {"shakespeare": 40.0, "python-docs": 20.0, "brown": 48.0, "sotu": 43.0, "chat": 5.7}

    def point(variant, tokens, x):
        ppl = {d: v * x for d, v in base.items()}
        return {"variant": variant, "tokens": tokens, "ppl": ppl, "x_geo": x, "x_max": x, "valid_loss": 4.0,
                "tokens_per_s": 50.0, "wall_s": 1.0}  # fmt: skip

    # two runs, one variant each, writing after every budget in turn
    mine, theirs = {}, {}
    for tokens, x in ((20480, 1.8), (40960, 1.7)):
        mine[f"a@{tokens}"] = point("a", tokens, x)
        scaling.write(args, {"a": "models/a"}, mine, base, 0.0)
        theirs[f"b@{tokens}"] = point("b", tokens, x + 0.01)
        scaling.write(args, {"b": "models/b"}, theirs, base, 0.0)
    report = json.loads(Path(f"{args.out}.json").read_text())
    assert sorted(report["results"]) == ["a@20480", "a@40960", "b@20480", "b@40960"]
    assert report["variants"] == {"a": "models/a", "b": "models/b"}
    text = Path(f"{args.out}.md").read_text()
    assert "| a | 40,960 |" in text and "| b | 40,960 |" in text and "`b`: a = " in text
    assert Path(f"{args.out}.png").stat().st_size > 0
