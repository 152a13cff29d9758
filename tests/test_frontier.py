"""The quantization frontier: sequential GPTQ of a whole model, mixed-precision folders mlx-lm opens, the Pareto marks, the CLI."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import load_script
from mlx_lm import load as mlx_lm_load
from tiny_folder import write_tiny_model

from sharp_mlx.io.checkpoint import load_model
from sharp_mlx.quant.gptq import BLOCK_LINEARS, mlp_sensitivity, sequential_gptq

frontier = load_script("frontier")
allocate_bits, main, markdown, pareto, plot, report, save_folder, with_codes = (
    frontier.allocate_bits,
    frontier.main,
    frontier.markdown,
    frontier.pareto,
    frontier.plot,
    frontier.report,
    frontier.save_folder,
    frontier.with_codes,
)

LAYERS = 6  # conftest.TINY


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_model(tmp_path / "float")


def every_linear(bits, group_size, layers=range(LAYERS)):
    return {
        f"model.layers.{i}.{name}": {"bits": bits, "group_size": group_size} for i in layers for name in BLOCK_LINEARS
    }


def windows(n=8, length=32, seed=0):
    return mx.array(np.random.default_rng(seed).integers(2, 75, size=(n, length)).astype(np.int32))


def test_sequential_gptq_folder_opens_in_mlx_lm_with_the_same_logits(tiny, tmp_path):
    model, config = load_model(tiny)
    codes = sequential_gptq(model, windows(), every_linear(3, 32), progress=False)
    assert set(codes) == set(every_linear(3, 32))
    codes["model.embed_tokens"] = mx.quantize(model.model.embed_tokens.weight, 32, 4)
    model.model.embed_tokens.weight = mx.dequantize(*codes["model.embed_tokens"], group_size=32, bits=4)
    tokens = windows(1, 24, seed=1)
    dequantized_logits = model(tokens)  # every weight is now its codes' float values
    model, config = with_codes(model, config, codes)
    assert (
        isinstance(model.model.layers[2].mlp.down_proj, nn.QuantizedLinear)
        and model.model.layers[2].mlp.down_proj.bits == 3
    )
    save_folder(tmp_path / "q", model, config, tiny)
    loaded, _ = mlx_lm_load(str(tmp_path / "q"))
    assert mx.array_equal(loaded(tokens), model(tokens))
    # ... and they are the logits of the float model sequential GPTQ left behind.
    assert mx.allclose(loaded(tokens), dequantized_logits, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3])
def test_sequential_gptq_moves_the_outputs_less_than_rounding_to_nearest(tiny, bits):
    calib = windows(16, 32)
    reference = load_model(tiny)[0](calib)
    fitted = load_model(tiny)[0]
    sequential_gptq(fitted, calib, every_linear(bits, 32), progress=False)
    rounded = load_model(tiny)[0]
    nn.quantize(rounded, 32, bits, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    gptq_err = mx.mean((fitted(calib) - reference) ** 2).item()
    round_err = mx.mean((rounded(calib) - reference) ** 2).item()
    assert gptq_err < 0.6 * round_err  # measured: 0.38x at 2 bits, 0.29x at 3


def test_mixed_precision_config_round_trips_through_mlx_lm_load(tiny, tmp_path):
    model, config = load_model(tiny)
    mlp_bits = [2, 3, 4, 3, 2, 4]
    params = {
        p: v for p, v in every_linear(4, 32, range(1, LAYERS)).items() if ".self_attn." in p
    }  # block 0's attention stays float
    for i, b in enumerate(mlp_bits):
        params.update(
            {
                f"model.layers.{i}.mlp.{n}": {"bits": b, "group_size": 32 if b != 3 else 64}
                for n in ("gate_proj", "up_proj")
            }
        )
        params[f"model.layers.{i}.mlp.down_proj"] = {"bits": b, "group_size": 32}
    codes = sequential_gptq(model, windows(), params, progress=False)
    model, config = with_codes(model, config, codes)
    save_folder(tmp_path / "mixed", model, config, tiny)
    saved = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization"]
    assert saved["model.layers.4.mlp.down_proj"] == {"group_size": 32, "bits": 2, "mode": "affine"}
    loaded, _ = mlx_lm_load(str(tmp_path / "mixed"))
    for i, b in enumerate(mlp_bits):
        for n in ("gate_proj", "up_proj", "down_proj"):
            m = loaded.model.layers[i].mlp[n]
            assert (m.bits, m.group_size) == (b, 32 if b != 3 or n == "down_proj" else 64)
    assert type(loaded.model.layers[0].self_attn.q_proj) is nn.Linear
    assert loaded.model.layers[1].self_attn.q_proj.bits == 4
    tokens = windows(2, 16, seed=2)
    assert mx.array_equal(loaded(tokens), model(tokens))


def mean_loss(model, batch):
    return nn.losses.cross_entropy(model(batch[:, :-1]), batch[:, 1:], reduction="mean").item()


def test_mlp_sensitivity_is_the_loss_increase_of_quantizing_that_mlp_alone(tiny):
    model = load_model(tiny)[0]
    calib = windows(8, 33)
    before = [mx.array(b.mlp.down_proj.weight) for b in model.model.layers]
    two, eight = (mlp_sensitivity(model, calib, bits, 32, progress=False) for bits in (2, 8))
    assert all(
        mx.array_equal(a, b.mlp.down_proj.weight) for a, b in zip(before, model.model.layers)
    )  # every weight restored
    assert max(abs(s) for s in eight) < 1e-3 < max(abs(s) for s in two)
    # Block 3's number is what the whole model loses with block 3's MLP alone GPTQ'd to 2 bits.
    base = mean_loss(model, calib)
    sequential_gptq(
        model,
        calib,
        {f"model.layers.3.mlp.{n}": {"bits": 2, "group_size": 32} for n in ("gate_proj", "up_proj", "down_proj")},
        progress=False,
    )
    assert abs(two[3] - (mean_loss(model, calib) - base)) < 1e-4


def test_bits_go_to_the_most_sensitive_blocks_within_the_budget():
    def cost(b):
        return 10 * b

    bits = allocate_bits([5.0, 0.1, 1.0, -1.0], [2, 3, 4], cost, budget=120, probe_bits=2)
    assert bits == [4, 2, 4, 2]
    assert allocate_bits([5.0, 0.1, 1.0, -1.0], [2, 3, 4], cost, budget=85, probe_bits=2) == [2, 2, 2, 2]
    assert sum(map(cost, allocate_bits([1.0] * 5, [2, 3, 4], cost, 150, 2))) <= 150


def test_pareto_marks_exactly_the_non_dominated_points():
    points = [(10, 5.0), (20, 2.0), (15, 6.0), (30, 2.0), (30, 1.5), (5, 9.0), (20, 2.0), (40, 1.5)]
    #          yes       yes      no: (10,5)  no: (20,2) yes       yes      yes (a tie)  no: (30,1.5)
    assert pareto(points) == [True, True, False, False, True, True, True, False]
    assert pareto([]) == []


def test_report_marks_the_frontier_and_writes_the_table_and_plot(tmp_path):
    base = {"a": 10.0, "b": 20.0}
    original = {"name": "original", "kind": "original", "bytes": 500e6, "ppl": base}

    def row(name, kind, mb, x):
        return {"name": name, "kind": kind, "path": name, "bytes": mb * 1e6, "ppl": {d: v * x for d, v in base.items()}}

    rep = report(
        original,
        [
            row("mlx-q4g64", "quantization", 80, 1.4),
            row("g3", "quantization", 60, 1.3),
            row("s", "sharp", 50, 2.0),
            row("big", "quantization", 90, 1.5),
        ],
        "python experiments/frontier.py",
        1.0,
        {"windows": 8, "seq_len": 256},
    )
    marks = {r["name"]: (r["frontier"], r["frontier_quantization"]) for r in rep["points"]}
    assert marks == {"s": (True, False), "g3": (True, True), "mlx-q4g64": (False, False), "big": (False, False)}
    assert [r["name"] for r in rep["points"]] == ["s", "g3", "mlx-q4g64", "big"]
    md = markdown(rep)
    assert "| g3 | quantization | 60.0 | 0.75 | 1.300 | 1.300 (a) |" in md
    plot(rep, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_reports_each_shared_point_and_the_points_of_one_side(tmp_path):
    original = {"name": "original", "kind": "original", "bytes": 500e6, "ppl": {"a": 10.0, "b": 20.0}}

    def rep(**points):
        rows = [
            {"name": n, "kind": "quantization", "path": n, "bytes": mb, "ppl": ppl} for n, (mb, ppl) in points.items()
        ]
        return report(original, rows, "python experiments/frontier.py", 1.0, {"windows": 8, "seq_len": 256})

    then = rep(g3=(60, {"a": 13.0, "b": 26.0}), gone=(70, {"a": 12.0, "b": 24.0}))
    now = rep(g3=(60, {"a": 13.0, "b": 26.26}), new=(80, {"a": 11.0, "b": 22.0}))
    c = frontier.compare(now, then)
    assert [r["name"] for r in c["rows"]] == ["g3"] and c["only_then"] == ["gone"] and c["only_now"] == ["new"]
    assert abs(c["rows"][0]["max_rel_ppl_diff"] - 0.01) < 1e-9 and c["rows"][0]["bytes"] == [60, 60]
    md = frontier.compare_markdown(c, tmp_path / "then.json")
    assert "1 of 1 points and rows in both have the same bytes" in md and "1.0e-02" in md


@pytest.mark.parametrize("spec", ["no-equals-sign", "=somewhere", "label@bogus=.", "bad/label=.", "x={missing}"])
def test_the_cli_rejects_a_bad_row_with_exit_2(spec, tmp_path, capsys):
    assert main(["--row", spec.format(missing=tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("experiments/frontier.py: error: --row") and len(err.strip().splitlines()) == 1


def test_the_cli_rejects_an_unknown_point_with_exit_2(capsys):
    assert main(["--points", "gptq-w7g64-e4"]) == 2
    assert "no such point" in capsys.readouterr().err


def test_keep_refuses_a_report_measured_with_other_settings(tmp_path, capsys):
    """--keep takes points as an earlier report measured them, so it must have measured them as this run would."""
    from sharp_mlx.errors import SharpError

    kept_report = frontier.kept_report

    good = {"command": "python experiments/frontier.py", "eval": {"windows": 8}, "original": {}, "points": []}
    path = tmp_path / "f.json"
    path.write_text(json.dumps(good))
    assert kept_report(path, {"windows": 8}) == good
    with pytest.raises(SharpError, match="--windows"):
        kept_report(path, {"windows": 4})
    path.write_text("not json")
    with pytest.raises(SharpError, match="cannot read"):
        kept_report(path, {"windows": 8})
