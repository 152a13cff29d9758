"""How well does an earlier layer's MLP stand in for a later one, on the inputs the model feeds it?

    python -m sharp_mlx.analyze                                   # default model and data, ~16k tokens
    python -m sharp_mlx.analyze --all-pairs --tokens 8192 --out runs/analyze-all

For each target layer t and reference r = t-1 (every r < t with --all-pairs), on the real inputs
x of MLP_t (captured over calibration text):
  cos        mean cosine similarity of MLP_r(x) and MLP_t(x) over tokens
  rel_error  ||MLP_r(X) - MLP_t(X)|| / ||MLP_t(X)||: direct sharing's error
  err@0      per projection (gate, up, down), ||Z (W_t - W_r)^T|| / ||Z W_t^T|| on its inputs Z
  err@k      the same after the best rank-k correction of W_t - W_r, weighted by the input
             covariance (what rank-k recovery could reach for that projection alone)
  own@k      per layer: the best rank-k approximation of W_t itself (recovery with no borrowed MLP)
  h_cos      per layer: cosine of the residual stream entering and leaving the layer
Writes analysis.json (read by `sharemap.parse_share("auto", similarity=...)`) and similarity.png.
"""

import argparse
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.activations import swiglu
from tqdm import tqdm

from .data import corpora
from .errors import ArgumentParser, SharpError, cli
from .io.checkpoint import load, read_config
from .options import at_least
from .recipes import PAPER
from .recovery.capture import calibration_text, capture_mlp_inputs
from .reports import save_figure

PROJECTIONS = ("gate", "up", "down")
SCHEMA_VERSION = 1


@dataclass
class TargetInputs:
    """What target layer t's MLP sees and does on the calibration tokens (N rows)."""

    x: mx.array  # (N, D) MLP inputs
    out: mx.array  # (N, D) MLP_t(x)
    x_root: mx.array  # (D, D) (X^T X)^{1/2}: weights output errors of gate and up
    h_cov: mx.array  # (F, F) H^T H, H = swiglu(gate x, up x): weights output errors of down
    energy: Dict[str, float] = field(default_factory=dict)  # ||Z W_t^T||^2 per projection (Z its inputs)


def mlp_weights(mlp) -> Dict[str, mx.array]:
    return {p: getattr(mlp, f"{p}_proj").weight.astype(mx.float32) for p in PROJECTIONS}


def run_mlp(mlp, x: mx.array):
    """(hidden activations (N, F), output (N, D)) of a Llama MLP."""
    h = swiglu(mlp.gate_proj(x), mlp.up_proj(x))
    return h, mlp.down_proj(h)


def psd_sqrt(c: mx.array) -> mx.array:
    """Square root of a symmetric positive semi-definite matrix."""
    vals, vecs = mx.linalg.eigh(c, stream=mx.cpu)  # linalg runs on the CPU on every backend
    return (vecs * mx.sqrt(mx.maximum(vals, 0))) @ vecs.T


def output_gram(w: mx.array, proj: str, inputs: TargetInputs) -> mx.array:
    """A (D, D) Gram matrix whose eigenvalues are the squared singular values of Z w^T, the
    projection's output on its inputs Z: w C w^T for down (out = D), else the C^{1/2}-side one."""
    if proj == "down":
        return w @ inputs.h_cov @ w.T
    a = w @ inputs.x_root  # (F, D)
    return a.T @ a


def energy_beyond(w: mx.array, proj: str, inputs: TargetInputs, rank: int) -> float:
    """||Z w^T||^2 left after the best rank-``rank`` approximation of w under Z's covariance."""
    if rank == 0:  # all of it: the trace, no eigenvalues needed
        return mx.trace(output_gram(w, proj, inputs)).item()
    vals = mx.maximum(mx.linalg.eigvalsh(output_gram(w, proj, inputs), stream=mx.cpu), 0)  # ascending
    return vals[: vals.shape[0] - rank].sum().item()


def target_inputs(mlp, x: mx.array) -> TargetInputs:
    x = x.astype(mx.float32)
    h, out = run_mlp(mlp, x)
    x_root, h_cov = psd_sqrt(x.T @ x), h.T @ h
    mx.eval(out, x_root, h_cov)
    inputs = TargetInputs(x=x, out=out, x_root=x_root, h_cov=h_cov)
    inputs.energy = {p: energy_beyond(w, p, inputs, 0) for p, w in mlp_weights(mlp).items()}
    return inputs


