"""Every default of the training commands, in one dataclass, and the named presets that set them.

    from sharp_mlx.recipes import PRESETS
    PRESETS["default"]   # the main job: 9 of 30 MLPs shared (targets chosen by damage), rank 64
    PRESETS["paper"]     # SHARP as the paper describes it: what a bare `python -m sharp_mlx.train` runs

Each field holds its default, its help and its valid range, once. ``python -m sharp_mlx.pipeline
--preset NAME`` runs a recipe (default: ``default``) and ``python -m sharp_mlx.train --stage slw|sft
--preset NAME`` one stage of it (default: ``paper``); both commands' flags are generated from these
fields by ``sharp_mlx.options``, and each flag given overrides one field. The library's configs
(``SLWConfig``, ``SFTConfig``) take their defaults from ``PAPER``.
"""

import math
from dataclasses import dataclass, field, fields, replace
from typing import Optional

from .errors import SharpError


def option(default, help: str, lo=None, hi=None, choices=None, lo_open: bool = False):
    """A recipe field: its default, help and valid range ([lo, hi]; ``lo_open``: lo itself excluded)."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open})


DAMAGE_TARGETS = '{"5": 4, "7": 6, "11": 10, "13": 12, "15": 14, "17": 16, "19": 18, "21": 20, "26": 25}'
BITS = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class Recipe:
    # --- the share map (SLW builds the shared model from it)
    share: str = option("next", "share map: next | next:K | auto | a JSON map or file")
    layers: Optional[str] = option("11:29", "layer range A:B for next, next:K and auto")
    cut: Optional[float] = option(None, "stored-MLP fraction to remove, for --share auto", 0, 1, lo_open=True)
    references: str = option("adjacent", "--share auto: the layer before each target, or any earlier one", None, None,
                             ("adjacent", "any"))  # fmt: skip
    rank: int = option(64, "recovery rank per target", 1)
    rank_allocation: str = option("uniform", "uniform: --rank everywhere; sensitivity: the same total split by damage",
                                  None, None, ("uniform", "sensitivity"))  # fmt: skip
    baseline: str = option(
        "sharp", "what the targets get: sharp, or a baseline (direct, mlp-prune, layer-prune, lowrank)"
    )
    recovery: str = option("plain", "recovery kind: plain (W_r + B A) | scaled (diag(out) W_r diag(in) + B A)")
    reference_rank: int = option(0, "> 0: references get factors too and the stored weight is fitted jointly", 0)
    # --- Single Layer Warmup
    tokens: int = option(32768, "SLW calibration tokens", 1)
    seq_len: int = option(256, "tokens per training, calibration and test window", 2)
    seed: int = option(0, "random seed", 0)
    init: str = option("asvd", "SLW factor start: zero | svd | asvd (the borrowed MLP as it is is always a candidate)",
                       None, None, ("zero", "svd", "asvd"))  # fmt: skip
    closed_form: bool = option(True, "fit the down projection exactly before Adam")
    slw_steps: int = option(100, "SLW Adam steps per target (0: the closed-form fits only)", 0)
    slw_lr: float = option(1e-3, "SLW Adam learning rate", 0, 1, lo_open=True)
    slw_batch_rows: int = option(1024, "token rows per SLW Adam step", 1)
    scales_init: str = option("ones", "scaled: vectors start at one | lsq (least squares, zero allowed)", None, None,
                              ("ones", "lsq"))  # fmt: skip
    slw_order: str = option("independent", "SLW order: independent | sequential (on the model's own states)", None,
                            None, ("independent", "sequential"))  # fmt: skip
    slw_objective: str = option("mlp", "SLW objective: mlp | block (sequential: the original's block output)", None,
                                None, ("mlp", "block"))  # fmt: skip
    # --- supervised fine-tuning
    sft_steps: int = option(200, "SFT optimizer steps", 1)
    batch_size: int = option(4, "SFT windows per micro-batch", 1)
    grad_accum: int = option(1, "SFT micro-batches per optimizer step", 1)
    # 1e-3 undid an SLW start: validation loss 4.76 -> 5.02 in 20 steps
    learning_rate: float = option(1e-4, "SFT peak learning rate, reached after the warmup", 0, 1, lo_open=True)
    min_learning_rate: float = option(1e-5, "SFT learning rate at the end of the cosine decay", 0, 1)
    warmup_steps: int = option(4, "SFT linear warmup steps", 0)
    weight_decay: float = option(0.0, "SFT AdamW weight decay", 0, 1)
    loss: str = option("kd", "SFT loss: kd (distil from the original), ce (next token) or mix", None, None,
                       ("kd", "ce", "mix"))  # fmt: skip
    kd_alpha: float = option(0.5, "weight of kd in the mix loss", 0, 1)
    kd_temperature: float = option(1.0, "distillation temperature", 0, 100, lo_open=True)
    lora_rank: int = option(0, "> 0: also LoRA of this rank on the linear layers of the trained blocks", 0)
    lora_scale: float = option(20.0, "LoRA scale", 0, 1e4, lo_open=True)
    lora_layers: Optional[int] = option(None, "LoRA on the last N blocks (none: from the first target on)", 1)
    grad_checkpoint: bool = option(False, "recompute each trained block in the backward pass (less memory)")
    frozen_prefix: bool = option(True, "run the blocks before the first target without gradients")
    valid_every: int = option(50, "SFT validation and checkpoint every N steps", 1)
    valid_windows: int = option(16, "SFT validation windows", 1)
    max_train_tokens: Optional[int] = option(None, "SFT reads at most this many tokens of each training file", 1)
    # --- evaluation, 4-bit checkpoint, generation
    eval_windows: int = option(8, "test windows per domain in the perplexity table", 1)
    recovery_bits: Optional[int] = option(8, "bits of the recovery factors in the 4-bit checkpoint (none: float16)",
                                          None, None, BITS)  # fmt: skip
    embedding_bits: Optional[int] = option(5, "bits of the embedding, fitted by GPTQ on the training splits (none: "
                                           "its GGUF codes)", None, None, BITS)  # fmt: skip
    calibration_windows: int = option(8, "GPTQ calibration windows of 256 tokens per training file", 1)
    max_tokens: int = option(128, "tokens each model generates at the end", 1)

    def __post_init__(self):
        for f in fields(self):
            check(f.name, getattr(self, f.name))

    @classmethod
    def help(cls, name: str) -> str:
        return FIELDS[name].metadata["help"]


FIELDS = {f.name: f for f in fields(Recipe)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(name: str, value) -> None:
    """Raise a one-line SharpError if ``value`` is outside the range of recipe field ``name``."""
    m = FIELDS[name].metadata
    if value is None:
        return
    if m["choices"] is not None and value not in m["choices"]:
        raise SharpError(f"{flag(name)} {value} is not one of {', '.join(map(str, m['choices']))}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SharpError(f"{flag(name)} {value} is not a finite number")
    lo, hi = m["lo"], m["hi"]
    if (lo is not None and (value < lo or (m["lo_open"] and value == lo))) or (hi is not None and value > hi):
        low = f"> {lo}" if m["lo_open"] else f">= {lo}"
        want = f"{low} and <= {hi}" if hi is not None else low
        raise SharpError(f"{flag(name)} {value} is out of range: it must be {want}")


PAPER = Recipe()
PRESETS = {
    # SHARP as the paper describes it: every other layer of 11:29 borrows the one before, plain recovery
    # fitted independently on the original's inputs, then SFT. What `train` runs without --preset.
    "paper": PAPER,
    # The main job. The 9 targets with the least summed end-to-end damage after SLW, each alone, on validation
    # text, no two adjacent; each borrowed weight scaled by least-squares vectors (zero allowed), fitted in
    # sequence to the original's block outputs (experiments/results/slw_variants.md, sft_scaling.md).
    "default": replace(
        PAPER,
        share=DAMAGE_TARGETS,
        layers=None,  # the map names its layers
        recovery="scaled",
        scales_init="lsq",
        slw_order="sequential",
        slw_objective="block",
        tokens=16384,
        slw_steps=50,
        sft_steps=80,  # 40,960 tokens: 1.76x against 1.84x at 20,480
        batch_size=2,
        valid_every=20,
        valid_windows=8,
        max_train_tokens=100_000,
    ),
}
# the earlier default's targets: every other layer of 11:29 borrows the one before
PRESETS["every-other"] = replace(PRESETS["default"], share="next", layers="11:29")
# the ~50% stored-MLP setting (18 targets) and the ~65% one (21 targets at rank 32)
PRESETS["half"] = replace(PRESETS["default"], share="next:2", layers="2:29")
PRESETS["aggressive"] = replace(PRESETS["default"], share="next:3", layers="1:29", rank=32)
# every stage at the smallest budget that still runs it: a check that the path works, not a model
PRESETS["smoke"] = replace(
    PRESETS["default"],
    share="next",
    layers="26:29",
    rank=32,
    tokens=256,
    slw_steps=2,
    sft_steps=1,
    batch_size=1,
    seq_len=32,
    valid_every=1,
    valid_windows=1,
    max_train_tokens=2000,
    eval_windows=1,
    calibration_windows=1,
    max_tokens=4,
)


def preset(name: str, **overrides) -> Recipe:
    """The named preset with the given fields replaced (each checked against its range)."""
    if name not in PRESETS:
        raise SharpError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


SLW_FIELDS = ("share", "layers", "cut", "references", "rank", "rank_allocation", "baseline", "recovery",
              "reference_rank", "tokens", "seq_len", "seed", "init", "closed_form", "slw_steps", "slw_lr",
              "slw_batch_rows", "scales_init", "slw_order", "slw_objective")  # fmt: skip
SFT_FIELDS = ("sft_steps", "batch_size", "seq_len", "seed", "grad_accum", "learning_rate", "min_learning_rate",
              "warmup_steps", "weight_decay", "loss", "kd_alpha", "kd_temperature", "lora_rank", "lora_scale",
              "lora_layers", "grad_checkpoint", "frozen_prefix", "valid_every", "valid_windows",
              "max_train_tokens")  # fmt: skip
