"""What the load-time checks cost on SmolLM2-135M (fp32, 538 MB): writes experiments/results/integrity_cost.{md,json}.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 .venv/bin/python experiments/integrity_cost.py

Each timing is the median of ``--repeats`` runs with the file in the page cache (a warm load, the
case where a check costs the most relative to the load), on this machine's 2 shared CPU cores.
"""

import argparse
import hashlib
import json
import statistics
import sys
import time
import zlib
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from sharp_mlx.io.checkpoint import load_model
from sharp_mlx.io.integrity import first_nonfinite, verify_checksums
from sharp_mlx.reports import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def digest(path: Path, name: str) -> None:
    with open(path, "rb") as f:
        if name == "crc32":
            c = 0
            while chunk := f.read(1 << 22):
                c = zlib.crc32(chunk, c)
        else:
            h = hashlib.new(name)
            while chunk := f.read(1 << 22):
                h.update(chunk)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    import sharp_mlx.io.checkpoint as ck

    weights = args.model / "model.safetensors"
    real_check = ck.check_finite
    ck.check_finite = lambda *a, **k: None  # the load alone
    load_alone = median_s(lambda: load_model(args.model), args.repeats)
    ck.check_finite = real_check
    load_checked = median_s(lambda: load_model(args.model), args.repeats)
    model = load_model(args.model)[0]
    params = tree_flatten(model.parameters())
    finite = median_s(lambda: first_nonfinite(params), args.repeats)
    flags = median_s(lambda: mx.eval(mx.stack([mx.isfinite(v).all() for _, v in params])), args.repeats)
    hashes = {n: median_s(lambda n=n: digest(weights, n), args.repeats) for n in ("sha256", "blake2b", "crc32")}
    verify = median_s(lambda: verify_checksums(args.model), args.repeats)
    r = {
        "command": " ".join(["python", "experiments/integrity_cost.py", *sys.argv[1:]]),
        "model": str(args.model.relative_to(ROOT)) if args.model.is_relative_to(ROOT) else str(args.model),
        "weights_mb": round(weights.stat().st_size / 1e6, 1),
        "tensors": len(params),
        "load_s": round(load_alone, 3),
        "load_with_finite_check_s": round(load_checked, 3),
        "finite_check_s": round(finite, 3),
        "finite_check_pct_of_load": round(100 * finite / load_alone, 1),
        "isfinite_all_s": round(flags, 3),
        "hash_s": {k: round(v, 3) for k, v in hashes.items()},
        "verify_sha256_s": round(verify, 3),
        "verify_pct_of_load": round(100 * verify / load_alone, 1),
        "repeats": args.repeats,
        "mlx": mx.__version__,
    }
    out = ROOT / "docs" / "results" / "integrity_cost"
    out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    on = r["verify_pct_of_load"] <= 10
    md = [
        "# What checking weights costs at load (SmolLM2-135M, fp32)",
        "",
        "```",
        f"LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 .venv/bin/{r['command']}",
        "```",
        "",
        f"{r['weights_mb']} MB in one file, {r['tensors']} tensors, page cache warm, median of {r['repeats']}, "
        "2 shared CPU cores (Linux, MLX CPU backend).",
        "",
        markdown_table(
            ["what", "seconds", "% of the load"],
            [
                ["load (`checkpoint.load_model`, no checks)", r["load_s"], 100],
                [
                    "finite check (a sum per tensor, evaluated together; `isfinite().all()` only where a sum is not "
                    "finite)",
                    r["finite_check_s"],
                    r["finite_check_pct_of_load"],
                ],
                [
                    "for comparison: `isfinite().all()` of every tensor",
                    r["isfinite_all_s"],
                    round(100 * r["isfinite_all_s"] / r["load_s"]),
                ],
                [
                    "load with the finite check",
                    r["load_with_finite_check_s"],
                    round(100 * r["load_with_finite_check_s"] / r["load_s"]),
                ],
                *([f"{k} of the weights file", v, round(100 * v / r["load_s"])] for k, v in r["hash_s"].items()),
                ["`verify_checksums` (sha256)", r["verify_sha256_s"], r["verify_pct_of_load"]],
            ],
        ),
        "",
        "The rule (issue 25): checksum verification is on at every load if it costs at most 10% of the load, "
        "otherwise at the start of long stages and in `python -m sharp_mlx.verify`. "
        + (
            "It costs at most 10% here, so every load verifies."
            if on
            else f"It costs {r['verify_pct_of_load']}% here, so loads do not verify by default; "
            "the long stages (SLW, SFT) and `python -m sharp_mlx.verify` do."
        ),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
