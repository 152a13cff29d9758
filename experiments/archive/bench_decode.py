"""Decode speed of sharp_mlx.generate against mlx-lm's generation on the same weights, alternated.

    python experiments/archive/bench_decode.py [--model DIR] [--rounds 7] [--max-tokens 64]

Both models are loaded from one folder (sharp_mlx.load and mlx_lm.load) and run the same
greedy prompt in alternating order each round; the medians and their ratio are printed.
"""

import argparse
import json
import statistics
import time

import mlx.core as mx
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import stream_generate

from sharp_mlx.convert import ensure_default_model
from sharp_mlx.generate import prompt_tokens, stream, timed_load

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


def ours(model, tokenizer, tokens, max_tokens):
    for _, timing in stream(model, tokenizer, tokens, max_tokens):
        pass
    return timing.decode_tps, timing.generation_tokens


def mlx_lm_side(model, tokenizer, tokens, max_tokens):
    for r in stream_generate(model, tokenizer, mx.array(tokens), max_tokens=max_tokens):
        pass
    return r.generation_tps, r.generation_tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens decoded per run (default: %(default)s)")
    args = p.parse_args(argv)
    path = args.model or str(ensure_default_model())
    sharp_model, tokenizer, _ = timed_load(path)
    ref_model, ref_tokenizer = mlx_lm_load(path)
    tokens = prompt_tokens(tokenizer, PROMPT)
    runs = {
        "sharp_mlx": (lambda: ours(sharp_model, tokenizer, tokens, args.max_tokens)),
        "mlx_lm": (lambda: mlx_lm_side(ref_model, ref_tokenizer, tokens, args.max_tokens)),
    }
    for fn in runs.values():  # warm-up, not timed
        fn()
    tps = {name: [] for name in runs}
    tic = time.perf_counter()
    for i in range(args.rounds):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        for name in order:
            rate, n = runs[name]()
            tps[name].append(rate)
    med = {name: statistics.median(v) for name, v in tps.items()}
    report = {
        "model": path,
        "rounds": args.rounds,
        "tokens_per_run": n,
        "decode_tps": {name: {"median": med[name], "min": min(v), "max": max(v)} for name, v in tps.items()},
        "ratio_sharp_over_mlx_lm": med["sharp_mlx"] / med["mlx_lm"],
        "wall_s": time.perf_counter() - tic,
    }
    print(json.dumps(report, indent=2))
    print(
        f"decode tokens/s, median of {args.rounds}: sharp_mlx {med['sharp_mlx']:.2f}, mlx_lm {med['mlx_lm']:.2f}, "
        f"ratio {report['ratio_sharp_over_mlx_lm']:.3f}"
    )


if __name__ == "__main__":
    main()
