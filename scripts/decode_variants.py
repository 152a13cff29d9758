"""Decode speed of the ways to store a SHARP checkpoint, against mlx-lm's 4-bit original, in one process.

    python scripts/decode_variants.py [--rounds 3] [--max-tokens 40]

Every variant is built in memory (GGUF codes for the linear weights; recovery float16 or 8-bit;
embedding GGUF 8-bit codes or 4-bit) and decodes the same greedy prompt with mlx-lm's
``stream_generate``, in alternating order each round. Prints median tokens/s and the ratio to
``mlx_lm.convert -q`` of the original (models/smollm2-135m-instruct-mlx-4bit, made by
``python -m sharp_mlx.bench`` or ``mlx_lm.convert -q``).
"""

import argparse
import json
import statistics

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from sharp_mlx.checkpoint import load, load_model
from sharp_mlx.quantize import gguf_codes, quantize, resolve_gguf

VARIANTS = [
    ("original, GGUF codes", "models/smollm2-135m-instruct", {}),
    ("original, GGUF codes, embedding 4-bit", "models/smollm2-135m-instruct", dict(embedding_bits=4)),
    ("SHARP, recovery float16", "models/smollm2-135m-instruct-sharp", {}),
    ("SHARP, recovery 8-bit", "models/smollm2-135m-instruct-sharp", dict(recovery_bits=8)),
    ("SHARP, recovery 8-bit, embedding 4-bit", "models/smollm2-135m-instruct-sharp", dict(recovery_bits=8, embedding_bits=4)),
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--mlx4", default="models/smollm2-135m-instruct-mlx-4bit")
    args = p.parse_args()
    _, tokenizer = load("models/smollm2-135m-instruct")
    ids = mx.array(tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True))
    models = {"mlx_lm.convert -q": load_model(args.mlx4)[0]}
    for name, path, kw in VARIANTS:
        model, config = load_model(path)
        codes, _ = gguf_codes(resolve_gguf("auto"), model, config)
        models[name] = quantize(model, config, codes=codes, **kw)[0]

    def run(model):
        for r in stream_generate(model, tokenizer, ids, max_tokens=args.max_tokens, sampler=make_sampler(temp=0.0)):
            pass
        return r.generation_tps

    for m in models.values():  # warm-up
        run(m)
    tps = {k: [] for k in models}
    for i in range(args.rounds):
        for k in list(models) if i % 2 == 0 else list(models)[::-1]:
            tps[k].append(run(models[k]))
    ref = statistics.median(tps["mlx_lm.convert -q"])
    for k, v in tps.items():
        print(json.dumps({"variant": k, "decode_tps": round(statistics.median(v), 2), "x_mlx4": round(statistics.median(v) / ref, 3)}))


if __name__ == "__main__":
    main()
