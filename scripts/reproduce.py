"""Reproduce SHARP's tables and ablations on the embedded SmolLM2-135M, from scratch, in one run.

    python scripts/reproduce.py --quick    # small budgets: 28 min on 2 quiet CPU cores
    python scripts/reproduce.py            # the main job's budgets for every variant, into docs/results/RESULTS-full.md:
                                           # 7.3 hours on 2 CPU cores (measured, see below)
    python scripts/reproduce.py --quick --force --compare docs/results/RESULTS.json   # again from scratch, against the last run

Where the full run's time goes (7.3 h, runs/repro/walls.json): 4.5 h of training (43 steps;
a quiet SLW or SFT step takes 5-7 min, some were slowed by other jobs sharing the cores), then
2.7 h evaluating 42 folders (8 test windows per domain; 200 next-sentence items for the 28
that get them, 8 items a forward pass, 4-6 min a model) and the bench.

It trains every variant with the project's own commands (``python -m sharp_mlx.train`` ...,
called in-process), evaluates them all the same way (test perplexity on the five domains and a
next-sentence multiple-choice check), quantizes and benchmarks the deployable ones, and writes
``docs/results/RESULTS.md`` (``--quick``; the full run: ``docs/results/RESULTS-full.md``; or ``--report``) and
its figures. Every number in the report comes from the run that wrote it.

Models go to models/repro[-quick]/, logs and per-model results to runs/repro[-quick]/. Each step is
skipped when its output exists, so an interrupted run continues where it stopped (each step's
time is kept, and the report's total counts every invocation's steps); ``--force`` redoes everything.
"""

import argparse
import json
import math
import platform
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sharp_mlx import analyze, bench, evaluate, quantize, sharemap, train  # noqa: E402
from sharp_mlx.checkpoint import read_config  # noqa: E402
from sharp_mlx.convert import ensure_default_model  # noqa: E402
from sharp_mlx.corpora import DOMAINS  # noqa: E402
from sharp_mlx.errors import ArgumentParser, SharpError, cli  # noqa: E402
from sharp_mlx.model import SharpArgs  # noqa: E402
from sharp_mlx.pipeline import ensure_data  # noqa: E402

DEFAULT = ["--share", "next", "--layers", "1:29", "--rank", "64"]  # 14 targets 2, 4, ..., 28
AGGRESSIVE = ["--share", "next:3", "--layers", "1:29", "--rank", "32"]  # 21 targets, one reference per three


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


def span(k: int, where: str) -> str:
    """--layers of ``k`` targets (every other layer, each borrowing the one before) early, in the
    middle or late in the 30-layer stack."""
    start = {"early": 1, "middle": 15 - k, "late": 29 - 2 * k}[where]
    return f"{start}:{start + 2 * k}"


def span_targets(layers: str) -> List[int]:
    a, b = map(int, layers.split(":"))
    return list(range(a + 1, b, 2))


def header_params(folder: Path) -> int:
    """Parameters stored in a float model folder, from the safetensors headers (nothing loaded)."""
    total = 0
    for f in folder.glob("model*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def lora_rank_for(config: dict, budget: int, blocks: int) -> int:
    """The LoRA rank on every linear layer of the last ``blocks`` blocks of ``config``'s model
    whose trainable count is closest to ``budget`` (a target with no MLP has attention only)."""
    h, inter, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    attention = 2 * (h + heads * hd) + 2 * (h + kv * hd)  # q, o and k, v: in + out per rank
    no_mlp = {int(t) for t, r in ((config.get("sharp") or {}).get("share") or {}).items() if r is None}
    per_rank = sum(attention + (0 if i in no_mlp else 3 * (h + inter)) for i in range(n - blocks, n))
    return max(1, round(budget / per_rank))


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
        tmp = self._walls.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.wall, indent=1))
        tmp.replace(self._walls)

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
        return self._run(
            name,
            train.main,
            [
                "--stage",
                "slw",
                "--model",
                self.original,
                "--tokens",
                tokens or b.slw_tokens,
                "--slw-steps",
                b.slw_steps,
                "--slw-batch-rows",
                b.slw_batch_rows,
                *argv,
            ],
        )

    def sft(self, name: str, src: Path, *argv) -> Path:
        b = self.b
        return self._run(
            name,
            train.main,
            [
                "--stage",
                "sft",
                "--model",
                src,
                "--teacher",
                self.original,
                "--steps",
                b.sft_steps,
                "--batch-size",
                b.sft_batch,
                "--seq-len",
                b.sft_seq,
                "--eval-every",
                b.sft_steps,
                "--save-every",
                b.sft_steps,
                "--eval-windows",
                b.sft_valid_windows,
                "--max-train-tokens",
                b.sft_tokens,
                "--run-dir",
                self.runs / "sft" / name,
                *argv,
            ],
        )

    def quantize(self, name: str, src: Path, *argv) -> Path:
        return self._run(name, quantize.main, ["--model", src, *argv])


