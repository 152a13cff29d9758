"""SFT speed side by side with mlx_lm.lora, and against what this machine's matmuls allow.

    python experiments/sft_speed.py --sharp models/smollm2-135m-instruct-sharp-slw \\
        --original models/smollm2-135m-instruct --out experiments/results/sft_speed

One process after another on the same machine, the same batch (2 windows of 256 tokens), the
same training file and a matched trainable count:
- ``sharp_mlx.train --stage sft`` on the shared model (its recovery factors), loss ``ce`` and ``kd``;
- ``mlx_lm lora`` on the original with LoRA on every linear layer of the blocks from the first
  target on, its rank chosen so that it trains about as many parameters.
Tokens/s leave out the first step (it compiles). The FLOPs of a step are counted from the
model's shapes (matmuls only: 2 per multiply-add; a frozen block's backward pass costs one
forward, the gradient of its input), and divided by the float32 matmul rate measured here on the
model's own shapes, so "x matmul peak" is the fraction of the machine the step uses.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from sharp_mlx.io.checkpoint import read_config
from sharp_mlx.reports import markdown_table

BATCH, SEQ = 2, 256


def matmul_gflops(dim: int, hidden: int, vocab: int, rows: int = BATCH * SEQ, reps: int = 20) -> float:
    """float32 GFLOP/s of the model's own matmuls (rows x dim @ dim x hidden, and the head), measured."""
    shapes = [(rows, dim, hidden), (rows, hidden, dim), (rows, dim, vocab)]
    flops, secs = 0.0, 0.0
    for m, k, n in shapes:
        a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
        mx.eval(a @ b)
        tic = time.perf_counter()
        for _ in range(reps):
            mx.eval(a @ b)
        secs += time.perf_counter() - tic
        flops += 2 * m * k * n * reps
    return flops / secs / 1e9


def step_gflop(config: dict, first: int, loss: str) -> float:
    """Matmul GFLOP of one training step of BATCH x SEQ tokens with blocks from ``first`` on trained."""
    d, h, v, n = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    block = d * d * 2 + d * kv * 2 + d * h * 3  # multiply-adds per token
    attention = 2 * SEQ * d  # scores and values, per token, causal on average over the window
    prefix, suffix = first * (block + attention / 2), (n - first) * (block + attention / 2)
    per_token = prefix + 2 * (suffix + d * v)  # forward; backward of the trained part: its input gradient
    if loss == "kd":
        per_token += suffix + d * v  # the teacher's forward from the shared prefix
    return 2 * per_token * BATCH * SEQ / 1e9


