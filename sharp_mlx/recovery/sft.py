"""Supervised fine-tuning (SFT), the second stage of SHARP: train the recovery factors end to end.

Only the recovery parameters are trained: the factors and, in a model with ``scales``, the
scaling vectors (optionally LoRA on the other linear layers from the first target on, with
mlx-lm's tuner). Keep ``weight_decay`` at 0 for scaling vectors: AdamW decays them towards 0,
not towards their neutral value 1. The loss is next-token cross-entropy (``ce``), distillation
from the frozen original model with KL(teacher || student) at temperature T (``kd``), or
``kd_alpha * kd + (1 - kd_alpha) * ce`` (``mix``).

Speed (a CPU step is mostly matmuls and exp over (B, L, vocab) logits):
- The blocks before the first trainable block are frozen, so ``frozen_prefix`` runs them under
  ``stop_gradient`` and starts the teacher from the same hidden states (its first blocks are the
  same), which saves the teacher's prefix; the validation windows' prefix is computed once per
  run. MLX's autodiff already leaves the prefix out of the backward pass (the gradient graph has
  the same size either way), so for ``ce`` alone this changes little.
- Losses take one exp over the logits each (see ``logsumexp`` and ``kl_div``).

Checkpoints in ``out_dir``: ``adapters-STEP.safetensors`` (trainable parameters),
``optimizer-STEP.safetensors`` and ``checkpoint.json`` (step, data position, RNG key, loss
history, config), each written to a temporary file and renamed; checkpoint.json is written last,
so it always names a complete checkpoint.

Data parallel under ``mx.distributed`` (``group`` of several processes, see
sharp_mlx.recovery.distributed): each process trains on its own slice of every global batch of
``batch_size * size`` windows, and the gradients are averaged across processes weighted by
their trained (unmasked) tokens, so the step equals one process's on the whole global batch.
Only rank 0 writes checkpoints, plots and logs. Resuming reads ``out_dir`` in every process.
"""

import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers
from tqdm import tqdm

from ..data.batches import DataError, batches, windows
from ..errors import SharpError
from ..io.integrity import first_nonfinite
from ..recipes import PAPER
from . import distributed
from .sft_checkpoint import CHECKPOINT, RESUME_FIXED, load_checkpoint, plot_losses, save_checkpoint  # noqa: F401

LOSSES = ("ce", "kd", "mix")


