"""The command lines end to end: on the real model, on a small Hugging Face folder, and on bad input."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import ROOT, TINY, tiny_model
from tiny_folder import write_char_tokenizer, write_gguf

from sharp_mlx import convert, evaluate, generate


def run_module(module, *args, env=None):
    """Run ``python -m module args`` in a fresh process; (returncode, stdout, stderr)."""
    p = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    return p.returncode, p.stdout, p.stderr


def test_generate_cli_answers_and_times(real_model_dir, capsys):
    assert generate.main(["--model", str(real_model_dir), "--max-tokens", "24", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "Paris" in out["text"]
    for key in ("load_s", "ttft_s", "prompt_tps", "decode_tps", "peak_memory_gb", "model_bytes"):
        assert out[key] > 0, key
    assert out["model_bytes"] == 538_060_032  # 134.5M float32 parameters, the tied embedding once


def test_generate_cli_samples_reproducibly(real_model_dir, capsys):
    args = [
        "--model",
        str(real_model_dir),
        "--max-tokens",
        "12",
        "--temp",
        "0.9",
        "--top-p",
        "0.9",
        "--seed",
        "7",
        "--json",
    ]
    generate.main(args)
    first = json.loads(capsys.readouterr().out)["text"]
    generate.main(args)
    assert json.loads(capsys.readouterr().out)["text"] == first


def test_evaluate_cli_table_and_json(real_model_dir, capsys, tmp_path):
    prose = ROOT / "tests" / "fixtures" / "prose.txt"
    args = ["--model", str(real_model_dir), "--data", str(prose), "--seq-len", "64", "--eval-windows", "2"]
    assert evaluate.main(args + ["--json", "--plot", str(tmp_path / "p.png")]) == 0
    result = json.loads(capsys.readouterr().out)[str(prose)]
    assert result["tokens"] == 128 and 2 < result["ppl"] < 500
    assert (tmp_path / "p.png").stat().st_size > 1000
    evaluate.main(args)
    assert "64-token windows" in capsys.readouterr().out


def one_line_error(rc, out, err, *needles):
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_model_folder_is_one_line_error(tmp_path):
    one_line_error(*run_module("sharp_mlx.generate", "--model", tmp_path / "nope"), "does not exist")


def test_broken_model_folders_are_one_line_errors(tmp_path):
    model, config = tiny_model()
    from sharp_mlx import save

    good = save(tmp_path / "good", model, config)
    (tmp_path / "empty").mkdir()
    one_line_error(
        *run_module("sharp_mlx.evaluate", "--model", tmp_path / "empty", "--data", "x.txt"), "no config.json"
    )

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((good / "config.json").read_text())
    one_line_error(*run_module("sharp_mlx.generate", "--model", no_weights), "no model*.safetensors")

    truncated = tmp_path / "truncated"
    os.system(f"cp -r {good} {truncated}")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(*run_module("sharp_mlx.generate", "--model", truncated), "truncated or corrupt")

    mismatch = tmp_path / "mismatch"
    os.system(f"cp -r {good} {mismatch}")
    cfg = json.loads((mismatch / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (mismatch / "config.json").write_text(json.dumps(cfg))
    one_line_error(*run_module("sharp_mlx.generate", "--model", mismatch), "do not match")


def test_bad_flags_are_one_line_errors(real_model_dir):
    one_line_error(*run_module("sharp_mlx.generate", "--model", real_model_dir, "--max-tokens", "0"), "--max-tokens")
    one_line_error(*run_module("sharp_mlx.convert", "--source", "/no/such/file.gguf"), "neither a file")


def test_convert_refuses_to_overwrite(real_model_dir):
    one_line_error(*run_module("sharp_mlx.convert", "--out", real_model_dir), "--force")


def test_convert_hub_id_offline_is_clear(tmp_path):
    rc, out, err = run_module(
        "sharp_mlx.convert", "--source", "some-org/some-model", "--out", tmp_path / "m", env={"HF_HUB_OFFLINE": "1"}
    )
    one_line_error(rc, out, err, "could not download", "some-org/some-model")


def test_convert_rejects_non_llama_gguf(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, "gpt2")
    one_line_error(*run_module("sharp_mlx.convert", "--source", path, "--out", tmp_path / "m"), "'gpt2'", "Llama")


def test_convert_hugging_face_folder_matches_transformers(tmp_path):
    """A transformers-5 folder (rope_theta only inside rope_parameters) imports with the right rope."""
    torch = pytest.importorskip("torch", reason="torch==2.13.0 could not be installed here")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500.0}
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    write_char_tokenizer(tmp_path / "hf")  # an import copies the tokenizer: it refuses a folder without one
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_theta" not in saved  # the pitfall this test guards against

    out = convert.import_model(str(tmp_path / "hf"), tmp_path / "mlx")
    from sharp_mlx.io.checkpoint import load_model

    model, config = load_model(out)
    assert config["rope_theta"] == 500.0
    ids = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.array(model(mx.array(ids))) - ref).max() < 1e-4