def build_variants(s: Steps) -> Dict[str, dict]:
    """Train every variant; {name: {"path", "group", "label"}} in report order."""
    v: Dict[str, dict] = {}

    def add(name: str, path: Path, group: str, label: str) -> None:
        v[name] = {"path": str(path), "group": group, "label": label}

    orig_cfg = read_config(s.original)
    add("original", s.original, "main", "original (float32)")
    # The default setting: every other layer of 1..28 borrows the MLP before it.
    add("direct", s.slw("direct", *DEFAULT, "--baseline", "direct"), "main", "direct sharing (no recovery)")
    mlp_prune = s.slw("mlp-prune", *DEFAULT, "--baseline", "mlp-prune")
    add("mlp-prune", mlp_prune, "main", "MLP pruning")
    layer_prune = s.slw("layer-prune", *DEFAULT, "--baseline", "layer-prune")
    add("layer-prune", layer_prune, "main", "layer pruning")
    sharp_slw = s.slw("sharp-slw", *DEFAULT)
    add("sharp-slw", sharp_slw, "main", "SHARP, SLW only")
    sftonly = s.sft("sharp-sftonly", s.slw("sharp-noslw", *DEFAULT, "--no-slw"))
    add("sharp-sftonly", sftonly, "main", "SHARP, SFT only (no SLW)")
    sharp = s.sft("sharp", sharp_slw)
    add("sharp", sharp, "main", "SHARP, SLW + SFT")
    control_slw = s.slw("control-slw", *DEFAULT, "--baseline", "lowrank")
    add("control-slw", control_slw, "main", "control (low-rank, nothing borrowed), SLW only")
    add("control", s.sft("control", control_slw), "main", "control (low-rank, nothing borrowed), SLW + SFT")
    # Pruning fine-tuned with LoRA on the same span of blocks, at SHARP's trainable budget.
    cfg = read_config(sharp_slw)
    share = {int(t): r for t, r in cfg["sharp"]["share"].items()}
    budget = sharemap.savings(orig_cfg, share, 64)["recovery_params"]
    first = min(share)
    n_mp = orig_cfg["num_hidden_layers"] - first
    r_mp = lora_rank_for(read_config(mlp_prune), budget, n_mp)
    add(
        "mlp-prune-ft",
        s.sft("mlp-prune-ft", mlp_prune, "--lora-rank", r_mp, "--lora-layers", n_mp),
        "main",
        f"MLP pruning + LoRA r{r_mp} (matched budget)",
    )
    lp_cfg = read_config(layer_prune)
    n_lp = lp_cfg["num_hidden_layers"] - first
    r_lp = lora_rank_for(lp_cfg, budget, n_lp)
    add(
        "layer-prune-ft",
        s.sft("layer-prune-ft", layer_prune, "--lora-rank", r_lp, "--lora-layers", n_lp),
        "main",
        f"layer pruning + LoRA r{r_lp} (matched budget)",
    )

    # The aggressive setting: one reference serves the three layers after it.
    add("direct65", s.slw("direct65", *AGGRESSIVE, "--baseline", "direct"), "aggressive", "direct sharing")
    add("mlp-prune65", s.slw("mlp-prune65", *AGGRESSIVE, "--baseline", "mlp-prune"), "aggressive", "MLP pruning")
    sharp65_slw = s.slw("sharp65-slw", *AGGRESSIVE)
    add("sharp65-slw", sharp65_slw, "aggressive", "SHARP, SLW only")
    add("sharp65", s.sft("sharp65", sharp65_slw), "aggressive", "SHARP, SLW + SFT")
    control65_slw = s.slw("control65-slw", *AGGRESSIVE, "--baseline", "lowrank")
    add("control65-slw", control65_slw, "aggressive", "control, SLW only")
    add("control65", s.sft("control65", control65_slw), "aggressive", "control, SLW + SFT")

    # Cross-domain: recover on chat only.
    chat = [str(ROOT / "data" / "chat" / "train.jsonl")]
    add(
        "sharp-chat",
        s.sft("sharp-chat", sharp_slw, "--data", *chat),
        "cross",
        "SHARP, SLW (all domains) + SFT on chat only",
    )
    if s.b.chat_only:
        add(
            "sharp-chat-only",
            s.sft("sharp-chat-only", s.slw("sharp-slw-chat", *DEFAULT, "--data", *chat), "--data", *chat),
            "cross",
            "SHARP, SLW and SFT on chat only",
        )

    # Ablations, after SLW (no SFT). The position ablation moves the ablation targets along the
    # stack; the others vary one thing on the late ones (each <- the layer before, rank 64).
    k_ab = s.b.ablation_targets
    for name in ("early", "middle", "late"):
        layers = span(k_ab, name)
        add(
            f"pos-{name}",
            s.slw(f"pos-{name}", "--share", "next", "--layers", layers, "--rank", 64),
            "position",
            f"{name}: targets {', '.join(map(str, span_targets(layers)))}",
        )
    late, late_span = v["pos-late"]["path"], span(k_ab, "late")
    LATE = ["--share", "next", "--layers", late_span]
    add(
        "next-late",
        late,
        "grouping",
        f"next: every other layer of {span_targets(late_span)[0]}..28 borrows the one before",
    )
    for k in (2, 3):
        add(
            f"next{k}-late",
            s.slw(f"next{k}-late", "--share", f"next:{k}", "--layers", late_span, "--rank", 64),
            "grouping",
            f"next:{k} over {late_span}: one reference for {k} layers",
        )
    for r in s.b.ranks:
        add(f"rank{r}", s.slw(f"rank{r}", *LATE, "--rank", r), "rank", f"rank {r}")
        add(
            f"control-rank{r}",
            s.slw(f"control-rank{r}", *LATE, "--rank", r, "--baseline", "lowrank"),
            "rank",
            f"control, rank {r}",
        )
    add("rank64", late, "rank", "rank 64")
    add(
        "control-rank64",
        s.slw("control-rank64", *LATE, "--rank", 64, "--baseline", "lowrank"),
        "rank",
        "control, rank 64",
    )
    for f, tag in ((0.25, "quarter"), (4, "4x")):
        tokens = int(s.b.slw_tokens * f)
        add(
            f"data-{tag}", s.slw(f"data-{tag}", *LATE, "--rank", 64, tokens=tokens), "data", f"SLW on {tokens:,} tokens"
        )
    add("data-1x", late, "data", f"SLW on {s.b.slw_tokens:,} tokens")
    # The parameterization at a matched count: through both stages at the default targets (full),
    # or SLW on the ablation targets (--quick).
    if s.b.scales_full:
        scaled_slw = s.slw("scales-slw", "--share", "next", "--layers", "1:29", "--rank", 63, "--scales")
        add("scales-slw", scaled_slw, "param", "rank 63 + row/column scales, SLW only")
        add("scales", s.sft("scales", scaled_slw), "param", "rank 63 + row/column scales, SLW + SFT")
        add("plain-slw", sharp_slw, "param", "rank 64, SLW only")
        add("plain", sharp, "param", "rank 64, SLW + SFT")
    else:
        add(
            "scales-slw",
            s.slw("scales-slw", *LATE, "--rank", 63, "--scales"),
            "param",
            "rank 63 + row/column scales, SLW only",
        )
        add("plain-slw", late, "param", "rank 64, SLW only")

    # A smaller model of SHARP's stored size: whole layers removed until the parameter count
    # matches, then fine-tuned with LoRA at SHARP's trainable budget on the same data.
    target = header_params(sharp)
    per_layer = (header_params(s.original) - header_params(layer_prune)) / len(share)
    k = max(1, round((header_params(s.original) - target) / per_layer))
    drop = list(range(orig_cfg["num_hidden_layers"] - 2, 0, -2))[:k]  # every other layer from the top, the last kept
    small = s.slw("smaller", "--share", json.dumps({str(t): t - 1 for t in sorted(drop)}), "--baseline", "layer-prune")
    sm_cfg = read_config(small)
    n_sm = sm_cfg["num_hidden_layers"] - first
    r_sm = lora_rank_for(sm_cfg, budget, n_sm)
    add("smaller", small, "smaller", f"{k} layers removed, no fine-tuning")
    add(
        "smaller-ft",
        s.sft("smaller-ft", small, "--lora-rank", r_sm, "--lora-layers", n_sm),
        "smaller",
        f"{k} layers removed + LoRA r{r_sm}",
    )

    # Deployment: 4-bit checkpoints (the embedded GGUF's codes; recovery at 8 bits where its rank allows).
    add("original-4bit", s.quantize("original-4bit", s.original), "deploy", "original, 4-bit (GGUF codes)")
    add("mlx-4bit", bench.mlx_4bit(ensure_default_model()), "deploy", "original, mlx_lm.convert -q (group 64)")
    add(
        "sharp-4bit",
        s.quantize("sharp-4bit", sharp, "--recovery-bits", 8),
        "deploy",
        "SHARP default, 4-bit (GGUF codes, 8-bit recovery)",
    )
    add(
        "sharp-4bit-emb6",
        s.quantize("sharp-4bit-emb6", sharp, "--recovery-bits", 8, "--embedding-bits", 6),
        "deploy",
        "SHARP default, 4-bit (GGUF codes, 8-bit recovery, embedding re-quantized to 6 bits)",
    )
    add(
        "sharp65-4bit",
        s.quantize("sharp65-4bit", v["sharp65"]["path"]),
        "deploy",
        "SHARP ~65%, 4-bit (GGUF codes, float16 recovery)",
    )
    return v


