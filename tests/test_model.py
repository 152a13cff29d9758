"""The shared-weight Llama on small random models: equivalences that must hold exactly."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import TINY, direct_sharing_reference, tiny_model
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

import sharp_mlx
from sharp_mlx.models.llama import ModelArgs, Recovery, SharpArgs

TOKENS = mx.array([[5, 17, 3, 99, 42, 7, 7, 1, 60, 23, 88, 14]])


def randomize_recovery(model, seed=1):
    """Give every recovery factor non-zero values and every scaling vector values around one,
    so tests see the recovery path at work."""
    mx.random.seed(seed)
    for layer in model.model.layers:
        if "recovery" in layer:
            for k, v in layer.recovery.parameters().items():
                scaling = k.endswith(("_in", "_out"))
                layer.recovery[k] = (1.0 if scaling else 0.0) + (0.2 if scaling else 0.05) * mx.random.normal(v.shape)
    mx.eval(model.parameters())


def base_weights(model):
    """Weights of an unshared model, as a dict."""
    return dict(tree_flatten(model.parameters()))


def test_empty_share_map_is_mlx_lm_llama():
    ours, config = tiny_model()
    ref = llama.Model(llama.ModelArgs.from_dict(config))
    ref.load_weights(list(base_weights(ours).items()), strict=True)
    assert mx.array_equal(ours(TOKENS), ref(TOKENS))


def test_fresh_shared_model_equals_direct_sharing():
    """Zero-initialised recovery: each target runs exactly its reference's MLP."""
    share = {3: 2, 4: 2, 5: 2}
    original, config = tiny_model()
    weights = base_weights(original)
    ref = direct_sharing_reference(weights, config, share)

    shared, _ = tiny_model(share=share, rank=8)
    kept = {k: v for k, v in weights.items() if not any(f"layers.{t}.mlp." in k for t in share)}
    shared.load_weights(list(kept.items()), strict=False)
    assert np.allclose(np.array(shared(TOKENS)), np.array(ref(TOKENS)), atol=1e-5)


def test_recovery_equals_merged_weights():
    """The low-rank path equals running an MLP whose weights have B A merged in."""
    dim, hidden, rank = 16, 24, 4
    mx.random.seed(0)
    mlp = llama.MLP(llama.ModelArgs.from_dict({**TINY, "hidden_size": dim, "intermediate_size": hidden}))
    rec = Recovery(dim, hidden, rank)
    for k, v in rec.parameters().items():
        rec[k] = mx.random.normal(v.shape)
    merged = llama.MLP(llama.ModelArgs.from_dict({**TINY, "hidden_size": dim, "intermediate_size": hidden}))
    for p in ("gate", "up", "down"):
        w = getattr(mlp, f"{p}_proj").weight + (rec[f"{p}_a"] @ rec[f"{p}_b"]).T
        getattr(merged, f"{p}_proj").weight = w
    x = mx.random.normal((2, 5, dim))
    assert np.allclose(np.array(rec(x, mlp)), np.array(merged(x)), atol=1e-4)
    # With no borrowed MLP, recovery alone is an MLP made of the low-rank factors.
    for p in ("gate", "up", "down"):
        getattr(merged, f"{p}_proj").weight = (rec[f"{p}_a"] @ rec[f"{p}_b"]).T
    assert np.allclose(np.array(rec(x, None)), np.array(merged(x)), atol=1e-4)


def test_scaling_vectors_at_one_equal_the_plain_model():
    """Fresh scaling vectors (ones) change nothing, whatever the factors."""
    share = {3: 2, 4: 2, 5: 2}
    plain, _ = tiny_model(share=share, rank=4)
    randomize_recovery(plain)
    scaled, config = tiny_model(share=share, rank=4, scales=True)
    assert config["sharp"]["recovery"] == "scaled"
    names = {k for k, _ in tree_flatten(scaled.parameters())} - set(base_weights(plain))
    assert names == {
        f"model.layers.{t}.recovery.{p}_{s}" for t in share for p in ("gate", "up", "down") for s in ("in", "out")
    }
    assert all(mx.array_equal(v, mx.ones_like(v)) for k, v in tree_flatten(scaled.parameters()) if k in names)
    scaled.load_weights(list(base_weights(plain).items()), strict=False)
    assert mx.array_equal(scaled(TOKENS), plain(TOKENS))


