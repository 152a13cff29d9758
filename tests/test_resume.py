"""SFT killed with SIGKILL mid-run resumes with --resume to the parameters of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import pytest
from conftest import ROOT
from tiny_folder import write_text_data, write_tiny_model

from sharp_mlx import train

STEPS, SAVE_EVERY = 60, 5


def sft_args(tmp_path, name):
    return [
        "--stage",
        "sft",
        "--model",
        tmp_path / "shared",
        "--out",
        tmp_path / name,
        "--run-dir",
        tmp_path / f"run-{name}",
        "--data",
        tmp_path / "train.jsonl",
        "--valid",
        tmp_path / "train.jsonl",
        "--loss",
        "ce",
        "--sft-steps",
        STEPS,
        "--batch-size",
        2,
        "--seq-len",
        32,
        "--learning-rate",
        1e-2,
        "--valid-every",
        20,
        "--valid-windows",
        2,
        "--seed",
        3,
    ]


def weights(folder):
    return mx.load(str(folder / "model.safetensors"))


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    write_tiny_model(tmp_path / "shared", share={3: 2, 5: 4}, rank=4)
    write_text_data(tmp_path / "train.jsonl")

    killed = subprocess.Popen(
        [sys.executable, "-m", "sharp_mlx.train", *map(str, sft_args(tmp_path, "part"))],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = tmp_path / "run-part" / "checkpoint.json"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    saved = json.loads(checkpoint.read_text())["step"]
    assert 0 < saved < STEPS and saved % SAVE_EVERY == 0
    assert not (tmp_path / "part").exists()  # the model folder is written only at the end

    assert train.main(list(map(str, sft_args(tmp_path, "part") + ["--resume"]))) == 0
    out = capsys.readouterr().out
    assert f"resumed {tmp_path / 'run-part'} at step {saved}" in out  # fewer than SAVE_EVERY steps redone
    assert train.main(list(map(str, sft_args(tmp_path, "full")))) == 0

    full, part = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert full.keys() == part.keys()
    moved = [k for k in full if ".recovery." in k and k.endswith("_b")]
    assert moved and all(mx.abs(full[k]).max().item() > 0 for k in moved)
    for k in full:
        assert mx.allclose(full[k], part[k], atol=1e-5, rtol=1e-4).item(), k
    history = [
        json.loads((tmp_path / n / "training.json").read_text())[-1]["summary"]["train_history"]
        for n in ("full", "part")
    ]
    assert [s for s, _ in history[1]] == list(range(1, STEPS + 1))
    assert [v for _, v in history[1]] == pytest.approx([v for _, v in history[0]], rel=1e-4)


def test_resume_needs_the_same_number_of_processes(tmp_path):
    """The global batch is batch_size x processes, so the data position means nothing to another count."""
    import numpy as np
    from conftest import tiny_model

    from sharp_mlx.errors import SharpError
    from sharp_mlx.models.sharemap import share_model
    from sharp_mlx.recovery import sft

    original, config = tiny_model()
    cfg = sft.SFTConfig(steps=2, batch_size=2, seq_len=16, loss="ce", eval_windows=1, save_every=1)
    tokens = np.random.default_rng(0).integers(0, 101, 8 * 16 + 1).astype(np.int32)
    sft.train_sft(
        share_model(original, config, {3: 2}, 2)[0],
        tokens,
        np.ones_like(tokens),
        tokens,
        cfg,
        tmp_path,
        log=lambda s: None,
    )
    model = share_model(original, config, {3: 2}, 2)[0]
    sft.prepare(model, cfg)
    optimizer = sft.make_optimizer(cfg)
    assert sft.load_checkpoint(tmp_path, model, optimizer, cfg)["processes"] == 1
    with pytest.raises(SharpError, match="trained by 1 process"):
        sft.load_checkpoint(tmp_path, model, optimizer, cfg, processes=2)
