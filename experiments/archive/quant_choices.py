"""What each quantization choice costs a SHARP checkpoint: bytes of weights and test perplexity.

    python experiments/archive/quant_choices.py [--model models/smollm2-135m-instruct-sharp] [--windows 8]

Linear weights keep the embedded GGUF's 4-bit codes in every row; the rows differ in how the
recovery factors (float16, 8-bit, 4-bit codes) and the tied embedding (its GGUF 8-bit codes, or
re-quantized to 6, 5, 4 bits, group 64) are stored. Perplexity is computed with the quantized
weights' float values (the same function, fast on a CPU). Prints a markdown table.
"""

import argparse
import json
from pathlib import Path

from mlx.utils import tree_flatten

from sharp_mlx import load
from sharp_mlx.data.batches import load_tokens
from sharp_mlx.eval.perplexity import perplexity
from sharp_mlx.io.checkpoint import load_model
from sharp_mlx.quant.codes import dequantized, gguf_codes, quantize, resolve_gguf

CHOICES = [
    ("float32 (no quantization)", None),
    ("codes, recovery float16", {}),
    ("codes, recovery 8-bit", dict(recovery_bits=8)),
    ("codes, recovery 4-bit", dict(recovery_bits=4)),
    ("codes, recovery 8-bit, embedding 6-bit", dict(recovery_bits=8, embedding_bits=6)),
    ("codes, recovery 8-bit, embedding 5-bit", dict(recovery_bits=8, embedding_bits=5)),
    ("codes, recovery 8-bit, embedding 4-bit", dict(recovery_bits=8, embedding_bits=4)),
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct-sharp")
    p.add_argument(
        "--windows", type=int, default=8, help="test windows of 256 tokens per domain (default: %(default)s)"
    )
    args = p.parse_args()
    _, tokenizer = load(args.model)
    streams = {f.parent.name: load_tokens(f, tokenizer)[0] for f in sorted(Path("data").glob("*/test.jsonl"))}
    rows = []
    for name, kw in CHOICES:
        model, config = load_model(args.model)
        if kw is not None:
            codes, _ = gguf_codes(resolve_gguf("auto"), model, config)
            model, _ = quantize(model, config, codes=codes, **kw)
        nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        if kw is not None:
            dequantized(model)
        ppl = {d: perplexity(model, s, 256, 4, args.windows, desc=f"{name} {d}")["ppl"] for d, s in streams.items()}
        rows.append({"choice": name, "bytes": nbytes, "ppl": ppl})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["ppl"]
    print(f"\n| {args.model} | MB | " + " | ".join(base) + " | worst x float |")
    print("|---|---|" + "---|" * (len(base) + 1))
    for r in rows:
        worst = max(r["ppl"][d] / base[d] for d in base)
        print(
            f"| {r['choice']} | {r['bytes'] / 1e6:.1f} | "
            + " | ".join(f"{r['ppl'][d]:.2f}" for d in base)
            + f" | {worst:.3f} |"
        )


if __name__ == "__main__":
    main()
