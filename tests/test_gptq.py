"""GPTQ for the tied embedding: MLX's packing, what the algorithm minimises, and the quantize plumbing."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny_folder import write_text_data, write_tiny_model

from sharp_mlx.errors import SharpError
from sharp_mlx.io.checkpoint import load, load_model
from sharp_mlx.quant.codes import BITS, options_record, quantize_model_folder
from sharp_mlx.quant.gptq import gptq, gptq_codes, output_hessian, pack
from sharp_mlx.quantize import main


@pytest.mark.parametrize("bits", BITS)
def test_pack_is_mlx_packing(bits):
    w = mx.random.normal((8, 128), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(w, 64, bits)
    deq = np.array(mx.dequantize(packed, scales, biases, group_size=64, bits=bits))
    codes = np.round((deq - np.repeat(np.array(biases), 64, 1)) / np.repeat(np.array(scales), 64, 1))
    assert np.array_equal(pack(codes, bits), np.array(packed))


def output_error(w, w_hat, h):
    d = (w - w_hat).astype(np.float64)
    return float(np.einsum("ri,ij,rj->", d, h, d))


def anisotropic_inputs(n=512, dims=64, seed=0):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dims, dims)))[0]
    return rng.normal(size=(n, dims)) @ np.diag(np.logspace(0, -2, dims)) @ basis


def test_gptq_codes_dequantize_to_their_affine_values_and_beat_rounding_on_the_outputs():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(48, 64)).astype(np.float32)
    x = anisotropic_inputs()
    h = x.T @ x
    packed, scales, biases = gptq_codes(mx.array(w), h, 3, 32)
    assert scales.dtype == biases.dtype == mx.float16
    w_gptq = np.array(
        mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size=32, bits=3)
    )
    codes, s, b = gptq(w, h, 3, 32)
    assert codes.min() >= 0 and codes.max() <= 7
    affine = np.repeat(s.astype(np.float32), 32, 1) * codes + np.repeat(b.astype(np.float32), 32, 1)
    np.testing.assert_allclose(w_gptq, affine, rtol=1e-6, atol=1e-6)
    w_round = np.array(mx.dequantize(*mx.quantize(mx.array(w), 32, 3), group_size=32, bits=3))
    # The outputs W x move much less; the weights themselves move more (the error went where x is small).
    assert output_error(w, w_gptq, h) < 0.5 * output_error(w, w_round, h)
    assert np.abs(w - w_gptq).mean() > np.abs(w - w_round).mean()


def test_gptq_with_uncorrelated_inputs_is_rounding_to_nearest():
    w = np.random.default_rng(2).normal(size=(16, 64))
    codes, s, b = gptq(w, np.eye(64), 4, 32, damp=0.0)
    s, b = np.repeat(s.astype(np.float64), 32, 1), np.repeat(b.astype(np.float64), 32, 1)
    assert np.array_equal(codes, np.clip(np.round((w - b) / s), 0, 15))


def test_gptq_refuses_a_row_length_the_group_does_not_divide():
    with pytest.raises(SharpError, match="multiple of the group size"):
        gptq(np.zeros((4, 48)), np.eye(48), 4, 32)


@pytest.fixture
def calibrated(tmp_path):
    folder = write_tiny_model(tmp_path / "float", share={3: 2}, rank=4)
    data = write_text_data(tmp_path / "calib.jsonl", records=60)
    return folder, data


def test_quantize_fits_the_tied_embedding_by_gptq_on_the_calibration_text(calibrated, tmp_path, capsys):
    folder, data = calibrated
    assert (
        main(
            [
                "--model",
                str(folder),
                "--out",
                str(tmp_path / "q"),
                "--bits",
                "8",
                "--group-size",
                "32",
                "--from-gguf",
                "none",
                "--embedding-bits",
                "3",
                "--calibration",
                str(data),
                "--calibration-windows",
                "2",
            ]
        )
        == 0
    )
    assert "fitted by GPTQ on 2 windows of each of 1 files" in capsys.readouterr().out
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 3, "mode": "affine"}
    assert config["sharp_quantize"] == options_record(
        bits=8, group_size=32, embedding_bits=3, calibration=[data], calibration_windows=2
    )
    assert config["sharp_quantize"]["embedding_fit"] == "gptq"
    # The stored codes are GPTQ's for the Hessian of the float model's final hidden states.
    model, tokenizer = load(folder)
    expected = gptq_codes(model.model.embed_tokens.weight, output_hessian(model, tokenizer, [data], 2), 3, 32)
    saved = mx.load(str(tmp_path / "q" / "model.safetensors"))
    for key, want in zip(("weight", "scales", "biases"), expected):
        assert mx.array_equal(saved[f"model.embed_tokens.{key}"], want)
    quantized, _ = load_model(tmp_path / "q")
    assert quantized.model.embed_tokens.bits == 3
    assert not any(k.endswith("scales") for k, _ in tree_flatten(quantized.model.layers[3].recovery.parameters()))


def test_calibration_needs_embedding_bits_and_existing_files(calibrated, tmp_path):
    folder, data = calibrated
    with pytest.raises(SharpError, match="pass --embedding-bits"):
        quantize_model_folder(folder, tmp_path / "q", calibration=[data])
    with pytest.raises(SharpError, match="does not exist"):
        quantize_model_folder(folder, tmp_path / "q", embedding_bits=4, calibration=[tmp_path / "missing.jsonl"])
    with pytest.raises(SharpError, match="fewer than 256 tokens"):
        short = tmp_path / "short.txt"
        short.write_text("too short")
        quantize_model_folder(
            folder, tmp_path / "q", group_size=32, from_gguf="none", embedding_bits=4, calibration=[short]
        )
    assert not (tmp_path / "q").exists()
