"""SFT of the recovery factors (sharp_mlx.recovery.sft) on tiny random models."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import tiny_model
from mlx.utils import tree_flatten

from sharp_mlx.data import batches as data
from sharp_mlx.errors import SharpError
from sharp_mlx.models.llama import Model, ModelArgs
from sharp_mlx.recovery import sft
from sharp_mlx.recovery.sft import SFTConfig, train_sft

SHARE = {3: 2, 5: 4}
RANK = 4


def shared(original, share=SHARE, rank=RANK, seed=1, scales=False):
    """A shared model holding the original's weights (fresh zero-B recovery on the targets)."""
    original, original_config = original
    mx.random.seed(seed)
    model = Model(
        ModelArgs.from_dict(
            {**original_config, "sharp": {"share": share, "rank": rank, "recovery": "scaled" if scales else "plain"}}
        )
    )
    weights = [
        (k, v)
        for k, v in tree_flatten(original.parameters())
        if not any(k.startswith(f"model.layers.{t}.mlp.") for t in share)
    ]
    model.load_weights(weights, strict=False)
    mx.eval(model.parameters())
    return model


@pytest.fixture
def original():
    return tiny_model()


@pytest.fixture
def tokens():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 101, 8 * 33 + 1).astype(np.int32)  # 8 windows of 32+1
    return train, np.ones_like(train), rng.integers(0, 101, 4 * 32 + 1).astype(np.int32)


def config(**kw):
    base = dict(
        steps=4,
        batch_size=2,
        seq_len=32,
        loss="ce",
        learning_rate=1e-2,
        warmup_steps=1,
        eval_every=2,
        eval_windows=2,
        save_every=2,
    )
    return SFTConfig(**{**base, **kw})


def flat(model):
    return dict(tree_flatten(model.parameters()))


def grads(model, cfg, start, teacher=None, seed=0):
    rng = np.random.default_rng(seed)
    inputs, targets = (mx.array(rng.integers(0, 101, (2, 16))) for _ in range(2))
    mask = mx.array(rng.integers(0, 2, (2, 16)).astype(np.float32))
    fn = nn.value_and_grad(model, lambda *a: sft.sft_loss(*a, config=cfg, start=start, teacher=teacher))
    (loss, _), g = fn(model, inputs, targets, mask)
    return loss, dict(tree_flatten(g))


@pytest.mark.parametrize("scales", [False, True])
def test_trains_only_recovery(original, tokens, tmp_path, scales):
    model = shared(original, scales=scales)
    assert sft.prepare(model, config()) == 3
    # gate, up: (64, r) + (r, 96); down: (96, r) + (r, 64); scaling vectors: in + out, one rank's worth
    per_target = 3 * (64 + 96) * (RANK + scales)
    assert sft.trainable_count(model) == per_target * len(SHARE)
    assert sum(k.endswith(("_in", "_out")) for k, _ in tree_flatten(model.trainable_parameters())) == (
        6 * len(SHARE) if scales else 0
    )
    model, messages = shared(original, scales=scales), []
    before = flat(model)
    summary = train_sft(model, *tokens, config(), tmp_path, log=messages.append)
    assert messages[0] == f"trainable parameters: {per_target * len(SHARE):,} (blocks 3..5)"
    after = flat(model)
    for name, value in before.items():
        if ".recovery." in name:  # A moves too, once B is no longer zero; so do the vectors
            assert not mx.array_equal(value, after[name]).item(), name
        else:
            assert mx.array_equal(value, after[name]), name
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert summary["tokens"] == 4 * 2 * 32 and summary["tokens_per_s"] > 0
    assert [s for s, _ in summary["valid_history"]] == [0, 2, 4]


def test_lora_with_checkpointing_and_accumulation(original, tokens, tmp_path):
    model = shared(original)
    cfg = config(lora_rank=2, grad_checkpoint=True, grad_accum=2, steps=2)
    assert sft.prepare(model, cfg) == 3
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert all(int(k.split(".")[2]) >= 3 for k in names)
    assert any("lora_a" in k for k in names) and any("recovery" in k for k in names)
    model = shared(original)
    summary = train_sft(model, *tokens, cfg, tmp_path, log=lambda s: None)
    assert all(math.isfinite(loss) for _, loss in summary["train_history"])
    x = mx.array(tokens[0][None, :32])
    before = model(x)
    sft.merge_lora(model)
    assert not any("lora" in k for k, _ in tree_flatten(model.parameters()))
    assert mx.allclose(model(x), before, atol=1e-4).item()


