"""The two training stages as library functions: SLW builds a shared model from the original and
warms up its recovery, SFT fine-tunes it end to end. ``python -m sharp_mlx.train`` and the main job
(``sharp_mlx.pipeline``) call ``run_stage`` with an ``SLWRun`` or an ``SFTRun``; every setting comes
from a ``sharp_mlx.recipes.Recipe``.
"""

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..data import corpora
from ..data.batches import load_tokens
from ..errors import SharpError
from ..io.checkpoint import atomic_dir, copy_tokenizer, load, read_config, verify, write_model
from ..io.integrity import strict_json
from ..io.outputs import claim_output, folder_weight_bytes
from ..models import sharemap
from ..models.llama import SharpArgs
from ..recipes import PAPER, Recipe
from . import distributed
from .capture import StudentInputs, calibration_text, capture_mlp_inputs
from .joint import run_joint
from .sft import SFTConfig, merge_lora, train_sft
from .slw import SLWConfig, run_slw
from .teacher import load_teacher

ANALYSIS = Path("runs") / "analyze" / "analysis.json"
SENSITIVITY_WINDOWS = 4


@dataclass
class SLWRun:
    """Build a shared model (or a baseline) from the original and warm up its recovery."""

    model: Path  # the original (unshared) model folder
    out: Path
    recipe: Recipe = PAPER
    data: Optional[List[Path]] = None  # calibration files (None: data/*/train.jsonl)
    analysis: Optional[Path] = None  # for --share auto (None: ANALYSIS)
    no_slw: bool = False  # fresh factors only (the SFT-only baseline)
    cache_dir: Optional[Path] = None  # where captured inputs go (None: in memory)


@dataclass
class SFTRun:
    """Fine-tune a shared model's recovery end to end."""

    model: Path  # a shared model folder
    out: Path
    recipe: Recipe = PAPER
    teacher: Optional[Path] = None  # the original, for distillation
    data: Optional[List[Path]] = None  # training files (None: data/*/train.jsonl)
    valid: Optional[List[Path]] = None  # validation files (None: data/*/valid.jsonl)
    run_dir: Optional[Path] = None  # checkpoints and loss curve (None: runs/<out name>)
    resume: bool = False


def slw_config(r: Recipe) -> SLWConfig:
    return SLWConfig(init=r.init, closed_form_down=r.closed_form, steps=r.slw_steps, lr=r.slw_lr,
                     batch_rows=r.slw_batch_rows, seed=r.seed, scales_init=r.scales_init)  # fmt: skip


def sft_config(r: Recipe) -> SFTConfig:
    """The library's SFT settings of a recipe (a checkpoint at every validation)."""
    return SFTConfig(
        steps=r.sft_steps, batch_size=r.batch_size, seq_len=r.seq_len, grad_accum=r.grad_accum,
        learning_rate=r.learning_rate, min_learning_rate=r.min_learning_rate, warmup_steps=r.warmup_steps,
        weight_decay=r.weight_decay, loss=r.loss, kd_alpha=r.kd_alpha, kd_temperature=r.kd_temperature,
        lora_rank=r.lora_rank, lora_scale=r.lora_scale, lora_layers=r.lora_layers, grad_checkpoint=r.grad_checkpoint,
        frozen_prefix=r.frozen_prefix, eval_every=r.valid_every, eval_windows=r.valid_windows,
        save_every=r.valid_every, seed=r.seed,
    )  # fmt: skip


def default_data(split: str) -> list:
    files = corpora.files(split)
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise SharpError(
            f"training data {missing[0]} is missing: run `python -m sharp_mlx.corpora`, or pass --data FILE..."
        )
    return files


def say(group, line: str, every_rank: bool = False) -> None:
    """Print on rank 0 only (or on every rank, prefixed by it, when there are several)."""
    if group.size() == 1:
        print(line)
    elif every_rank or distributed.is_main(group):
        print(f"[rank {group.rank()}] {line}")


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
        why = "borrows no weights, so there is nothing to transform" if not baseline.borrows else "has no recovery"
        raise SharpError(
            f"--recovery {kind} applies to --baseline sharp; --baseline {baseline.name} {why}: use --recovery plain"
        )
    try:
        SharpArgs(share=share, rank=rank, kind=kind).validate(
            config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]
        )
    except ValueError as e:
        raise SharpError(f"--recovery {kind}: {e}")


