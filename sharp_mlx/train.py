"""Recover a shared model: Single Layer Warmup (SLW), then supervised fine-tuning (SFT).

    python -m sharp_mlx.train --stage slw --model models/smollm2-135m-instruct \\
        --share next --layers 14:30 --rank 64 --out models/sharp-slw
    python -m sharp_mlx.train --stage sft --model models/sharp-slw \\
        --teacher models/smollm2-135m-instruct --out models/sharp

``--stage slw`` starts from the original model: it builds the shared model from the share map,
captures each target's real MLP inputs on calibration text and fits the recovery factors.
``--stage sft`` fine-tunes a shared model's recovery factors end to end.
``--preset NAME`` takes every setting of the stage from the main job's recipe (``sharp_mlx.recipes``;
``--preset default`` is what ``python -m sharp_mlx.pipeline`` runs); the flags given override it.
Without it the defaults are SHARP as the paper describes it: plain recovery, fitted independently.
``--baseline`` builds the comparison models at the same targets instead of SHARP:
direct (borrow, no recovery), mlp-prune (no MLP at the targets), layer-prune (no target
layers at all), lowrank (the control: recovery factors with no borrowed weights).
``--recovery scaled`` (or ``--scales``) gives each SHARP target a row and a column scaling
vector per borrowed weight besides its factors (W_t ~= diag(out) W_r diag(in) + B A); one rank's
worth of parameters, so ``--rank 63 --recovery scaled`` stores as much as ``--rank 64``.
"""

import argparse
import json
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from . import corpora, distributed, sharemap
from .capture import StudentInputs, calibration_text, capture_mlp_inputs
from .checkpoint import atomic_dir, copy_tokenizer, load, read_config, write_model
from .data import load_tokens
from .errors import ArgumentParser, SharpError, cli
from .joint import run_joint
from .model import RECOVERY_KINDS, SharpArgs
from .recipes import PRESETS, sft_fields, slw_fields
from .sft import SFTConfig
from .slw import SLWConfig, run_slw

SFT_HELP = {  # the flags' help; their defaults live on sft.SFTConfig's fields
    "steps": "optimizer steps",
    "batch_size": "windows per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "learning_rate": "peak learning rate, reached after the warmup",
    "min_learning_rate": "learning rate at the end of the cosine decay",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay",
    "loss": "kd (distil from --teacher), ce (next token) or mix",
    "kd_alpha": "weight of kd in the mix loss",
    "kd_temperature": "distillation temperature",
    "lora_rank": "> 0: also LoRA of this rank on the linear layers of the trained blocks",
    "lora_scale": "LoRA scale",
    "lora_layers": "LoRA on the last N blocks (default: from the first target on)",
    "grad_checkpoint": "recompute each trained block in the backward pass (less memory)",
    "frozen_prefix": "run the blocks before the first target without gradients",
    "eval_every": "validate every N steps",
    "eval_windows": "validation windows",
    "save_every": "checkpoint every N steps",
}
DEFAULT_LAYERS = "14:30"


@dataclass
class SLWRun:
    """``--stage slw``: build a shared model (or a baseline) from the original and warm it up."""

    model: Path  # the original (unshared) model folder
    out: Path
    share: str = "next"  # next | next:K | auto | JSON map or file
    layers: Optional[str] = None  # A:B for next, next:K and auto (None: DEFAULT_LAYERS)
    cut: Optional[float] = None  # stored-MLP fraction to remove, for auto
    analysis: Optional[Path] = None  # for auto (None: runs/analyze/analysis.json)
    references: str = "adjacent"  # auto: adjacent or any earlier layer
    rank: int = 64
    rank_allocation: str = "uniform"  # or sensitivity
    baseline: str = "sharp"  # a name in sharemap.BASELINES
    recovery: str = "plain"  # a name in model.RECOVERY_KINDS
    reference_rank: int = 0  # > 0: references get their own factors and the stored weight is fitted jointly
    data: Optional[List[Path]] = None  # calibration files (None: data/*/train.jsonl)
    tokens: int = 32768  # calibration tokens
    seq_len: int = 256
    seed: int = 0
    init: str = "asvd"
    no_closed_form: bool = False
    slw_steps: int = 100
    slw_lr: float = 1e-3
    scales_init: str = "ones"  # recovery scaled: vectors start at one, or by least squares (lsq)
    slw_order: str = "independent"  # or sequential: each target's inputs from the model with the earlier ones fitted
    slw_objective: str = "mlp"  # or block: in sequence, fit what makes the block's output the original's
    slw_batch_rows: int = SLWConfig.batch_rows
    no_slw: bool = False  # fresh factors only (the SFT-only baseline)
    cache_dir: Optional[Path] = None


