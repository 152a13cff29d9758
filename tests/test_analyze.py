"""The MLP similarity analysis: metrics on arrays against brute force, on a tiny model, and the
command line end to end on the real model."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES, TINY, tiny_model
from mlx_lm.models import llama

from sharp_mlx import analyze
from sharp_mlx.models.sharemap import parse_share

PROJ = ("gate", "up", "down")


def random_windows(n=4, length=16, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, TINY["vocab_size"], (n, length)).astype(np.int32))


def copy_mlp(model, src, dst):
    for p in ("gate_proj", "up_proj", "down_proj"):
        getattr(model.model.layers[dst].mlp, p).weight = getattr(model.model.layers[src].mlp, p).weight
    mx.eval(model.parameters())


def tail_norm(z: np.ndarray, rank: int) -> float:
    """Frobenius norm left after the best rank-``rank`` approximation of z."""
    s = np.linalg.svd(z, compute_uv=False)
    return float(np.sqrt((s[rank:] ** 2).sum()))


def test_metrics_equal_brute_force():
    """err@k is the SVD tail of Z (W_t - W_r)^T over ||Z W_t^T||, with Z the projection's inputs."""
    dim, hidden, rank = 16, 24, 3
    args = llama.ModelArgs.from_dict({**TINY, "hidden_size": dim, "intermediate_size": hidden})
    mx.random.seed(0)
    tgt, ref = llama.MLP(args), llama.MLP(args)
    # gate differs by a rank-2 matrix, so rank 3 recovers it exactly; up is shared; down differs.
    ref.up_proj.weight = tgt.up_proj.weight
    ref.gate_proj.weight = tgt.gate_proj.weight + 0.3 * mx.random.normal((hidden, 2)) @ mx.random.normal((2, dim))
    x = mx.random.normal((300, dim))
    inputs = analyze.target_inputs(tgt, x)
    got = analyze.pair_metrics(ref, tgt, inputs, rank)
    own = analyze.own_lowrank_error(tgt, inputs, rank)

    xs = np.array(x, dtype=np.float64)
    h = np.array(analyze.run_mlp(tgt, x)[0], dtype=np.float64)
    out_t, out_r = (np.array(analyze.run_mlp(m, x)[1], dtype=np.float64) for m in (tgt, ref))
    assert got["rel_error"] == pytest.approx(np.linalg.norm(out_r - out_t) / np.linalg.norm(out_t), rel=1e-4)
    cos = (out_r * out_t).sum(-1) / (np.linalg.norm(out_r, axis=-1) * np.linalg.norm(out_t, axis=-1))
    assert got["cosine"] == pytest.approx(cos.mean(), abs=1e-5)
    for p, z in (("gate", xs), ("up", xs), ("down", h)):
        w_t = np.array(getattr(tgt, f"{p}_proj").weight, dtype=np.float64)
        delta = w_t - np.array(getattr(ref, f"{p}_proj").weight, dtype=np.float64)
        base = np.linalg.norm(z @ w_t.T)
        assert got["proj_error"][p] == pytest.approx(np.linalg.norm(z @ delta.T) / base, rel=1e-3, abs=1e-5), p
        assert got["lowrank_error"][p] == pytest.approx(tail_norm(z @ delta.T, rank) / base, rel=1e-3, abs=1e-3), p
        assert own[p] == pytest.approx(tail_norm(z @ w_t.T, rank) / base, rel=1e-3), p
    assert got["proj_error"]["gate"] > 0.1 and got["lowrank_error"]["gate"] < 1e-3
    assert got["proj_error"]["up"] == got["lowrank_error"]["up"] == 0.0  # up is the same matrix


def test_identical_mlps_give_cosine_one_and_error_zero():
    model, _ = tiny_model()
    copy_mlp(model, 2, 3)
    result = analyze.analyze(model, random_windows(), rank=4)
    assert [(p["reference"], p["target"]) for p in result["pairs"]] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    same = result["pairs"][2]
    assert same["cosine"] == pytest.approx(1.0, abs=1e-5) and same["rel_error"] == 0.0
    assert all(same[k][p] == 0.0 for k in ("proj_error", "lowrank_error") for p in PROJ)
    others = [p for p in result["pairs"] if p is not same]
    assert all(p["rel_error"] > 0.3 and p["cosine"] < 0.9 for p in others)
    assert len(result["layers"]) == 6 and result["tokens"] == 64 and result["seq_len"] == 16
    assert all(-1 <= lay["residual_cosine"] <= 1 for lay in result["layers"])


def test_all_pairs_table_plot_and_auto(tmp_path):
    model, config = tiny_model()
    copy_mlp(model, 1, 4)
    result = {"config": config, **analyze.analyze(model, random_windows(), rank=4, all_pairs=True)}
    assert len(result["pairs"]) == 15
    assert parse_share("auto", 6, similarity=result, cut=0.1, adjacent_only=False) == {4: 1}
    rows = analyze.table(result).splitlines()
    assert "best r (rel_err)" in rows[0] and len(rows) == 2 + 6
    assert rows[2 + 4].endswith(" 1 (0.000)")
    analyze.plot(result, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 10_000


def test_cli_on_real_model(real_model_dir, tmp_path, capsys):
    out = tmp_path / "an"
    # The fixture, not data/: the test must pass on a fresh clone that has fetched no corpora.
    argv = [
        "--model",
        str(real_model_dir),
        "--data",
        str(FIXTURES / "prose.txt"),
        "--tokens",
        "640",
        "--seq-len",
        "128",
        "--out",
        str(out),
        "--json",
    ]
    assert analyze.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "analysis.json").read_text())
    assert printed == saved
    assert saved["tokens"] == 640 and saved["rank"] == 64 and saved["config"]["num_hidden_layers"] == 30
    assert [(p["reference"], p["target"]) for p in saved["pairs"]] == [(t - 1, t) for t in range(1, 30)]
    for p in saved["pairs"]:
        assert -1 <= p["cosine"] <= 1 and p["rel_error"] > 0
        assert all(0 < p["lowrank_error"][k] < p["proj_error"][k] for k in PROJ)
    assert all(math.isfinite(v) for lay in saved["layers"] for v in lay["own_lowrank_error"].values())
    assert (out / "similarity.png").stat().st_size > 10_000
    assert not [p for p in out.iterdir() if p.name.startswith(".capture")]  # captured inputs removed
    share = parse_share("auto", 30, similarity=out / "analysis.json", cut=0.1, rank=64)
    assert all(r == t - 1 and 0 < t < 29 for t, r in share.items())


def test_cli_errors(real_model_dir, tmp_path, capsys, monkeypatch):
    def error(argv):
        assert analyze.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sharp_mlx.analyze: error:")
        return lines[0]

    assert "nope.jsonl" in error(["--model", str(real_model_dir), "--data", "nope.jsonl"])
    assert "--rank must be between 0 and 576" in error(
        ["--model", str(real_model_dir), "--data", str(FIXTURES / "prose.txt"), "--rank", "600"]
    )
    model, config = tiny_model(share={3: 2}, rank=2)
    from sharp_mlx import save

    save(tmp_path / "shared", model, config)
    assert "already shares layers" in error(
        ["--model", str(tmp_path / "shared"), "--data", str(FIXTURES / "prose.txt")]
    )
    monkeypatch.chdir(tmp_path)
    assert "python -m sharp_mlx.corpora" in error([])
