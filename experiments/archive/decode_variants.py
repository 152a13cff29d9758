"""Decode speed of the ways to store a SHARP checkpoint, against mlx-lm's 4-bit original, in one process.

    python experiments/archive/decode_variants.py [--rounds 8] [--max-tokens 40]

Every variant is built in memory (GGUF codes for the linear weights; recovery float16 or 8-bit;
embedding GGUF 8-bit codes or re-quantized) and decodes the same greedy prompt with mlx-lm's
``generate_step`` for exactly ``--max-tokens`` tokens (no stop at end-of-sequence), in alternating
order each round. Reported per variant: the median time between consecutive tokens over all
rounds (steady-state decode, robust to the pauses a shared machine inserts) as tokens/s, the
mean rate of each round (median of rounds), and both as
ratios to ``mlx_lm.convert -q`` of the original (models/smollm2-135m-instruct-mlx-4bit, made by
``python -m sharp_mlx.bench`` or ``mlx_lm.convert -q``).
"""

import argparse
import json
import statistics
import time

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from sharp_mlx.io.checkpoint import load, load_model
from sharp_mlx.quant.codes import gguf_codes, quantize, resolve_gguf

VARIANTS = [
    ("original, GGUF codes", "models/smollm2-135m-instruct", {}),
    ("SHARP, recovery float16", "models/smollm2-135m-instruct-sharp", {}),
    ("SHARP, recovery 8-bit", "models/smollm2-135m-instruct-sharp", dict(recovery_bits=8)),
    (
        "SHARP, recovery 8-bit, embedding 6-bit",
        "models/smollm2-135m-instruct-sharp",
        dict(recovery_bits=8, embedding_bits=6),
    ),
    ("SHARP ~50%, recovery 8-bit", "models/smollm2-135m-instruct-sharp50", dict(recovery_bits=8)),
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--mlx4", default="models/smollm2-135m-instruct-mlx-4bit")
    args = p.parse_args()
    _, tokenizer = load("models/smollm2-135m-instruct")
    ids = mx.array(
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)
    )
    models = {"mlx_lm.convert -q": load_model(args.mlx4)[0]}
    for name, path, kw in VARIANTS:
        model, config = load_model(path)
        codes, _ = gguf_codes(resolve_gguf("auto"), model, config)
        models[name] = quantize(model, config, codes=codes, **kw)[0]

    def run(model):
        """Seconds between consecutive tokens of exactly --max-tokens (no stop at end-of-sequence,
        so every variant times the same number at the same cache lengths; the first token is the prompt's)."""
        times = [
            time.perf_counter()
            for _ in generate_step(ids, model, max_tokens=args.max_tokens, sampler=make_sampler(temp=0.0))
        ]
        return [b - a for a, b in zip(times, times[1:])]

    for m in models.values():  # warm-up
        run(m)
    tps, gaps = {k: [] for k in models}, {k: [] for k in models}
    for i in range(args.rounds):
        for k in list(models) if i % 2 == 0 else list(models)[::-1]:
            g = run(models[k])
            gaps[k] += g
            tps[k].append(len(g) / sum(g))
    ref, ref_gap = statistics.median(tps["mlx_lm.convert -q"]), statistics.median(gaps["mlx_lm.convert -q"])
    for k in models:
        gap = statistics.median(gaps[k])
        print(
            json.dumps(
                {
                    "variant": k,
                    "steady_tps": round(1 / gap, 2),
                    "x_mlx4_steady": round(ref_gap / gap, 3),
                    "tokens_timed": len(gaps[k]),
                    "mean_tps": round(statistics.median(tps[k]), 2),
                    "x_mlx4": round(statistics.median(tps[k]) / ref, 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