def test_scaled_recovery_equals_dense_weights():
    """mlp.p_proj(x * p_in) * p_out + delta is the MLP with weights diag(out) W diag(in) + (B A)^T."""
    dim, hidden, rank = 16, 24, 4
    args = llama.ModelArgs.from_dict({**TINY, "hidden_size": dim, "intermediate_size": hidden})
    mx.random.seed(0)
    mlp = llama.MLP(args)
    rec = Recovery(dim, hidden, rank, kind="scaled")
    for k, v in rec.parameters().items():
        rec[k] = (1.0 + 0.5 * mx.random.normal(v.shape)) if k.endswith(("_in", "_out")) else mx.random.normal(v.shape)
    dense = llama.MLP(args)
    for p in ("gate", "up", "down"):
        w = np.array(getattr(mlp, f"{p}_proj").weight)  # (out, in)
        scaled = np.diag(np.array(rec[f"{p}_out"])) @ w @ np.diag(np.array(rec[f"{p}_in"]))
        getattr(dense, f"{p}_proj").weight = mx.array(scaled + (np.array(rec[f"{p}_a"]) @ np.array(rec[f"{p}_b"])).T)
    x = mx.random.normal((2, 5, dim))
    got = np.array(rec(x, mlp))
    assert np.allclose(got, np.array(dense(x)), atol=1e-4)
    # ... and the vectors matter: with them back at one the output is another one.
    plain = Recovery(dim, hidden, rank)
    plain.update({k: v for k, v in rec.parameters().items() if not k.endswith(("_in", "_out"))})
    assert not np.allclose(got, np.array(plain(x, mlp)), atol=1e-2)


@pytest.mark.parametrize("share", [{}, {3: 2, 5: 4}, {2: 1, 3: 1, 4: 1}])
def test_kv_cache_decode_equals_full_forward(share):
    model, _ = tiny_model(share=share, rank=4)
    randomize_recovery(model)
    full = model(TOKENS)
    cache = make_prompt_cache(model)
    steps = [model(TOKENS[:, :5], cache=cache)[:, -1]]
    for i in range(5, TOKENS.shape[1]):
        steps.append(model(TOKENS[:, i : i + 1], cache=cache)[:, -1])
    assert np.allclose(np.array(full[:, 4:]), np.array(mx.stack(steps, axis=1)), atol=1e-4)


def test_shared_weight_stored_once(tmp_path):
    share = {3: 2, 4: 2, 5: 2}
    model, config = tiny_model(share=share, rank=4)
    paths = [k for k, _ in tree_flatten(model.parameters())]
    assert not any(f"layers.{t}.mlp." in k for t in share for k in paths)
    sharp_mlx.save(tmp_path / "m", model, config)
    saved = mx.load(str(tmp_path / "m" / "model.safetensors"))
    mlp_keys = sorted(k for k in saved if ".mlp." in k)
    assert len(mlp_keys) == 3 * (TINY["num_hidden_layers"] - len(share))
    assert all(f"layers.{t}.mlp." not in k for t in share for k in saved)
    # The stored bytes are those of the owners only, plus the recovery factors.
    recovery = [k for k in saved if ".recovery." in k]
    assert len(recovery) == 6 * len(share)