@dataclass
class SFTRun:
    """``--stage sft``: fine-tune a shared model's recovery end to end."""

    model: Path  # a shared model folder
    out: Path
    sft: SFTConfig
    teacher: Optional[Path] = None  # the original, for distillation
    data: Optional[List[Path]] = None  # training files (None: data/*/train.jsonl)
    valid: Optional[List[Path]] = None  # validation files (None: data/*/valid.jsonl)
    max_train_tokens: Optional[int] = None  # of each training file
    run_dir: Optional[Path] = None  # checkpoints and loss curve (None: runs/<out name>)
    resume: bool = False


def default_data(split: str) -> list:
    files = corpora.files(split)
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise SharpError(
            f"training data {missing[0]} is missing: run `python -m sharp_mlx.corpora`, or pass --data FILE..."
        )
    return files


def token_streams(files, tokenizer, max_tokens_each=None):
    return [load_tokens(f, tokenizer, max_tokens_each) for f in files]


def say(group, line: str, every_rank: bool = False) -> None:
    """Print on rank 0 only (or on every rank, prefixed by it, when there are several)."""
    if group.size() == 1:
        print(line)
    elif every_rank or distributed.is_main(group):
        print(f"[rank {group.rank()}] {line}")


def save_stage(out: Path, model, config: dict, source: Path, record: dict, force: bool) -> None:
    """The model folder plus ``training.json``: every stage's settings and results so far."""
    history = []
    if (source / "training.json").exists():
        history = json.loads((source / "training.json").read_text())
    with atomic_dir(out, force=force) as tmp:
        write_model(tmp, model, config)
        copy_tokenizer(source, tmp)
        (tmp / "training.json").write_text(json.dumps(history + [record], indent=2))


