"""Load, decode and perplexity benchmark: SHARP checkpoints against mlx-lm's 4-bit original.

    python -m sharp_mlx.bench --reference models/smollm2-135m-instruct \\
        --row mine=models/my-sharp-4bit --out runs/bench
    python -m sharp_mlx.bench --row "original-4bit mlx-lm@mlx_lm=models/x-mlx-4bit" \\
        --row mine=models/mine --out runs/bench

Every repetition of every row is a fresh process, started in alternating order (rows forward on
even repetitions, backward on odd ones), so no row enjoys a warmer process than another. Each
process times its load twice: from the moment it was spawned to the weights being materialised
(interpreter, imports and reading the weights: what a user waits for) and the weight-loading call
alone (in-process: ``sharp_mlx.io.checkpoint.load_model`` or ``mlx_lm.utils.load_model``, then
``mx.eval``); the tokenizer, the same for every row, is loaded and timed after that. It then
answers every prompt greedily and reports time to first token, prompt and decode tokens/s, and
peak memory (MLX's allocator, this process only). The report gives medians with min-max, and
ratios against mlx-lm's 4-bit conversion of the original run by mlx-lm itself (``mlx_lm.load`` +
``stream_generate``), the tool a user would otherwise pick.

Perplexity is measured once per row on the test split of every domain, with quantized weights
replaced by their float values (``quantize.dequantized``: the same function to float16
precision; MLX's CPU quantized matmul is ~25x slower than float for many-token batches, and
decoding is timed above anyway).

``--reference ORIGINAL`` adds the float original and mlx-lm's 4-bit conversion of it (made with
``mlx_lm.convert`` when missing) as the rows every ratio is taken against.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .errors import ArgumentParser, SharpError, cli
from .options import at_least, between
from .quant.codes import folder_bytes
from .recipes import PAPER
from .reports import geomean_ratio, markdown_table, save_figure, write_report

PROMPTS = (
    "What is the capital of France?",
    "Explain in three sentences why the sky is blue.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
)
REFERENCE = "original-4bit mlx-lm"  # the row every ratio is taken against
WORKER = Path(__file__).parent / "eval" / "bench_worker.py"  # run by path: an mlx-lm row never imports sharp_mlx


@dataclass
class Row:
    name: str
    path: Path
    loader: str = "sharp_mlx"  # or "mlx_lm"
    note: str = ""


@dataclass
class BenchConfig:
    reps: int = 3
    max_tokens: int = 48
    prompts: List[str] = field(default_factory=lambda: list(PROMPTS))
    ppl_windows: int = 8
    seq_len: int = 256
    cold: bool = False  # drop the weights from the page cache before each run (a first load, read from disk)
    data: List[Path] = field(default_factory=lambda: sorted(Path("data").glob("*/test.jsonl")))


def memory_bandwidth_gbs(mb: int = 512, reps: int = 5) -> float:
    """Read bandwidth of one core summing a float32 array much larger than the caches (median GB/s)."""
    a = np.ones(mb * 2**20 // 4, dtype=np.float32)
    a.sum()
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - tic)
    return a.nbytes / statistics.median(times) / 1e9


def evict(folder: Path) -> None:
    """Drop ``folder``'s weight files from the page cache, so the next load reads them from disk
    (Linux; the pages of a file nobody has open go at once)."""
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_worker(row: Row, cfg: BenchConfig) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if cfg.cold:
        evict(row.path)
    cmd = [
        sys.executable,
        str(WORKER),
        repr(time.time()),
        row.loader,
        str(row.path),
        str(cfg.max_tokens),
        json.dumps(cfg.prompts),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in p.stdout.splitlines() if x.startswith("BENCH ")), None)
    if p.returncode != 0 or line is None:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise SharpError(f"benchmark of {row.name} ({row.path}) failed: {tail}")
    return json.loads(line[len("BENCH ") :])


def summary(values: List[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def time_rows(rows: List[Row], cfg: BenchConfig) -> Dict[str, dict]:
    from tqdm import tqdm

    raw = {r.name: [] for r in rows}
    with tqdm(total=cfg.reps * len(rows), desc="bench", unit="run") as bar:
        for rep in range(cfg.reps):
            for row in rows if rep % 2 == 0 else rows[::-1]:
                raw[row.name].append(run_worker(row, cfg))
                bar.update()
    out = {}
    for row in rows:
        reps = raw[row.name]
        runs = [run for rep in reps for run in rep["runs"]]
        out[row.name] = {
            "path": str(row.path),
            "loader": row.loader,
            "note": row.note,
            "bytes": folder_bytes(row.path),
            "model_bytes": reps[0]["model_bytes"],
            "load_spawn_s": summary([r["load_spawn_s"] for r in reps]),
            "load_s": summary([r["load_s"] for r in reps]),
            "tokenizer_s": summary([r["tokenizer_s"] for r in reps]),
            "ttft_s": summary([r["ttft_s"] for r in runs]),
            "prompt_tps": summary([r["prompt_tps"] for r in runs]),
            "decode_tps": summary([r["decode_tps"] for r in runs]),
            "peak_memory_gb": summary([r["peak_memory_gb"] for r in runs]),
            "generation_tokens": [r["generation_tokens"] for r in reps[0]["runs"]],
            "tokens": [r["tokens"] for r in reps[0]["runs"]],
        }
    return out


def perplexities(rows: List[Row], cfg: BenchConfig) -> Dict[str, Dict[str, float]]:
    """{row: {domain: ppl}}, quantized weights scored by their float values; each folder once."""
    from .eval.perplexity import evaluate

    folders = list(dict.fromkeys(row.path for row in rows))
    results = evaluate(folders, cfg.data, cfg.seq_len, 4, cfg.ppl_windows, float_weights=True)
    return {row.name: {f.parent.name: results[str(row.path)][str(f)]["ppl"] for f in cfg.data} for row in rows}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def geo_x(p: Dict[str, float], ppl: Dict[str, Dict[str, float]]) -> float:
    """A row's perplexities ``p`` against the ``original`` row's: the geometric mean of the ratios (nan without one)."""
    return geomean_ratio(p, ppl["original"])[0] if "original" in ppl else float("nan")


TIMING_HEADER = (
    "row", "disk MB", "x", "load from spawn s", "x", "load in-process s", "x", "first token s", "prompt tok/s",
    "decode tok/s", "x", "peak GB", "GB/s",
)  # fmt: skip


def timing_cells(name: str, r: dict, ref: dict) -> List[str]:
    """One row of the timing table; ``ref``: the reference row every ratio is against."""

    def cell(s: dict, fmt: str = ".2f") -> str:
        return f"{s['median']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]"

    def x(key: str) -> str:
        return f"{ratio(r[key]['median'], ref[key]['median']):.2f}"

    return [
        name, f"{r['bytes'] / 1e6:.1f}", f"{ratio(r['bytes'], ref['bytes']):.2f}", cell(r["load_spawn_s"]),
        x("load_spawn_s"), cell(r["load_s"], ".3f"), x("load_s"), cell(r["ttft_s"]),
        f"{r['prompt_tps']['median']:.1f}", cell(r["decode_tps"], ".1f"), x("decode_tps"),
        f"{r['peak_memory_gb']['median']:.2f}", f"{r['model_bytes'] * r['decode_tps']['median'] / 1e9:.2f}",
    ]  # fmt: skip


def markdown(report: dict) -> str:
    rows, ref = report["rows"], report["rows"][REFERENCE]
    m = report["machine"]
    lines = [
        f"Machine: {m['machine']}; one core's measured read bandwidth {m['bandwidth_gbs']:.1f} GB/s. "
        f"{report['config']['reps']} repetitions per row, each a fresh process, alternating order; "
        f"{len(report['config']['prompts'])} chat prompts, greedy, up to {report['config']['max_tokens']} new tokens. "
        "Load: weights only (the tokenizer, "
        f"{statistics.median(r['tokenizer_s']['median'] for r in report['rows'].values()):.2f} s in every row, is "
        "loaded after)"
        + (
            "; cold: the weight files were dropped from the page cache before each run, so they are read from disk. "
            if report["config"].get("cold")
            else "; warm: the weight files are in the page cache. "
        )
        + (
            f"Medians, [min-max]; ratios against `{REFERENCE}` (`mlx_lm.convert -q` of the original, loaded and run "
            "by mlx-lm)."
        ),
        "",
        markdown_table(TIMING_HEADER, [timing_cells(name, r, ref) for name, r in rows.items()]),
    ]
    ppl = report.get("perplexity")
    if ppl:
        domains = list(next(iter(ppl.values())))
        lines += [
            "",
            f"Perplexity, test splits ({report['config']['ppl_windows']} windows of {report['config']['seq_len']} "
            "tokens per domain); "
            "last column: geometric mean of the ratios to the `original` row.",
            "",
            markdown_table(
                ["row", *domains, "x original"],
                [[name, *(f"{p[d]:.2f}" for d in domains), f"{geo_x(p, ppl):.3f}"] for name, p in ppl.items()],
            ),
        ]
    notes = [f"- `{n}`: `{r['path']}`{' (' + r['note'] + ')' if r['note'] else ''}" for n, r in rows.items()]
    same = [n for n, r in rows.items() if n != REFERENCE and r["path"] == ref["path"]]
    for n in same:
        notes.append(f"- `{n}` and `{REFERENCE}` greedy tokens identical: {rows[n]['tokens'] == ref['tokens']}")
    return "\n".join(lines + ["", "Rows:"] + notes) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = list(rows)
    ref = rows[REFERENCE]
    panels = [
        ("disk bytes", [ratio(r["bytes"], ref["bytes"]) for r in rows.values()]),
        ("load (in-process)", [ratio(r["load_s"]["median"], ref["load_s"]["median"]) for r in rows.values()]),
        ("decode tokens/s", [ratio(r["decode_tps"]["median"], ref["decode_tps"]["median"]) for r in rows.values()]),
    ]
    ppl = report.get("perplexity") or {}
    if "original" in ppl:
        panels.append(
            ("perplexity (geo. mean x original)", [geo_x(ppl[n], ppl) if n in ppl else float("nan") for n in names])
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(names) + 1.8), sharey=True)
    for ax, (title, values) in zip(axes, panels):
        ax.barh(names, values, color=["tab:gray" if n == REFERENCE else "tab:blue" for n in names])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(title + ("" if title.startswith("perplexity") else f"\nx {REFERENCE}"), fontsize=9)
        ax.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, path)


def mlx_4bit(original: Path, out: Optional[Path] = None) -> Path:
    """mlx-lm's own 4-bit conversion of a float model folder (``mlx_lm.convert -q``, group 64),
    made once at ``out`` (default: ``<original>-mlx-4bit``)."""
    import importlib

    from .io.checkpoint import atomic_dir

    out = Path(out) if out else Path(f"{original}-mlx-4bit")
    if not out.exists():
        mlx_convert = importlib.import_module("mlx_lm.convert").convert
        with atomic_dir(out) as tmp:
            tmp.rmdir()  # mlx_lm.convert refuses an existing folder
            mlx_convert(hf_path=str(original), mlx_path=str(tmp), quantize=True, q_group_size=64, q_bits=4)
    return out


def reference_rows(original: Path) -> List[Row]:
    """The float original and mlx-lm's 4-bit conversion of it run by mlx-lm (every ratio's reference)."""
    return [
        Row("original", original, note="float"),
        Row(REFERENCE, mlx_4bit(original), "mlx_lm", "mlx_lm.convert -q, group 64, loaded and run by mlx-lm"),
    ]


def run(rows: List[Row], cfg: BenchConfig, out: Path, command: str) -> str:
    """Time (and score) ``rows``; write OUT.md, OUT.json and OUT.png; return the markdown."""
    import platform

    if REFERENCE not in {r.name for r in rows}:
        raise SharpError(
            f"no row is named {REFERENCE!r}: add --row '{REFERENCE}@mlx_lm=FOLDER' (mlx-lm's 4-bit original) or "
            "--reference ORIGINAL"
        )
    tic = time.time()
    report = {
        "command": command,
        "machine": {
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
            "bandwidth_gbs": memory_bandwidth_gbs(),
        },
        "config": {k: (v if k != "data" else [str(x) for x in v]) for k, v in asdict(cfg).items()},
        "rows": time_rows(rows, cfg),
    }
    if cfg.ppl_windows > 0 and cfg.data:
        report["perplexity"] = perplexities(rows, cfg)
    report["wall_s"] = time.time() - tic
    out.parent.mkdir(parents=True, exist_ok=True)
    text = f"# Benchmark\n\n`{report['command']}` ({report['wall_s'] / 60:.0f} min)\n\n" + markdown(report)
    write_report(out, md=text, record=report)
    plot(report, out.with_name(out.name + ".png"))
    return text


def parse_row(spec: str) -> Row:
    name, sep, path = spec.partition("=")
    loader = "sharp_mlx"
    if name.endswith("@mlx_lm"):
        name, loader = name[: -len("@mlx_lm")], "mlx_lm"
    if not sep or not name or not path:
        raise SharpError(f"--row {spec!r}: write NAME=FOLDER (NAME@mlx_lm=FOLDER to load it with mlx-lm)")
    if not Path(path).is_dir():
        raise SharpError(f"--row {spec!r}: {path} is not a model folder")
    return Row(name, Path(path), loader)


def add_timing_flags(p: argparse.ArgumentParser) -> None:
    """The flags of what is measured and how (see ``config_from``)."""
    p.add_argument("--reps", type=at_least(1), default=3, help="fresh processes per row (default: %(default)s)")
    p.add_argument(
        "--prompts",
        type=between(1, len(PROMPTS), int),
        default=len(PROMPTS),
        help=f"how many of the {len(PROMPTS)} built-in prompts to run (default: %(default)s)",
    )
    p.add_argument("--max-tokens", type=at_least(1), default=48, help="new tokens per prompt (default: %(default)s)")
    p.add_argument(
        "--eval-windows",
        type=at_least(0),
        default=PAPER.eval_windows,
        help="test windows per domain for perplexity; 0 skips it (default: %(default)s)",
    )
    p.add_argument(
        "--seq-len", type=at_least(2), default=PAPER.seq_len, help="perplexity window (default: %(default)s)"
    )
    p.add_argument("--data", type=Path, nargs="+", help="perplexity files (default: data/*/test.jsonl)")
    p.add_argument(
        "--cold",
        action="store_true",
        help="drop the weight files from the page cache before each run: load times of a first load, from disk (Linux)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sharp_mlx.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--row",
        action="append",
        type=parse_row,
        required=True,
        help=f"NAME=FOLDER (or NAME@mlx_lm=FOLDER), once per row; one must be {REFERENCE!r}@mlx_lm, "
        "or pass --reference",
    )
    p.add_argument(
        "--reference",
        type=Path,
        help=(
            "the float original: adds it and mlx-lm's 4-bit conversion of it (made at ORIGINAL-mlx-4bit if missing) "
            "as the reference rows"
        ),
    )
    p.add_argument("--out", type=Path, required=True, help="writes OUT.md, OUT.json, OUT.png")
    add_timing_flags(p)
    return p


def config_from(args) -> BenchConfig:
    """The BenchConfig of parsed bench flags (shared with scripts that add rows of their own)."""
    if min(args.reps, args.max_tokens, args.prompts) < 1:
        raise SharpError("--reps, --max-tokens and --prompts must be at least 1")
    if args.cold and not hasattr(os, "posix_fadvise"):
        raise SharpError(
            "--cold drops files from the page cache with posix_fadvise, which this system lacks: on macOS run `sudo "
            "purge` before a warm run instead"
        )
    cfg = BenchConfig(
        reps=args.reps,
        max_tokens=args.max_tokens,
        prompts=list(PROMPTS[: args.prompts]),
        ppl_windows=args.eval_windows,
        seq_len=args.seq_len,
        cold=args.cold,
    )
    if args.data:
        missing = [str(f) for f in args.data if not f.is_file()]
        if missing:
            raise SharpError(f"--data {missing[0]}: no such file; pass test files (.jsonl or .txt)")
        cfg.data = list(args.data)
    return cfg


@cli("sharp_mlx.bench")
def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = config_from(args)
    if args.reference is not None and not (args.reference / "config.json").exists():
        raise SharpError(f"--reference {args.reference}: not a model folder (no config.json)")
    rows = (reference_rows(args.reference) if args.reference else []) + args.row
    print(run(rows, cfg, args.out, "python -m sharp_mlx.bench " + " ".join(argv if argv is not None else sys.argv[1:])))


if __name__ == "__main__":
    raise SystemExit(main())
