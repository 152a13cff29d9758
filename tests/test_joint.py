"""A jointly fitted shared weight (reference_rank > 0): stored once, round-trips everywhere, fits better than SHARP."""

import json
import struct

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY, correlated_inputs, random_mlp, tiny_model
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load
from test_model import TOKENS, randomize_recovery
from tiny_folder import write_char_tokenizer

import sharp_mlx
from sharp_mlx import fuse
from sharp_mlx.errors import SharpError
from sharp_mlx.models.llama import Model, ModelArgs, QuantizedRecovery, Recovery, SharpArgs
from sharp_mlx.models.sharemap import savings, share_model, stored_params
from sharp_mlx.quant.codes import gguf_codes, quantize_model_folder
from sharp_mlx.recovery.capture import capture_mlp_inputs
from sharp_mlx.recovery.joint import _split, fit_group, groups_of, run_joint
from sharp_mlx.recovery.sft import SFTConfig, prepare
from sharp_mlx.recovery.slw import PROJ, SLWConfig, fit_layer, mlp_apply, rel_error, weights_of

SHARE = {3: 2, 4: 2, 5: None}
RANK = 32  # a multiple of the recovery group size (32), so the factors can be quantized too


def joint_model(share=SHARE, rank=RANK, reference_rank=RANK, seed=0):
    """The tiny Llama with every reference recovered too, its factors and W_s made non-trivial."""
    mx.random.seed(seed)
    config = {**TINY, "sharp": {"share": share, "rank": rank, "reference_rank": reference_rank}}
    model = Model(ModelArgs.from_dict(config))
    randomize_recovery(model)
    for r in sorted({r for r in share.values() if r is not None}):  # W_s no longer equals any original weight
        mlp = model.model.layers[r].mlp
        for p in PROJ:
            lin = mlp[f"{p}_proj"]
            lin.weight = lin.weight + 0.01 * mx.random.normal(lin.weight.shape)
    mx.eval(model.parameters())
    return model, config


