"""Quantize a model folder (SHARP or plain) to MLX affine 4- or 8-bit, keeping GGUF codes where they fit.

    python -m sharp_mlx.quantize --model models/smollm2-135m-instruct-sharp \\
        --out models/smollm2-135m-instruct-sharp-4bit
    python -m sharp_mlx.quantize --model DIR --out DIR --bits 8 --group-size 64 --from-gguf none

Every Linear and Embedding that the model stores is quantized once: a shared MLP lives at one
path, so it is quantized and stored once whatever number of layers run it. Recovery factors are
plain arrays and stay float (``--recovery-dtype``) unless ``--recovery-bits`` asks for affine
codes (``QuantizedRecovery``); scaling vectors, if any, always stay float. Norms keep the source's dtype,
so a float32 model runs float32 activations, which MLX's CPU backend needs (its float16 quantized
matmul is ~35x slower there). The scales and biases of new codes are stored as float16
(``--scales-dtype``), as the GGUF's are: float32 ones add half a bit per weight at group size 64
and buy nothing measurable;
import with ``python -m sharp_mlx.convert --dtype float16`` for a float16 model on a Mac. The
result is recorded in config.json as mlx-lm records it (``"quantization": {"group_size",
"bits", "mode", <path>: {...}}``), so ``sharp_mlx.load`` and ``mlx_lm.load`` restore it.

A GGUF of the same model holds its weights as Q4_1 / Q8_0 codes, which are MLX affine codes with
group size 32 (``mx.load`` returns them as such). Re-quantizing the dequantized float weights
would add a second rounding error; instead every weight whose float values equal the GGUF's
codes, dequantized, takes those codes (4-bit for linear layers, 8-bit for the embedding of the
embedded SmolLM2), so quantization loses nothing. ``--from-gguf auto`` (the default) does this
with the embedded model's GGUF when the weights match it; ``--bits`` and ``--group-size`` apply
to the weights no GGUF code matches.

A reference with its own recovery (``reference_rank`` > 0, see sharp_mlx.recovery.joint) stores a fitted
W_s, which its factors and its targets' correct: its recovery is quantized like a target's, and
W_s like any changed float weight. GGUF codes are W_r's, so they are kept for W_s only when it
still equals them to float32 rounding (``FITTED_TOL``: the joint fit kept its start in a
float32 import); even a change below ``MATCH_TOL`` is the fit's, and snapping back to W_r's
codes would undo it. (Of a float16 import such a W_s is quantized afresh, at ``--bits``.)
"""

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Optional

from .errors import ArgumentParser, cli
from .options import at_least
from .quant.codes import BITS, RECOVERY_DTYPES, SCALES_DTYPES, QuantizeOptions, quantize_model_folder


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sharp_mlx.quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, required=True, help="float model folder (SHARP or plain)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--bits",
        type=int,
        choices=BITS,
        default=QuantizeOptions.bits,
        help="bits per weight not taken from GGUF codes (default: %(default)s)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        choices=(32, 64, 128),
        default=QuantizeOptions.group_size,
        help="quantization group size for weights not taken from GGUF codes (default: %(default)s)",
    )
    p.add_argument(
        "--recovery-dtype",
        choices=sorted(RECOVERY_DTYPES),
        default=QuantizeOptions.recovery_dtype,
        help="dtype of float recovery factors (default: %(default)s)",
    )
    p.add_argument(
        "--recovery-bits",
        type=int,
        choices=BITS,
        help="quantize the recovery factors too, to this many bits (default: keep them float)",
    )
    p.add_argument(
        "--recovery-group-size",
        type=int,
        choices=(32, 64, 128),
        help="group size of the recovery codes (default: the largest up to --group-size that divides the rank)",
    )
    p.add_argument(
        "--embedding-bits",
        type=int,
        choices=BITS,
        help="bits for the embedding, overriding its GGUF codes (default: its codes, else --bits)",
    )
    p.add_argument(
        "--scales-dtype",
        choices=sorted(SCALES_DTYPES),
        default=QuantizeOptions.scales_dtype,
        help="dtype of the scales and biases of codes made here (default: %(default)s)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        nargs="+",
        metavar="FILE",
        help=(
            "with --embedding-bits: fit the tied embedding's codes by GPTQ on these files' text (e.g. "
            "data/*/train.jsonl) instead of rounding to nearest"
        ),
    )
    p.add_argument(
        "--calibration-windows",
        type=at_least(1),
        default=QuantizeOptions.calibration_windows,
        help="windows of 256 tokens per calibration file (default: %(default)s)",
    )
    p.add_argument(
        "--from-gguf",
        default=QuantizeOptions.from_gguf,
        metavar="FILE|auto|none",
        help=(
            "keep the codes of this GGUF for every weight they match; 'auto': the embedded model's GGUF; 'none': "
            "re-quantize everything (default: %(default)s)"
        ),
    )
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def summary(r: dict, seconds: Optional[float] = None) -> str:
    """What ``quantize_model_folder`` did, in lines a person reads."""
    source = (
        f"{r['gguf_codes']} keep the codes of {r['gguf']}, {r['gguf_mismatched']} differ from it"
        if r["gguf"]
        else "no GGUF codes kept"
    )
    lines = [
        f"quantized {r['quantized']} weights of {r['model']} -> {r['out']} ({source}"
        + (f"; {seconds:.1f} s)" if seconds is not None else ")")
    ]
    if r["embedding_fit_s"] is not None:
        o = r["options"]
        lines.append(
            f"embedding: {o['embedding_bits']}-bit codes fitted by GPTQ on {o['calibration_windows']} windows of each "
            f"of {len(o['calibration'])} files "
            f"({r['embedding_fit_s']} s)"
        )
    lines.append(
        f"bytes on disk: {r['bytes_before']:,} -> {r['bytes_after']:,} ({r['bytes_after'] / r['bytes_before']:.3f}x)"
    )
    return "\n".join(lines)


@cli("sharp_mlx.quantize")
def main(argv=None):
    args = build_parser().parse_args(argv)
    tic = time.perf_counter()
    options = QuantizeOptions(**{f.name: getattr(args, f.name) for f in fields(QuantizeOptions)})
    r = quantize_model_folder(args.model, args.out, options, force=args.force, tokenizer=True)
    print(json.dumps(r) if args.json else summary(r, time.perf_counter() - tic))


if __name__ == "__main__":
    raise SystemExit(main())
