"""Reproduce SHARP's tables and ablations on the embedded SmolLM2-135M, from scratch, in one run.

    python experiments/reproduce.py --quick    # small budgets: 28 min on 2 quiet CPU cores
    python experiments/reproduce.py            # the main job's budgets for every variant, into experiments/results/RESULTS-full.md:
                                           # 7.3 hours on 2 CPU cores (measured, see below)
    python experiments/reproduce.py --quick --force --compare experiments/results/RESULTS.json   # again from scratch, against the last run

Where the full run's time goes (7.3 h, runs/repro/walls.json): 4.5 h of training (43 steps;
a quiet SLW or SFT step takes 5-7 min, some were slowed by other jobs sharing the cores), then
2.7 h evaluating 42 folders (8 test windows per domain; 200 next-sentence items for the 28
that get them, 8 items a forward pass, 4-6 min a model) and the bench.

It trains every variant with the project's own commands (``python -m sharp_mlx.train`` ...,
called in-process), evaluates them all the same way (test perplexity on the five domains and a
next-sentence multiple-choice check), quantizes and benchmarks the deployable ones, and writes
``experiments/results/RESULTS.md`` (``--quick``; the full run: ``experiments/results/RESULTS-full.md``; or ``--report``) and
its figures. Every number in the report comes from the run that wrote it.

The variants are one table (``variants``: each one's stage, source and flags, with every layer
span derived from the original's number of layers), made in order by ``build_variants``; then
``measure`` and ``bench_step`` measure them and ``write_results`` writes the record and report.

Models go to models/repro[-quick]/, logs and per-model results to runs/repro[-quick]/. Each step is
skipped when its output exists, so an interrupted run continues where it stopped (each step's
time is kept, and the report's total counts every invocation's steps); ``--force`` redoes everything.
"""

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sharp_mlx import (
    analyze,  # noqa: E402
    bench,  # noqa: E402
    quantize,  # noqa: E402
    train,  # noqa: E402
)
from sharp_mlx.convert import ensure_default_model  # noqa: E402
from sharp_mlx.data.corpora import DOMAINS  # noqa: E402
from sharp_mlx.errors import ArgumentParser, SharpError, cli  # noqa: E402
from sharp_mlx.eval import perplexity as evaluate  # noqa: E402
from sharp_mlx.io.checkpoint import read_config  # noqa: E402
from sharp_mlx.jobs.main_job import ensure_data  # noqa: E402
from sharp_mlx.models import sharemap  # noqa: E402
from sharp_mlx.models.llama import SharpArgs  # noqa: E402
from sharp_mlx.models.sharemap import lora_rank_for, stored_params  # noqa: E402
from sharp_mlx.quant.codes import folder_bytes  # noqa: E402
from sharp_mlx.reports import geomean_ratio, markdown_table, save_figure, write_atomic  # noqa: E402


@dataclass
class Budget:
    slw_tokens: int
    slw_steps: int
    slw_batch_rows: int
    sft_steps: int
    sft_batch: int
    sft_seq: int
    sft_tokens: int  # at most this many training tokens of each domain
    eval_windows: int  # test windows of eval_seq tokens per domain
    eval_seq: int
    cloze_items: int  # per domain
    analyze_tokens: int
    bench_reps: int
    sft_valid_windows: int  # SFT's own validation windows (its loss curve), not the report's test
    ablation_targets: int  # targets each ablation moves or varies (every other layer)
    scales_full: bool  # the parameterization ablation on the default targets through SLW + SFT (else: the ablation targets, SLW only)
    ranks: Tuple[int, ...]  # the rank sweep's points besides 64
    chat_only: bool  # also SLW and SFT on chat alone, in the cross-domain table
    cloze: Optional[List[str]] = None  # the variants given the next-sentence check (None: every one in CLOZE_GROUPS)

    def checks_cloze(self, name: str, group: str) -> bool:
        """Whether variant ``name`` of ``group`` gets the next-sentence check."""
        return name in self.cloze if self.cloze is not None else group in CLOZE_GROUPS


QUICK = Budget(
    slw_tokens=1024,
    slw_steps=10,
    slw_batch_rows=512,
    sft_steps=8,
    sft_batch=2,
    sft_seq=128,
    sft_tokens=20000,
    eval_windows=1,
    eval_seq=256,
    cloze_items=4,
    analyze_tokens=1024,
    bench_reps=2,
    sft_valid_windows=1,
    ablation_targets=3,
    scales_full=False,
    ranks=(16, 128),
    chat_only=False,
    cloze=["original", "sharp", "control", "mlp-prune-ft", "smaller-ft", "sharp65", "control65", "sharp-4bit"],
)
FULL = Budget(
    slw_tokens=16384,
    slw_steps=50,
    slw_batch_rows=1024,
    sft_steps=40,
    sft_batch=2,
    sft_seq=256,
    sft_tokens=100000,
    eval_windows=8,
    eval_seq=256,
    cloze_items=40,
    analyze_tokens=15360,
    bench_reps=3,
    sft_valid_windows=4,
    ablation_targets=5,
    scales_full=True,
    ranks=(16, 32, 128),
    chat_only=True,
)
CLOZE_BATCH = 8  # next-sentence items per forward pass: 1.5x faster than one at a time, the same picks
CLOZE_GROUPS = (
    "main",
    "aggressive",
    "cross",
    "smaller",
    "deploy",
    "param",
)  # the ablations are read by perplexity alone


# -- the settings, from the original's number of layers n ------------------------------------------


def inner(n: int) -> str:
    """Every layer but the first and the last ("1:29" of 30): the default and aggressive settings' span."""
    return f"1:{n - 1}"


def default(n: int) -> List[str]:
    """Every other layer of 1..n-2 borrows the MLP before it (of 30: targets 2, 4, ..., 28)."""
    return ["--share", "next", "--layers", inner(n), "--rank", "64"]


def aggressive(n: int) -> List[str]:
    """One reference serves the three layers after it (of 30: 21 targets)."""
    return ["--share", "next:3", "--layers", inner(n), "--rank", "32"]


