"""Would a mixed-precision embedding meet the deployment bars? Keep the GGUF's 8-bit codes for
the ``--keep`` most frequent tokens and re-quantize the other rows to fewer bits; measure test
perplexity against the checkpoint that keeps every 8-bit code.

    python experiments/archive/embedding_split.py [--model models/smollm2-135m-instruct-sharp-4bit] [--keep 8192]

The embedding is tied, so a row's error reaches both the token's input vector and its output
logit. Two orders of "frequent": token id (BPE merge order, needs no data) and counts on the
training split of the five domains. The rows are fake-quantized (the float values the codes would
hold), which is the same function as a split table would compute; no storage format is written.
Prints one JSON line per row and the bytes such an embedding would take (8-bit group 32 with
float16 scales and biases: 9 bits a weight; ``b``-bit group 64: b + 0.5).
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from sharp_mlx import load
from sharp_mlx.data.batches import load_tokens
from sharp_mlx.eval.perplexity import perplexity
from sharp_mlx.quant.codes import dequantized


def fake_quantize(w: mx.array, bits: int, group_size: int = 64) -> mx.array:
    return mx.dequantize(*mx.quantize(w, group_size, bits), group_size=group_size, bits=bits)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct-sharp-4bit")
    p.add_argument("--keep", type=int, default=8192, help="rows that keep their 8-bit codes (default: %(default)s)")
    p.add_argument(
        "--windows", type=int, default=8, help="test windows of 256 tokens per domain (default: %(default)s)"
    )
    p.add_argument(
        "--train-tokens", type=int, default=200_000, help="training tokens per domain counted for the frequency order"
    )
    args = p.parse_args()
    model, tokenizer = load(args.model)
    files = sorted(Path("data").glob("*/test.jsonl"))
    streams = {f.parent.name: load_tokens(f, tokenizer)[0] for f in files}
    counts = np.bincount(
        np.concatenate(
            [np.asarray(load_tokens(f.with_name("train.jsonl"), tokenizer)[0][: args.train_tokens]) for f in files]
        ),
        minlength=model.model.embed_tokens.weight.shape[0],
    )
    dequantized(model)
    full = model.model.embed_tokens.weight.astype(mx.float32)
    vocab, dim = full.shape
    orders = {"token id": np.arange(vocab), "training-split frequency": np.argsort(-counts[:vocab], kind="stable")}

    def run(name: str, weight: mx.array, keep: np.ndarray, tail_bits: int) -> None:
        model.model.embed_tokens.weight = weight
        ppl = {d: perplexity(model, s, 256, 4, args.windows, desc=f"{name} {d}")["ppl"] for d, s in streams.items()}
        n_keep = int(keep.sum())
        mb = (n_keep * 9 + (vocab - n_keep) * (tail_bits + 0.5)) * dim / 8 / 1e6
        coverage = {d: round(float(keep[np.asarray(s)].mean()), 4) for d, s in streams.items()}
        print(
            json.dumps(
                {
                    "row": name,
                    "embedding_mb": round(mb, 2),
                    "test_coverage": coverage,
                    "ppl": {d: round(v, 2) for d, v in ppl.items()},
                }
            ),
            flush=True,
        )

    run("every row 8-bit (the GGUF codes)", full, np.ones(vocab, bool), 8)
    for bits in (4, 5):
        tail = fake_quantize(full, bits)
        for order_name, order in orders.items():
            keep = np.zeros(vocab, bool)
            keep[order[: args.keep]] = True
            run(
                f"first {args.keep} by {order_name} 8-bit, the rest {bits}-bit",
                mx.where(mx.array(keep)[:, None], full, tail),
                keep,
                bits,
            )


if __name__ == "__main__":
    main()
