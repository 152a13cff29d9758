"""Export a SHARP model folder as a plain dense Llama that needs no custom code.

    python -m sharp_mlx.fuse --model models/smollm2-135m-instruct-sharp --out models/smollm2-135m-instruct-fused

Each target layer gets MLP weights of its own, its reference's with the recovery merged in:
W_t = W_r + (a @ b)^T for gate, up and down (W_t = (a @ b)^T when it borrows no MLP), or with
scaling vectors W_t = diag(out) W_r diag(in) + (a @ b)^T. A reference with its own
recovery (``reference_rank`` > 0) gets W_r = W_s + (a_r @ b_r)^T from the stored weight W_s, and its
targets build on W_s, not on that. The
result stores every MLP again, so it is as large as the original model: it is for tools that
cannot run a shared model (stock ``mlx_lm.load``, transformers' ``LlamaForCausalLM``), not for
saving bytes. A quantized input is dequantized first; the output is float.
"""

import argparse
import time
from pathlib import Path
from typing import Dict, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import ArgumentParser, SharpError, cli
from .io.checkpoint import atomic_dir, copy_tokenizer, load_model, read_config, require_tokenizer, write_model
from .io.outputs import claim_output, model_bytes
from .models.llama import Model, ModelArgs, projection_shapes
from .quant.codes import dequantized

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def merged_mlp_weights(model: Model, layer: int) -> Dict[str, mx.array]:
    """float32 (out, in) gate/up/down weights that layer ``layer`` effectively runs: the stored
    MLP it runs (its own, or its reference's) with its own recovery, if any, merged in."""
    owner = model.model.mlp_owner[layer]
    block = model.model.layers[layer]
    shapes = projection_shapes(model.args.hidden_size, model.args.intermediate_size)
    weights = {}
    for p, (n_in, n_out) in shapes.items():
        w = None if owner is None else model.model.layers[owner].mlp[f"{p}_proj"].weight.astype(mx.float32)
        if "recovery" in block:
            w = block.recovery.merged(p, w, (n_out, n_in))
        weights[p] = mx.zeros((n_out, n_in)) if w is None else w  # a pruned MLP: zeros
    return weights


def fuse(model: nn.Module, config: dict, dtype: str = "float16", release: bool = False) -> Tuple[Model, dict]:
    """A plain (unshared, unquantized) Llama computing what ``model`` computes, and its config.

    ``release``: empty ``model`` of its arrays once the fused weights' graphs hold them, so that each
    input tensor is freed as soon as what needs it is computed (with a lazily read model, the peak
    is then about the output plus a few input tensors, not the input and the output together)."""
    if dtype not in DTYPES:
        raise SharpError(f"dtype {dtype!r} is not supported: use {', '.join(DTYPES)}")
    quantized = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    if quantized:
        for m in quantized:
            # float32 scales, so dequantizing adds no float16 rounding to the weights
            m.scales, m.biases = m.scales.astype(mx.float32), m.biases.astype(mx.float32)
    model = dequantized(model)  # also recovery factors stored as codes
    plain_config = {
        k: v for k, v in config.items() if k not in ("sharp", "model_file", "quantization", "quantization_config")
    }
    plain_config["torch_dtype"] = dtype
    weights = {k: v for k, v in tree_flatten(model.parameters()) if ".recovery." not in k}
    for i in range(model.args.num_hidden_layers):
        for p, w in merged_mlp_weights(model, i).items():
            weights[f"model.layers.{i}.mlp.{p}_proj.weight"] = w
    if release:  # from here only the fused weights' graphs hold the input: each input tensor goes once used
        for _, module in model.named_modules():
            for key in [k for k, v in module.items() if isinstance(v, mx.array)]:
                del module[key]
    del model
    fused = Model(ModelArgs.from_dict(plain_config))
    cast = [(k, v.astype(DTYPES[dtype])) for k, v in weights.items()]
    weights.clear()
    fused.load_weights(cast, strict=True)
    del cast
    for k, v in tree_flatten(fused.parameters()):  # one tensor at a time: peak ~ the output plus one input tensor
        if not mx.all(mx.isfinite(v)).item():
            raise SharpError(
                f"fused weight {k} has non-finite values: the checkpoint's weights or recovery factors are broken "
                "(retrain or re-save it)"
            )
    return fused, plain_config


def fuse_folder(
    model_dir: Union[str, Path], out: Union[str, Path], dtype: str = "auto", force: bool = False, tokenizer=False
) -> Path:
    """Fuse the model folder ``model_dir`` into the plain Llama folder ``out`` (``tokenizer``: refuse a
    folder without one, which would give a tokenizer-less output)."""
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and not force:
        raise SharpError(f"{out} already exists: pass --force to replace it, or choose another --out")
    config = read_config(model_dir)
    if tokenizer:
        require_tokenizer(model_dir)
    if dtype == "auto":  # a bfloat16 or float16 model stays so; float32 (exact for a GGUF) becomes float16
        dtype = config.get("torch_dtype") if config.get("torch_dtype") in ("bfloat16", "float16") else "float16"
    with claim_output(out, need=model_bytes(config, mx.zeros(1, DTYPES.get(dtype, mx.float16)).itemsize)):
        return _fuse_folder(model_dir, out, dtype, force)


def _fuse_folder(model_dir: Path, out: Path, dtype: str, force: bool) -> Path:
    fused, plain_config = fuse(*load_model(model_dir, lazy=True), dtype, release=True)  # read tensor by tensor
    with atomic_dir(out, force=force) as tmp:
        write_model(tmp, fused, plain_config)
        copy_tokenizer(model_dir, tmp)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sharp_mlx.fuse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, required=True, help="SHARP model folder (float or quantized)")
    p.add_argument("--out", type=Path, required=True, help="output folder for the dense Llama")
    p.add_argument(
        "--dtype",
        choices=["auto", *sorted(DTYPES)],
        default="auto",
        help="weight dtype of the output (default: auto, the model's bfloat16 or float16, else float16)",
    )
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    return p


@cli("sharp_mlx.fuse")
def main(argv=None):
    args = build_parser().parse_args(argv)
    tic = time.perf_counter()
    out = fuse_folder(args.model, args.out, args.dtype, args.force, tokenizer=True)
    print(
        f"fused {args.model} -> {out}, a plain Llama for mlx_lm.load and transformers "
        f"({time.perf_counter() - tic:.1f} s)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
