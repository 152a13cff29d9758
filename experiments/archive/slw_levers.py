"""What each Single Layer Warmup lever buys, per layer, on the embedded model; writes a report.

    python experiments/archive/slw_levers.py [--layers 15 22 28] [--tokens 8192] [--rank 64] [--out experiments/results/slw_levers.md]

For each target t (reference t-1) it captures t's real MLP inputs once, then fits the recovery
factors with each recipe and reports the held-out relative L2 error of the MLP output
(1.0 = as bad as no MLP at all). The control fits the same rank with no borrowed weights.
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from sharp_mlx.convert import ensure_default_model
from sharp_mlx.data.batches import load_tokens
from sharp_mlx.io.checkpoint import load
from sharp_mlx.recovery.capture import calibration_windows, capture_mlp_inputs
from sharp_mlx.recovery.slw import SLWConfig, fit_layer
from sharp_mlx.train import default_data

RECIPES = {
    "zero + Adam (paper)": (True, SLWConfig(init="zero", closed_form_down=False)),
    "svd init": (True, SLWConfig(init="svd", closed_form_down=False, steps=0)),
    "asvd init": (True, SLWConfig(init="asvd", closed_form_down=False, steps=0)),
    "asvd + closed-form down": (True, SLWConfig(init="asvd", steps=0)),
    "asvd + closed-form down + Adam": (True, SLWConfig(init="asvd")),
    "control: no borrowed weights, asvd + closed-form down + Adam": (False, SLWConfig(init="asvd")),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[15, 22, 28], help="target layers (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens (default: %(default)s)")
    p.add_argument("--rank", type=int, default=64, help="recovery rank (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="Adam steps where a recipe uses Adam (default: %(default)s)")
    p.add_argument(
        "--out", type=Path, default=Path("experiments/results/slw_levers.md"), help="report (markdown; JSON beside it)"
    )
    args = p.parse_args(argv)
    tic = time.perf_counter()
    model, tokenizer = load(ensure_default_model())
    streams = [load_tokens(f, tokenizer)[0][:200_000] for f in default_data("train")]
    windows = calibration_windows(streams, 256, args.tokens)
    inputs = capture_mlp_inputs(model, windows, args.layers)["mlp_inputs"]
    results = {}
    for t in args.layers:
        for name, (borrow, cfg) in RECIPES.items():
            cfg = replace(cfg, steps=args.steps if cfg.steps else 0)
            ref = model.model.layers[t - 1].mlp if borrow else None
            start = time.perf_counter()
            errors = fit_layer(ref, model.model.layers[t].mlp, inputs[t], args.rank, cfg)["errors"]
            results.setdefault(str(t), {})[name] = {
                "error": errors["final"],
                "direct": errors["none"],
                "seconds": time.perf_counter() - start,
            }
            print(f"layer {t} {name}: {errors['final']:.3f}", flush=True)
    lines = [
        f"# SLW levers: held-out relative error of MLP_t, rank {args.rank}",
        "",
        f"`python experiments/archive/slw_levers.py --layers {' '.join(map(str, args.layers))} --tokens {args.tokens} --rank "
        f"{args.rank} --steps {args.steps}`"
        f" ({windows.size} calibration tokens, 10% of rows held out; Linux x86_64, 2 cores; "
        f"{time.perf_counter() - tic:.0f} s in all)",
        "",
        "| recipe | " + " | ".join(f"layer {t} <- {t - 1}" for t in args.layers) + " |",
        "|---|" + "---|" * len(args.layers),
        "| direct sharing (no recovery) | "
        + " | ".join(f"{results[str(t)][next(iter(RECIPES))]['direct']:.3f}" for t in args.layers)
        + " |",
    ]
    for name in RECIPES:
        lines.append(f"| {name} | " + " | ".join(f"{results[str(t)][name]['error']:.3f}" for t in args.layers) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
