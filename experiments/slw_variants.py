"""SLW variants against SHARP as it is and the control, at a matched stored size, SLW only.

    python experiments/slw_variants.py [--layers 11:29] [--tokens 16384] [--slw-steps 50] [--windows 8]

At the main job's targets (every other layer of --layers borrows the one before) and its SLW
budget, SLW only: SHARP at rank 64, the control (rank 64, nothing borrowed), and SHARP at rank 63
with row/column scaling vectors (one rank's worth: the same stored size) started at one and
started by least squares (``--scales-init lsq``), and SHARP and the control fitted in sequence
(``--slw-order sequential``), also to the block's output (``--slw-objective block``), and a jointly fitted stored weight (rank 48 per
target plus rank 16 per reference: the same stored size, ``--reference-rank``). Writes experiments/results/slw_variants.{md,json}: the
per-layer held-out MLP errors after the closed-form fits and after Adam, and test perplexity.
Each model is kept under models/scales-init/ and skipped when it exists. ``--variants A B``
runs only those; the rows of the others are kept from the report already there (the same
command and settings: SLW is deterministic), each row saying which run made it.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from sharp_mlx.convert import ensure_default_model
from sharp_mlx.data import corpora
from sharp_mlx.eval import perplexity as evaluate
from sharp_mlx.recipes import preset
from sharp_mlx.recovery.stages import SLWRun, run_stage
from sharp_mlx.reports import geomean_ratio, markdown_table, write_atomic

VARIANTS = {  # name -> SLWRun fields
    "sharp r64": dict(rank=64),
    "control r64": dict(rank=64, baseline="lowrank"),
    "scaled r63, ones": dict(rank=63, recovery="scaled"),
    "scaled r63, lsq": dict(rank=63, recovery="scaled", scales_init="lsq"),
    "sharp r64, sequential": dict(rank=64, slw_order="sequential"),
    "control r64, sequential": dict(rank=64, baseline="lowrank", slw_order="sequential"),
    "sharp r64, block": dict(rank=64, slw_order="sequential", slw_objective="block"),
    "control r64, block": dict(rank=64, baseline="lowrank", slw_order="sequential", slw_objective="block"),
    "scaled r63, lsq, block": dict(rank=63, recovery="scaled", scales_init="lsq", slw_order="sequential",
                                   slw_objective="block"),
    "joint r48 + reference r16": dict(rank=48, reference_rank=16),
    # the targets experiments/target_damage.py chose by their damage after SLW, instead of every other layer
    "sharp r64, targets by damage": dict(rank=64, share="experiments/results/target_damage_map.json", layers=None),
    "scaled r63, lsq, block, targets by damage": dict(rank=63, recovery="scaled", scales_init="lsq",
                                                      slw_order="sequential", slw_objective="block",
                                                      share="experiments/results/target_damage_map.json", layers=None),
    "control r64, block, targets by damage": dict(rank=64, baseline="lowrank", slw_order="sequential",
                                                  slw_objective="block", share="experiments/results/target_damage_map.json",
                                                  layers=None),
}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python experiments/slw_variants.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--layers", default="11:29")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--slw-steps", type=int, default=50)
    p.add_argument("--windows", type=int, default=8, help="test windows of 256 tokens per domain")
    p.add_argument("--out", type=Path, default=Path("experiments/results/slw_variants"))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="run only these (default: all)")
    args = p.parse_args(argv)
    command = "python experiments/slw_variants.py " + " ".join(argv if argv is not None else sys.argv[1:])
    previous = Path(f"{args.out}.json")
    kept = {}
    if args.variants and previous.exists():
        old = json.loads(previous.read_text())
        kept = {n: {**r, "run": r.get("run", old["command"])} for n, r in old["rows"].items() if n not in args.variants}
    tic = time.time()
    original = ensure_default_model()
    root = Path("models/scales-init")
    folders, records = {}, {}
    for name, fields in VARIANTS.items():
        if args.variants and name not in args.variants:
            continue
        out = root / name.replace(" ", "-").replace(",", "")
        if not out.exists():
            recipe = preset("paper", tokens=args.tokens, slw_steps=args.slw_steps,
                            **{"share": "next", "layers": args.layers, **fields})  # fmt: skip
            run_stage(SLWRun(original, out, recipe))
        folders[name] = out
        records[name] = json.loads((out / "training.json").read_text())[-1]
    tests = corpora.files("test")
    ppl = evaluate.evaluate([original, *folders.values()], tests, seq_len=256, max_windows=args.windows)
    base = {t: ppl[str(original)][t]["ppl"] for t in map(str, tests)}
    rows = {}
    for name, folder in folders.items():
        # the targets' errors (a joint fit also reports its references'; its closed form is its start)
        layers = {t: e for t, e in records[name]["layers"].items() if "group" not in e or "none" in e}
        x_geo, x_max = geomean_ratio({t: ppl[str(folder)][t]["ppl"] for t in base}, base)
        rows[name] = {
            "closed_form": sum(e.get("closed_form_down", e.get("init", e.get("start"))) for e in layers.values())
            / len(layers),
            "final": sum(e["final"] for e in layers.values()) / len(layers),
            "ppl": {Path(t).parent.name: ppl[str(folder)][t]["ppl"] for t in base},
            "x_geo": x_geo,
            "x_max": x_max,
            "wall_s": records[name]["wall_s"],
            "run": command,
        }
    rows = {n: ({**kept, **rows}[n]) for n in VARIANTS if n in kept or n in rows}
    runs = sorted({r["run"] for r in rows.values()})
    lines = [
        "# SLW variants at a matched stored size (SLW only)",
        "",
        f"`{command}` ({(time.time() - tic) / 60:.0f} min here, Linux x86_64, 2 cores, other jobs sharing them). "
        f"Targets: every other layer of {args.layers} borrows the one before; SLW on {args.tokens:,} calibration tokens, "
        f"{args.slw_steps} Adam steps per layer. MLP error: held-out relative error of the target's MLP output, mean over targets. "
        f"Perplexity: {args.windows} test windows of 256 tokens per domain, ratio to the original.",
        "",
        "",
        "Runs: " + "; ".join(f"({k + 1}) `{r}`" for k, r in enumerate(runs)) + ".",
        "",
        markdown_table(
            [
                "variant",
                "MLP error, closed form",
                "MLP error, final",
                *corpora.DOMAINS,
                "x original (geo)",
                "worst x",
                "run",
            ],
            [
                [
                    name,
                    f"{r['closed_form']:.3f}",
                    f"{r['final']:.3f}",
                    *(f"{r['ppl'][d]:.2f}" for d in corpora.DOMAINS),
                    f"{r['x_geo']:.2f}",
                    f"{r['x_max']:.2f}",
                    f"({runs.index(r['run']) + 1})",
                ]
                for name, r in rows.items()
            ],
        ),
    ]
    write_atomic(args.out.with_name(args.out.name + ".md"), "\n".join(lines) + "\n")
    write_atomic(args.out.with_name(args.out.name + ".json"), json.dumps({"command": command, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
