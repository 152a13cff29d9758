"""How many SFT tokens does recovery need? Test perplexity against SFT tokens, per variant.

    python experiments/sft_scaling.py --variant sharp=models/X-slw control=models/Y-slw \\
        [--budgets 20480 40960 81920 163840] --out experiments/results/sft_scaling

Each variant is one SFT run (``sharp_mlx.train --stage sft``, distilled from the original, 2
windows of 256 tokens per step) whose learning rate is constant after its warmup, extended
budget by budget with ``--resume``: the model after B tokens is what a run of B tokens without
decay reaches. Budgets are taken in ascending order, every variant at one budget before any at
the next, so an interrupted run leaves every variant at the same budgets; a budget whose model
folder exists is skipped, so running again continues. After each budget: test perplexity on the
first ``--windows`` windows of each domain's test split, as in every other report.

Several invocations may write one ``--out`` at once (say one per variant, each on its own core
with ``OPENBLAS_NUM_THREADS=1``): each merges its points into the report under a lock, and the
report shows every variant it holds.

The report fits x(T) = 1 + a T^-b to each variant's geometric-mean ratio (least squares on
log(x - 1) against log T) and extrapolates the tokens at which it would reach ``--target``: an
extrapolation from the measured points, said as such.
"""

import argparse
import contextlib
import fcntl
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from sharp_mlx.convert import ensure_default_model
from sharp_mlx.data import corpora
from sharp_mlx.eval import perplexity as evaluate
from sharp_mlx.recipes import PAPER, preset
from sharp_mlx.recovery.stages import SFTRun, run_stage
from sharp_mlx.reports import geomean_ratio, markdown_table, save_figure, write_atomic

BATCH, SEQ = 2, 256


def fit_power(tokens, ratios):
    """(a, b) of x = 1 + a T^-b, least squares in log space; None with fewer than 2 points."""
    pts = [(math.log(t), math.log(x - 1)) for t, x in zip(tokens, ratios) if x > 1]
    if len(pts) < 2:
        return None
    slope, icept = np.polyfit(*zip(*pts), 1)
    return math.exp(icept), -slope