def check_slw(run: SLWRun, config: dict) -> None:
    """The combinations of SLW settings that cannot run, refused before any work."""
    r = run.recipe
    if config.get("sharp", {}).get("share"):
        raise SharpError(
            f"{run.model} is already a shared model: --stage slw starts from the original (unshared) model"
        )
    if r.reference_rank and (r.baseline != "sharp" or r.slw_order != "independent" or r.recovery != "plain"):
        raise SharpError(
            "--reference-rank fits a SHARP reference and its targets together on the original's inputs: use it "
            "with --baseline sharp, --recovery plain and --slw-order independent"
        )
    if r.slw_objective == "block" and r.slw_order != "sequential":
        raise SharpError(
            "--slw-objective block fits each block to the original's output on the student's own states: "
            "add --slw-order sequential"
        )
    if r.scales_init != "ones" and r.recovery != "scaled":
        raise SharpError(
            f"--scales-init {r.scales_init} fits scaling vectors: add --recovery scaled, or drop --scales-init"
        )
    if r.baseline not in sharemap.BASELINES:
        raise SharpError(f"--baseline {r.baseline} is not one of {', '.join(sharemap.BASELINES)}")


def share_map(run: SLWRun, n_layers: int) -> dict:
    """{target: reference} of the run's recipe on a model of ``n_layers``."""
    r = run.recipe
    similarity = None
    if r.share == "auto":
        path = run.analysis or ANALYSIS
        if not path.exists():
            raise SharpError(
                f"--share auto needs a layer analysis at {path}: run `python -m sharp_mlx.analyze` first, or pass "
                "--analysis FILE"
            )
        similarity = json.loads(path.read_text())
    return sharemap.parse_share(r.share, n_layers, layers=r.layers, rank=r.rank, cut=r.cut, similarity=similarity,
                                adjacent_only=r.references == "adjacent", kind=r.recovery)  # fmt: skip


def sensitivity(original, config: dict, share: dict, windows) -> dict:
    """{target: mean next-token loss on ``windows`` with that target's MLP removed, minus the
    original's}: how much each target alone costs before any recovery."""
    from ..eval.perplexity import window_losses

    def loss(model) -> float:  # per token, 4 windows at a time
        total = sum(window_losses(model, windows[i : i + 4]).sum().item() for i in range(0, len(windows), 4))
        return total / (windows.size - len(windows))

    base = loss(original)
    return {
        t: max(loss(sharemap.share_model(original, config, {t: None}, 0)[0]) - base, 0.0)
        for t in tqdm(sorted(share), desc="sensitivity", unit="target")
    }


def ranks_by_damage(run: SLWRun, original, config: dict, share: dict, windows) -> dict:
    """The same total rank as --rank at every target, split in steps of 16 by each target's damage."""
    r = run.recipe
    damage = sensitivity(original, config, share, windows[:SENSITIVITY_WINDOWS])
    rank = sharemap.allocate_ranks(damage, r.rank * len(share), step=min(16, r.rank))
    group = distributed.group()
    say(group, "loss increase without each target's MLP: " + ", ".join(f"{t}: {d:+.3f}" for t, d in damage.items()))
    say(group, "ranks by target: " + ", ".join(f"{t}: {k}" for t, k in rank.items()))
    for k in rank.values():
        check_rank(k, config)
    return rank