@pytest.mark.parametrize("share", [{3: None, 5: None}, {}])
def test_lora_fine_tunes_a_model_without_recovery(original, tokens, tmp_path, share):
    """The pruning baselines at a matched budget: MLP-pruned (rank-0 targets) or plain, LoRA only."""
    model = shared(original, share=share, rank=0)
    with pytest.raises(SharpError, match="--lora-rank"):
        sft.prepare(model, config())
    cfg = config(lora_rank=2, lora_layers=3)
    assert sft.prepare(model, cfg) == 3
    # q, k, v, o (64 -> 64, 64 -> 32 twice, 64 -> 64) and, where the block owns one, the MLP.
    attention = 2 * (2 * (64 + 64) + 2 * (64 + 32))
    mlp = 2 * (2 * (64 + 96) + (96 + 64))
    assert sft.trainable_count(model) == 3 * attention + sum(1 for i in (3, 4, 5) if i not in share) * mlp
    model = shared(original, share=share, rank=0)
    before = flat(model)
    summary = train_sft(model, *tokens, cfg, tmp_path, log=lambda s: None)
    assert all(math.isfinite(loss) for _, loss in summary["train_history"])
    after = flat(model)
    for name, value in after.items():
        if ".lora_b" in name:
            assert mx.abs(value).max().item() > 0, name  # trained from zero
        elif ".lora_a" not in name:
            assert mx.array_equal(value, before[name.replace(".linear.", ".")]).item(), name  # frozen


def test_loss_decreases_on_a_fixed_batch(original, tokens, tmp_path):
    model = shared(original, rank=8)
    train, mask, valid = tokens
    fixed = train[: 2 * 32 + 1]  # two windows: every batch is the same two
    summary = train_sft(
        model,
        fixed,
        mask[: len(fixed)],
        valid,
        config(steps=20, save_every=20, eval_every=20),
        tmp_path,
        log=lambda s: None,
    )
    losses = [loss for _, loss in summary["train_history"]]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize(
    "kw",
    [
        dict(loss="ce"),
        dict(loss="mix", kd_temperature=2.0),
        dict(loss="ce", grad_checkpoint=True),
        dict(loss="kd", lora_rank=2),
    ],
)
def test_frozen_prefix_gives_the_same_gradients(original, kw):
    teacher = original[0]
    model = shared(original)
    cfg = config(**kw)
    first = sft.prepare(model, cfg)
    assert first == 3
    for name, value in tree_flatten(model.trainable_parameters()):  # nonzero B: every factor gets a gradient
        if name.endswith("_b"):
            model.load_weights([(name, mx.random.normal(value.shape) * 0.1)], strict=False)
    plain_loss, plain = grads(model, config(**{**kw, "grad_checkpoint": False}), 0, teacher)
    loss, fast = grads(model, cfg, first, teacher)
    assert abs(loss.item() - plain_loss.item()) < 1e-5
    assert plain.keys() == fast.keys()
    for name in plain:
        assert mx.abs(plain[name]).max().item() > 0, name
        assert mx.allclose(plain[name], fast[name], atol=1e-6, rtol=1e-4).item(), name


def test_kd_is_zero_against_the_same_function(original):
    student = shared(original)
    direct = shared(original, rank=0)  # direct sharing: what a zero-B recovery computes
    cfg = config(loss="kd")
    first = sft.prepare(student, cfg)
    zero, _ = grads(student, cfg, first, direct)
    positive, _ = grads(student, cfg, first, original[0])
    assert abs(zero.item()) < 1e-6
    assert positive.item() > 1e-4