def stage_slw(args) -> dict:
    config = read_config(args.model)
    if config.get("sharp", {}).get("share"):
        raise SharpError(
            f"{args.model} is already a shared model: --stage slw starts from the original (unshared) model"
        )
    if args.slw_batch_rows < 1:
        raise SharpError(f"--slw-batch-rows must be at least 1, got {args.slw_batch_rows}")
    n = config["num_hidden_layers"]
    layers = (
        args.layers if args.layers is not None or not sharemap.share_kind(args.share).takes_layers else DEFAULT_LAYERS
    )
    similarity = _similarity(args)
    kind = args.recovery
    share = sharemap.parse_share(
        args.share,
        n,
        layers=layers,
        rank=args.rank,
        cut=args.cut,
        similarity=similarity,
        adjacent_only=args.references == "adjacent",
        kind=kind,
    )
    baseline = sharemap.BASELINES[args.baseline]
    fits = baseline.recovered and args.slw_steps >= 0 and not args.no_slw  # builds recovery factors and fits them here
    if baseline.recovered:
        check_rank(args.rank, config)
    if kind != "plain":
        check_kind(baseline, kind, share, args.rank, config)
    if args.reference_rank and (args.baseline != "sharp" or args.slw_order != "independent" or kind != "plain"):
        raise SharpError(
            "--reference-rank fits a SHARP reference and its targets together on the original's inputs: use it "
            "with --baseline sharp, --recovery plain and --slw-order independent"
        )
    if args.slw_objective == "block" and args.slw_order != "sequential":
        raise SharpError(
            "--slw-objective block fits each block to the original's output on the student's own states: "
            "add --slw-order sequential"
        )
    if args.scales_init != "ones" and kind != "scaled":
        raise SharpError(
            f"--scales-init {args.scales_init} fits scaling vectors: add --recovery scaled, or drop --scales-init"
        )
    rank = args.rank
    original, tokenizer = load(args.model)
    windows = None
    if fits or (baseline.recovered and args.rank_allocation == "sensitivity"):
        # Only as many random records as the calibration needs are tokenized.
        windows = calibration_text(args.data or default_data("train"), tokenizer, args.tokens, args.seq_len, args.seed)
    if baseline.recovered and args.rank_allocation == "sensitivity":
        damage = sensitivity(original, config, share, windows[:SENSITIVITY_WINDOWS])
        rank = sharemap.allocate_ranks(
            damage, args.rank * len(share), step=min(16, args.rank)
        )  # the same total rank, spread by damage
        say(
            distributed.group(),
            "loss increase without each target's MLP: " + ", ".join(f"{t}: {d:+.3f}" for t, d in damage.items()),
        )
        say(distributed.group(), "ranks by target: " + ", ".join(f"{t}: {k}" for t, k in rank.items()))
        for k in rank.values():
            check_rank(k, config)
    if not baseline.removes_layers:
        share = baseline.targets(share)
        rank = rank if baseline.recovered else 0
    mx.random.seed(args.seed)  # fresh factors (what --no-slw keeps) are drawn: the same every run
    model, new_config = baseline.build(original, config, share, rank, kind, reference_rank=args.reference_rank)
    report = {}
    if fits:
        # Under mlx.launch each process captures and fits its own targets (same seeds).
        group = distributed.group()
        mine = distributed.shard(sorted(share), group)
        split = f", {len(mine)} of them in this process of {group.size()}" if group.size() > 1 else ""
        how = "in sequence, each on the inputs of" if args.slw_order == "sequential" else "on the inputs captured from"
        say(group, f"fitting {len(share)} targets {how} the model on {windows.size} tokens{split} ...", every_rank=True)
        cache = args.cache_dir / f"rank{group.rank()}" if args.cache_dir and group.size() > 1 else args.cache_dir
        if args.slw_order == "sequential":
            if group.size() > 1:
                raise SharpError("--slw-order sequential fits one target after another: run it in one process")
            inputs = StudentInputs(windows, sorted(share), original=original if args.slw_objective == "block" else None)
        elif args.reference_rank:
            if group.size() > 1:
                raise SharpError("--reference-rank fits each reference with its targets: run it in one process")
            layers_in = sorted(set(share) | {r for r in share.values() if r is not None})  # targets and references
            inputs = capture_mlp_inputs(original, windows, layers_in, out_dir=cache)["mlp_inputs"]
        else:
            inputs = capture_mlp_inputs(original, windows, mine, out_dir=cache)["mlp_inputs"]
        cfg = SLWConfig(
            init=args.init,
            closed_form_down=not args.no_closed_form,
            steps=args.slw_steps,
            lr=args.slw_lr,
            batch_rows=args.slw_batch_rows,
            seed=args.seed,
            scales_init=args.scales_init,
        )
        if args.reference_rank:
            report = run_joint(model, original, inputs, cfg, log=lambda line: say(group, line))
        else:
            report = run_slw(
                model,
                original,
                inputs,
                cfg,
                log=lambda line: say(group, line, every_rank=True),
                group=group,
            )
    say(distributed.group(), sharemap.savings_line(config, share, rank, args.baseline, kind, args.reference_rank))
    record = {
        "stage": "slw",
        "baseline": args.baseline,
        "share": {str(k): v for k, v in share.items()},
        "rank": SharpArgs(rank=rank).to_dict()["rank"],
        "recovery": kind,
        "reference_rank": args.reference_rank,
        "layers": {str(k): v for k, v in report.items()},
    }
    return {"model": model, "config": new_config, "record": record}


def check_rank(rank: int, config: dict) -> None:
    """A recovery rank fits between 1 and the smaller of the model's hidden and MLP sizes."""
    top = min(config["hidden_size"], config["intermediate_size"])
    if not 1 <= rank <= top:
        raise SharpError(
            f"--rank {rank} is outside 1..{top} (the smaller of the model's hidden and MLP sizes): pass a rank in "
            "that range (--baseline direct shares without recovery)"
        )


