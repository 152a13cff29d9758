"""Quantization: sharing survives it, recovery stays float, round trips are exact, GGUF codes lose nothing."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY, tiny_model
from mlx.utils import tree_flatten
from test_model import TOKENS, randomize_recovery

import sharp_mlx
from sharp_mlx.convert import embedded_gguf
from sharp_mlx.errors import SharpError
from sharp_mlx.io.checkpoint import load_model
from sharp_mlx.models.sharemap import share_model
from sharp_mlx.quant.codes import folder_bytes, gguf_codes, quantize, quantize_model_folder
from sharp_mlx.quantize import main

SHARE = {3: 2, 4: 2}


def dequantized(model, path):
    """float32 weight of module ``path`` (scales in float32, so no float16 rounding is added)."""
    m = model
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else m[part]
    return mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32), m.group_size, m.bits)


@pytest.fixture
def shared_dir(tmp_path):
    model, config = tiny_model(share=SHARE, rank=4)
    randomize_recovery(model)
    return sharp_mlx.save(tmp_path / "float", model, config)


def test_quantized_folder_stores_shared_mlp_once_and_recovery_in_float16(shared_dir, tmp_path):
    r = quantize_model_folder(shared_dir, tmp_path / "q", group_size=32, from_gguf="none")
    saved = mx.load(str(tmp_path / "q" / "model.safetensors"))
    scales = sorted(k for k in saved if k.endswith(".scales"))
    # Every stored Linear plus the embedding, each once; no MLP keys for the targets.
    stored_mlps = TINY["num_hidden_layers"] - len(SHARE)
    assert len(scales) == 4 * TINY["num_hidden_layers"] + 3 * stored_mlps + 1 == r["quantized"]
    assert all(f"layers.{t}.mlp." not in k for t in SHARE for k in saved)
    assert "model.layers.2.mlp.gate_proj.scales" in saved
    recovery = [k for k in saved if ".recovery." in k]
    assert len(recovery) == 6 * len(SHARE) and all(saved[k].dtype == mx.float16 for k in recovery)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert config["sharp"]["share"] == {"3": 2, "4": 2}
    assert r["bytes_after"] < 0.5 * r["bytes_before"]


@pytest.mark.parametrize("share, scales", [({}, False), (SHARE, False), (SHARE, True)])
def test_quantized_round_trip_is_exact_and_close_to_float(tmp_path, share, scales):
    model, config = tiny_model(share=share, rank=4, scales=scales)
    randomize_recovery(model)
    reference = model(TOKENS)
    errors = {}
    for bits in (8, 4):
        model, _ = tiny_model(share=share, rank=4, scales=scales)
        randomize_recovery(model)
        q, q_config = quantize(model, config, bits=bits, group_size=32)
        out = sharp_mlx.save(tmp_path / f"q{bits}", q, q_config)
        loaded, loaded_config = load_model(out)
        assert (loaded_config["sharp"].get("recovery") == "scaled") == scales if share else "sharp" not in loaded_config
        assert mx.array_equal(loaded(TOKENS), q(TOKENS))
        errors[bits] = mx.abs(q(TOKENS) - reference).mean().item() / mx.abs(reference).mean().item()
    assert 0 < errors[8] < 0.03 and errors[8] < errors[4] < 0.5, errors


def test_quantize_refuses_quantized_input_and_existing_out(shared_dir, tmp_path, capsys):
    out = tmp_path / "q"
    quantize_model_folder(shared_dir, out, group_size=32, from_gguf="none")
    with pytest.raises(SharpError, match="already quantized"):
        quantize_model_folder(out, tmp_path / "qq", group_size=32, from_gguf="none")
    assert main(["--model", str(shared_dir), "--out", str(out), "--group-size", "32", "--from-gguf", "none"]) == 2
    assert "--force" in capsys.readouterr().err
    model, config = load_model(out)
    with pytest.raises(SharpError, match="already quantized"):
        quantize(model, config)


def test_explicit_gguf_that_does_not_match_is_refused(shared_dir, tmp_path):
    with pytest.raises(SharpError, match="matches the codes"):
        quantize_model_folder(shared_dir, tmp_path / "q", group_size=32, from_gguf=str(embedded_gguf()))
    assert not (tmp_path / "q").exists()


def test_gguf_codes_make_the_real_model_4bit_without_loss(real_model_dir, tmp_path):
    r = quantize_model_folder(real_model_dir, tmp_path / "q4")
    assert r["gguf_codes"] == r["quantized"] == 7 * 30 + 1 and r["gguf_mismatched"] == 0
    assert r["bytes_after"] < 0.19 * r["bytes_before"]
    q, config = load_model(tmp_path / "q4", lazy=True)
    original, _ = load_model(real_model_dir, lazy=True)
    assert config["quantization"]["group_size"] == 32 and config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    for path in (
        "model.layers.3.self_attn.q_proj",
        "model.layers.3.self_attn.k_proj",
        "model.layers.17.self_attn.v_proj",
        "model.layers.26.mlp.down_proj",
        "model.embed_tokens",
    ):
        float_w = dict(tree_flatten(original.parameters()))[f"{path}.weight"]
        assert np.abs(np.array(dequantized(q, path)) - np.array(float_w)).max() < 1e-3, path


def test_gguf_codes_on_a_shared_model_skip_the_targets(real_model, real_model_dir):
    original, _ = real_model
    model, config = share_model(original, json.loads((real_model_dir / "config.json").read_text()), {27: 26, 29: 28}, 8)
    codes, mismatched = gguf_codes(embedded_gguf(), model, config)
    assert mismatched == 0 and len(codes) == 7 * 30 + 1 - 3 * 2
    assert "model.layers.26.mlp.gate_proj" in codes and not any(".27.mlp" in p or ".29.mlp" in p for p in codes)
    q, _ = quantize(model, config, codes=codes)
    flat = dict(tree_flatten(q.parameters()))
    assert all(flat[k].dtype == mx.float16 for k in flat if ".recovery." in k)
    assert (
        np.abs(
            np.array(dequantized(q, "model.layers.28.mlp.up_proj"))
            - np.array(original.model.layers[28].mlp.up_proj.weight)
        ).max()
        < 1e-3
    )


@pytest.mark.parametrize("scales", [False, True])
def test_recovery_codes_round_trip_through_sharp_mlx_and_mlx_lm(tmp_path, scales):
    from mlx_lm.utils import load_model as mlx_lm_load_model

    from sharp_mlx.models.llama import QuantizedRecovery, vector_names
    from sharp_mlx.quant.codes import dequantized as float_copy

    model, config = tiny_model(share=SHARE, rank=32, scales=scales)
    randomize_recovery(model)
    reference = model(TOKENS)
    before = {k: model.model.layers[3].recovery[k] for k in vector_names("scaled" if scales else "plain")}
    # float32 scales, so that the float copy below is exactly the same function (float16 ones: see the next test)
    q, q_config = quantize(
        model, config, bits=8, group_size=32, recovery_bits=8, embedding_bits=4, scales_dtype="float32"
    )
    assert q_config["quantization"]["model.layers.3.recovery"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert q_config["quantization"]["model.embed_tokens"]["bits"] == 4
    assert (
        isinstance(q.model.layers[3].recovery, QuantizedRecovery)
        and not q.model.layers[3].recovery.trainable_parameters()
    )
    out = sharp_mlx.save(tmp_path / "q", q, q_config)
    saved = mx.load(str(out / "model.safetensors"))
    codes = {f"{p}_{f}{s}" for p in ("gate", "up", "down") for f in "ab" for s in ("", "_scales", "_biases")}
    assert {k.split(".recovery.")[1] for k in saved if ".layers.3.recovery." in k} == codes | set(
        vector_names("scaled" if scales else "plain")
    )
    for k in vector_names("scaled" if scales else "plain"):  # the vectors stay float, as they were
        assert saved[f"model.layers.3.recovery.{k}"].dtype == mx.float32
        assert mx.array_equal(saved[f"model.layers.3.recovery.{k}"], before[k])
    logits = q(TOKENS)
    ours, _ = load_model(out)
    theirs, _ = mlx_lm_load_model(out, trust_remote_code=True)
    assert mx.array_equal(ours(TOKENS), logits) and mx.array_equal(theirs(TOKENS), logits)
    # 8-bit recovery with a 4-bit embedding stays close to float; the float copy is the same function.
    assert mx.abs(logits - reference).mean().item() < 0.2 * mx.abs(reference).mean().item()
    assert mx.allclose(float_copy(ours)(TOKENS), logits, atol=1e-4)
    assert not any(k.endswith("scales") for k, _ in tree_flatten(ours.parameters()))


def test_new_codes_keep_float16_scales(tmp_path):
    """By default the scales and biases of codes made here are float16: half a bit per weight
    less at group size 64 than float32 ones, for a rounding far below the codes' own."""
    outs = {}
    for dtype in ("float16", "float32"):
        model, config = tiny_model(share=SHARE, rank=32)
        randomize_recovery(model)
        q, q_config = quantize(model, config, bits=4, group_size=32, recovery_bits=8, scales_dtype=dtype)
        flat = dict(tree_flatten(q.parameters()))
        assert {flat[k].dtype for k in flat if k.endswith(("scales", "biases"))} == {getattr(mx, dtype)}
        outs[dtype] = (q(TOKENS), folder_bytes(sharp_mlx.save(tmp_path / dtype, q, q_config)))
    (half, half_bytes), (full, full_bytes) = outs["float16"], outs["float32"]
    assert half_bytes < full_bytes
    assert mx.abs(half - full).max().item() < 1e-2 * mx.abs(full).max().item()