def _ratio(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else 0.0


def pair_metrics(ref_mlp, tgt_mlp, inputs: TargetInputs, rank: int) -> dict:
    """How well reference MLP_r stands in for MLP_t on t's inputs (see the module docstring)."""
    _, out_r = run_mlp(ref_mlp, inputs.x)
    diff = out_r - inputs.out
    dot = (out_r * inputs.out).sum(-1)
    cos = dot / (mx.linalg.norm(out_r, axis=-1) * mx.linalg.norm(inputs.out, axis=-1) + 1e-12)
    rel = mx.linalg.norm(diff) / (mx.linalg.norm(inputs.out) + 1e-12)
    w_r, w_t = mlp_weights(ref_mlp), mlp_weights(tgt_mlp)
    deltas = {p: w_t[p] - w_r[p] for p in PROJECTIONS}
    return {
        "cosine": cos.mean().item(),
        "rel_error": rel.item(),
        "proj_error": {p: _ratio(energy_beyond(d, p, inputs, 0), inputs.energy[p]) for p, d in deltas.items()},
        "lowrank_error": {p: _ratio(energy_beyond(d, p, inputs, rank), inputs.energy[p]) for p, d in deltas.items()},
    }


def own_lowrank_error(mlp, inputs: TargetInputs, rank: int) -> Dict[str, float]:
    """Relative error of the best rank-``rank`` stand-in for each of MLP_t's own projections."""
    return {p: _ratio(energy_beyond(w, p, inputs, rank), inputs.energy[p]) for p, w in mlp_weights(mlp).items()}


def analyze(
    model,
    windows: mx.array,
    rank: int = 64,
    all_pairs: bool = False,
    batch_size: int = 4,
    workdir: Optional[Path] = None,
) -> dict:
    """Per-layer and per-pair metrics of an unshared model on token windows (N, L)."""
    n_layers = model.args.num_hidden_layers
    layers = model.model.layers
    with tempfile.TemporaryDirectory(prefix=".capture-", dir=workdir) as tmp:
        captured = capture_mlp_inputs(model, windows, range(n_layers), Path(tmp), batch_size)
        per_layer, pairs = [], []
        for t in tqdm(range(n_layers), desc="layers", unit="layer", leave=False):
            inputs = target_inputs(layers[t].mlp, mx.array(np.asarray(captured["mlp_inputs"][t], dtype=np.float32)))
            per_layer.append(
                {
                    "layer": t,
                    "residual_cosine": captured["residual_cosine"][t],
                    "own_lowrank_error": own_lowrank_error(layers[t].mlp, inputs, rank),
                }
            )
            for r in range(t) if all_pairs else range(max(t - 1, 0), t):
                pairs.append({"reference": r, "target": t, **pair_metrics(layers[r].mlp, layers[t].mlp, inputs, rank)})
    return {
        "version": SCHEMA_VERSION,
        "rank": rank,
        "tokens": int(windows.size),
        "seq_len": int(windows.shape[1]),
        "layers": per_layer,
        "pairs": pairs,
    }


def table(analysis: dict) -> str:
    """One row per layer, for its adjacent reference (plus the best one with --all-pairs)."""
    k, layers = analysis["rank"], analysis["layers"]
    by_target: Dict[int, List[dict]] = {}
    for p in analysis["pairs"]:
        by_target.setdefault(p["target"], []).append(p)
    all_pairs = any(len(ps) > 1 for ps in by_target.values())

    def gud(d: Optional[dict]) -> str:
        return " ".join(f"{d[p]:4.2f}" for p in PROJECTIONS) if d else ""

    rows = [
        f"{'t':>2} {'r':>2} {'h_cos':>6} {'cos':>6} {'rel_err':>7} | {'err@0 g/u/d':<14} | {f'err@{k} g/u/d':<14} | "
        f"own@{k} g/u/d" + ("  | best r (rel_err)" if all_pairs else "")
    ]
    rows.append("-" * len(rows[0]))
    for t, layer in enumerate(layers):
        p = next((p for p in by_target.get(t, []) if p["reference"] == t - 1), None)
        row = f"{t:>2} {t - 1 if p else '-':>2} {layer['residual_cosine']:6.3f} "
        row += f"{p['cosine']:6.3f} {p['rel_error']:7.3f}" if p else f"{'':>6} {'':>7}"
        row += f" | {gud(p and p['proj_error']):<14} | {gud(p and p['lowrank_error']):<14}"
        row += f" | {gud(layer['own_lowrank_error'])}"
        if t in by_target and all_pairs:
            best = min(by_target[t], key=lambda q: q["rel_error"])
            row += f"  | {best['reference']:>2} ({best['rel_error']:.3f})"
        rows.append(row)
    return "\n".join(rows)


def plot(analysis: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, layers = analysis["rank"], analysis["layers"]
    adjacent = [p for p in analysis["pairs"] if p["reference"] == p["target"] - 1]
    targets = [p["target"] for p in adjacent]
    n_layers = len(layers)
    all_pairs = len(analysis["pairs"]) > len(adjacent)
    fig, axes = plt.subplots(1, 3 if all_pairs else 2, figsize=(16 if all_pairs else 11, 5.2))
    ax = axes[0]
    ax.plot(range(n_layers), [lay["residual_cosine"] for lay in layers], "k.-", label="hidden state cos(in, out)")
    ax.plot(targets, [p["cosine"] for p in adjacent], "o-", label="cos(MLP_{t-1}(x), MLP_t(x))")
    ax.plot(targets, [p["rel_error"] for p in adjacent], "s-", label="relative error of MLP_{t-1}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="layer t", title="similarity of adjacent layers")
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, proj in enumerate(PROJECTIONS):
        color = f"C{i}"
        ax.plot(targets, [p["proj_error"][proj] for p in adjacent], ":", color=color, label=f"{proj}: W_(t-1)")
        ax.plot(
            targets,
            [p["lowrank_error"][proj] for p in adjacent],
            "o-",
            color=color,
            label=f"{proj}: W_(t-1) + rank {k}",
        )
        ax.plot(
            range(n_layers),
            [lay["own_lowrank_error"][proj] for lay in layers],
            "--",
            color=color,
            alpha=0.6,
            label=f"{proj}: rank {k} alone",
        )
    ax.set(xlabel="layer t", ylabel="relative output error", title="recoverability per projection", ylim=(0, None))
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    if all_pairs:
        grid = np.full((n_layers, n_layers), np.nan)
        for p in analysis["pairs"]:
            grid[p["target"], p["reference"]] = p["rel_error"]
        im = axes[2].imshow(grid, origin="lower", cmap="viridis_r", vmin=0, vmax=min(np.nanmax(grid), 2.0))
        axes[2].set(xlabel="reference r", ylabel="target t", title="relative error of MLP_r on t's inputs")
        fig.colorbar(im, ax=axes[2])
    fig.tight_layout()
    save_figure(fig, out)


def build_parser() -> argparse.ArgumentParser:
    from .convert import DEFAULT_MODEL

    p = ArgumentParser(
        prog="python -m sharp_mlx.analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", type=Path, help=f"an unshared model folder (default: {DEFAULT_MODEL}, imported on first use)"
    )
    p.add_argument(
        "--data",
        type=Path,
        nargs="+",
        help="calibration text files, .txt or .jsonl (default: data/*/train.jsonl of the five domains)",
    )
    p.add_argument(
        "--tokens",
        type=at_least(1),
        default=16384,
        help="calibration tokens, drawn evenly from the files (default: %(default)s)",
    )
    p.add_argument(
        "--seq-len",
        type=at_least(2),
        default=PAPER.seq_len,
        help="tokens per calibration window (default: %(default)s)",
    )
    p.add_argument(
        "--rank",
        type=at_least(1),
        default=PAPER.rank,
        help="recovery rank k of the err@k and own@k columns (default: %(default)s)",
    )
    p.add_argument(
        "--all-pairs",
        action="store_true",
        help="compare every reference r < t, not only r = t-1 (about n_layers/2 times slower)",
    )
    p.add_argument(
        "--batch-size",
        type=at_least(1),
        default=PAPER.batch_size,
        help="windows per forward pass while capturing (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=at_least(0), default=PAPER.seed, help="seed of the calibration sample (default: %(default)s)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs") / "analyze",
        help="folder for analysis.json and similarity.png (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print analysis.json instead of the table")
    return p


@cli("sharp_mlx.analyze")
def main(argv=None):
    args = build_parser().parse_args(argv)
    if min(args.tokens, args.seq_len, args.batch_size) < 1:
        raise SharpError(
            f"--tokens, --seq-len and --batch-size must be at least 1, got {args.tokens}, {args.seq_len}, "
            f"{args.batch_size}"
        )
    files = args.data or corpora.files("train")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        hint = (
            f"run `{corpora.FETCH}` to build the default data" if args.data is None else "pass existing files to --data"
        )
        raise SharpError(f"data file(s) not found: {', '.join(missing)}: {hint}")
    if args.model is None:
        from .convert import ensure_default_model

        args.model = ensure_default_model()
    config = read_config(args.model)
    if (config.get("sharp") or {}).get("share"):
        raise SharpError(f"{args.model} already shares layers: analyze the original model it was made from")
    if not 0 <= args.rank <= min(config["hidden_size"], config["intermediate_size"]):
        raise SharpError(
            f"--rank must be between 0 and {min(config['hidden_size'], config['intermediate_size'])}, got {args.rank}"
        )
    model, tokenizer = load(args.model)
    windows = calibration_text(files, tokenizer, args.tokens, args.seq_len, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    analysis = {
        "model": str(args.model),
        "data": [str(f) for f in files],
        "config": config,
        **analyze(model, windows, args.rank, args.all_pairs, args.batch_size, workdir=args.out),
    }
    (args.out / "analysis.json").write_text(json.dumps(analysis, indent=1))
    plot(analysis, args.out / "similarity.png")
    if args.json:
        print(json.dumps(analysis, indent=1))
    else:
        print(table(analysis))
        print(
            f"\n{analysis['tokens']} tokens from {len(files)} file(s); wrote {args.out / 'analysis.json'} and "
            f"{args.out / 'similarity.png'}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
