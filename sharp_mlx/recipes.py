"""Named recipes: every budget of the main job in one dataclass, and the presets that set them.

    from sharp_mlx.recipes import PRESETS
    PRESETS["default"]   # 9 of 30 MLPs shared (targets chosen by damage), rank 64, the main job's budgets

``python -m sharp_mlx.pipeline --preset NAME`` runs one; each of its flags overrides one field.
``python -m sharp_mlx.train --preset NAME`` runs one stage of it (``slw_fields`` and ``sft_fields``
are the recipe's settings of each stage, the same for both commands).
"""

from dataclasses import dataclass, field, fields, replace
from typing import Optional

from .errors import SharpError


def option(default, help: str):
    return field(default=default, metadata={"help": help})


DAMAGE_TARGETS = '{"5": 4, "7": 6, "11": 10, "13": 12, "15": 14, "17": 16, "19": 18, "21": 20, "26": 25}'


@dataclass(frozen=True)
class Recipe:
    # The 9 targets with the least summed end-to-end damage after SLW, each alone, on validation text
    # (never the test splits), no two adjacent; SLW alone 2.05x against 2.30x at every other layer of 11:29.
    share: str = option(DAMAGE_TARGETS, "share map kind: next | next:K | auto | JSON map or file")
    layers: Optional[str] = option("11:29", "layer range A:B for next, next:K and auto")
    cut: Optional[float] = option(None, "stored-MLP fraction to remove, for --share auto")
    rank: int = option(64, "recovery rank per target")
    # The best point measured (experiments/results/slw_variants.md, sft_scaling.md): each borrowed weight scaled by
    # least-squares row and column vectors (zero allowed), fitted in sequence to the original's block outputs.
    recovery: str = option("scaled", "recovery kind: plain (W_r + B A) | scaled (diag(out) W_r diag(in) + B A)")
    scales_init: str = option("lsq", "scaled: vectors start at one | lsq (least squares, zero allowed)")
    slw_order: str = option("sequential", "SLW order: independent | sequential (on the model's own states)")
    slw_objective: str = option("block", "SLW objective: mlp | block (sequential: the original's block output)")
    tokens: int = option(16384, "SLW calibration tokens")
    slw_steps: int = option(50, "SLW Adam steps per layer")
    sft_steps: int = option(80, "SFT optimizer steps")  # 40,960 tokens: 1.76x against 1.84x at 20,480
    batch_size: int = option(2, "SFT windows per step")
    seq_len: int = option(256, "tokens per training and test window")
    sft_eval_every: int = option(20, "SFT validation and checkpoint every N steps")
    sft_eval_windows: int = option(8, "SFT validation windows")
    max_train_tokens: int = option(100_000, "SFT reads at most this many tokens of each training file")
    eval_windows: int = option(8, "test windows per domain in the perplexity table")
    recovery_bits: Optional[int] = option(8, "bits of the recovery factors in the 4-bit checkpoint (None: float16)")
    embedding_bits: Optional[int] = option(
        5, "bits of the embedding, fitted by GPTQ on the training splits (None: its GGUF codes)"
    )
    calibration_windows: int = option(8, "GPTQ calibration windows of 256 tokens per training file")
    max_tokens: int = option(128, "tokens each model generates at the end")

    @classmethod
    def help(cls, name: str) -> str:
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)


PRESETS = {
    "default": Recipe(),
    # the ~50% stored-MLP setting (18 targets) and the ~65% one (21 targets at rank 32)
    "half": Recipe(share="next:2", layers="2:29"),
    "aggressive": Recipe(share="next:3", layers="1:29", rank=32),
    # the earlier default's targets: every other layer of 11:29 borrows the one before
    "every-other": Recipe(share="next"),
    # every stage at the smallest budget that still runs it: a check that the path works, not a model
    "smoke": Recipe(
        share="next",
        layers="26:29",
        rank=32,
        tokens=256,
        slw_steps=2,
        sft_steps=1,
        batch_size=1,
        seq_len=32,
        sft_eval_every=1,
        sft_eval_windows=1,
        max_train_tokens=2000,
        eval_windows=1,
        calibration_windows=1,
        max_tokens=4,
    ),
}


def preset(name: str, **overrides) -> Recipe:
    """The named preset with the given fields replaced."""
    if name not in PRESETS:
        raise SharpError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def slw_fields(r: Recipe) -> dict:
    """The ``train.SLWRun`` fields the recipe sets; its layer range only where its share map takes one."""
    layers = r.layers if r.share.startswith("next") else None
    names = ("share", "cut", "rank", "recovery", "scales_init", "slw_order", "slw_objective", "tokens", "slw_steps")
    return {"layers": layers, "seq_len": r.seq_len, **{n: getattr(r, n) for n in names}}


def sft_fields(r: Recipe) -> dict:
    """The ``sft.SFTConfig`` fields the recipe sets (checkpoints as often as validation)."""
    return dict(
        steps=r.sft_steps,
        batch_size=r.batch_size,
        seq_len=r.seq_len,
        eval_every=r.sft_eval_every,
        save_every=r.sft_eval_every,
        eval_windows=r.sft_eval_windows,
    )