def plot(path: Path, rows: dict, fits: dict, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in rows.items():
        t = [p["tokens"] for p in pts]
        (line,) = ax.plot(t, [p["x_geo"] for p in pts], "o-", label=f"{name} (geo. mean)")
        ax.plot(t, [p["x_max"] for p in pts], "x:", color=line.get_color(), label=f"{name} (worst domain)")
        if fits.get(name):
            a, b = fits[name]
            grid = np.geomspace(t[0], max(t) * 16, 50)
            ax.plot(grid, 1 + a * grid**-b, "--", color=line.get_color(), alpha=0.5)
    ax.axhline(target, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("SFT tokens")
    ax.set_ylabel("perplexity / original's")
    ax.set_title("SFT token scaling (dashed: fitted 1 + a T^-b)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python experiments/sft_scaling.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--variant", nargs="+", required=True, help="NAME=SLW_FOLDER, one SFT run each")
    p.add_argument("--budgets", nargs="+", type=int, default=[20480, 40960, 81920, 163840], help="SFT tokens")
    p.add_argument("--learning-rate", type=float, default=PAPER.learning_rate)
    p.add_argument("--windows", type=int, default=8, help="test windows of 256 tokens per domain")
    p.add_argument("--max-train-tokens", type=int, default=200_000, help="of each training file")
    p.add_argument("--target", type=float, default=1.25, help="ratio to extrapolate to (default: %(default)s)")
    p.add_argument("--root", type=Path, default=Path("models/sft-scaling"))
    p.add_argument("--out", type=Path, default=Path("experiments/results/sft_scaling"))
    args = p.parse_args(argv)
    variants = dict(v.split("=", 1) for v in args.variant)
    per_step = BATCH * SEQ
    for b in args.budgets:
        if b % per_step:
            raise SystemExit(f"error: budget {b} is not a multiple of {per_step} tokens (one step): round it")
    original = ensure_default_model()
    tests = corpora.files("test")
    base = {Path(t).parent.name: r["ppl"] for t, r in evaluate.evaluate([original], tests, seq_len=SEQ,
                                                                        max_windows=args.windows)[str(original)].items()}  # fmt: skip
    results = json.loads(Path(f"{args.out}.json").read_text())["results"] if Path(f"{args.out}.json").exists() else {}
    tic = time.time()
    for budget in sorted(args.budgets):
        for name, slw in variants.items():
            key = f"{name}@{budget}"
            out = args.root / f"{name}-{budget}"
            if key in results and out.exists():
                continue
            run_dir = Path("runs/sft-scaling") / name
            steps = budget // per_step
            recipe = preset(
                "paper", sft_steps=steps, batch_size=BATCH, seq_len=SEQ, learning_rate=args.learning_rate,
                min_learning_rate=args.learning_rate, valid_every=40, valid_windows=8,
                max_train_tokens=args.max_train_tokens,
            )  # fmt: skip
            if not out.exists():
                run_stage(SFTRun(Path(slw), out, recipe, teacher=original, run_dir=run_dir,
                                 resume=(run_dir / "checkpoint.json").exists()))  # fmt: skip
            record = json.loads((out / "training.json").read_text())[-1]
            ppl = evaluate.evaluate([out], tests, seq_len=SEQ, max_windows=args.windows)[str(out)]
            per = {Path(t).parent.name: r["ppl"] for t, r in ppl.items()}
            x_geo, x_max = geomean_ratio(per, base)
            results[key] = {
                "variant": name, "tokens": budget, "ppl": per, "x_geo": x_geo,
                "x_max": x_max, "valid_loss": record["summary"]["final_valid_loss"],
                "tokens_per_s": record["summary"]["tokens_per_s"], "wall_s": record["wall_s"],
            }  # fmt: skip
            write(args, variants, results, base, tic)


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock for the read-merge-write of the report ``path`` (its lock file in runs/)."""
    lock = Path("runs/sft-scaling") / f"{path.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def write(args, variants, results, base, tic) -> None:
    report = Path(f"{args.out}.json")
    with locked(report):
        earlier = json.loads(report.read_text()) if report.exists() else {}  # other runs' points too
        merged = {**earlier.get("results", {}), **results}
        write_locked(args, {**earlier.get("variants", {}), **variants}, merged, base, tic)


def write_locked(args, variants, results, base, tic) -> None:
    variants = {n: v for n, v in variants.items() if any(r["variant"] == n for r in results.values())}
    rows = {n: sorted((r for r in results.values() if r["variant"] == n), key=lambda r: r["tokens"]) for n in variants}
    fits = {n: fit_power([r["tokens"] for r in pts], [r["x_geo"] for r in pts]) for n, pts in rows.items()}
    command = "python experiments/sft_scaling.py " + " ".join(sys.argv[1:])
    lines = [
        "# SFT token scaling",
        "",
        f"`{command}` (Linux x86_64, 2 cores shared with other jobs; {(time.time() - tic) / 60:.0f} min in this "
        f"invocation). Variants: " + ", ".join(f"`{n}` = SFT from `{v}`" for n, v in variants.items()) + ". "
        f"SFT: distillation from the original, {BATCH} x {SEQ} tokens per step, learning rate "
        f"{args.learning_rate:g} constant after 4 warmup steps, one run per variant resumed budget by budget. "
        f"Perplexity: the first {args.windows} test windows of 256 tokens per domain, float weights, ratio to the "
        "original.",
        "",
        markdown_table(
            ["variant", "SFT tokens", *corpora.DOMAINS, "x original (geo)", "worst x", "valid loss"],
            [
                [
                    n,
                    f"{r['tokens']:,}",
                    *(f"{r['ppl'][d]:.2f}" for d in corpora.DOMAINS),
                    f"{r['x_geo']:.3f}",
                    f"{r['x_max']:.3f}",
                    f"{r['valid_loss']:.4f}",
                ]
                for n, pts in rows.items()
                for r in pts
            ],
        ),
    ]
    lines += ["", f"Fitted x = 1 + a T^-b and the tokens at which it would reach {args.target}x (extrapolated):", ""]
    for n, f in fits.items():
        if f is None:
            lines.append(f"- `{n}`: fewer than two points")
            continue
        a, b = f
        reach = (a / (args.target - 1)) ** (1 / b) if b > 0 else math.inf
        speed = rows[n][-1]["tokens_per_s"]
        lines.append(
            f"- `{n}`: a = {a:.3g}, b = {b:.3f}; {args.target}x at ~{reach:.3g} tokens"
            + (f" (~{reach / speed / 3600:.3g} h at this machine's {speed:.0f} tok/s)" if math.isfinite(reach) else "")
        )
    write_atomic(f"{args.out}.md", "\n".join(lines) + "\n")
    write_atomic(
        f"{args.out}.json",
        json.dumps({"command": command, "base": base, "variants": variants, "results": results}, indent=1),
    )
    plot(Path(f"{args.out}.png"), rows, fits, args.target)
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
