"""What re-quantizing the tied embedding costs, rounded to nearest against fitted by GPTQ.

    python experiments/archive/embedding_gptq.py --model models/smollm2-135m-instruct-sharp --rows float rtn:5:64 gptq:5:64 gptq:4:64 gptq:4:32

Each row replaces the embedding of the float model (quantized folders run with their weights'
float values) by the float values of ``bits``-bit codes in groups of ``group`` (float16 scales
and biases): ``rtn`` is ``mx.quantize``, ``gptq`` is ``sharp_mlx.quant.gptq`` with the Hessian of the
final hidden states on ``--calibration-windows`` windows of 256 tokens of each domain's training
split, as ``python -m sharp_mlx.quantize --embedding-bits B --calibration data/*/train.jsonl``
fits it. ``input:rtn:B:G`` / ``output:rtn:B:G`` quantize only the input table or only the
output layer (the tie is cut for the row), to show which side the cost comes from. Prints one
JSON line per row: test perplexity on 8 windows of 256 tokens per domain, its ratio to the
float row, and the embedding's bytes.
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from sharp_mlx import load
from sharp_mlx.data.batches import load_tokens
from sharp_mlx.eval.perplexity import perplexity
from sharp_mlx.quant.codes import dequantized
from sharp_mlx.quant.gptq import gptq_codes, output_hessian


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/smollm2-135m-instruct-sharp")
    p.add_argument("--rows", nargs="+", default=["float", "rtn:5:64", "gptq:5:64", "gptq:4:64", "gptq:4:32"])
    p.add_argument(
        "--windows", type=int, default=8, help="test windows of 256 tokens per domain (default: %(default)s)"
    )
    p.add_argument(
        "--calibration-windows",
        type=int,
        default=8,
        help="training windows of 256 tokens per domain for GPTQ (default: %(default)s)",
    )
    args = p.parse_args()
    model, tokenizer = load(args.model)
    files = sorted(Path("data").glob("*/test.jsonl"))
    streams = {f.parent.name: load_tokens(f, tokenizer)[0] for f in files}
    dequantized(model)
    full = model.model.embed_tokens.weight.astype(mx.float32)
    vocab, dim = full.shape
    hessian = None
    baseline = None
    for row in args.rows:
        side, spec = ("both", row) if not row.startswith(("input:", "output:")) else row.split(":", 1)
        if spec == "float":
            weight, bits, group = full, None, None
        else:
            kind, bits, group = spec.split(":")
            bits, group = int(bits), int(group)
            if kind == "rtn":
                packed, scales, biases = mx.quantize(full, group, bits)
                scales, biases = (
                    scales.astype(mx.float16),
                    biases.astype(mx.float16),
                )  # stored as sharp_mlx.quant.codes stores them
            else:
                if hessian is None:
                    hessian = output_hessian(
                        model, tokenizer, [f.with_name("train.jsonl") for f in files], args.calibration_windows
                    )
                packed, scales, biases = gptq_codes(full, hessian, bits, group)
            weight = mx.dequantize(
                packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group, bits=bits
            )
        if side != "both":  # cut the tie: one side quantized, the other float
            model.args.tie_word_embeddings = False
            model.lm_head = nn.Linear(dim, vocab, bias=False)
            weight, head = (weight, full) if side == "input" else (full, weight)
            model.lm_head.weight = head
        model.model.embed_tokens.weight = weight
        ppl = {d: perplexity(model, s, 256, 4, args.windows, desc=row)["ppl"] for d, s in streams.items()}
        if side != "both":
            model.args.tie_word_embeddings = True
            model.pop("lm_head")
        baseline = baseline or (ppl if spec == "float" else None)
        out = {
            "row": row,
            "embedding_mb": round(vocab * dim * (bits + 32 / group) / 8 / 1e6, 2) if bits else None,
            "ppl": {d: round(v, 2) for d, v in ppl.items()},
        }
        if baseline:
            out["worst_x_float"] = round(max(ppl[d] / baseline[d] for d in ppl), 4)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
