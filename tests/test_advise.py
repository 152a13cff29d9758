"""The advisor, validated both ways: on a tiny model where two layers carry the MLP of the layer
before (hidden units permuted, small noise) it says "pays" and plans exactly those layers; on the
tiny random model it says "does not pay"."""

import json

import pytest
from conftest import load_script
from tiny_folder import write_text_data, write_tiny_model

from sharp_mlx import advise

ARGS = ["--cut", "0.2", "--rank", "8", "--tokens", "1024", "--seq-len", "64", "--gptq-bits", "--from-gguf", "none"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text_data(tmp_path_factory.mktemp("advise") / "text.jsonl", records=120)


def run(folder, text, out):
    assert advise.main(["--model", str(folder), "--data", str(text), *ARGS, "--out", str(out)]) == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").exists()
    return rep


def test_pays_where_layers_carry_the_previous_function(tmp_path, text):
    bench = load_script("advise_bench")
    folder = bench.positive_model(tmp_path / "positive")
    rep = run(folder, text, tmp_path / "positive-report")
    assert rep["verdict"] == "pays"
    assert rep["targets"] == {str(t): r for t, r in bench.POSITIVE.items()}
    gains = {row["target"]: row["borrow_gain"] for row in rep["layers"]}
    assert all(gains[t] > 0.8 for t in bench.POSITIVE) and all(gains[t] < 0.2 for t in gains if t not in bench.POSITIVE)
    assert "sharp_mlx.train" in rep["next_command"] and '{"2": 1, "4": 3}' in rep["next_command"]
    assert {q["name"] for q in rep["quantization"]} == {"mlx-4bit", "mlx-3bit"}


def test_does_not_pay_on_a_random_model(tmp_path, text):
    folder = write_tiny_model(tmp_path / "random")
    rep = run(folder, text, tmp_path / "random-report")
    assert rep["verdict"] == "does not pay"
    assert all(row["borrow_gain"] < 0.2 and not row["pays"] for row in rep["layers"])
    assert "sharp_mlx.quantize" in rep["next_command"]


def test_plan_size_follows_the_cut_and_the_budget(tmp_path):
    from sharp_mlx.io.checkpoint import load_model

    folder = write_tiny_model(tmp_path / "m")
    model, config = load_model(folder)
    small = advise.plan_size(model, config, [1, 2, 3, 4, 5], 8, cut=0.1)
    big = advise.plan_size(model, config, [1, 2, 3, 4, 5], 8, cut=0.3)
    assert small["k"] == 1 < big["k"] == 3 and big["bytes"] < small["bytes"] < big["base_4bit_bytes"]
    budget = advise.plan_size(model, config, [1, 2, 3, 4, 5], 8, budget_mb=small["bytes"] / 1e6)
    assert budget["k"] == 1


def test_pipeline_prints_the_verdict_first_and_skips_a_report_it_has(tmp_path, text, monkeypatch, capsys):
    from sharp_mlx.data import corpora
    from sharp_mlx.jobs import main_job as pipeline

    for f in corpora.files("train", tmp_path / "data"):
        f.parent.mkdir(parents=True)
        f.write_text(text.read_text())
    monkeypatch.setattr(pipeline, "ADVICE", tmp_path / "runs" / "advise")
    monkeypatch.setattr(pipeline, "ADVISE_ARGS", ARGS[:8] + ["--from-gguf", "none", "--gptq-bits"])
    folder = load_script("advise_bench").positive_model(tmp_path / "positive")
    pipeline.advise_first(folder, tmp_path / "data", "positive")
    assert "[advise] sharing pays here" in capsys.readouterr().out
    report = (tmp_path / "runs" / "advise" / "positive.json").read_text()
    pipeline.advise_first(folder, tmp_path / "data", "positive")  # the report exists: read, not made again
    assert "[advise] sharing pays here" in capsys.readouterr().out
    assert (tmp_path / "runs" / "advise" / "positive.json").read_text() == report