def measure(v: Dict[str, dict], b: Budget, runs: Path, log) -> Tuple[float, float]:
    """Perplexity and the multiple-choice check of every model folder once (a folder several
    variants share is measured once), cached per folder in runs/; the test text is tokenized and
    the items are built once for the whole run. Returns the seconds all folders' measurements
    took, and those of the folders an earlier invocation measured."""
    from sharp_mlx import cloze
    from sharp_mlx.data import load_tokens

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
            "params": header_params(path) if "quantization" not in read_config(path) else None,
            "bytes": quantize.folder_bytes(path),
        }
        out["wall_s"], tic = time.perf_counter() - tic, time.perf_counter()  # loading this folder included
        f = cache / f"{names[key][0]}.json"
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(f)
        record(key, out)
    total = sum(v[ns[0]].get("wall_s", 0.0) for ns in names.values())
    return total, total - sum(v[names[str(p)][0]]["wall_s"] for p in todo)


def geo(ratios: List[float]) -> float:
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def summarise(v: Dict[str, dict], original_config: dict) -> None:
    base = v["original"]["ppl"]
    for info in v.values():
        r = [info["ppl"][d] / base[d] for d in DOMAINS]
        info["x_geo"], info["x_max"] = geo(r), max(r)
        if info["cloze"]:
            acc = [info["cloze"][d]["accuracy"] for d in DOMAINS]
            info["cloze_all"] = sum(acc) / len(acc)
        cfg = read_config(info["path"])
        sharp = SharpArgs.from_dict(cfg.get("sharp"))
        if sharp.share:
            info["targets"] = len(sharp.share)
            info["mlp_cut"] = sharemap.savings(original_config, sharp.share, sharp.rank, sharp.scales)["mlp_cut"]
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
    fig.savefig(figs["perplexity"], dpi=120)
    plt.close(fig)

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
    fig.savefig(figs["rank"], dpi=120)
    plt.close(fig)

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
    fig.savefig(figs["pareto"], dpi=120)
    plt.close(fig)

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
    fig.savefig(figs["cloze"], dpi=120)
    plt.close(fig)


