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
import math
import sys
from pathlib import Path

from sharp_mlx.convert import ensure_default_model
from sharp_mlx.data import corpora, heldout
from sharp_mlx.eval import perplexity as evaluate


def ratios(ppl: dict, base: dict) -> dict:
    r = {Path(f).parent.name: ppl[f]["ppl"] / base[f]["ppl"] for f in base}
    return {**r, "geo": math.exp(sum(map(math.log, r.values())) / len(r)), "worst": max(r.values())}


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
        "| model | " + " | ".join(kinds) + " | held-out geo. | held-out worst | five domains geo. |",
        "|---|" + "---|" * (len(kinds) + 3),
    ]
    for label, r in rows.items():
        h = r["heldout"]
        lines.append(
            f"| {label} | " + " | ".join(f"{h[k]:.3f}" for k in kinds)
            + f" | {h['geo']:.3f} | {h['worst']:.3f} | {r['domains']['geo']:.3f} |"
        )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".md", "\n".join(lines) + "\n"), (".json", json.dumps({"command": command, "rows": rows},
                                                                                    indent=1))):  # fmt: skip
        tmp = Path(f"{args.out}{suffix}.tmp")
        tmp.write_text(text)
        tmp.replace(f"{args.out}{suffix}")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