def test_resume_matches_an_uninterrupted_run(original, tokens, tmp_path, monkeypatch):
    cfg = config(steps=6, grad_accum=2, save_every=3, eval_every=3, loss="mix")
    full = shared(original)
    train_sft(full, *tokens, cfg, tmp_path / "full", teacher=original[0], log=lambda s: None)

    class Crash(Exception):
        pass

    save = sft.save_checkpoint

    def save_then_crash(out_dir, step, *args):
        save(out_dir, step, *args)
        if step == 3:
            raise Crash

    monkeypatch.setattr(sft, "save_checkpoint", save_then_crash)
    part = shared(original)
    with pytest.raises(Crash):
        train_sft(part, *tokens, cfg, tmp_path / "part", teacher=original[0], log=lambda s: None)
    monkeypatch.undo()
    with pytest.raises(SharpError, match="already holds"):
        train_sft(shared(original), *tokens, cfg, tmp_path / "part", teacher=original[0])
    with pytest.raises(SharpError, match="seed"):
        train_sft(
            shared(original),
            *tokens,
            config(steps=6, grad_accum=2, loss="mix", seed=1),
            tmp_path / "part",
            teacher=original[0],
            resume=True,
        )
    resumed = shared(original, seed=7)  # different initial A: the checkpoint must restore it
    messages = []
    summary = train_sft(resumed, *tokens, cfg, tmp_path / "part", teacher=original[0], resume=True, log=messages.append)
    assert messages[0] == f"trainable parameters: {sft.trainable_count(resumed):,} (blocks 3..5)"
    assert messages[1] == f"resumed {tmp_path / 'part'} at step 3"
    expected, got = flat(full), flat(resumed)
    for name in expected:
        assert mx.allclose(expected[name], got[name], atol=1e-6).item(), name
    assert [s for s, _ in summary["train_history"]] == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "part" / "checkpoint.json").read_text())["batch"] == 12


def test_non_finite_loss_stops_and_keeps_the_checkpoint(original, tokens, tmp_path, monkeypatch):
    def poisoned(*args, **kwargs):
        for i, (x, y, m) in enumerate(data.batches(*args, **kwargs)):
            yield x, y, m * math.nan if i == 4 else m  # the 5th micro-batch: step 5

    monkeypatch.setattr(sft, "batches", poisoned)
    with pytest.raises(SharpError, match="step 5.*step 4"):
        train_sft(shared(original), *tokens, config(steps=8), tmp_path, log=lambda s: None)
    state = json.loads((tmp_path / "checkpoint.json").read_text())
    assert state["step"] == 4
    saved = mx.load(str(tmp_path / state["adapters"]))
    assert all(mx.isfinite(v).all().item() for v in saved.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["checkpoint.json", "loss.png", state["adapters"], state["optimizer"]]
    )
    monkeypatch.undo()  # clean data and a lower learning rate: the run goes on from step 4
    summary = train_sft(
        shared(original), *tokens, config(steps=8, learning_rate=1e-3), tmp_path, resume=True, log=lambda s: None
    )
    assert [s for s, _ in summary["train_history"]] == list(range(1, 9))


def test_schedule_warms_up_then_decays():
    optimizer = sft.make_optimizer(SFTConfig(steps=10, warmup_steps=3, learning_rate=1.0, min_learning_rate=0.1))
    lrs = []
    for _ in range(10):
        optimizer.update({}, {})
        lrs.append(optimizer.learning_rate.item())  # the rate the update just used
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] > 0.1


def test_user_mistakes_raise_sharp_error(original, tokens, tmp_path):
    with pytest.raises(SharpError, match="teacher"):
        train_sft(shared(original), *tokens, config(loss="kd"), tmp_path)
    with pytest.raises(SharpError, match="unknown SFT loss"):
        train_sft(shared(original), *tokens, config(loss="mse"), tmp_path)
    with pytest.raises(SharpError, match="no recovery"):
        train_sft(tiny_model()[0], *tokens, config(), tmp_path)
    other, _ = tiny_model(seed=5)
    with pytest.raises(SharpError, match="differs from the student"):
        train_sft(shared(original), *tokens, config(loss="kd"), tmp_path, teacher=other)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_losses_match_their_textbook_forms(temperature):
    mx.random.seed(0)
    s, t = mx.random.normal((2, 5, 50)) * 3, mx.random.normal((2, 5, 50)) * 3
    targets = mx.random.randint(0, 50, (2, 5))

    def textbook_kl(s):
        log_p, log_q = nn.log_softmax(t / temperature), nn.log_softmax(s / temperature)
        return ((mx.exp(log_p) * (log_p - log_q)).sum(-1) * temperature**2).sum()

    pairs = [
        (lambda s: sft.kl_div(s, t, temperature).sum(), textbook_kl),
        (lambda s: sft.cross_entropy(s, targets).sum(), lambda s: nn.losses.cross_entropy(s, targets).sum()),
    ]
    for mine, reference in pairs:
        assert abs(mine(s).item() - reference(s).item()) < 1e-4
        assert mx.allclose(mx.grad(mine)(s), mx.grad(reference)(s), atol=1e-5).item()
    assert abs(sft.kl_div(t, t, temperature).sum().item()) < 1e-5