def safetensors_keys(folder):
    keys = set()
    for f in folder.glob("model*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            keys |= {k for k in json.loads(fh.read(n)) if k != "__metadata__"}
    return keys


def assert_stored_once(folder, quantized=False):
    keys = safetensors_keys(folder)
    suffixes = ("weight", "scales", "biases") if quantized else ("weight",)
    mlp = {k for k in keys if ".mlp." in k}
    assert mlp == {f"model.layers.{i}.mlp.{p}_proj.{s}" for i in (0, 1, 2) for p in PROJ for s in suffixes}
    assert any(k.startswith("model.layers.2.recovery.") for k in keys)  # the reference's own factors
    assert not any(k.startswith(("model.layers.0.recovery.", "model.layers.1.recovery.")) for k in keys)


# (a) a checkpoint with reference recovery: stored once, and every loader runs the same function


def test_reference_recovery_round_trips_through_save_quantize_mlx_lm_and_fuse(tmp_path):
    model, config = joint_model()
    assert isinstance(model.model.layers[2].recovery, Recovery) and "mlp" in model.model.layers[2]
    assert model.model.layers[2].recovery.kind == "plain"
    src = sharp_mlx.save(tmp_path / "float", model, config)
    write_char_tokenizer(src)
    assert json.loads((src / "config.json").read_text())["sharp"]["reference_rank"] == RANK
    assert_stored_once(src)
    ours, _ = sharp_mlx.load(src)
    assert mx.array_equal(ours(TOKENS), model(TOKENS))
    theirs, _ = mlx_lm_load(str(src), trust_remote_code=True)
    assert type(theirs).__module__ == "custom_model"
    assert mx.array_equal(theirs(TOKENS), model(TOKENS))

    q_dir = tmp_path / "q"
    r = quantize_model_folder(src, q_dir, group_size=32, from_gguf="none", recovery_bits=8)
    assert r["quantization"]["model.layers.2.recovery"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert_stored_once(q_dir, quantized=True)
    q_ours, _ = sharp_mlx.load(q_dir)
    q_theirs, _ = mlx_lm_load(str(q_dir), trust_remote_code=True)
    assert isinstance(q_ours.model.layers[2].recovery, QuantizedRecovery)
    assert type(q_theirs.model.layers[2].recovery).__name__ == "QuantizedRecovery"  # the checkpoint's copy
    assert mx.array_equal(q_theirs(TOKENS), q_ours(TOKENS))
    # W_s became 4-bit codes of itself, the reference's factors 8-bit codes of themselves
    w_s, q_w = model.model.layers[2].mlp.up_proj.weight, weights_of(q_ours.model.layers[2].mlp)["up"]
    assert 0 < np.linalg.norm(q_w - np.array(w_s)) < 0.15 * np.linalg.norm(np.array(w_s))
    ref_q, ref_f = q_ours.model.layers[2].recovery.dequantized(), model.model.layers[2].recovery
    for k in ("gate_a", "down_b"):
        assert np.linalg.norm(np.array(ref_q[k] - ref_f[k])) < 0.02 * np.linalg.norm(np.array(ref_f[k])), k

    for m in (model, q_ours):  # the dense export: W_r = W_s + (a_r b_r)^T, targets on W_s
        fused, _ = fuse.fuse(m, config, dtype="float32")
        assert np.allclose(np.array(fused(TOKENS)), np.array(m(TOKENS)), atol=1e-4)


def test_reference_recovery_is_counted_in_stored_and_saved_params(tmp_path):
    per_rank = 3 * (TINY["hidden_size"] + TINY["intermediate_size"])
    with_ref = sharp_mlx.save(tmp_path / "ref", *joint_model())
    without = sharp_mlx.save(tmp_path / "plain", *joint_model(reference_rank=0))
    assert stored_params(with_ref) - stored_params(without) == per_rank * RANK
    s, s0 = savings(TINY, SHARE, RANK, reference_rank=RANK), savings(TINY, SHARE, RANK)
    assert s["recovery_params"] - s0["recovery_params"] == per_rank * RANK
    assert s["params_after"] == stored_params(with_ref)


def test_a_fitted_stored_weight_never_keeps_the_gguf_codes_of_the_original(tmp_path):
    """Codes that match W_r within the import tolerance are W_r's, not the fitted W_s's."""
    for reference_rank in (0, 8):
        model, config = share_model(tiny_model()[0], TINY, {3: 2}, 8, reference_rank=reference_rank)
        lin = model.model.layers[2].mlp.gate_proj
        w, s, b = mx.quantize(lin.weight, 32, 4)
        lin.weight = mx.dequantize(w, s, b, 32, 4)  # W_r: exactly the GGUF's codes
        path = tmp_path / f"codes{reference_rank}.safetensors"
        mx.save_safetensors(
            str(path), {"blk.2.ffn_gate.weight": w, "blk.2.ffn_gate.scales": s, "blk.2.ffn_gate.biases": b}
        )
        codes, mismatched = gguf_codes(path, model, config)
        assert "model.layers.2.mlp.gate_proj" in codes and mismatched == 0  # W_s = W_r: the codes are exact
        # A change well below the import tolerance (1e-3 of the largest weight).
        lin.weight = lin.weight + 1e-4 * mx.abs(lin.weight).max() * mx.random.normal(lin.weight.shape)
        codes, mismatched = gguf_codes(path, model, config)
        if reference_rank:  # fitted: quantized afresh
            assert "model.layers.2.mlp.gate_proj" not in codes and mismatched == 1
        else:  # SHARP's untouched reference: float rounding, the codes stay
            assert "model.layers.2.mlp.gate_proj" in codes and mismatched == 0


def test_sft_trains_the_reference_recovery_and_freezes_the_stored_weight():
    model, _ = joint_model()
    prepare(model, SFTConfig())
    names = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert {k for k in names if k.startswith("model.layers.2.")} == {
        f"model.layers.2.recovery.{p}_{f}" for p in PROJ for f in "ab"
    }
    assert not any(".mlp." in k for k in names)


# (c) reference rank 0 is today's SHARP


def test_reference_rank_zero_is_todays_config_and_model():
    old = {"share": {"3": 2, "4": 2, "5": None}, "rank": 8}
    for d in (old, {**old, "reference_rank": 0}, {**old, "reference_rank": {}}):
        assert SharpArgs.from_dict(d).to_dict() == old
    assert SharpArgs.from_dict({**old, "reference_rank": 16}).to_dict() == {**old, "reference_rank": 16}
    assert SharpArgs.from_dict({**old, "reference_rank": {"2": 16}}).to_dict() == {**old, "reference_rank": {"2": 16}}
    today, _ = tiny_model(share=SHARE, rank=8)
    mx.random.seed(0)
    zero = Model(ModelArgs.from_dict({**TINY, "sharp": {"share": SHARE, "rank": 8, "reference_rank": 0}}))
    a, b = dict(tree_flatten(today.parameters())), dict(tree_flatten(zero.parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    assert "recovery" not in zero.model.layers[2]
    original, _ = tiny_model(seed=1)
    mx.random.seed(0)
    m1, c1 = share_model(original, TINY, SHARE, 8)
    mx.random.seed(0)
    m0, c0 = share_model(original, TINY, SHARE, 8, reference_rank=0)
    assert c0 == c1 and "reference_rank" not in c0["sharp"]
    assert mx.array_equal(m0(TOKENS), m1(TOKENS))
    mr, cr = share_model(original, TINY, SHARE, 8, reference_rank=8)
    assert cr["sharp"]["reference_rank"] == 8
    assert mx.array_equal(mr(TOKENS), m1(TOKENS))  # fresh reference factors (b = 0) change nothing


@pytest.mark.parametrize(
    "reference_rank, message",
    [
        ({"3": 8}, "not a reference"),
        (65, "between 0 and 64"),
        ({"2": -1}, "between 0 and 64"),
        ("8", "not a whole number"),
        (True, "not a whole number"),
        ({"2": 8.5}, "not a whole number"),
    ],
)
def test_bad_reference_ranks_are_refused(reference_rank, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_dict({**TINY, "sharp": {"share": {3: 2}, "rank": 8, "reference_rank": reference_rank}})


def test_a_reference_rank_without_references_is_refused():
    with pytest.raises(ValueError, match="no target of the share map borrows"):
        ModelArgs.from_dict({**TINY, "sharp": {"share": {3: None}, "rank": 8, "reference_rank": 8}})
    with pytest.raises(SharpError, match="not a reference"):
        savings(TINY, {3: 2}, 8, reference_rank={4: 8})


# (b) the joint fit


mlp, inputs = random_mlp, correlated_inputs  # shared with the other SLW tests (conftest)


def shared_plus_lowrank(seed, k=4):
    """An MLP whose weights are those of mlp(1) (the W_s*) plus a rank-k term as large as them."""
    m, rng = mlp(1), np.random.default_rng(seed)
    for p in PROJ:
        lin = m[f"{p}_proj"]
        w = np.array(lin.weight)
        delta = rng.normal(size=(w.shape[0], k)) @ rng.normal(size=(k, w.shape[1]))
        lin.weight = mx.array((w + delta * np.linalg.norm(w) / np.linalg.norm(delta)).astype(np.float32))
    return m


def test_joint_fit_finds_the_shared_weight_that_sharp_cannot_use():
    """W_r and W_t are one weight plus different rank-4 terms: a shared weight and rank 4 each fit
    both, while SHARP's W_t - W_r has rank 8."""
    ref, target = shared_plus_lowrank(10), shared_plus_lowrank(11)
    x_r, x_t = inputs(seed=1), inputs(seed=2)
    cfg = SLWConfig(steps=200, lr=3e-3, batch_rows=256)
    out = fit_group(ref, [target], x_r, [x_t], 4, 4, cfg)
    e = out["errors"]
    assert e["reference"]["start"] == 0.0 and e["kept"] == "end"
    assert e["sum"]["final"] < 0.5 * e["sum"]["start"], e
    # Better than SLW's whole fit (Adam included) of the target alone, even with the reference's error added.
    sharp = fit_layer(ref, target, x_t, 4, cfg)["errors"]
    assert e["sum"]["final"] < 0.6 * sharp["final"], (e, sharp)
    assert e["targets"][0]["start"] == pytest.approx(sharp["closed_form_down"], rel=1e-4)  # SHARP's start
    # The stored weight moved, and the result computes what the errors say.
    w_r = weights_of(ref)
    assert all(np.abs(out["stored"][p] - w_r[p]).max() > 1e-3 for p in PROJ)
    _, x_hold = _split(x_t, cfg)
    w_s = {p: mx.array(v) for p, v in out["stored"].items()}
    got = mlp_apply(w_s, mx.array(x_hold), {k: mx.array(v) for k, v in out["targets"][0].items()})
    want = mlp_apply({p: mx.array(v) for p, v in weights_of(target).items()}, mx.array(x_hold))
    assert rel_error(got, want) == pytest.approx(e["targets"][0]["final"], rel=1e-4)


def test_joint_fit_never_ends_worse_than_its_sharp_start():
    ref, target, x_r, x_t = mlp(1), mlp(2), inputs(seed=1), inputs(seed=2)
    # A learning rate that blows Adam up: the start is kept, exactly.
    out = fit_group(ref, [target], x_r, [x_t], 8, 8, SLWConfig(steps=20, lr=0.5, batch_rows=256))
    e = out["errors"]
    assert e["kept"] == "start" and e["sum"]["end"] > e["sum"]["start"] == e["sum"]["final"]
    assert all(np.array_equal(out["stored"][p], weights_of(ref)[p]) for p in PROJ)
    assert all(not out["reference"][f"{p}_b"].any() for p in PROJ)
    # An ordinary run on unrelated layers, two targets (one of rank 0, running W_s as it is).
    out = fit_group(ref, [target, mlp(3)], x_r, [x_t, inputs(seed=3)], [8, 0], 8, SLWConfig(steps=40, batch_rows=256))
    e = out["errors"]
    assert e["sum"]["final"] <= e["sum"]["start"] and out["targets"][1] == {}
    assert e["targets"][1]["start"] == pytest.approx(e["targets"][1]["none"])  # W_s = W_r at the start
    # Reference rank 0: W_s stays W_r and the reference is exact; only the targets' factors move.
    out = fit_group(ref, [target], None, [x_t], 8, 0, SLWConfig(steps=40, batch_rows=256))
    assert out["reference"] == {} and out["errors"]["reference"]["final"] == 0.0
    assert all(np.array_equal(out["stored"][p], weights_of(ref)[p]) for p in PROJ)
    with pytest.raises(ValueError, match="ref_inputs"):
        fit_group(ref, [target], None, [x_t], 8, 8, SLWConfig(steps=1))


def test_run_joint_writes_the_stored_weight_and_every_factor_into_the_model():
    original, _ = tiny_model(seed=3)
    mx.random.seed(0)
    model, _ = share_model(original, TINY, {3: 2, 4: 2}, 8, reference_rank=8)
    assert groups_of(model) == {2: [3, 4]}
    windows = mx.array(np.random.default_rng(0).integers(0, TINY["vocab_size"], (16, 32)).astype(np.int32))
    x = capture_mlp_inputs(original, windows, [2, 3, 4])["mlp_inputs"]
    with pytest.raises(SharpError, match=r"layers \[2\]"):
        run_joint(model, original, {3: x[3], 4: x[4]}, SLWConfig(steps=1), log=lambda *_: None)
    cfg = SLWConfig(steps=60, lr=3e-3, batch_rows=128)
    report = run_joint(model, original, x, cfg, log=lambda *_: None)
    assert set(report) == {2, 3, 4} and all(e["group"] == 2 for e in report.values())
    inner = model.model
    assert not np.array_equal(
        np.array(inner.layers[2].mlp.up_proj.weight), np.array(original.model.layers[2].mlp.up_proj.weight)
    )
    for layer in (2, 3, 4):
        _, x_hold = _split(np.asarray(x[layer]), cfg)
        xh = mx.array(x_hold)
        got = inner.layers[layer].recovery(xh, inner.mlp_of(layer))  # what the model runs
        assert rel_error(got, original.model.layers[layer].mlp(xh)) == pytest.approx(report[layer]["final"], rel=1e-3)