def fit_targets(run: SLWRun, model, original, share: dict, windows) -> dict:
    """SLW of every target of ``model`` (in this process's share under mlx.launch); the per-layer errors."""
    r = run.recipe
    group = distributed.group()
    mine = distributed.shard(sorted(share), group)
    split = f", {len(mine)} of them in this process of {group.size()}" if group.size() > 1 else ""
    how = "in sequence, each on the inputs of" if r.slw_order == "sequential" else "on the inputs captured from"
    say(group, f"fitting {len(share)} targets {how} the model on {windows.size} tokens{split} ...", every_rank=True)
    cache = run.cache_dir / f"rank{group.rank()}" if run.cache_dir and group.size() > 1 else run.cache_dir
    if (r.slw_order == "sequential" or r.reference_rank) and group.size() > 1:
        raise SharpError("--slw-order sequential and --reference-rank fit one group after another: use one process")
    if r.slw_order == "sequential":
        inputs = StudentInputs(windows, sorted(share), original=original if r.slw_objective == "block" else None)
    elif r.reference_rank:
        layers_in = sorted(set(share) | {ref for ref in share.values() if ref is not None})  # targets and references
        inputs = capture_mlp_inputs(original, windows, layers_in, out_dir=cache)["mlp_inputs"]
    else:
        inputs = capture_mlp_inputs(original, windows, mine, out_dir=cache)["mlp_inputs"]
    if r.reference_rank:
        return run_joint(model, original, inputs, slw_config(r), log=lambda line: say(group, line))
    return run_slw(model, original, inputs, slw_config(r), log=lambda line: say(group, line, True), group=group)


def stage_slw(run: SLWRun) -> dict:
    """Build the shared model of ``run`` and fit its recovery; {model, config, record}."""
    r = run.recipe
    config = read_config(run.model)
    check_slw(run, config)
    share = share_map(run, config["num_hidden_layers"])
    baseline = sharemap.BASELINES[r.baseline]
    fits = baseline.recovered and not run.no_slw  # builds recovery factors and fits them here
    if baseline.recovered:
        check_rank(r.rank, config)
    if r.recovery != "plain":
        check_kind(baseline, r.recovery, share, r.rank, config)
    verify(run.model)  # a long stage checks its input's checksums first
    original, tokenizer = load(run.model)
    windows, rank = None, r.rank
    if fits or (baseline.recovered and r.rank_allocation == "sensitivity"):
        # Only as many random records as the calibration needs are tokenized.
        windows = calibration_text(run.data or default_data("train"), tokenizer, r.tokens, r.seq_len, r.seed)
    if baseline.recovered and r.rank_allocation == "sensitivity":
        rank = ranks_by_damage(run, original, config, share, windows)
    if not baseline.removes_layers:
        share = baseline.targets(share)
        rank = rank if baseline.recovered else 0
    mx.random.seed(r.seed)  # fresh factors (what --no-slw keeps) are drawn: the same every run
    model, new_config = baseline.build(original, config, share, rank, r.recovery, reference_rank=r.reference_rank)
    report = fit_targets(run, model, original, share, windows) if fits else {}
    say(distributed.group(), sharemap.savings_line(config, share, rank, r.baseline, r.recovery, r.reference_rank))
    record = {
        "stage": "slw",
        "baseline": r.baseline,
        "share": {str(k): v for k, v in share.items()},
        "rank": SharpArgs(rank=rank).to_dict()["rank"],
        "recovery": r.recovery,
        "reference_rank": r.reference_rank,
        "layers": {str(k): v for k, v in report.items()},
    }
    return {"model": model, "config": new_config, "record": record}


