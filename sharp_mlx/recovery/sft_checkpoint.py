"""SFT checkpoints: write them whole or not at all, read and check them, resume from them.

``adapters-STEP.safetensors`` (trainable parameters), ``optimizer-STEP.safetensors`` and
``checkpoint.json`` (step, data position, RNG key, loss history, config), each written to a
temporary file and renamed; checkpoint.json is written last, so it always names a complete
checkpoint. The loss curve is plotted beside them.
"""

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import SharpError
from ..io.outputs import is_write_error, write_error

CHECKPOINT = "checkpoint.json"
# Fields a resumed run must share with its checkpoint: they fix the data order and position and
# the set of trained parameters. Others may change (say, a lower learning rate after a blow-up);
# an unchanged config resumes to exactly the parameters of an uninterrupted run.
RESUME_FIXED = ("batch_size", "seq_len", "grad_accum", "seed", "lora_rank", "lora_scale", "lora_layers")


def _replace(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_write_error(e):  # a full or read-only disk: one line; the previous checkpoint is intact
            raise write_error(path, e) from e
        raise


def save_checkpoint(out_dir: Path, step: int, model, optimizer, state: dict) -> None:
    names = {"adapters": f"adapters-{step:07d}.safetensors", "optimizer": f"optimizer-{step:07d}.safetensors"}
    _replace(
        out_dir / names["adapters"],
        lambda p: mx.save_safetensors(str(p), dict(tree_flatten(model.trainable_parameters()))),
    )
    _replace(out_dir / names["optimizer"], lambda p: mx.save_safetensors(str(p), dict(tree_flatten(optimizer.state))))
    state = {**state, **names, "step": step, "rng": mx.random.state[0].tolist()}
    _replace(out_dir / CHECKPOINT, lambda p: p.write_text(json.dumps(state, indent=1)))
    for old in [*out_dir.glob("adapters-*.safetensors"), *out_dir.glob("optimizer-*.safetensors")]:
        if old.name not in names.values():
            old.unlink()


CHECKPOINT_KEYS = ("step", "batch", "config", "adapters", "optimizer", "rng", "train_history", "valid_history")


def read_checkpoint(path: Path) -> dict:
    """checkpoint.json, refused in one line if it is cut off or lacks a field."""
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SharpError(
            f"cannot resume: {path} is not valid JSON (cut off by a crash or a full disk?): start a new run in another "
            "--run-dir"
        )
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise SharpError(f"cannot resume: {path} lacks {missing[0]}: start a new run in another --run-dir")
    return state


def load_checkpoint(out_dir: Path, model, optimizer, config, processes: int = 1) -> dict:
    """Restore parameters, optimizer state and RNG key from out_dir; return checkpoint.json."""
    path = out_dir / CHECKPOINT
    if not path.exists():
        raise SharpError(
            f"cannot resume: {path} does not exist; start without --resume, or pass the --run-dir of an earlier run"
        )
    state = read_checkpoint(path)
    saved, wanted = state["config"], asdict(config)
    changed = [k for k in RESUME_FIXED if saved.get(k) != wanted[k]]
    if changed:
        raise SharpError(
            f"cannot resume {out_dir}: {', '.join(f'{k}={saved.get(k)!r}' for k in changed)} in its checkpoint, "
            f"{', '.join(f'{k}={wanted[k]!r}' for k in changed)} now; use the same settings"
        )
    if state.get("processes", 1) != processes:
        raise SharpError(
            f"cannot resume {out_dir}: it was trained by {state.get('processes', 1)} process(es), this run has "
            f"{processes}; resume with the same number (the global batch depends on it)"
        )
    for key in ("adapters", "optimizer"):
        if not (out_dir / state[key]).is_file():
            raise SharpError(
                f"cannot resume: {out_dir / state[key]} (named by {path}) is missing; restore it, or start a new run "
                "in another --run-dir"
            )
    try:
        params = mx.load(str(out_dir / state["adapters"]))
        optimizer_state = mx.load(str(out_dir / state["optimizer"]))
    except RuntimeError as e:
        raise SharpError(
            f"cannot resume: a checkpoint file in {out_dir} is unreadable ({str(e).splitlines()[0]}); start a new run "
            "in another --run-dir"
        )
    expected = {k for k, _ in tree_flatten(model.trainable_parameters())}
    if set(params) != expected:
        raise SharpError(
            f"{out_dir / state['adapters']} holds other parameters than this model trains: resume with the same model "
            "and share map"
        )
    model.load_weights(list(params.items()), strict=False)
    optimizer.state = tree_unflatten(list(optimizer_state.items()))
    key = state["rng"]
    mx.random.seed((key[0] << 32) | key[1])
    mx.eval(model.parameters(), optimizer.state)
    return state


def plot_losses(path: Path, train: list, valid: list, tokens_per_step: int, loss: str) -> None:
    """Training loss (``loss``: ce, kd or mix) and validation next-token loss against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, history, marker in ((f"train ({loss})", train, None), ("valid (next-token)", valid, "o")):
        if history:
            steps, losses = zip(*history)
            ax.plot(np.array(steps) * tokens_per_step, losses, label=name, marker=marker)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    _replace(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