def span(k: int, where: str, n: int) -> str:
    """--layers of ``k`` targets (every other layer, each borrowing the one before) early, in the
    middle or late in a stack of ``n`` layers (the last layer is never a target)."""
    start = {"early": 1, "middle": n // 2 - k, "late": n - 1 - 2 * k}[where]
    return f"{start}:{start + 2 * k}"


def span_targets(layers: str) -> List[int]:
    a, b = map(int, layers.split(":"))
    return list(range(a + 1, b, 2))


def flag(flags: List[str], name: str) -> str:
    return flags[flags.index(name) + 1]


# -- the variants: one table, made in order by build_variants -------------------------------------

Made = Dict[str, Path]  # the folder of every variant made so far, by name
Rule = Callable[[Made, Optional[str]], Tuple[tuple, dict]]


@dataclass(frozen=True)
class Variant:
    """One model of the run: how it is made and where the report shows it."""

    name: str
    group: Optional[str]  # the report's table; None: a step the report does not show
    label: str  # with a rule: formatted with the facts the rule returns
    stage: str  # slw (from the original), sft or quantize (of source), given (source's folder), mlx-4bit (of source)
    source: Optional[str] = None  # the variant it starts from; None: the original
    flags: tuple = ()  # the command's flags besides the budget's (Steps adds those)
    tokens: Optional[int] = None  # SLW calibration tokens; None: the budget's
    rule: Optional[Rule] = None  # (made, source) -> (flags put before ``flags``, label facts)


def share_of(folder: Path) -> Dict[int, Optional[int]]:
    return {int(t): r for t, r in read_config(folder)["sharp"]["share"].items()}


def matched_budget(original: Path, sharp_slw: Path) -> int:
    """SHARP's trainable budget: the recovery parameters of the default setting at rank 64."""
    return sharemap.savings(read_config(original), share_of(sharp_slw), 64)["recovery_params"]


def matched_lora(made: Made, source: Optional[str]) -> Tuple[tuple, dict]:
    """LoRA on every block from the default setting's first target on, at the rank whose
    trainable count is closest to SHARP's budget."""
    cfg = read_config(made[source])
    blocks = cfg["num_hidden_layers"] - min(share_of(made["sharp-slw"]))
    r = lora_rank_for(cfg, matched_budget(made["original"], made["sharp-slw"]), blocks)
    removed = read_config(made["original"])["num_hidden_layers"] - cfg["num_hidden_layers"]
    return ("--lora-rank", r, "--lora-layers", blocks), {"r": r, "removed": removed}


def same_size(made: Made, source: Optional[str]) -> Tuple[tuple, dict]:
    """Whole layers removed (every other one from the top, the last kept, each worth what the
    layer-pruning baseline removes per layer) until about as many parameters are stored as
    SHARP's default stores."""
    orig = stored_params(made["original"])
    per_layer = (orig - stored_params(made["layer-prune"])) / len(share_of(made["sharp-slw"]))
    k = max(1, round((orig - stored_params(made["sharp"])) / per_layer))
    drop = list(range(read_config(made["original"])["num_hidden_layers"] - 2, 0, -2))[:k]
    return ("--share", json.dumps({str(t): t - 1 for t in sorted(drop)})), {"removed": k}


def variants(b: Budget, n: int) -> List[Variant]:
    """Every model of a run at budget ``b`` from an original of ``n`` layers, in report order
    (each after those it starts from or its rule reads)."""

    def slw(name, group, label, *flags, tokens=None, rule=None):
        return Variant(name, group, label, "slw", None, flags, tokens, rule)

    def sft(name, group, label, source, *flags, rule=None):
        return Variant(name, group, label, "sft", source, flags, rule=rule)

    def quantized(name, group, label, source, *flags):
        return Variant(name, group, label, "quantize", source, flags)

    def given(name, group, label, source=None):
        return Variant(name, group, label, "given", source)

    D, A, k = default(n), aggressive(n), b.ablation_targets
    pos = {where: span(k, where, n) for where in ("early", "middle", "late")}
    late = pos["late"]
    NEXT = ("--share", "next", "--layers")
    LATE = (*NEXT, late)  # the ablations after the position one vary one thing on these targets
    chat = ("--data", str(ROOT / "data" / "chat" / "train.jsonl"))
    CONTROL, control = ("--baseline", "lowrank"), "control (low-rank, nothing borrowed)"
    PRUNE = ("--baseline", "layer-prune")
    tokens = {tag: int(b.slw_tokens * f) for f, tag in ((0.25, "quarter"), (4, "4x"))}
    scales = "rank 63 + row/column scales"
    first, *_, last = span_targets(late)

    def listed(layers):
        return ", ".join(map(str, span_targets(layers)))

    def grouped(g):
        return ("--share", f"next:{g}", "--layers", late, "--rank", 64)

    return [
        # The default setting: SHARP and its baselines.
        given("original", "main", "original (float32)"),
        slw("direct", "main", "direct sharing (no recovery)", *D, "--baseline", "direct"),
        slw("mlp-prune", "main", "MLP pruning", *D, "--baseline", "mlp-prune"),
        slw("layer-prune", "main", "layer pruning", *D, *PRUNE),
        slw("sharp-slw", "main", "SHARP, SLW only", *D),
        slw("sharp-noslw", None, "", *D, "--no-slw"),
        sft("sharp-sftonly", "main", "SHARP, SFT only (no SLW)", "sharp-noslw"),
        sft("sharp", "main", "SHARP, SLW + SFT", "sharp-slw"),
        slw("control-slw", "main", f"{control}, SLW only", *D, *CONTROL),
        sft("control", "main", f"{control}, SLW + SFT", "control-slw"),
        # Pruning fine-tuned with LoRA on the same span of blocks, at SHARP's trainable budget.
        sft("mlp-prune-ft", "main", "MLP pruning + LoRA r{r} (matched budget)", "mlp-prune", rule=matched_lora),
        sft("layer-prune-ft", "main", "layer pruning + LoRA r{r} (matched budget)", "layer-prune", rule=matched_lora),
        # The aggressive setting: one reference serves the three layers after it.
        slw("direct65", "aggressive", "direct sharing", *A, "--baseline", "direct"),
        slw("mlp-prune65", "aggressive", "MLP pruning", *A, "--baseline", "mlp-prune"),
        slw("sharp65-slw", "aggressive", "SHARP, SLW only", *A),
        sft("sharp65", "aggressive", "SHARP, SLW + SFT", "sharp65-slw"),
        slw("control65-slw", "aggressive", "control, SLW only", *A, *CONTROL),
        sft("control65", "aggressive", "control, SLW + SFT", "control65-slw"),
        # Cross-domain: recover on chat only.
        sft("sharp-chat", "cross", "SHARP, SLW (all domains) + SFT on chat only", "sharp-slw", *chat),
        *(
            [
                slw("sharp-slw-chat", None, "", *D, *chat),
                sft("sharp-chat-only", "cross", "SHARP, SLW and SFT on chat only", "sharp-slw-chat", *chat),
            ]
            if b.chat_only
            else []
        ),
        # Ablations, after SLW (no SFT). The position ablation moves the ablation targets along the
        # stack; the others vary one thing on the late ones (each <- the layer before, rank 64).
        *[slw(f"pos-{w}", "position", f"{w}: targets {listed(s)}", *NEXT, s, "--rank", 64) for w, s in pos.items()],
        given(
            "next-late", "grouping", f"next: every other layer of {first}..{last} borrows the one before", "pos-late"
        ),
        *[
            slw(f"next{g}-late", "grouping", f"next:{g} over {late}: one reference for {g} layers", *grouped(g))
            for g in (2, 3)
        ],
        *[
            x
            for r in b.ranks
            for x in (
                slw(f"rank{r}", "rank", f"rank {r}", *LATE, "--rank", r),
                slw(f"control-rank{r}", "rank", f"control, rank {r}", *LATE, "--rank", r, *CONTROL),
            )
        ],
        given("rank64", "rank", "rank 64", "pos-late"),
        slw("control-rank64", "rank", "control, rank 64", *LATE, "--rank", 64, *CONTROL),
        *[
            slw(f"data-{t}", "data", f"SLW on {n_:,} tokens", *LATE, "--rank", 64, tokens=n_)
            for t, n_ in tokens.items()
        ],
        given("data-1x", "data", f"SLW on {b.slw_tokens:,} tokens", "pos-late"),
        # The parameterization at a matched count: through both stages at the default targets
        # (full), or SLW on the ablation targets (--quick).
        *(
            [
                slw("scales-slw", "param", f"{scales}, SLW only", *D[:4], "--rank", 63, "--recovery", "scaled"),
                sft("scales", "param", f"{scales}, SLW + SFT", "scales-slw"),
                given("plain-slw", "param", "rank 64, SLW only", "sharp-slw"),
                given("plain", "param", "rank 64, SLW + SFT", "sharp"),
            ]
            if b.scales_full
            else [
                slw("scales-slw", "param", f"{scales}, SLW only", *LATE, "--rank", 63, "--recovery", "scaled"),
                given("plain-slw", "param", "rank 64, SLW only", "pos-late"),
            ]
        ),
        # A smaller model of SHARP's stored size, fine-tuned with LoRA at SHARP's trainable budget.
        slw("smaller", "smaller", "{removed} layers removed, no fine-tuning", *PRUNE, rule=same_size),
        sft("smaller-ft", "smaller", "{removed} layers removed + LoRA r{r}", "smaller", rule=matched_lora),
        # Deployment: 4-bit checkpoints (the embedded GGUF's codes; recovery at 8 bits where its rank allows).
        quantized("original-4bit", "deploy", "original, 4-bit (GGUF codes)", None),
        Variant("mlx-4bit", "deploy", "original, mlx_lm.convert -q (group 64)", "mlx-4bit"),
        quantized(
            "sharp-4bit", "deploy", "SHARP default, 4-bit (GGUF codes, 8-bit recovery)", "sharp", "--recovery-bits", 8
        ),
        quantized(
            "sharp-4bit-emb6",
            "deploy",
            "SHARP default, 4-bit (GGUF codes, 8-bit recovery, embedding re-quantized to 6 bits)",
            "sharp",
            *("--recovery-bits", 8, "--embedding-bits", 6),
        ),
        quantized("sharp65-4bit", "deploy", "SHARP ~65%, 4-bit (GGUF codes, float16 recovery)", "sharp65"),
    ]


def pairs(options: dict) -> list:
    return [x for kv in options.items() for x in kv]


class Steps:
    """Runs the project's commands in-process, once: a step whose output folder exists is skipped."""

    def __init__(self, b: Budget, models: Path, runs: Path, original: Path, log):
        self.b, self.models, self.runs, self.original, self.log = b, models, runs, original, log
        # Seconds per step, kept in runs/ so that a run resumed across invocations reports them all.
        self._walls = runs / "walls.json"
        self.wall: Dict[str, float] = json.loads(self._walls.read_text()) if self._walls.exists() else {}
        self.earlier = set(self.wall)  # steps an earlier invocation of this run did

    def record(self, name: str, seconds: float) -> None:
        self.wall[name] = seconds
        write_atomic(self._walls, json.dumps(self.wall, indent=1))

    def _run(self, name: str, main, argv: List[str]) -> Path:
        out = self.models / name
        if not out.exists():
            argv = [str(a) for a in argv] + ["--out", str(out)]
            self.log(f"[{name}] python -m {main.__module__} {' '.join(argv)}")
            tic = time.perf_counter()
            if main(argv) != 0:
                raise SharpError(f"step {name} failed (see the error above); fix it and run again to continue")
            self.record(name, time.perf_counter() - tic)
        return out

    def slw(self, name: str, *argv, tokens: Optional[int] = None) -> Path:
        b = self.b
        budget = {"--tokens": tokens or b.slw_tokens, "--slw-steps": b.slw_steps, "--slw-batch-rows": b.slw_batch_rows}
        return self._run(name, train.main, ["--stage", "slw", "--model", self.original, *pairs(budget), *argv])

    def sft(self, name: str, src: Path, *argv) -> Path:
        b = self.b
        budget = {
            "--sft-steps": b.sft_steps,
            "--batch-size": b.sft_batch,
            "--seq-len": b.sft_seq,
            "--valid-every": b.sft_steps,
            "--valid-windows": b.sft_valid_windows,
            "--max-train-tokens": b.sft_tokens,
            "--run-dir": self.runs / "sft" / name,
        }
        return self._run(
            name, train.main, ["--stage", "sft", "--model", src, "--teacher", self.original, *pairs(budget), *argv]
        )

    def quantize(self, name: str, src: Path, *argv) -> Path:
        return self._run(name, quantize.main, ["--model", src, *argv])

    def make(self, x: Variant, made: Made, flags: tuple) -> Path:
        """The folder of variant ``x`` (made from its source unless it exists) with ``flags``."""
        src = made[x.source] if x.source else self.original
        if x.stage == "given":
            return src
        if x.stage == "mlx-4bit":
            return bench.mlx_4bit(src)
        if x.stage == "slw":
            return self.slw(x.name, *flags, tokens=x.tokens)
        return {"sft": self.sft, "quantize": self.quantize}[x.stage](x.name, src, *flags)


def build_variants(s: Steps, table: List[Variant]) -> Dict[str, dict]:
    """Make every variant of ``table`` in order; {name: {"path", "group", "label"}} of those the
    report shows, in its order."""
    made: Made = {}
    v: Dict[str, dict] = {}
    for x in table:
        flags, facts = x.rule(made, x.source) if x.rule else ((), {})
        made[x.name] = s.make(x, made, (*flags, *x.flags))
        if x.group:
            label = x.label.format(**facts) if x.rule else x.label
            v[x.name] = {"path": str(made[x.name]), "group": x.group, "label": label}
    return v


def measure(v: Dict[str, dict], b: Budget, runs: Path, log) -> Tuple[float, float]:
    """Perplexity and the multiple-choice check of every model folder once (a folder several
    variants share is measured once), cached per folder in runs/; the test text is tokenized and
    the items are built once for the whole run. Returns the seconds all folders' measurements
    took, and those of the folders an earlier invocation measured."""
    from sharp_mlx.data.batches import load_tokens
    from sharp_mlx.eval import cloze

    tests = [ROOT / "data" / d / "test.jsonl" for d in DOMAINS]
    cache = runs / "eval"
    cache.mkdir(parents=True, exist_ok=True)
    names: Dict[str, List[str]] = {}  # folder -> the variants that are it
    for name, info in v.items():
        names.setdefault(info["path"], []).append(name)
    wants_cloze = {path: any(b.checks_cloze(n, v[n]["group"]) for n in ns) for path, ns in names.items()}

    def record(path: str, out: dict) -> None:
        for n in names[path]:
            v[n].update(out)

    todo = []
    for path, ns in names.items():
        f = cache / f"{ns[0]}.json"
        fresh = f.exists() and f.stat().st_mtime > (Path(path) / "config.json").stat().st_mtime
        out = json.loads(f.read_text()) if fresh else None
        if out is None or (wants_cloze[path] and not out["cloze"]):
            todo.append(Path(path))
        else:
            record(path, out)

    def prepare(tokenizer):
        return {f: load_tokens(f, tokenizer)[0] for f in tests}, {
            f: cloze.build_items(f, tokenizer, b.cloze_items) for f in tests
        }

    tic = time.perf_counter()
    for path, model, (streams, items) in evaluate.over_models(todo, prepare, float_weights=True):
        key = str(path)
        log(f"[eval] {names[key][0]}")
        out = {
            "ppl": {
                f.parent.name: evaluate.perplexity(
                    model, streams[f], b.eval_seq, max_windows=b.eval_windows, desc=f"{f} on {path.name}"
                )["ppl"]
                for f in tests
            },
            "cloze": {
                f.parent.name: cloze.score(model, items[f], CLOZE_BATCH, desc=f"{f} on {path.name}") for f in tests
            }
            if wants_cloze[key]
            else {},
            "params": stored_params(path) if "quantization" not in read_config(path) else None,
            "bytes": folder_bytes(path),
        }
        out["wall_s"], tic = time.perf_counter() - tic, time.perf_counter()  # loading this folder included
        write_atomic(cache / f"{names[key][0]}.json", json.dumps(out))
        record(key, out)
    total = sum(v[ns[0]].get("wall_s", 0.0) for ns in names.values())
    return total, total - sum(v[names[str(p)][0]]["wall_s"] for p in todo)


BENCH_ROWS = ("original-4bit", "sharp-4bit", "sharp-4bit-emb6", "sharp65-4bit")  # against mlx-lm's 4-bit


def bench_step(v: Dict[str, dict], steps: Steps, runs: Path, log) -> Tuple[dict, Dict[str, str]]:
    """The deployable variants timed against mlx-lm's 4-bit original (once): timings by row, and
    each row's variant."""
    t0 = time.perf_counter()
    rows = [bench.Row(bench.REFERENCE, Path(v["mlx-4bit"]["path"]), "mlx_lm")]
    names = {bench.REFERENCE: "mlx-4bit"}
    for n in BENCH_ROWS:
        rows.append(bench.Row(n, Path(v[n]["path"])))
        names[n] = n
    bench_file = runs / "bench.json"
    if bench_file.exists():
        return json.loads(bench_file.read_text()), names
    log("[bench]")
    cfg = bench.BenchConfig(reps=steps.b.bench_reps, max_tokens=16, prompts=list(bench.PROMPTS[:1]), ppl_windows=0)
    timing = bench.time_rows(rows, cfg)
    bench_file.write_text(json.dumps(timing, indent=1))
    steps.record("bench", time.perf_counter() - t0)
    return timing, names


def summarise(v: Dict[str, dict], original_config: dict) -> None:
    base = v["original"]["ppl"]
    for info in v.values():
        info["x_geo"], info["x_max"] = geomean_ratio(info["ppl"], {d: base[d] for d in DOMAINS})
        if info["cloze"]:
            acc = [info["cloze"][d]["accuracy"] for d in DOMAINS]
            info["cloze_all"] = sum(acc) / len(acc)
        cfg = read_config(info["path"])
        sharp = SharpArgs.from_dict(cfg.get("sharp"))
        if sharp.share:
            info["targets"] = len(sharp.share)
            info["mlp_cut"] = sharemap.savings(original_config, sharp.share, sharp.rank, sharp.kind)["mlp_cut"]
        elif cfg.get("num_hidden_layers") != original_config["num_hidden_layers"]:
            info["targets"] = original_config["num_hidden_layers"] - cfg["num_hidden_layers"]


# -- the report ----------------------------------------------------------------------------------


def fig_paths(report: Path) -> Dict[str, Path]:
    d = report.parent / (report.stem.lower() + "-figures")
    return {k: d / f"{k}.png" for k in ("similarity", "perplexity", "rank", "pareto", "cloze")}


def plots(v: Dict[str, dict], figs: Dict[str, Path], analysis_png: Path) -> None:
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs["similarity"].parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(analysis_png, figs["similarity"])

    rows = [n for n, i in v.items() if i["group"] in ("main", "aggressive", "smaller")]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.5))
    ax.barh(
        range(len(rows)),
        [v[n]["x_geo"] for n in rows],
        color=["C0" if v[n]["group"] == "main" else "C1" if v[n]["group"] == "aggressive" else "C2" for n in rows],
    )
    ax.set_yticks(range(len(rows)), [f"{n} ({v[n]['group']})" for n in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.25, color="k", ls="--", lw=0.8)
    ax.set_xlabel("test perplexity / original's (geometric mean of 5 domains, log scale; dashed: 1.25x)")
    fig.tight_layout()
    save_figure(fig, figs["perplexity"])

    fig, ax = plt.subplots(figsize=(6, 4))
    for prefix, label in (
        ("rank", "SHARP (borrowed MLP + rank r)"),
        ("control-rank", "control (rank r, nothing borrowed)"),
    ):
        pts = sorted(
            (v[f"{prefix}{r}"]["params"], v[f"{prefix}{r}"]["x_geo"], r)
            for r in (16, 32, 64, 128)
            if f"{prefix}{r}" in v
        )
        ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], "o-", label=label)
        for p in pts:
            ax.annotate(f"r{p[2]}", (p[0] / 1e6, p[1]), fontsize=7)
    ax.set_xlabel("parameters stored (M)")
    ax.set_ylabel("perplexity / original (geo mean), after SLW")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, figs["rank"])

    fig, ax = plt.subplots(figsize=(7, 5))
    seen = set()
    for n, i in v.items():
        if i["path"] in seen:
            continue
        seen.add(i["path"])
        color = "C3" if i["group"] == "deploy" else "C0" if n.startswith(("sharp", "scales")) else "C7"
        ax.scatter(i["bytes"] / 1e6, i["x_geo"], color=color, s=14)
        ax.annotate(n, (i["bytes"] / 1e6, i["x_geo"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes on disk (MB, log)")
    ax.set_ylabel("perplexity / original (geo mean, log)")
    ax.set_title("every variant: size vs quality (blue: SHARP, red: 4-bit)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, figs["pareto"])

    rows = [n for n, i in v.items() if "cloze_all" in i and i["group"] in ("main", "aggressive", "smaller", "deploy")]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.5))
    acc = [v[n]["cloze_all"] for n in rows]
    err = [math.sqrt(a * (1 - a) / sum(v[n]["cloze"][d]["n"] for d in DOMAINS)) for n, a in zip(rows, acc)]
    ax.barh(range(len(rows)), acc, xerr=err, color="C2")
    chance = 1 / next(iter(v.values()))["cloze"][DOMAINS[0]].get("choices", 4)
    ax.axvline(chance, color="k", ls="--", lw=0.8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("next-sentence accuracy, all domains (dashed: chance; bars: 1 s.e.)")
    fig.tight_layout()
    save_figure(fig, figs["cloze"])


def table(v: Dict[str, dict], names: List[str], extra: Optional[Dict[str, str]] = None) -> str:
    extra = extra or {}
    header = [
        "variant",
        *extra,
        "params stored",
        "stored-MLP cut",
        *DOMAINS,
        "x orig (geo)",
        "worst x",
        "next-sentence acc",
    ]
    rows = []
    for n in names:
        i = v[n]
        cut = f"{i['mlp_cut']:.1%}" if "mlp_cut" in i else ("-" if "targets" not in i else f"{i['targets']} layers")
        params = f"{i['params'] / 1e6:.1f}M" if i.get("params") else f"{i['bytes'] / 1e6:.1f} MB"
        rows.append(
            [f"{n}: {i['label']}", *(extra[k](n) for k in extra), params, cut]
            + [f"{i['ppl'][d]:,.2f}" for d in DOMAINS]
            + [f"{i['x_geo']:.2f}", f"{i['x_max']:.2f}", f"{i['cloze_all']:.1%}" if "cloze_all" in i else "-"]
        )
    return markdown_table(header, rows)


def wins(v, a: str, b: str) -> str:
    """'a beats b on k of 5 domains (geo x_a vs x_b)'."""
    k = sum(v[a]["ppl"][d] < v[b]["ppl"][d] for d in DOMAINS)
    return f"{a} {v[a]['x_geo']:.2f}x vs {b} {v[b]['x_geo']:.2f}x: {a} lower on {k} of {len(DOMAINS)} domains"


def write_report(res: dict, out: Path) -> None:
    v, b = res["variants"], res["budget"]
    figs = fig_paths(out)
    rel = {k: p.relative_to(out.parent) for k, p in figs.items()}
    names = lambda g: [n for n, i in v.items() if i["group"] == g]  # noqa: E731
    s = []
    s.append("# SHARP on SmolLM2-135M: results\n")
    s.append(
        f"Made by `{res['command']}` on {res['date']} in {res['wall_s'] / 60:.0f} min on {res['machine']}. "
        f"Every number below comes from that run; `{out.with_suffix('.json').name}` beside this file holds them all.\n"
    )
    s.append(
        "Budgets of this run: " + ", ".join(f"{k} {v_}" for k, v_ in b.items()) + ". "
        "SLW = Single Layer Warmup (`--slw-steps` Adam steps per layer after the activation-aware SVD init and the "
        "closed-form down-projection fit); SFT = end-to-end fine-tuning of the recovery factors, distilled from the "
        "original (`--loss kd`). Test perplexity: non-overlapping windows of the held-out test split of each domain; "
        "`x orig (geo)` is the geometric mean over the five domains of the ratio to the original, `worst x` the worst "
        "domain's ratio. Next-sentence accuracy: `python -m sharp_mlx.cloze` (pick the true next sentence of held-out "
        "text "
        f"among 4, {b['cloze_items']} items per domain, chance 25%).\n"
    )
    if res.get("quick"):
        s.append(
            "**This is the `--quick` run**: budgets far below the main job's (`python -m sharp_mlx.pipeline`), so "
            "every "
            "recovered model is further from the original than the same recipe gets with more data; the comparisons "
            "between "
            "variants (same budget each) are what it shows. `python experiments/reproduce.py` runs the same at the main "
            "job's "
            "budgets.\n"
        )

    s.append("## Where SHARP wins and where it loses\n")
    s.extend(f"- {line}" for line in res["verdict"])
    s.append("")

    a = res["analysis"]
    s.append("## 1. Adjacent-layer similarity\n")
    s.append(
        f"`python -m sharp_mlx.analyze --tokens {b['analyze_tokens']}`: for each layer t, how well MLP_(t-1) predicts "
        "MLP_t on "
        "t's real inputs (cosine, relative L2 error: 1.0 is as bad as no MLP), and the error of each projection with "
        "the "
        "borrowed weights alone (`err@0`), after the best rank-64 correction (`err@64`) and for a rank-64 stand-in "
        "with "
        f"nothing borrowed (`own@64`).\n\n![similarity]({rel['similarity']})\n"
    )
    s.append("```\n" + a["table"] + "\n```\n")
    s.append(
        "`--share auto` (adjacent references, greedy from the lowest error) picks: "
        + "; ".join(f"cut {c}: {m}" for c, m in a["auto"].items())
        + "\n"
    )

    s.append("## 2. In-domain perplexity\n")
    n = res["model"]["num_hidden_layers"]
    targets, A = span_targets(inner(n)), aggressive(n)
    references = sorted(set(sharemap.parse_share(flag(A, "--share"), n, flag(A, "--layers")).values()))
    s.append(
        f"Default setting `{' '.join(default(n))}` (every other layer of {targets[0]}..{targets[-1]} borrows the MLP "
        "of the layer before it). "
        "Pruning baselines remove the same targets' MLPs (MLP pruning) or whole layers (layer pruning) and are then "
        "fine-tuned with LoRA on every linear layer from the first target on, at SHARP's trainable budget "
        f"({res['budget_params']:,} parameters), with the same SFT.\n"
    )
    s.append(table(v, names("main")) + "\n")
    s.append(
        f"Aggressive setting `{' '.join(A)}` (layers {references[0]}, {references[1]}, ..., {references[-1]} each "
        "serve the three layers after them):\n"
    )
    s.append(table(v, names("aggressive")) + "\n")
    s.append(f"![perplexity]({rel['perplexity']})\n")

    s.append("## 3. Cross-domain recovery\n")
    s.append("SFT on the chat domain's training split only (the default setting), evaluated on all five:\n")
    s.append(table(v, ["sharp"] + names("cross")) + "\n")

    s.append("## 4. Ablations (after SLW, no SFT)\n")
    k_ab = b["ablation_targets"]
    s.append(
        f"Targets early, in the middle or late in the stack ({k_ab} targets each, rank 64); the other ablations vary "
        "one thing "
        f"on the late {k_ab} (`--share next --layers {span(k_ab, 'late', n)}`):\n"
    )
    s.append(table(v, names("position")) + "\n")
    s.append("One reference for 1, 2 or 3 following layers (rank 64):\n")
    s.append(table(v, names("grouping")) + "\n")
    s.append(f"Recovery rank, SHARP against the control at the same rank:\n\n![rank]({rel['rank']})\n")
    s.append(table(v, names("rank")) + "\n")
    where = (
        "through both stages at the default targets" if b["scales_full"] else f"after SLW on the late {k_ab} targets"
    )
    s.append(
        f"Parameterization at a matched parameter count, {where}: plain rank 64 against rank 63 plus a row and a "
        "column scaling "
        f"vector per projection ({res['model']['hidden_size']} + {res['model']['intermediate_size']} values per "
        "projection: exactly one rank unit):\n"
    )
    s.append(table(v, names("param")) + "\n")
    s.append("SLW calibration data (the init, the closed-form fit and the Adam steps all see it):\n")
    s.append(table(v, names("data")) + "\n")

    s.append("## 5. Against a smaller model of the same size\n")
    s.append(
        "The original with whole layers removed (every other layer from the top, the last kept) until it stores about "
        "as "
        "many parameters as SHARP's default, fine-tuned with LoRA at SHARP's trainable budget on the same data:\n"
    )
    s.append(table(v, ["sharp"] + names("smaller")) + "\n")

    s.append("## 6. Deployment\n")
    bn = res["bench"]
    s.append(
        f"`python -m sharp_mlx.bench` rows (fresh processes, alternating, {b['bench_reps']} repetitions, 1 prompt, 16 "
        "new tokens; "
        "perplexity of 4-bit rows computed with their weights' float values):\n"
    )
    ref = bn[bench.REFERENCE]
    s.append(
        markdown_table(
            [
                "row",
                "disk MB",
                "x mlx-lm",
                "load s (in-process)",
                "decode tok/s",
                "x mlx-lm",
                "peak GB",
                "x orig (geo)",
                "worst x",
            ],
            [
                [
                    row,
                    f"{r['bytes'] / 1e6:.1f}",
                    f"{r['bytes'] / ref['bytes']:.2f}",
                    f"{r['load_s']['median']:.3f}",
                    f"{r['decode_tps']['median']:.1f}",
                    f"{r['decode_tps']['median'] / ref['decode_tps']['median']:.2f}",
                    f"{r['peak_memory_gb']['median']:.2f}",
                    f"{v[res['bench_names'][row]]['x_geo']:.2f}",
                    f"{v[res['bench_names'][row]]['x_max']:.2f}",
                ]
                for row, r in bn.items()
            ],
        )
    )
    s.append(
        "\nEvery variant, bytes on disk against perplexity (float32 folders and 4-bit "
        f"ones):\n\n![pareto]({rel['pareto']})\n"
    )
    s.append(table(v, names("deploy")) + "\n")

    s.append("## 7. Next-sentence check beyond perplexity\n")
    s.append(f"![cloze]({rel['cloze']})\n")
    cloze_rows = [
        [n, *(f"{i['cloze'][d]['accuracy']:.0%}" for d in DOMAINS), f"{i['cloze_all']:.1%}"]
        for n, i in v.items()
        if "cloze_all" in i
    ]
    s.append(markdown_table(["variant", *DOMAINS, "all"], cloze_rows))
    n_items = sum(v["original"]["cloze"][d]["n"] for d in DOMAINS)
    s.append(
        f"\n{n_items} items in all: one standard error is about {math.sqrt(0.25 / n_items):.0%} at 50% accuracy, so "
        "differences smaller than ~2 standard errors are noise.\n"
    )

    c = res.get("compare")
    if c:
        s.append("## Reproducibility\n")
        s.append(
            f"Against an earlier run from scratch (`{c['command']}`, {c['date']}, {c['wall_s'] / 60:.0f} min): of "
            f"{c['variants']} variants "
            f"both have, {c['ppl_identical']} have every perplexity identical; the largest difference is "
            + (f"{c['ppl_max_rel']:.2%} ({c['ppl_worst']})" if c["ppl_worst"] else "none")
            + f". Next-sentence accuracies: {c['cloze_compared'] - len(c['cloze_differ'])} of {c['cloze_compared']} variants identical"
            + (f"; differing: {', '.join(c['cloze_differ'])}" if c["cloze_differ"] else "")
            + ".\n"
        )
    s.append("## Steps and wall time\n")
    s.append(markdown_table(["step", "wall s"], [[k, f"{w:.0f}"] for k, w in res["steps"].items()]))
    resumed = res.get("resumed")
    s.append(
        f"\nTotal {res['wall_s'] / 60:.1f} min"
        + (
            ": the run was resumed, so this is the last invocation's time plus the recorded times of the "
            f"{len(resumed)} steps "
            "earlier invocations did (kept in `walls.json` beside the run's log); evaluation is cached per model "
            "folder and "
            "its row sums every folder's time, whichever invocation measured it.\n"
            if resumed
            else ", in one invocation.\n"
        )
    )
    write_atomic(out, "\n".join(s))


def write_results(res: dict, report: Path, runs: Path, analysis_dir: Path) -> None:
    """Write the results record (runs/ and beside the report), the figures and the report."""
    record = json.dumps(res, indent=1)
    (runs / "results.json").write_text(record)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_suffix(".json").write_text(record)
    plots(res["variants"], fig_paths(report), analysis_dir / "similarity.png")
    write_report(res, report)


def compare(res: dict, other: dict) -> dict:
    """How far this run's perplexities and next-sentence accuracies are from an earlier run's
    (``other``, a results record), over the variants both have."""
    a, b = res["variants"], other["variants"]
    common = [n for n in a if n in b and a[n].get("ppl") and b[n].get("ppl")]
    rel = {n: max(abs(a[n]["ppl"][d] - b[n]["ppl"][d]) / b[n]["ppl"][d] for d in DOMAINS) for n in common}
    worst = max(rel, key=rel.get) if rel else None
    cloze = [n for n in common if a[n].get("cloze") and b[n].get("cloze")]
    return {
        "command": other["command"],
        "date": other["date"],
        "wall_s": other["wall_s"],
        "variants": len(common),
        "ppl_max_rel": rel[worst] if worst else None,
        "ppl_worst": worst,
        "ppl_identical": sum(r == 0 for r in rel.values()),
        "cloze_compared": len(cloze),
        "cloze_differ": [
            n for n in cloze if any(a[n]["cloze"][d]["accuracy"] != b[n]["cloze"][d]["accuracy"] for d in DOMAINS)
        ],
    }


def verdict(v: Dict[str, dict], bn: dict, names: Dict[str, str]) -> List[str]:
    out = []
    out.append(
        f"Default setting ({v['sharp']['mlp_cut']:.1%} of stored MLP parameters removed, recovery counted): SHARP "
        "after SLW + SFT is "
        f"{v['sharp']['x_geo']:.2f}x the original's perplexity (worst domain {v['sharp']['x_max']:.2f}x); the 1.25x "
        "bar is " + ("met." if v["sharp"]["x_max"] <= 1.25 else "not met.")
    )
    for other in ("control", "mlp-prune-ft", "layer-prune-ft", "smaller-ft", "sharp-sftonly", "direct"):
        if other in v:
            out.append(f"SHARP against {v[other]['label']}: {wins(v, 'sharp', other)}.")
    out.append(f"Aggressive setting ({v['sharp65']['mlp_cut']:.1%}): {wins(v, 'sharp65', 'control65')}.")
    if "scales" in v:
        out.append(f"Scaling vectors at a matched count: {wins(v, 'scales', 'plain')}.")
    elif "scales-slw" in v:
        out.append(f"Scaling vectors at a matched count (after SLW): {wins(v, 'scales-slw', 'plain-slw')}.")
    out.append(
        "Borrowed weights at every rank after SLW: "
        + "; ".join(
            wins(v, f"rank{r}", f"control-rank{r}")
            for r in (16, 32, 64, 128)
            if f"rank{r}" in v and f"control-rank{r}" in v
        )
        + "."
    )
    ref = bn[bench.REFERENCE]
    for row in bn:
        if names[row].startswith("sharp"):
            r = bn[row]
            out.append(
                f"{row}: {r['bytes'] / ref['bytes']:.2f}x the bytes of mlx-lm's 4-bit original and "
                f"{r['decode_tps']['median'] / ref['decode_tps']['median']:.2f}x its decode speed, "
                f"at {v[names[row]]['x_geo']:.2f}x the original's perplexity (mlx-lm's 4-bit: "
                f"{v['mlx-4bit']['x_geo']:.2f}x)."
            )
    out.append(
        f"Next-sentence accuracy: original {v['original']['cloze_all']:.1%}, SHARP {v['sharp']['cloze_all']:.1%}, "
        f"control {v['control']['cloze_all']:.1%}, "
        f"MLP pruning + LoRA {v['mlp-prune-ft']['cloze_all']:.1%}, smaller model {v['smaller-ft']['cloze_all']:.1%}."
    )
    return out


# -- the run: analysis, variants, measurements, report ----------------------------------------------


def analysis_step(steps: Steps, b: Budget, runs: Path, log) -> Tuple[Path, dict, Dict[float, str]]:
    """The layer analysis of the original (once), and the maps ``--share auto`` picks from it."""
    analysis_dir = runs / "analyze"
    if not (analysis_dir / "analysis.json").exists():
        log("[analyze]")
        t0 = time.perf_counter()
        argv = ["--model", str(steps.original), "--tokens", str(b.analyze_tokens), "--out", str(analysis_dir)]
        if analyze.main(argv) != 0:
            raise SharpError("the layer analysis failed (see above)")
        steps.record("analyze", time.perf_counter() - t0)
    analysis = json.loads((analysis_dir / "analysis.json").read_text())
    n = analysis["config"]["num_hidden_layers"]
    auto = {}
    for cut in (0.25, 0.38):
        try:
            auto[cut] = str(sharemap.parse_share("auto", n, layers=f"0:{n}", similarity=analysis, cut=cut, rank=64))
        except SharpError as e:
            auto[cut] = str(e)
    return analysis_dir, analysis, auto


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python experiments/reproduce.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small budgets (28 min on 2 quiet CPU cores)")
    p.add_argument(
        "--report",
        type=Path,
        help="report to write (default: experiments/results/RESULTS.md with --quick, else experiments/results/RESULTS-full.md)",
    )
    p.add_argument("--force", action="store_true", help="redo every step")
    p.add_argument(
        "--compare",
        type=Path,
        help="an earlier run's results (its RESULTS.json) to compare this run's numbers with, in the report",
    )
    return p


@cli("reproduce")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    earlier = None
    if args.compare:  # read now: a run takes long, and it may be the report this run replaces
        try:
            earlier = json.loads(args.compare.read_text())
            missing = {"variants", "command", "date", "wall_s"} - set(earlier)  # what compare() reads
        except (OSError, ValueError, TypeError) as e:
            missing = str(e)
        if missing:
            raise SharpError(
                f"--compare {args.compare}: not a results record of this script ({missing}); pass an earlier run's "
                "RESULTS.json"
            )
    import os
    import shutil

    import mlx.core as mx

    os.chdir(ROOT)
    tic = time.perf_counter()
    b = QUICK if args.quick else FULL
    tag = "repro-quick" if args.quick else "repro"
    models, runs = ROOT / "models" / tag, ROOT / "runs" / tag
    report = args.report or ROOT / "docs" / "results" / ("RESULTS.md" if args.quick else "RESULTS-full.md")
    if args.force:
        shutil.rmtree(models, ignore_errors=True)
        shutil.rmtree(runs, ignore_errors=True)
    models.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    log_file = open(runs / "log.txt", "a")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        log_file.flush()

    original = ensure_default_model()
    ensure_data(ROOT / "data")
    steps = Steps(b, models, runs, original, log)

    analysis_dir, analysis, auto = analysis_step(steps, b, runs, log)
    original_config = read_config(original)
    v = build_variants(steps, variants(b, original_config["num_hidden_layers"]))
    eval_s, eval_earlier_s = measure(v, b, runs, log)
    steps.record("evaluate", eval_s)
    timing, names = bench_step(v, steps, runs, log)

    summarise(v, original_config)
    res = {
        "command": "python experiments/reproduce.py" + (" --quick" if args.quick else ""),
        "tag": tag,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__} ({'CPU' if not mx.metal.is_available() else 'Metal'})",
        "budget": asdict(b),
        "model": {k: original_config[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size")},
        "budget_params": matched_budget(original, Path(v["sharp-slw"]["path"])),
        "analysis": {"table": analyze.table(analysis), "auto": auto},
        "variants": v,
        "bench": timing,
        "bench_names": names,
        "steps": {k: round(w, 1) for k, w in steps.wall.items()},
    }
    res["verdict"] = verdict(v, timing, names)
    if earlier:
        res["compare"] = compare(res, earlier)
    # A resumed run's wall time: every step's own time (kept across invocations) plus this
    # invocation's time outside the steps it ran.
    now = time.perf_counter() - tic
    res["resumed"] = sorted(steps.earlier - {"evaluate"})
    res["wall_s"] = (
        now + eval_earlier_s + sum(w for k, w in steps.wall.items() if k in steps.earlier and k != "evaluate")
    )
    write_results(res, report, runs, analysis_dir)
    log(f"wrote {report} in {res['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