def stage_sft(run: SFTRun) -> dict:
    """Fine-tune the recovery of ``run.model``; {model, config, record}."""
    config = read_config(run.model)
    sharp = SharpArgs.from_dict(config.get("sharp"))
    cfg = sft_config(run.recipe)
    cfg.validate()
    if not any(sharp.rank_of(t) > 0 for t in sharp.share) and not cfg.lora_rank > 0:
        what = "shares no layers" if not sharp.share else "has rank-0 targets (a pruned MLP)"
        raise SharpError(
            f"{run.model} {what}, so it has no recovery factors to train: make a shared model with --stage slw "
            "first, or fine-tune this one with LoRA (--lora-rank R)"
        )
    if cfg.loss != "ce" and run.teacher is None:
        raise SharpError(f"--loss {cfg.loss} distils from the original model: pass --teacher DIR (or use --loss ce)")
    for folder in (run.model, run.teacher):  # a long stage checks its inputs' checksums first
        if folder is not None:
            verify(folder)
    model, tokenizer = load(run.model)
    teacher = None
    if run.teacher:  # one copy of what teacher and student share: the teacher keeps only its own tensors
        teacher, held = load_teacher(run.teacher, model)
        say(
            distributed.group(),
            f"teacher: {held['own_bytes'] / 2**20:,.2f} MiB of its own, "
            f"{held['shared_bytes'] / 2**20:,.2f} MiB shared with the student",
        )
    train = [load_tokens(f, tokenizer, run.recipe.max_train_tokens) for f in run.data or default_data("train")]
    valid = [load_tokens(f, tokenizer) for f in run.valid or default_data("valid")]
    tokens, mask = (np.concatenate([s[i] for s in train]) for i in (0, 1))
    valid_tokens = np.concatenate([s for s, _ in valid])
    run_dir = run.run_dir or Path("runs") / run.out.name
    summary = train_sft(
        model, tokens, mask, valid_tokens, cfg, run_dir, teacher=teacher, resume=run.resume, group=distributed.group()
    )
    if cfg.lora_rank > 0:
        merge_lora(model)  # LoRA folded into plain weights: the folder keeps its config's names
    return {"model": model, "config": config, "record": {"stage": "sft", "config": asdict(cfg), "summary": summary}}


def save_stage(out: Path, model, config: dict, source: Path, record: dict, force: bool) -> None:
    """The model folder plus ``training.json``: every stage's settings and results so far."""
    history = []
    if (source / "training.json").exists():
        history = json.loads((source / "training.json").read_text())
    with atomic_dir(out, force=force) as tmp:
        write_model(tmp, model, config)
        copy_tokenizer(source, tmp)
        (tmp / "training.json").write_text(json.dumps(strict_json(history + [record]), indent=2, allow_nan=False))


def run_stage(run, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run one stage (an ``SLWRun`` or an ``SFTRun``) and write its output folder; returns it."""
    if run.out.exists() and not force:
        raise SharpError(f"{run.out} already exists: pass --force to replace it, or choose another --out")
    with contextlib.ExitStack() as claims:  # one writer per output and run folder, before any work
        if distributed.is_main(distributed.group()):
            claims.enter_context(claim_output(run.out, need=folder_weight_bytes(run.model)))
            if isinstance(run, SFTRun):
                claims.enter_context(claim_output(run.run_dir or Path("runs") / run.out.name))
        if run.out.exists() and not force:  # a restored .old-PID counts
            raise SharpError(f"{run.out} already exists: pass --force to replace it, or choose another --out")
        tic = time.perf_counter()
        result = (stage_slw if isinstance(run, SLWRun) else stage_sft)(run)
        result["record"]["wall_s"] = round(time.perf_counter() - tic, 1)
        result["record"]["settings"] = settings_of(run)
        if distributed.is_main(distributed.group()):  # rank 0 writes the folder; every process holds the same model
            save_stage(run.out, result["model"], result["config"], run.model, result["record"], force)
            log(f"{result['record']['stage']} done in {result['record']['wall_s']:.0f} s -> {run.out}")
    return run.out


def settings_of(run) -> dict:
    """The settings of an ``SLWRun`` or ``SFTRun`` that shape its output, as JSON values (paths as text)."""

    def plain(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    skip = {"out", "cache_dir", "run_dir", "resume"}
    return {k: plain(v) for k, v in asdict(run).items() if k not in skip}


def recorded_settings(out: Path) -> Optional[dict]:
    """The settings the last stage of the model folder ``out`` recorded (None: none recorded)."""
    try:
        history = json.loads((Path(out) / "training.json").read_text())
        return history[-1].get("settings")
    except (OSError, json.JSONDecodeError, IndexError, AttributeError, TypeError):
        return None