def test_recovery_bits_need_a_rank_that_groups_divide(shared_dir, tmp_path):
    with pytest.raises(SharpError, match="multiple of 32"):
        quantize_model_folder(shared_dir, tmp_path / "q", group_size=32, from_gguf="none", recovery_bits=8)
    assert not (tmp_path / "q").exists()


def test_evaluate_float_weights_is_the_same_function(shared_dir, tmp_path, capsys):
    """evaluate --float-weights runs a 4-bit folder with its weights' float values: the same perplexity."""
    from tiny_folder import write_char_tokenizer

    from sharp_mlx import evaluate

    write_char_tokenizer(shared_dir)
    out = tmp_path / "q"
    quantize_model_folder(shared_dir, out, group_size=32, from_gguf="none")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    ppl = {}
    for flag in ([], ["--float-weights"]):
        assert (
            evaluate.main(
                ["--model", str(out), "--data", str(text), "--seq-len", "32", "--eval-windows", "4", "--json", *flag]
            )
            == 0
        )
        ppl[bool(flag)] = json.loads(capsys.readouterr().out)[str(text)]["ppl"]
    assert ppl[True] == pytest.approx(ppl[False], rel=1e-3)


def test_recovery_group_size_is_chosen_or_refused():
    for asked, want in ((None, 64), (32, 32)):
        model, config = tiny_model(share=SHARE, rank=64, intermediate_size=128)
        _, q_config = quantize(model, config, bits=4, group_size=64, recovery_bits=6, recovery_group_size=asked)
        assert q_config["quantization"]["model.layers.3.recovery"] == {"group_size": want, "bits": 6, "mode": "affine"}
    model, config = tiny_model(share=SHARE, rank=32)
    with pytest.raises(SharpError, match="does not divide the recovery rank 32"):
        quantize(model, config, bits=4, group_size=64, recovery_bits=6, recovery_group_size=64)