def check_kind(baseline, kind: str, share: dict, rank: int, config: dict) -> None:
    """A recovery kind other than plain transforms borrowed weights: SHARP targets with a reference and a rank only."""
    if baseline.name != "sharp":
        why = (
            "borrows no weights, so there is nothing to transform"
            if not baseline.borrows
            else "has no recovery parameters"
        )
        raise SharpError(
            f"--recovery {kind} applies to --baseline sharp; --baseline {baseline.name} {why}: use --recovery plain"
        )
    try:
        SharpArgs(share=share, rank=rank, kind=kind).validate(
            config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]
        )
    except ValueError as e:
        raise SharpError(f"--recovery {kind}: {e}")


SENSITIVITY_WINDOWS = 4


def sensitivity(original, config: dict, share: dict, windows) -> dict:
    """{target: mean next-token loss on ``windows`` with that target's MLP removed, minus the
    original's}: how much each target alone costs before any recovery."""
    from .evaluate import window_losses

    def loss(model) -> float:  # per token, 4 windows at a time
        return sum(window_losses(model, windows[i : i + 4]).sum().item() for i in range(0, len(windows), 4)) / (
            windows.size - len(windows)
        )

    base = loss(original)
    damage = {}
    for t in tqdm(sorted(share), desc="sensitivity", unit="target"):
        damage[t] = max(loss(sharemap.share_model(original, config, {t: None}, 0)[0]) - base, 0.0)
    return damage


def _similarity(args):
    if args.share != "auto":
        return None
    path = args.analysis or Path("runs/analyze/analysis.json")
    if not path.exists():
        raise SharpError(
            f"--share auto needs a layer analysis at {path}: run `python -m sharp_mlx.analyze` first, or pass "
            "--analysis FILE"
        )
    return json.loads(path.read_text())


def stage_sft(args: SFTRun) -> dict:
    from .sft import merge_lora, train_sft

    config = read_config(args.model)
    sharp = SharpArgs.from_dict(config.get("sharp"))
    if not any(sharp.rank_of(t) > 0 for t in sharp.share) and not args.sft.lora_rank > 0:
        what = "shares no layers" if not sharp.share else "has rank-0 targets (a pruned MLP)"
        raise SharpError(
            f"{args.model} {what}, so it has no recovery factors to train: make a shared model with --stage slw "
            "first, or fine-tune this one with LoRA (--lora-rank R)"
        )
    model, tokenizer = load(args.model)
    teacher = None
    if args.teacher:  # one copy of what teacher and student share: the teacher keeps only its own tensors
        from .teacher import load_teacher

        teacher, held = load_teacher(args.teacher, model)
        say(
            distributed.group(),
            f"teacher: {held['own_bytes'] / 2**20:,.2f} MiB of its own, "
            f"{held['shared_bytes'] / 2**20:,.2f} MiB shared with the student",
        )
    cfg = args.sft
    if cfg.loss != "ce" and teacher is None:
        raise SharpError(f"--loss {cfg.loss} distils from the original model: pass --teacher DIR (or use --loss ce)")
    train = token_streams(args.data or default_data("train"), tokenizer, args.max_train_tokens)
    valid = token_streams(args.valid or default_data("valid"), tokenizer)
    tokens, mask = (np.concatenate([s[i] for s in train]) for i in (0, 1))
    valid_tokens = np.concatenate([s for s, _ in valid])
    run_dir = args.run_dir or Path("runs") / args.out.name
    summary = train_sft(
        model, tokens, mask, valid_tokens, cfg, run_dir, teacher=teacher, resume=args.resume, group=distributed.group()
    )
    if cfg.lora_rank > 0:
        merge_lora(model)  # LoRA folded into plain weights: the folder keeps its config's names
    return {"model": model, "config": config, "record": {"stage": "sft", "config": asdict(cfg), "summary": summary}}