@dataclass
class SFTConfig:
    steps: int = PAPER.sft_steps  # optimizer steps
    batch_size: int = PAPER.batch_size  # windows per micro-batch
    seq_len: int = PAPER.seq_len  # tokens per window
    grad_accum: int = PAPER.grad_accum  # micro-batches per optimizer step
    learning_rate: float = (
        PAPER.learning_rate
    )  # peak, after warmup_steps (1e-3 undid an SLW start: valid 4.76 -> 5.02 in 20 steps)
    min_learning_rate: float = PAPER.min_learning_rate  # end of the cosine decay
    warmup_steps: int = PAPER.warmup_steps
    weight_decay: float = PAPER.weight_decay
    loss: str = PAPER.loss  # "ce", "kd" or "mix"
    kd_alpha: float = PAPER.kd_alpha  # weight of kd in "mix"
    kd_temperature: float = PAPER.kd_temperature
    lora_rank: int = PAPER.lora_rank  # > 0: also LoRA on the linear layers of the trained blocks
    lora_scale: float = PAPER.lora_scale  # mlx-lm's default
    lora_layers: Optional[int] = PAPER.lora_layers  # LoRA on the last N blocks; None: from the first target on
    grad_checkpoint: bool = PAPER.grad_checkpoint  # recompute each trained block in the backward pass
    frozen_prefix: bool = PAPER.frozen_prefix  # run blocks before the first trainable one without gradients
    eval_every: int = PAPER.valid_every
    eval_windows: int = PAPER.valid_windows  # validation windows of seq_len tokens
    save_every: int = PAPER.valid_every
    seed: int = PAPER.seed

    def validate(self) -> None:
        """Raise SharpError naming the first bad value."""
        if self.loss not in LOSSES:
            raise SharpError(f"unknown SFT loss {self.loss!r}: use one of {', '.join(LOSSES)}")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_windows", "save_every"):
            if getattr(self, name) < 1:
                raise SharpError(f"SFT {name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.kd_alpha <= 1:
            raise SharpError(f"kd_alpha must be between 0 and 1, got {self.kd_alpha}")
        if self.kd_temperature <= 0:
            raise SharpError(f"kd_temperature must be positive, got {self.kd_temperature}")
        if self.lora_rank < 0 or self.warmup_steps < 0 or self.learning_rate <= 0:
            raise SharpError(
                f"lora_rank and warmup_steps must be >= 0 and learning_rate > 0, got {self.lora_rank}, "
                f"{self.warmup_steps}, {self.learning_rate}"
            )


def trainable_count(model: nn.Module) -> int:
    """Number of trainable scalars (after ``prepare``: the recovery factors and any scaling
    vectors, and LoRA if asked)."""
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def prepare(model: nn.Module, config: SFTConfig) -> int:
    """Freeze everything but the recovery parameters (factors and any scaling vectors; and LoRA,
    if asked); return the first trainable block. Every recovery is trained, a reference's own
    (``reference_rank`` > 0) as well as the targets'; the stored MLP weights, W_s of a jointly
    fitted group included, stay frozen (LoRA on them aside)."""
    layers = model.model.layers
    targets = [i for i, layer in enumerate(layers) if "recovery" in layer]  # and recovered references
    if not targets and config.lora_rank <= 0:
        raise SharpError(
            "the model has no recovery factors to train: give its share map a rank > 0, or fine-tune it with LoRA "
            "(--lora-rank R)"
        )
    model.freeze()
    if config.lora_rank > 0:
        # By default LoRA covers the blocks from the first target on (every block without targets).
        n = config.lora_layers if config.lora_layers is not None else len(layers) - (targets[0] if targets else 0)
        lora = {"rank": config.lora_rank, "scale": config.lora_scale, "dropout": 0.0}
        linear_to_lora_layers(model, n, lora)
    for i in targets:
        layers[i].recovery.unfreeze()
    return min(i for i, layer in enumerate(layers) if tree_flatten(layer.trainable_parameters()))


def merge_lora(model: nn.Module) -> None:
    """Fold LoRA layers back into plain linear layers (after training with lora_rank > 0)."""
    merged = [(name, module.fuse()) for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    if merged:
        model.update_modules(tree_unflatten(merged))


def _checkpointed(i, layer, h, mask, cache, mlp) -> mx.array:
    """A block recomputed in the backward pass (a ``LlamaModel.run`` hook)."""
    # A target block runs its reference's MLP, so that MLP's trainable parameters (LoRA) are
    # inputs of the checkpoint too; an owned MLP is already among the block's.
    owners = [layer] if mlp is None or "mlp" in layer else [layer, mlp]

    def inner(params, h):
        for module, p in zip(owners, params):
            module.update(p)
        return layer(h, mask, mlp=mlp)

    return mx.checkpoint(inner)([m.trainable_parameters() for m in owners], h)


def run_blocks(
    model: nn.Module, h: mx.array, start: int, stop: Optional[int] = None, checkpoint: bool = False
) -> mx.array:
    """Hidden states (B, L, D) after blocks start..stop-1, from the hidden states entering ``start``."""
    return model.model.run(h, start, stop, hook=_checkpointed if checkpoint else None)


def prefix(model: nn.Module, inputs: mx.array, start: int) -> mx.array:
    """Hidden states entering block ``start``, constant for the gradient."""
    h = model.model.embed_tokens(inputs)
    return mx.stop_gradient(run_blocks(model, h, 0, start)) if start > 0 else h


def logsumexp(x: mx.array) -> mx.array:
    """logsumexp over the last axis whose gradient reuses the forward's exp (MLX's own recomputes
    it): exp over (B, L, vocab) logits is a large part of a training step on a CPU."""
    m = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    return mx.log(mx.exp(x - m).sum(axis=-1)) + m[..., 0]


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Next-token loss per position (B, L)."""
    return logsumexp(logits) - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def kl_div(student: mx.array, teacher: mx.array, temperature: float) -> mx.array:
    """KL(teacher || student) per position (B, L) of logits softened by T, scaled by T^2.

    With p = softmax(t), KL = sum p (t - s) + logsumexp(s) - logsumexp(t): one exp over each."""
    s, t = student / temperature, mx.stop_gradient(teacher) / temperature
    m = t.max(axis=-1, keepdims=True)
    e = mx.exp(t - m)
    z = e.sum(axis=-1, keepdims=True)
    log_z = mx.log(z[..., 0]) + m[..., 0]
    return ((e / z * (t - s)).sum(axis=-1) + logsumexp(s) - log_z) * temperature**2


def sft_loss(model, inputs, targets, mask, config: SFTConfig, start: int, teacher=None):
    """(mean loss over masked positions, their count) of a batch (B, L); differentiable in ``model``.

    ``start`` > 0 runs blocks before it without gradients (the frozen prefix), and the teacher
    continues from the same hidden states: its blocks before ``start`` equal the student's."""
    h = prefix(model, inputs, start)
    logits = model.head(run_blocks(model, h, start, checkpoint=config.grad_checkpoint)).astype(mx.float32)
    n = mask.sum()
    per_token = mx.zeros(mask.shape)
    if config.loss != "kd":
        ce = cross_entropy(logits, targets)
        per_token = per_token + (1 - config.kd_alpha if config.loss == "mix" else 1.0) * ce
    if config.loss != "ce":
        teacher_logits = teacher.head(run_blocks(teacher, h, start)).astype(mx.float32)
        kd = kl_div(logits, teacher_logits, config.kd_temperature)
        per_token = per_token + (config.kd_alpha if config.loss == "mix" else 1.0) * kd
    return (per_token * mask).sum() / mx.maximum(n, 1), n


def _check_teacher(model, teacher, start: int) -> None:
    """A teacher continues from the student's prefix, so their first blocks must be the same."""
    mine = tree_flatten(
        {"embed": model.model.embed_tokens.parameters(), "layers": [b.parameters() for b in model.model.layers[:start]]}
    )
    theirs = dict(
        tree_flatten(
            {
                "embed": teacher.model.embed_tokens.parameters(),
                "layers": [b.parameters() for b in teacher.model.layers[:start]],
            }
        )
    )
    for name, value in mine:
        if name not in theirs or theirs[name].shape != value.shape or not mx.array_equal(theirs[name], value).item():
            raise SharpError(
                f"the teacher's {name} differs from the student's: pass the original model the shared one was made "
                "from (or turn off frozen_prefix, --no-frozen-prefix)"
            )


class _Validator:
    """Mean next-token loss on the first ``eval_windows`` validation windows; prefixes computed once."""

    def __init__(self, model, valid_tokens, config: SFTConfig, start: int):
        wins = windows(valid_tokens, config.seq_len)[0][: config.eval_windows]
        if wins.shape[0] == 0:
            raise SharpError(
                f"the validation data ({len(valid_tokens)} tokens) is shorter than one window of {config.seq_len}+1 "
                "tokens: use more validation data or a smaller --seq-len"
            )
        self.model, self.start = model, start
        self.batches = []
        for i in range(0, wins.shape[0], config.batch_size):
            w = wins[i : i + config.batch_size]
            self.batches.append((prefix(model, w[:, :-1], start), w[:, 1:]))
            mx.eval(self.batches[-1])

    def __call__(self) -> float:
        total, count = 0.0, 0
        for h, targets in self.batches:
            logits = self.model.head(run_blocks(self.model, h, self.start))
            loss = cross_entropy(logits.astype(mx.float32), targets).sum()
            total += loss.item()
            count += targets.size
        return total / count


def make_optimizer(config: SFTConfig) -> optim.Optimizer:
    """AdamW with linear warmup to the peak learning rate, then cosine decay to the minimum."""
    schedule = optim.cosine_decay(
        config.learning_rate, max(config.steps - config.warmup_steps, 1), config.min_learning_rate
    )
    if config.warmup_steps > 0:  # from lr / (warmup + 1), so the first update already moves
        warmup = optim.linear_schedule(
            config.learning_rate / (config.warmup_steps + 1), config.learning_rate, config.warmup_steps
        )
        schedule = optim.join_schedules([warmup, schedule], [config.warmup_steps])
    return optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)


def _start(model, config: SFTConfig, out_dir: Path, teacher, resume: bool, size: int, log: Callable):
    """Checks, the trainable parameters and the optimizer, and the state to resume from:
    (first block run with gradients, optimizer, step, data position, train history, valid history)."""
    if config.loss != "ce" and teacher is None:
        raise SharpError(
            f"SFT loss {config.loss!r} distils from a teacher: pass the original (unshared) model, or use loss='ce'"
        )
    if not resume and (out_dir / CHECKPOINT).exists():
        raise SharpError(
            f"{out_dir} already holds an SFT checkpoint: pass --resume to continue it, or choose another --run-dir"
        )
    mx.random.seed(config.seed)
    first = prepare(model, config)
    log(f"trainable parameters: {trainable_count(model):,} (blocks {first}..{len(model.model.layers) - 1})")
    start = first if config.frozen_prefix else 0
    if teacher is not None:
        teacher.freeze()
        if start > 0:
            _check_teacher(model, teacher, start)
    optimizer = make_optimizer(config)
    optimizer.init(model.trainable_parameters())
    step, position, train_history, valid_history = 0, 0, [], []
    if resume:
        saved = load_checkpoint(out_dir, model, optimizer, config, size)
        step, position = saved["step"], saved["batch"]
        train_history, valid_history = ([tuple(p) for p in saved[k]] for k in ("train_history", "valid_history"))
        changed = {k: v for k, v in asdict(config).items() if saved["config"].get(k) != v}
        log(f"resumed {out_dir} at step {step}" + (f" with changed settings {changed}" if changed else ""))
    return start, optimizer, step, position, train_history, valid_history


def _stop_if_not_finite(what: str, value, step: int, out_dir: Path, kept: str, bar) -> None:
    """One line and a stop when a loss or a trained weight is no longer finite; the last finite checkpoint stays."""
    if value is None or (isinstance(value, float) and math.isfinite(value)):
        return
    bar.close()
    shown = f"trained weight {value} is not finite after step {step}" if what == "weight" else f"{what} is {value}"
    where = "" if what == "weight" else f" at step {step}"
    hint = "Lower learning_rate or check the data" if what == "training loss" else "Lower learning_rate"
    raise SharpError(f"{shown}{where}: stopped; {out_dir} keeps {kept}. {hint}")


def train_sft(model, train_tokens, train_mask, valid_tokens, config: SFTConfig, out_dir: Path, teacher=None,
              resume: bool = False, log: Callable[[str], None] = print, group=None) -> dict:  # fmt: skip
    """Fine-tune ``model`` in place (see the module docstring); return a summary of the run.

    ``group``: the ``mx.distributed`` group to train data-parallel in (None: this process alone)."""
    config.validate()
    out_dir = Path(out_dir)
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    main = rank == 0
    if not main:
        log = lambda line: None  # noqa: E731  (rank 0 speaks for all)
    start, optimizer, step, position, train_history, valid_history = _start(
        model, config, out_dir, teacher, resume, size, log
    )
    saved_step = step if resume else None
    validate = _Validator(model, valid_tokens, config, start)
    try:
        data = batches(
            train_tokens, train_mask, config.batch_size, config.seq_len, config.seed, start=position, shard=(rank, size)
        )
    except DataError as e:
        raise DataError(f"the training data: {e}")
    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * size
    if step == 0:
        valid_history.append((0, validate()))

    loss_and_grad = nn.value_and_grad(model, partial(sft_loss, config=config, start=start, teacher=teacher))
    state = [model.state, optimizer.state, mx.random.state]
    frozen = teacher.state if teacher is not None else {}

    @partial(mx.compile, inputs=[*state, frozen], outputs=state)
    def micro_step(inputs, targets, mask, grad, count, update: bool):
        (loss, n), g = loss_and_grad(model, inputs, targets, mask)
        grad = g if grad is None else tree_map(mx.add, grad, g)
        count = n if count is None else count + n
        if update:
            grad = tree_map(lambda x: x / config.grad_accum, grad)
            if size > 1:
                # Each process's gradient weighted by its trained tokens, as in one batch of them all.
                weight = count * size / mx.maximum(distributed.all_sum(count, group), 1)
                grad = nn.average_gradients(tree_map(lambda x: x * weight, grad), group)
            optimizer.update(model, grad)
            grad, count = None, None
        return loss, n, grad, count

    mx.reset_peak_memory()
    train_time, wall_start, first_step = 0.0, time.perf_counter(), step
    first_time = None  # the first step of this process also compiles it
    bar = tqdm(
        range(step + 1, config.steps + 1), initial=step, total=config.steps, desc="sft", unit="step", disable=not main
    )
    for step in bar:
        tic = time.perf_counter()
        grad, count, total, tokens = None, None, 0.0, 0.0
        for k in range(config.grad_accum):
            inputs, targets, mask = next(data)
            position += 1
            loss, n, grad, count = micro_step(inputs, targets, mask, grad, count, k == config.grad_accum - 1)
            mx.eval(state, loss, n, grad, count)
            total += loss.item()
            tokens += n.item()
        train_time += time.perf_counter() - tic
        first_time = train_time if first_time is None else first_time
        loss = total / config.grad_accum
        if size > 1:  # the mean over every process's trained tokens
            summed = distributed.all_sum(mx.array([loss * tokens, tokens]), group).tolist()
            loss = summed[0] / max(summed[1], 1.0)
        kept = "no checkpoint yet" if saved_step is None else f"the checkpoint of step {saved_step}"
        _stop_if_not_finite("training loss", loss, step, out_dir, kept, bar)
        diverged = first_nonfinite(tree_flatten(model.trainable_parameters()))  # finite loss, then this update
        _stop_if_not_finite("weight", diverged, step, out_dir, kept, bar)
        train_history.append((step, loss))
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{(step - first_step) * tokens_per_step / train_time:.0f}")
        if step % config.eval_every == 0 or step == config.steps:
            valid_history.append((step, validate()))
            _stop_if_not_finite("validation loss", valid_history[-1][1], step, out_dir, kept, bar)
            log(f"step {step}: train loss {loss:.4f}, valid loss {valid_history[-1][1]:.4f}")
        if step % config.save_every == 0 or step == config.steps:
            # A checkpoint is kept only of a model that still computes finite losses (weights of 1e30 are finite).
            checked = valid_history[-1][1] if valid_history[-1][0] == step else validate()
            _stop_if_not_finite("validation loss", checked, step, out_dir, kept, bar)
            if main:
                record = {"batch": position, "processes": size, "train_history": train_history,
                          "valid_history": valid_history, "config": asdict(config)}  # fmt: skip
                out_dir.mkdir(parents=True, exist_ok=True)
                save_checkpoint(out_dir, step, model, optimizer, record)
                plot_losses(out_dir / "loss.png", train_history, valid_history, tokens_per_step, config.loss)
            saved_step = step
    bar.close()
    return _summary(config, tokens_per_step, first_step, train_time, first_time, wall_start, size,
                    train_history, valid_history)  # fmt: skip


def _summary(
    config, tokens_per_step, first_step, train_time, first_time, wall_start, size, train_history, valid_history
):
    """What a run reports: losses, tokens, speed (also without the first step, which compiles), peak memory."""
    trained = (config.steps - first_step) * tokens_per_step
    return {
        "final_valid_loss": valid_history[-1][1],
        "best_valid_loss": min(v for _, v in valid_history),
        "tokens": config.steps * tokens_per_step,
        "processes": size,
        "tokens_per_s": trained / train_time if train_time else float("nan"),
        # without the first step, which also compiled the step function
        "steady_tokens_per_s": (trained - tokens_per_step) / (train_time - first_time)
        if first_time is not None and train_time > first_time
        else float("nan"),
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "wall_s": time.perf_counter() - wall_start,
        "train_history": train_history,
        "valid_history": valid_history,
    }
