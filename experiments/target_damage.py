"""Which layers to share: choose targets by their measured end-to-end damage after SLW.

    python experiments/target_damage.py [--targets 9] [--tokens 16384] [--slw-steps 50] [--rank 64]

Every layer t in 1..N-1 is a candidate that borrows layer t-1's MLP. Each candidate alone is
fitted by SLW exactly as the main job fits a target (rank ``--rank``, ``--tokens`` calibration
tokens of the train splits, ``--slw-steps`` Adam steps), and its damage is the increase in
next-token loss per token of the model with that one target, on windows of the validation splits
(never the test splits, which only the reports read). ``--targets`` of them are then chosen,
no two adjacent (a target's reference keeps its MLP), with the least summed damage (dynamic
programming over the layers). Writes experiments/results/target_damage.{md,json,png} and the chosen
share map as experiments/results/target_damage_map.json, which ``sharp_mlx.train --share FILE`` reads
(``experiments/slw_variants.py`` fits and measures it: "sharp r64, targets by damage").
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

from sharp_mlx.convert import ensure_default_model
from sharp_mlx.data import corpora
from sharp_mlx.eval.perplexity import window_losses
from sharp_mlx.io.checkpoint import load, read_config
from sharp_mlx.models import sharemap
from sharp_mlx.recovery.capture import calibration_text, capture_mlp_inputs
from sharp_mlx.recovery.slw import SLWConfig, fit_layer
from sharp_mlx.reports import markdown_table, save_figure, write_atomic

MAIN_JOB = list(range(12, 29, 2))  # the default preset's targets: next over 11:29


def mean_loss(model, windows: mx.array) -> float:
    """Next-token loss per token over windows (N, L+1)."""
    total = sum(window_losses(model, windows[i : i + 4]).sum().item() for i in range(0, len(windows), 4))
    return total / (windows.size - len(windows))


def plot(path: Path, damage: dict, chosen: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    layers = sorted(damage)
    colours = ["tab:green" if t in chosen else "tab:grey" for t in layers]
    ax.bar(layers, [damage[t] for t in layers], color=colours)
    for t in MAIN_JOB:
        ax.plot(t, damage[t], "kv", ms=5)
    ax.set_xlabel("target layer t (borrows t-1)")
    ax.set_ylabel("loss increase per token after SLW")
    ax.set_title("damage of each target alone (green: chosen; triangles: the main job's targets)")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python experiments/target_damage.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--targets", type=int, default=9)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--slw-steps", type=int, default=50)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--valid-windows", type=int, default=16, help="validation windows of 256 tokens")
    p.add_argument("--out", type=Path, default=Path("experiments/results/target_damage"))
    args = p.parse_args(argv)
    tic = time.time()
    folder = ensure_default_model()
    original, tokenizer = load(folder)
    config = read_config(folder)
    n = config["num_hidden_layers"]
    candidates = list(range(1, n))
    windows = calibration_text(corpora.files("train"), tokenizer, args.tokens, 256)
    valid = calibration_text(corpora.files("valid"), tokenizer, args.valid_windows * 257, 257)
    inputs = capture_mlp_inputs(original, windows, candidates)["mlp_inputs"]
    base = mean_loss(original, valid)
    cfg = SLWConfig(steps=args.slw_steps)
    damage, errors = {}, {}
    for t in candidates:
        out = fit_layer(original.model.layers[t - 1].mlp, original.model.layers[t].mlp, inputs[t], args.rank, cfg)
        model, _ = sharemap.share_model(original, config, {t: t - 1}, args.rank)
        model.model.layers[t].recovery.update({k: mx.array(v) for k, v in out["factors"].items()})
        damage[t] = mean_loss(model, valid) - base
        errors[t] = out["errors"]["final"]
        print(f"target {t:2d} <- {t - 1}: MLP error {errors[t]:.3f}, loss +{damage[t]:.4f}", flush=True)
    chosen = sharemap.least_damage_targets(damage, args.targets)
    share = {str(t): t - 1 for t in chosen}
    command = "python experiments/target_damage.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Targets chosen by measured damage after SLW",
        "",
        f"`{command}` ({(time.time() - tic) / 60:.0f} min, Linux x86_64, 2 cores shared with other jobs). Each "
        f"candidate alone: SLW at rank {args.rank} on {args.tokens:,} train tokens, {args.slw_steps} Adam steps; "
        f"damage = next-token loss increase per token on {args.valid_windows} validation windows (original: "
        f"{base:.4f}). Chosen: the {args.targets} non-adjacent targets with the least summed damage.",
        "",
        f"- chosen: {chosen} (summed damage {sum(damage[t] for t in chosen):.4f})",
        f"- the main job's targets: {MAIN_JOB} (summed damage {sum(damage[t] for t in MAIN_JOB):.4f})",
        "",
        markdown_table(
            ["target", "MLP error after SLW", "loss increase", "chosen", "main job"],
            [
                [
                    t,
                    f"{errors[t]:.3f}",
                    f"{damage[t]:+.4f}",
                    "yes" if t in chosen else "",
                    "yes" if t in MAIN_JOB else "",
                ]
                for t in candidates
            ],
        ),
    ]
    record = {"command": command, "base_loss": base, "damage": damage, "errors": errors, "chosen": chosen}
    for path, text in (
        (Path(f"{args.out}.md"), "\n".join(lines) + "\n"),
        (Path(f"{args.out}.json"), json.dumps(record, indent=1)),
        (Path(f"{args.out}_map.json"), json.dumps(share)),
    ):
        write_atomic(path, text)
    plot(Path(f"{args.out}.png"), damage, chosen)
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
