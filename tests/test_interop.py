"""mlx-lm's own tools open SHARP checkpoints, and fused exports open without custom code."""

import functools
import json
import sys
from typing import List, Tuple

import mlx.core as mx
import numpy as np
import pytest
from conftest import ROOT, TINY, run_tree, tiny_model
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load_model as mlx_lm_load_model
from test_model import TOKENS, randomize_recovery
from tiny_folder import write_char_tokenizer

import sharp_mlx
from sharp_mlx import fuse, generate
from sharp_mlx.errors import SharpError
from sharp_mlx.models.sharemap import share_model
from sharp_mlx.quant.codes import quantize_model_folder

PROMPT = "What is the capital of France?"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def sharp_dirs(real_model, real_model_dir, tmp_path_factory):
    """{"float": ..., "4bit": ...}: SmolLM2 sharing MLPs 27<-26 and 29<-28 with random recovery."""
    original, _ = real_model
    config = json.loads((real_model_dir / "config.json").read_text())
    model, config = share_model(original, config, {27: 26, 29: 28}, 8)
    mx.random.seed(3)
    for t in (27, 29):  # small enough that the answer stays sensible, large enough to matter
        rec = model.model.layers[t].recovery
        rec.update({k: 0.02 * mx.random.normal(v.shape) for k, v in rec.parameters().items() if k.endswith("_b")})
    root = tmp_path_factory.mktemp("interop")
    dirs = {"float": sharp_mlx.save(root / "float", model, config, tokenizer_from=real_model_dir)}
    dirs["4bit"] = quantize_model_folder(dirs["float"], root / "4bit")["out"]
    return dirs


@functools.lru_cache
def sharp_text(path) -> Tuple[List[int], str]:
    """(prompt ids, greedy text) of sharp_mlx on the raw prompt (no chat template: 4-bit
    matmuls are slow on CPU, and the short prompt keeps the test quick)."""
    model, tokenizer = sharp_mlx.load(path)
    prompt_ids = generate.prompt_tokens(tokenizer, PROMPT, chat=False)
    return prompt_ids, "".join(text for text, _ in generate.stream(model, tokenizer, prompt_ids, MAX_TOKENS))


@pytest.mark.parametrize("kind", ["float", "4bit"])
def test_mlx_lm_load_runs_the_sharp_model(sharp_dirs, kind):
    path = sharp_dirs[kind]
    theirs, tokenizer = mlx_lm_load(path, trust_remote_code=True)
    ours, _ = sharp_mlx.load(path)
    assert type(theirs).__module__ == "custom_model"  # the checkpoint's copy of sharp_mlx/models/llama.py
    assert "recovery" in theirs.model.layers[27] and "mlp" not in theirs.model.layers[27]
    prompt_ids, text = sharp_text(path)
    assert prompt_ids == tokenizer.encode(PROMPT)
    assert mx.array_equal(theirs(mx.array([prompt_ids])), ours(mx.array([prompt_ids])))
    pieces = [
        r.text
        for r in stream_generate(
            theirs, tokenizer, mx.array(prompt_ids), max_tokens=MAX_TOKENS, sampler=make_sampler(temp=0.0)
        )
    ]
    assert len(pieces) == MAX_TOKENS
    assert "".join(pieces) == text


def test_mlx_lm_generate_cli_gives_sharp_mlx_text(sharp_dirs):
    path = sharp_dirs["4bit"]
    cmd = [
        sys.executable,
        "-m",
        "mlx_lm",
        "generate",
        "--model",
        str(path),
        "--trust-remote-code",
        "--max-tokens",
        str(MAX_TOKENS),
        "--temp",
        "0",
        "--ignore-chat-template",
        "--prompt",
        PROMPT,
    ]
    p = run_tree(cmd, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    # mlx-lm prints "==========\n", the text, "\n==========" and its timings.
    text = p.stdout.split("=" * 10 + "\n", 1)[1].split("\n" + "=" * 10, 1)[0]
    assert text and text == sharp_text(path)[1]


def test_mlx_lm_loads_a_model_with_scaling_vectors(tmp_path):
    model, config = tiny_model(share={3: 2, 4: 2, 5: 2}, rank=4, scales=True)
    randomize_recovery(model)
    out = sharp_mlx.save(tmp_path / "sharp", model, config)
    theirs, their_config = mlx_lm_load_model(out, trust_remote_code=True)
    assert type(theirs).__module__ == "custom_model" and their_config["sharp"]["recovery"] == "scaled"
    assert "gate_in" in theirs.model.layers[3].recovery
    assert mx.array_equal(theirs(TOKENS), model(TOKENS))


@pytest.mark.parametrize("share, scales", [({3: 2, 4: 2, 5: None}, False), ({}, False), ({2: 1, 4: 3, 5: 3}, True)])
def test_fused_model_equals_sharp_model(tmp_path, share, scales):
    model, config = tiny_model(share=share, rank=4, scales=scales)
    randomize_recovery(model)
    src = sharp_mlx.save(tmp_path / "sharp", model, config)
    write_char_tokenizer(src)  # the command refuses a folder without a tokenizer
    assert fuse.main(["--model", str(src), "--out", str(tmp_path / "fused"), "--dtype", "float32"]) == 0
    out = tmp_path / "fused"
    on_disk = json.loads((out / "config.json").read_text())
    assert "sharp" not in on_disk and "model_file" not in on_disk
    stock, _ = mlx_lm_load_model(out)  # mlx-lm's own llama, no trust_remote_code
    assert type(stock).__module__ == "mlx_lm.models.llama"
    assert np.allclose(np.array(stock(TOKENS)), np.array(model(TOKENS)), atol=1e-4)


def test_fused_model_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    model, config = tiny_model(share={3: 2, 4: 2}, rank=4)
    randomize_recovery(model)
    out = fuse.fuse_folder(sharp_mlx.save(tmp_path / "sharp", model, config), tmp_path / "fused", dtype="float32")
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor(np.array(TOKENS))).logits.numpy()
    assert np.allclose(logits, np.array(model(TOKENS)), atol=1e-4)


@pytest.mark.parametrize("recovery_bits, scales", [(None, False), (8, False), (None, True), (8, True)])
def test_fuse_dequantizes_a_quantized_input(tmp_path, recovery_bits, scales):
    model, config = tiny_model(share={3: 2}, rank=32, scales=scales)
    randomize_recovery(model)
    src = sharp_mlx.save(tmp_path / "sharp", model, config)
    q = quantize_model_folder(src, tmp_path / "q", group_size=32, from_gguf="none", recovery_bits=recovery_bits)["out"]
    quantized, _ = sharp_mlx.io.checkpoint.load_model(q)
    fused, _ = fuse.fuse(quantized, config, dtype="float32")
    assert not any(k.endswith(".scales") for k, _ in tree_flatten(fused.parameters()))
    assert np.allclose(np.array(fused(TOKENS)), np.array(quantized(TOKENS)), atol=1e-4)


def test_fuse_refuses_non_finite_recovery(tmp_path):
    model, config = tiny_model(share={3: 2}, rank=4)
    model.model.layers[3].recovery.up_b = mx.full((4, TINY["intermediate_size"]), float("inf"))
    with pytest.raises(SharpError, match="non-finite"):
        fuse.fuse(model, config)