def table(v: Dict[str, dict], names: List[str], extra: Optional[Dict[str, str]] = None) -> str:
    extra = extra or {}
    head = (
        "| variant | "
        + (" | ".join(extra) + " | " if extra else "")
        + "params stored | stored-MLP cut | "
        + " | ".join(DOMAINS)
        + " | x orig (geo) | worst x | next-sentence acc |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for n in names:
        i = v[n]
        cut = f"{i['mlp_cut']:.1%}" if "mlp_cut" in i else ("-" if "targets" not in i else f"{i['targets']} layers")
        params = f"{i['params'] / 1e6:.1f}M" if i.get("params") else f"{i['bytes'] / 1e6:.1f} MB"
        cells = [extra[k](n) for k in extra] if extra else []
        lines.append(
            f"| {n}: {i['label']} | "
            + "".join(f"{c} | " for c in cells)
            + f"{params} | {cut} | "
            + " | ".join(f"{i['ppl'][d]:,.2f}" for d in DOMAINS)
            + f" | {i['x_geo']:.2f} | {i['x_max']:.2f} | "
            + (f"{i['cloze_all']:.1%}" if "cloze_all" in i else "-")
            + " |"
        )
    return "\n".join(lines)


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
            "variants (same budget each) are what it shows. `python scripts/reproduce.py` runs the same at the main "
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
    s.append(
        f"Default setting `{' '.join(DEFAULT)}` (every other layer of 2..28 borrows the MLP of the layer before it). "
        "Pruning baselines remove the same targets' MLPs (MLP pruning) or whole layers (layer pruning) and are then "
        "fine-tuned with LoRA on every linear layer from the first target on, at SHARP's trainable budget "
        f"({res['budget_params']:,} parameters), with the same SFT.\n"
    )
    s.append(table(v, names("main")) + "\n")
    s.append(
        f"Aggressive setting `{' '.join(AGGRESSIVE)}` (layers 1, 5, ..., 25 each serve the three layers after them):\n"
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
        f"on the late {k_ab} (`--share next --layers {span(k_ab, 'late')}`):\n"
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
        "vector per projection (576 + 1536 values per projection: exactly one rank unit):\n"
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
    s.append(
        "| row | disk MB | x mlx-lm | load s (in-process) | decode tok/s | x mlx-lm | peak GB | x orig (geo) | worst "
        "x |"
    )
    s.append("|---|---|---|---|---|---|---|---|---|")
    ref = bn[bench.REFERENCE]
    for row, r in bn.items():
        n = res["bench_names"][row]
        s.append(
            f"| {row} | {r['bytes'] / 1e6:.1f} | {r['bytes'] / ref['bytes']:.2f} | {r['load_s']['median']:.3f} | "
            f"{r['decode_tps']['median']:.1f} | "
            f"{r['decode_tps']['median'] / ref['decode_tps']['median']:.2f} | {r['peak_memory_gb']['median']:.2f} | "
            f"{v[n]['x_geo']:.2f} | {v[n]['x_max']:.2f} |"
        )
    s.append(
        "\nEvery variant, bytes on disk against perplexity (float32 folders and 4-bit "
        f"ones):\n\n![pareto]({rel['pareto']})\n"
    )
    s.append(table(v, names("deploy")) + "\n")

    s.append("## 7. Next-sentence check beyond perplexity\n")
    s.append(f"![cloze]({rel['cloze']})\n")
    s.append("| variant | " + " | ".join(DOMAINS) + " | all |")
    s.append("|---" * (len(DOMAINS) + 2) + "|")
    for n, i in v.items():
        if "cloze_all" in i:
            s.append(
                f"| {n} | "
                + " | ".join(f"{i['cloze'][d]['accuracy']:.0%}" for d in DOMAINS)
                + f" | {i['cloze_all']:.1%} |"
            )
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
    s.append("| step | wall s |\n|---|---|")
    s.extend(f"| {k} | {w:.0f} |" for k, w in res["steps"].items())
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
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(s))
    tmp.replace(out)


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


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python scripts/reproduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small budgets (28 min on 2 quiet CPU cores)")
    p.add_argument(
        "--report",
        type=Path,
        help="report to write (default: docs/results/RESULTS.md with --quick, else docs/results/RESULTS-full.md)",
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

    analysis_dir = runs / "analyze"
    if not (analysis_dir / "analysis.json").exists():
        log("[analyze]")
        t0 = time.perf_counter()
        if analyze.main(["--model", str(original), "--tokens", str(b.analyze_tokens), "--out", str(analysis_dir)]) != 0:
            raise SharpError("the layer analysis failed (see above)")
        steps.record("analyze", time.perf_counter() - t0)
    analysis = json.loads((analysis_dir / "analysis.json").read_text())
    auto = {}
    for cut in (0.25, 0.38):
        try:
            auto[cut] = str(
                sharemap.parse_share(
                    "auto",
                    analysis["config"]["num_hidden_layers"],
                    layers="0:30",
                    similarity=analysis,
                    cut=cut,
                    rank=64,
                )
            )
        except SharpError as e:
            auto[cut] = str(e)

    v = build_variants(steps)
    eval_s, eval_earlier_s = measure(v, b, runs, log)
    steps.record("evaluate", eval_s)

    t0 = time.perf_counter()
    rows = [bench.Row(bench.REFERENCE, Path(v["mlx-4bit"]["path"]), "mlx_lm")]
    names = {bench.REFERENCE: "mlx-4bit"}
    for n in ("original-4bit", "sharp-4bit", "sharp-4bit-emb6", "sharp65-4bit"):
        rows.append(bench.Row(n, Path(v[n]["path"])))
        names[n] = n
    bench_file = runs / "bench.json"
    if bench_file.exists():
        timing = json.loads(bench_file.read_text())
    else:
        log("[bench]")
        timing = bench.time_rows(
            rows, bench.BenchConfig(reps=b.bench_reps, max_tokens=16, prompts=list(bench.PROMPTS[:1]), ppl_windows=0)
        )
        bench_file.write_text(json.dumps(timing, indent=1))
        steps.record("bench", time.perf_counter() - t0)

    summarise(v, read_config(original))
    cfg = read_config(v["sharp-slw"]["path"])
    share = {int(t): r for t, r in cfg["sharp"]["share"].items()}
    res = {
        "command": "python scripts/reproduce.py" + (" --quick" if args.quick else ""),
        "tag": tag,
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__} ({'CPU' if not mx.metal.is_available() else 'Metal'})",
        "budget": asdict(b),
        "budget_params": sharemap.savings(read_config(original), share, 64)["recovery_params"],
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
    record = json.dumps(res, indent=1)
    (runs / "results.json").write_text(record)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_suffix(".json").write_text(record)
    plots(v, fig_paths(report), analysis_dir / "similarity.png")
    write_report(res, report)
    log(f"wrote {report} in {res['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