def build_parser() -> argparse.ArgumentParser:
    from .sft import SFTConfig

    p = ArgumentParser(
        prog="python -m sharp_mlx.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--stage",
        choices=("slw", "sft"),
        required=True,
        help="slw: build + warm up from the original; sft: fine-tune a shared model",
    )
    p.add_argument(
        "--model", type=Path, required=True, help="input model folder (the original for slw, a shared model for sft)"
    )
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="every setting of this stage from the main job's recipe NAME (default: the paper's plain SHARP and "
        "SFTConfig's defaults); the flags given override it",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--data", type=Path, nargs="+", help="training / calibration files (default: data/*/train.jsonl)")
    p.add_argument("--seed", type=int, default=SLWRun.seed, help="random seed (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=SLWRun.seq_len, help="tokens per window (default: %(default)s)")
    g = p.add_argument_group("share map (slw)")
    g.add_argument(
        "--share", default=SLWRun.share, help="next | next:K | auto | JSON map or file (default: %(default)s)"
    )
    g.add_argument("--layers", help=f"layer range A:B for next, next:K and auto (default: {DEFAULT_LAYERS})")
    g.add_argument("--cut", type=float, help="stored-MLP fraction to remove, for --share auto")
    g.add_argument(
        "--analysis",
        type=Path,
        help="analysis.json from sharp_mlx.analyze, for --share auto (default: runs/analyze/analysis.json)",
    )
    g.add_argument(
        "--references",
        choices=("adjacent", "any"),
        default=SLWRun.references,
        help=(
            "--share auto: a reference is the layer right before its target, or any earlier layer the analysis "
            "measured (analyze --all-pairs) (default: %(default)s)"
        ),
    )
    g.add_argument("--rank", type=int, default=SLWRun.rank, help="recovery rank per target (default: %(default)s)")
    g.add_argument(
        "--rank-allocation",
        choices=("uniform", "sensitivity"),
        default=SLWRun.rank_allocation,
        help=(
            "uniform: --rank at every target; sensitivity: the same total rank split in steps of 16 (or --rank, if "
            "smaller) by how much the loss on calibration text rises when each target's MLP is removed (default: "
            "%(default)s)"
        ),
    )
    g.add_argument(
        "--baseline",
        choices=list(sharemap.BASELINES),
        default=SLWRun.baseline,
        help="what to build at the targets (default: %(default)s)",
    )
    g.add_argument(
        "--recovery",
        choices=list(RECOVERY_KINDS),
        default=SLWRun.recovery,
        help=(
            "recovery kind: plain (W_t ~= W_r + B A) or scaled (also a row and a column scaling vector per borrowed "
            "weight, W_t ~= diag(out) W_r diag(in) + B A: one rank's worth of parameters, so --rank 63 --recovery "
            "scaled matches --rank 64) (default: %(default)s)"
        ),
    )
    g.add_argument(
        "--scales", dest="recovery", action="store_const", const="scaled", help="the same as --recovery scaled"
    )
    g = p.add_argument_group("single layer warmup (slw)")
    g.add_argument("--tokens", type=int, default=SLWRun.tokens, help="calibration tokens (default: %(default)s)")
    g.add_argument(
        "--init",
        choices=("zero", "svd", "asvd"),
        default=SLWRun.init,
        help="factor initialisation (default: %(default)s)",
    )
    g.add_argument("--no-closed-form", action="store_true", help="skip the exact down-projection fit")
    g.add_argument(
        "--slw-steps",
        type=int,
        default=SLWRun.slw_steps,
        help="Adam steps per layer after the closed-form fits (default: %(default)s)",
    )
    g.add_argument("--slw-lr", type=float, default=SLWRun.slw_lr, help="SLW Adam learning rate (default: %(default)s)")
    g.add_argument(
        "--slw-order",
        choices=("independent", "sequential"),
        default=SLWRun.slw_order,
        help="independent: every target fitted on the original model's MLP inputs; sequential: in order, each on the "
        "inputs of the model with the targets before it already fitted (default: %(default)s)",
    )
    g.add_argument(
        "--reference-rank",
        type=int,
        default=SLWRun.reference_rank,
        help="> 0: each reference also gets recovery factors of this rank, and its stored MLP is fitted jointly with "
        "its targets' factors (W_r ~= W_s + B_r A_r, W_t ~= W_s + B_t A_t; 0: SHARP's untouched reference) "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--slw-objective",
        choices=("mlp", "block"),
        default=SLWRun.slw_objective,
        help="mlp: fit the target MLP's output on its inputs; block (with --slw-order sequential): fit what the MLP "
        "must add for the block's output to be the original's, correcting the earlier targets' error "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--scales-init",
        choices=("ones", "lsq"),
        default=SLWRun.scales_init,
        help="--recovery scaled: start the vectors at one, or fit them by least squares (zero allowed) and keep "
        "the better of that start and the all-zero one, the control's (default: %(default)s)",
    )
    g.add_argument(
        "--slw-batch-rows",
        type=int,
        default=SLWRun.slw_batch_rows,
        help="token rows per SLW Adam step (default: %(default)s)",
    )
    g.add_argument(
        "--no-slw", action="store_true", help="build the shared model with fresh factors only (the SFT-only baseline)"
    )
    g.add_argument("--cache-dir", type=Path, help="where captured inputs go (default: in memory)")
    g = p.add_argument_group("supervised fine-tuning (sft)")
    g.add_argument("--teacher", type=Path, help="the original model, for distillation")
    g.add_argument("--valid", type=Path, nargs="+", help="validation files (default: data/*/valid.jsonl)")
    g.add_argument("--max-train-tokens", type=int, help="use at most this many tokens of each training file")
    g.add_argument("--run-dir", type=Path, help="checkpoints, loss curve (default: runs/<out name>)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --run-dir")
    for f in fields(SFTConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("seed", "seq_len"):
            continue
        kind = type(f.default) if f.default is not None else int
        if kind is bool:
            g.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                help=f"SFT: {SFT_HELP[f.name]} (default: {f.default})",
            )
        else:
            g.add_argument(flag, dest=f.name, type=kind, help=f"SFT: {SFT_HELP[f.name]} (default: {f.default})")
    return p