@pytest.mark.parametrize(
    "sharp",
    [
        {"share": {}, "rank": 0},
        {"share": {3: 2, 5: 4}, "rank": 4},
        {"share": {2: 1, 3: 1, 4: None}, "rank": {2: 2, 3: 5, 4: 3}},
        {"share": {3: 2, 4: 2, 5: 2}, "rank": {3: 2, 4: 3, 5: 1}, "recovery": "scaled"},
    ],
)
def test_save_load_round_trip_is_exact(tmp_path, sharp):
    model, config = tiny_model(share=sharp["share"], rank=sharp["rank"], scales=sharp.get("recovery") == "scaled")
    randomize_recovery(model)
    sharp_mlx.save(tmp_path / "m", model, config)
    loaded, saved_config = sharp_mlx.io.checkpoint.load_model(tmp_path / "m")
    before, after = base_weights(model), base_weights(loaded)
    assert before.keys() == after.keys()
    assert all(mx.array_equal(before[k], after[k]) for k in before)
    assert mx.array_equal(model(TOKENS), loaded(TOKENS))
    on_disk = json.loads((tmp_path / "m" / "config.json").read_text())
    if sharp["share"]:
        assert SharpArgs.from_dict(on_disk["sharp"]) == SharpArgs.from_dict(sharp)
        assert on_disk["model_file"] == "sharp_model.py"
        assert ("recovery" in on_disk["sharp"]) == ("recovery" in sharp)  # plain configs stay as they were
    else:
        assert "sharp" not in on_disk and "model_file" not in on_disk


def test_save_refuses_to_overwrite(tmp_path):
    model, config = tiny_model()
    out = sharp_mlx.save(tmp_path / "m", model, config)
    before = (out / "model.safetensors").read_bytes()
    other, _ = tiny_model(seed=5)
    with pytest.raises(sharp_mlx.errors.SharpError, match="--force"):
        sharp_mlx.save(out, other, config)
    assert (out / "model.safetensors").read_bytes() == before
    sharp_mlx.save(out, other, config, force=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind


@pytest.mark.parametrize(
    "share, rank, message",
    [
        ({3: 3}, 4, "not before it"),
        ({3: 4}, 4, "not before it"),
        ({9: 2}, 4, "out of range"),
        ({3: -1}, 4, "out of range"),
        ({3: 2, 2: 1}, 4, "is itself a target"),
        ({3: 2}, 65, "between 0 and 64"),
        ({3: 2}, -1, "between 0 and 64"),
        ({3: 2}, {4: 2}, "not a target"),
    ],
)
def test_share_map_validation(share, rank, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_dict({**TINY, "sharp": {"share": share, "rank": rank}})


def test_scales_need_a_reference_and_a_rank():
    ok = ModelArgs.from_dict({**TINY, "sharp": {"share": {3: 2, 5: 4}, "rank": 4, "recovery": "scaled"}})
    assert ok.sharp_args.kind == "scaled" and ok.sharp_args.to_dict()["recovery"] == "scaled"
    assert "recovery" not in SharpArgs(share={3: 2}, rank=4).to_dict()
    # configs written before recovery kinds had names say "scales": true
    assert (
        ModelArgs.from_dict({**TINY, "sharp": {"share": {3: 2}, "rank": 4, "scales": True}}).sharp_args.kind == "scaled"
    )
    with pytest.raises(ValueError, match="unknown recovery kind 'nope'"):
        ModelArgs.from_dict({**TINY, "sharp": {"share": {3: 2}, "rank": 4, "recovery": "nope"}})
    with pytest.raises(ValueError, match="target 4 borrows none"):
        ModelArgs.from_dict({**TINY, "sharp": {"share": {3: 2, 4: None}, "rank": 4, "scales": True}})
    with pytest.raises(ValueError, match="target 3 has rank 0"):
        ModelArgs.from_dict({**TINY, "sharp": {"share": {3: 2, 4: 2}, "rank": {3: 0, 4: 2}, "scales": True}})


@pytest.mark.parametrize("scales", [False, True])
def test_quantize_keeps_sharing_and_float_recovery(scales):
    model, _ = tiny_model(share={3: 2, 4: 2}, rank=4, scales=scales)
    nn.quantize(model, group_size=32, bits=4)
    flat = dict(tree_flatten(model.parameters()))
    assert "model.layers.2.mlp.gate_proj.scales" in flat
    assert not any(k.startswith(("model.layers.3.mlp", "model.layers.4.mlp")) for k in flat)
    assert all(flat[k].dtype == mx.float32 for k in flat if ".recovery." in k)
    model(TOKENS)  # still runs