def ours(sharp: Path, original: Path, data: Path, valid: Path, loss: str, steps: int, work: Path) -> dict:
    out = work / f"sharp-{loss}"
    cmd = [
        sys.executable, "-m", "sharp_mlx.train", "--stage", "sft", "--model", str(sharp), "--teacher", str(original),
        "--out", str(out), "--run-dir", str(work / f"run-{loss}"), "--data", str(data), "--valid", str(valid),
        "--loss", loss, "--sft-steps", str(steps), "--batch-size", str(BATCH), "--seq-len", str(SEQ),
        "--valid-every", str(10 * steps), "--valid-windows", "1",
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    record = json.loads((out / "training.json").read_text())[-1]
    return {
        "command": " ".join(cmd[2:]).replace(str(work), "WORK"),
        "tokens_per_s": record["summary"]["steady_tokens_per_s"],
    }


def trainable(sharp: Path) -> tuple:
    """(trainable count, first trained block) of the shared model's recovery."""
    from sharp_mlx.io.checkpoint import load
    from sharp_mlx.recovery.sft import SFTConfig, prepare, trainable_count

    model, _ = load(sharp)
    first = prepare(model, SFTConfig())
    return trainable_count(model), first


def mlx_lm_lora(
    original: Path, data: Path, valid: Path, rank: int, per_rank: int, layers: int, steps: int, work: Path
) -> dict:
    """``mlx_lm lora`` for ``steps - 1`` steps (ours count one compiling step more); tok/s of its
    reports after the first."""
    folder = work / "lora-data"
    folder.mkdir(exist_ok=True)
    (folder / "train.jsonl").write_text(data.read_text())
    (folder / "valid.jsonl").write_text(valid.read_text())
    cfg = work / "lora.yaml"
    cfg.write_text(f"lora_parameters:\n  rank: {rank}\n  scale: 20.0\n  dropout: 0.0\n")
    report = 4
    cmd = [
        sys.executable, "-m", "mlx_lm", "lora", "--model", str(original), "--train", "--data", str(folder),
        "--iters", str(steps - 1), "--batch-size", str(BATCH), "--max-seq-length", str(SEQ), "--num-layers", str(layers),
        "--steps-per-report", str(report), "--steps-per-eval", str(10 * steps), "--val-batches", "1",
        "--adapter-path", str(work / "lora-adapters"), "-c", str(cfg),
    ]  # fmt: skip
    text = re.sub(r"\x1b\[[0-9;]*m", "", subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    # its report rows: iter, train loss (and an arrow), tok/s, tokens trained
    rates = [float(m[1].replace(",", "")) for m in re.findall(r"^\s*(\d+)\s+[0-9.]+ [▼▲ ]?\s+([0-9,.]+)\s+[0-9.]+k\s*$",
                                                                 text, re.M)]  # fmt: skip
    if len(rates) < 2:
        raise SystemExit(f"error: no tok/s in mlx_lm lora's output:\n{text[-2000:]}")
    return {
        "command": " ".join(cmd[2:]).replace(str(work), "WORK"),
        "tokens_per_s": sum(rates[1:]) / len(rates[1:]),  # the first report holds the compiling step
        "trainable": rank * per_rank,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sharp", type=Path, required=True, help="a shared model folder (after SLW)")
    p.add_argument("--original", type=Path, required=True, help="the original model folder")
    p.add_argument("--data", type=Path, default=Path("data/brown/train.jsonl"), help="training file")
    p.add_argument("--valid", type=Path, default=Path("data/brown/valid.jsonl"), help="validation file")
    p.add_argument("--steps", type=int, default=13, help="steps per run (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="report prefix (PREFIX.md, PREFIX.json)")
    args = p.parse_args(argv)
    config = read_config(args.original)
    count, first = trainable(args.sharp)
    layers = config["num_hidden_layers"] - first
    d, h = config["hidden_size"], config["intermediate_size"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    per_rank = layers * ((d + d) * 2 + (d + kv) * 2 + (d + h) * 3)  # LoRA on q, o, k, v, gate, up, down
    rank = max(1, round(count / per_rank))
    peak = matmul_gflops(d, h, config["vocab_size"])
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        work = Path(tmp)
        rows = {
            "sharp_mlx SFT, ce": {**ours(args.sharp, args.original, args.data, args.valid, "ce", args.steps, work),
                                  "trainable": count, "gflop": step_gflop(config, first, "ce")},
            "mlx_lm lora, ce": {**mlx_lm_lora(args.original, args.data, args.valid, rank, per_rank, layers, args.steps,
                                                    work),
                                "gflop": step_gflop(config, first, "ce")},
            "sharp_mlx SFT, kd": {**ours(args.sharp, args.original, args.data, args.valid, "kd", args.steps, work),
                                  "trainable": count, "gflop": step_gflop(config, first, "kd")},
        }  # fmt: skip
    peak_after = matmul_gflops(d, h, config["vocab_size"])
    for r in rows.values():
        r["step_s"] = BATCH * SEQ / r["tokens_per_s"]
        r["gflops"] = r["gflop"] / r["step_s"]
        r["x_peak"] = r["gflops"] / ((peak + peak_after) / 2)
    base = rows["mlx_lm lora, ce"]["tokens_per_s"]
    lines = [
        "# SFT speed: sharp_mlx against mlx_lm.lora",
        "",
        f"`python experiments/sft_speed.py --sharp {args.sharp} --original {args.original} --out {args.out}` "
        f"(this machine: {sys.platform}, 2 cores; one run after another). Batch {BATCH} x {SEQ} tokens, "
        f"{args.steps} steps each, tokens/s without the first (compiling) step. Trained: blocks {first}.."
        f"{config['num_hidden_layers'] - 1}; mlx_lm LoRA rank {rank} on their 7 linear layers. float32 matmul "
        f"rate on the model's shapes: {peak:.1f} GFLOP/s before the runs, {peak_after:.1f} after.",
        "",
        markdown_table(
            ["run", "trainable", "tokens/s", "x mlx_lm lora", "GFLOP/step (matmuls)", "GFLOP/s", "x matmul peak"],
            [
                [
                    name,
                    f"{r['trainable'] / 1e6:.2f}M" if r.get("trainable") else "?",
                    f"{r['tokens_per_s']:.0f}",
                    f"{r['tokens_per_s'] / base:.2f}",
                    f"{r['gflop']:.0f}",
                    f"{r['gflops']:.1f}",
                    f"{r['x_peak']:.2f}",
                ]
                for name, r in rows.items()
            ],
        ),
    ]
    lines += [
        "",
        "Commands (WORK: a temporary folder):",
        *[f"- {name}: `python -m {r['command']}`" for name, r in rows.items()],
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{args.out}.json").write_text(json.dumps({"peak_gflops": [peak, peak_after], "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