def run_stage(run, force: bool = False) -> Path:
    """Run one stage (an ``SLWRun`` or an ``SFTRun``) and write its output folder; returns it."""
    if run.out.exists() and not force:
        raise SharpError(f"{run.out} already exists: pass --force to replace it, or choose another --out")
    tic = time.perf_counter()
    result = (stage_slw if isinstance(run, SLWRun) else stage_sft)(run)
    result["record"]["wall_s"] = round(time.perf_counter() - tic, 1)
    if distributed.is_main(distributed.group()):  # rank 0 writes the folder; every process holds the same model
        save_stage(run.out, result["model"], result["config"], run.model, result["record"], force)
        print(f"{result['record']['stage']} done in {result['record']['wall_s']:.0f} s -> {run.out}")
    return run.out


def given_flags(parser: argparse.ArgumentParser, argv) -> set:
    """The destinations that ``argv`` sets itself (a parse with every default suppressed)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for a, default in saved:
            a.default = default


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, with ``--preset``'s recipe filling each setting of the stage that they leave out."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:
        given = given_flags(parser, argv)
        r = PRESETS[args.preset]
        if "share" in given:  # the recipe's range goes with the share kind given
            r = replace(r, share=args.share)
        stage = slw_fields(r) if args.stage == "slw" else {**sft_fields(r), "max_train_tokens": r.max_train_tokens}
        for name, value in stage.items():
            if name not in given:
                setattr(args, name, value)
    return args


def run_from_args(args):
    """The SLWRun or SFTRun of parsed ``python -m sharp_mlx.train`` flags."""
    from .sft import SFTConfig

    if args.stage == "slw":
        return SLWRun(**{f.name: getattr(args, f.name) for f in fields(SLWRun)})
    if args.recovery != "plain":
        raise SharpError(
            "--recovery applies to --stage slw, which builds the shared model; SFT trains whatever recovery "
            f"parameters its model has: drop --recovery {args.recovery}"
        )
    sft = SFTConfig(
        **{f.name: getattr(args, f.name) for f in fields(SFTConfig) if getattr(args, f.name, None) is not None}
    )
    return SFTRun(sft=sft, **{f.name: getattr(args, f.name) for f in fields(SFTRun) if f.name != "sft"})


@cli("sharp_mlx.train")
def main(argv=None):
    args = parse_args(argv)
    run_stage(run_from_args(args), args.force)


if __name__ == "__main__":
    raise SystemExit(main())
