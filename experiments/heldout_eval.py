"""Perplexity on kinds of text that no training, calibration or selection step reads.

    python experiments/heldout_eval.py --model sharp=models/smollm2-135m-instruct-sharp-4bit \\
        mlx-q4g64=runs/frontier/mlx-q4g64 --out experiments/results/heldout

The kinds are ``sharp_mlx.data.heldout.HELDOUT`` (fetched by ``python -m sharp_mlx.heldout``, test
files only). Each model's perplexity on the first ``--windows`` windows of 256 tokens of each,
quantized weights run by their float values, as a ratio to the float original's; beside it the
same models' ratio on the five training domains' test splits, to see what generalises.
"""

import argparse
import json
import sys
from pathlib import Path

from sharp_mlx.convert import ensure_default_model
from sharp_mlx.data import corpora, heldout
from sharp_mlx.eval import perplexity as evaluate
from sharp_mlx.reports import geomean, markdown_table, write_atomic


def ratios(ppl: dict, base: dict) -> dict:
    r = {Path(f).parent.name: ppl[f]["ppl"] / base[f]["ppl"] for f in base}
    return {**r, "geo": geomean(r.values()), "worst": max(r.values())}


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python experiments/heldout_eval.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", nargs="+", required=True, help="LABEL=DIR")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("experiments/results/heldout"))
    args = p.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.model)
    missing = [str(f) for f in heldout.heldout_files() if not f.is_file()]
    if missing:
        sys.exit(f"error: {missing[0]} is missing: run `python -m sharp_mlx.heldout` first")
    original = ensure_default_model()
    folders = [original, *map(Path, models.values())]
    held = [str(f) for f in heldout.heldout_files()]
    seen = [str(f) for f in corpora.files("test")]
    ppl = evaluate.evaluate(folders, [*map(Path, held), *map(Path, seen)], seq_len=256, max_windows=args.windows,
                            float_weights=True)  # fmt: skip
    base = ppl[str(original)]
    rows = {}
    for label, folder in models.items():
        got = ppl[str(Path(folder))]
        rows[label] = {
            "path": folder,
            "heldout": ratios({f: got[f] for f in held}, {f: base[f] for f in held}),
            "domains": ratios({f: got[f] for f in seen}, {f: base[f] for f in seen}),
            "ppl": {f: got[f]["ppl"] for f in got},
        }
    kinds = [Path(f).parent.name for f in held]
    command = "python experiments/heldout_eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Held-out kinds of text",
        "",
        f"`{command}` (Linux x86_64, 2 cores). Perplexity on the first {args.windows} windows of 256 tokens of "
        "each kind that no training, calibration or selection step reads (`python -m sharp_mlx.heldout`: "
        + ", ".join(kinds)
        + "), quantized weights run by their float values, as a ratio to the float original ("
        + ", ".join(f"{k} {base[f]['ppl']:.2f}" for k, f in zip(kinds, held))
        + "). Beside it the geometric mean over the five training domains' test splits.",
        "",
        markdown_table(
            ["model", *kinds, "held-out geo.", "held-out worst", "five domains geo."],
            [
                [
                    label,
                    *(f"{r['heldout'][k]:.3f}" for k in kinds),
                    f"{r['heldout']['geo']:.3f}",
                    f"{r['heldout']['worst']:.3f}",
                    f"{r['domains']['geo']:.3f}",
                ]
                for label, r in rows.items()
            ],
        ),
    ]
    write_atomic(f"{args.out}.md", "\n".join(lines) + "\n")
    write_atomic(f"{args.out}.json", json.dumps({"command": command, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
