"""4- or 8-bit codes for a model: the GGUF's own codes where they fit, fitted ones elsewhere, shared weights kept once.

The command is ``python -m sharp_mlx.quantize`` (``sharp_mlx/quantize.py``)."""

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import dequantize_model

from ..errors import SharpError
from ..io.checkpoint import atomic_dir, copy_tokenizer, load_model, read_config, require_tokenizer, write_model
from ..io.outputs import claim_output, folder_weight_bytes
from ..models.llama import QuantizedRecovery

Codes = Dict[str, Tuple[mx.array, mx.array, mx.array]]  # module path -> (weight, scales, biases)
RECOVERY_DTYPES = {"float16": mx.float16, "float32": mx.float32}
SCALES_DTYPES = RECOVERY_DTYPES
BITS = (2, 3, 4, 5, 6, 8)
# What the main job's 4-bit checkpoint uses (each choice's cost was measured on SmolLM2-135M).
DEFAULT_RECOVERY_BITS: Optional[int] = 8
DEFAULT_EMBEDDING_BITS: Optional[int] = 5  # fitted by GPTQ on the training splits (the main job passes --calibration)
# A GGUF code matches a float weight when it dequantizes to it within this fraction of the
# weight's largest magnitude (0 for an fp32 import of the GGUF; fp16 rounding stays below 1e-3).
MATCH_TOL = 1e-3
# The stored weight of a reference with its own recovery was fitted: codes must equal it to float32 rounding.
FITTED_TOL = 1e-6


def folder_bytes(path: Path) -> int:
    """Bytes of the weight files of a model folder."""
    return sum(f.stat().st_size for f in Path(path).glob("model*.safetensors"))


def is_quantized(model: nn.Module, config: dict) -> bool:
    return "quantization" in config or any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters()))


def gguf_codes(path: Union[str, Path], model: nn.Module, config: dict) -> Tuple[Codes, int]:
    """(codes of the GGUF at ``path`` that match the model's stored weights, by module path;
    how many weights of the GGUF the model stores but do not match)."""
    from ..io.gguf_import import hf_name, unpermute_rows

    try:
        tensors = mx.load(str(path))
    except (ValueError, RuntimeError) as e:
        raise SharpError(
            f"cannot read quantized tensors from {path} ({str(e).splitlines()[0]}): pass a GGUF with Q4_0/Q4_1/Q8_0 "
            "weights, or --from-gguf none"
        )
    heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}
    weights = dict(tree_flatten(model.parameters()))
    fitted = tuple(f"model.layers.{i}.mlp." for i in recovered_layers(model) if "mlp" in model.model.layers[i])
    codes, mismatched = {}, 0
    for key in tensors:
        if not key.endswith(".scales"):
            continue
        stem = key[: -len(".scales")]
        name = hf_name(f"{stem}.weight")
        w, s, b = tensors[f"{stem}.weight"], tensors[key], tensors.get(f"{stem}.biases")
        if name not in weights or b is None:
            continue  # a target's MLP (not stored here) or a code without biases (not affine)
        float_w = weights[name]
        in_dims = float_w.shape[-1]
        group_size, bits = in_dims // s.shape[-1], w.shape[-1] * 32 // in_dims
        if w.shape[0] != float_w.shape[0] or group_size * s.shape[-1] != in_dims:
            mismatched += 1
            continue
        for proj, n in heads.items():
            if f".{proj}." in name:
                # Groups run along the input axis, so packed rows permute like float rows.
                w, s, b = (unpermute_rows(x, n) for x in (w, s, b))
        deq = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)
        scale = mx.abs(float_w).max().item() or 1.0
        tol = FITTED_TOL if name.startswith(fitted) else MATCH_TOL
        if mx.abs(deq - float_w.astype(mx.float32)).max().item() <= tol * scale:
            codes[name[: -len(".weight")]] = (w, s, b)
        else:
            mismatched += 1
    return codes, mismatched


def recovered_layers(model: nn.Module) -> list:
    """Layers with a recovery: every target of rank > 0 and every reference of reference_rank > 0."""
    return [i for i, layer in enumerate(model.model.layers) if "recovery" in layer]


def code_params(weight: mx.array, scales: mx.array, in_dims: int) -> dict:
    return {"group_size": in_dims // scales.shape[-1], "bits": weight.shape[-1] * 32 // in_dims, "mode": "affine"}


def check_options(
    bits: int,
    group_size: int,
    recovery_dtype: str,
    recovery_bits: Optional[int] = None,
    embedding_bits: Optional[int] = None,
    scales_dtype: str = "float16",
) -> None:
    for flag, b in (("--bits", bits), ("--recovery-bits", recovery_bits), ("--embedding-bits", embedding_bits)):
        if b is not None and b not in BITS:
            raise SharpError(f"{flag} {b} is not supported: use {', '.join(map(str, BITS))}")
    if group_size not in (32, 64, 128):
        raise SharpError(f"--group-size {group_size} is not supported: use 32, 64 or 128")
    if recovery_dtype not in RECOVERY_DTYPES:
        raise SharpError(f"recovery dtype {recovery_dtype!r} is not supported: use {', '.join(RECOVERY_DTYPES)}")
    if scales_dtype not in SCALES_DTYPES:
        raise SharpError(f"scales dtype {scales_dtype!r} is not supported: use {', '.join(SCALES_DTYPES)}")


def recovery_group(rank: int, group_size: int, asked: Optional[int] = None) -> int:
    """``asked`` if it divides the rank, else the largest supported group size <= ``group_size`` that does."""
    if asked is not None:
        if rank % asked:
            raise SharpError(
                f"--recovery-group-size {asked} does not divide the recovery rank {rank}: use 32, 64 or 128 dividing it"
            )
        return asked
    for g in (128, 64, 32):
        if g <= group_size and rank % g == 0:
            return g
    raise SharpError(
        f"recovery rank {rank} is not a multiple of 32, so its factors cannot be quantized: keep them float (drop "
        "--recovery-bits)"
    )


def quantize(
    model: nn.Module,
    config: dict,
    bits: int = 4,
    group_size: int = 64,
    recovery_dtype: str = "float16",
    codes: Optional[Codes] = None,
    recovery_bits: Optional[int] = None,
    embedding_bits: Optional[int] = None,
    scales_dtype: str = "float16",
    recovery_group_size: Optional[int] = None,
) -> Tuple[nn.Module, dict]:
    """Quantize ``model`` in place; returns it and its config with a "quantization" section.

    Modules in ``codes`` take those codes; every other Linear/Embedding whose input size is a
    multiple of ``group_size`` is quantized to ``bits`` (the embedding to ``embedding_bits``
    when given, which overrides its codes). Recovery factors become ``recovery_dtype``, or
    ``recovery_bits`` affine codes when given, in groups of ``recovery_group_size`` (default: the
    largest of 128/64/32 up to ``group_size`` that divides the rank; scaling vectors keep their dtype); other
    float tensors keep their dtype. New codes' scales and biases are ``scales_dtype``.
    """
    if is_quantized(model, config):
        raise SharpError("the model is already quantized: quantize the float model it came from")
    check_options(bits, group_size, recovery_dtype, recovery_bits, embedding_bits, scales_dtype)
    codes = dict(codes or {})
    layers = model.model.layers
    recovered = recovered_layers(model)  # targets and references with their own recovery, alike
    recovery = (
        {}
        if recovery_bits is None
        else {
            f"model.layers.{i}.recovery": {
                "group_size": recovery_group(layers[i].recovery.gate_a.shape[1], group_size, recovery_group_size),
                "bits": recovery_bits,
                "mode": "affine",
            }
            for i in recovered
        }
    )
    params = {}
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized"):
            continue
        in_dims = module.weight.shape[-1]
        if embedding_bits is not None and isinstance(module, nn.Embedding):
            codes.pop(path, None)
            if in_dims % group_size == 0:
                params[path] = {"group_size": group_size, "bits": embedding_bits, "mode": "affine"}
        elif path in codes:
            params[path] = code_params(codes[path][0], codes[path][1], in_dims)
        elif in_dims % group_size == 0:
            params[path] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    quantization = {**quantization_config(params), **recovery}
    for i in recovered:
        q = recovery.get(f"model.layers.{i}.recovery")
        if q:
            layers[i].recovery = QuantizedRecovery.from_recovery(layers[i].recovery, **q)
        else:
            layers[i].recovery.update(
                tree_map(lambda x: x.astype(RECOVERY_DTYPES[recovery_dtype]), layers[i].recovery.parameters())
            )
    apply_codes(model, params, codes)
    dt = SCALES_DTYPES[scales_dtype]
    for path, module in model.named_modules():  # the codes made here (the GGUF's keep their own)
        if path not in codes:
            module.update({k: v.astype(dt) for k, v in module.parameters().items() if k.endswith(("scales", "biases"))})
    mx.eval(model.parameters())
    return model, {**config, "quantization": quantization}


def apply_codes(model: nn.Module, params: Dict[str, dict], codes: Codes) -> None:
    """Quantize each module in ``params`` (path -> mlx quantization parameters), in place, and give
    those in ``codes`` exactly their codes."""
    nn.quantize(model, class_predicate=lambda p, m: params.get(p, False))
    # Lazy: the codes replace the re-quantized weights before those are ever computed.
    model.load_weights(
        [(f"{p}.{n}", x) for p, code in codes.items() for n, x in zip(("weight", "scales", "biases"), code)],
        strict=False,
    )


def dequantized(model: nn.Module, dtype: Optional[mx.Dtype] = None) -> nn.Module:
    """``model`` with every quantized weight replaced, in place, by its float values (MLX's CPU
    quantized matmul is ~25x slower than float for many-token batches). By default the weights come
    out in the scales' dtype (float16): the same function to float16 precision, within 5e-4 of the
    values the quantized matmul computes with. ``dtype=mx.float32``: exactly those values."""
    if dtype is not None:  # scales and biases first, so the products are not rounded to their dtype
        for _, m in model.named_modules():
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedRecovery)):
                m.update({k: v.astype(dtype) for k, v in m.items() if k.split("_")[-1] in ("scales", "biases")})
    dequantize_model(model)
    for layer in model.model.layers:
        if isinstance(layer.get("recovery"), QuantizedRecovery):
            layer.recovery = layer.recovery.dequantized()
    return model


def quantization_config(params: Dict[str, dict]) -> dict:
    """mlx-lm's form: the most common parameters at the top, the other modules by path."""
    if not params:
        raise SharpError("no weight of this model can be quantized with the group size asked: try --group-size 32")
    top = dict(Counter(tuple(sorted(p.items())) for p in params.values()).most_common(1)[0][0])
    return {**top, **{path: p for path, p in params.items() if p != top}}


def resolve_gguf(from_gguf: str) -> Optional[Path]:
    """The GGUF file ``--from-gguf`` names: a path, ``auto`` (the embedded model's, if installed) or ``none``."""
    if from_gguf == "none":
        return None
    if from_gguf == "auto":
        from ..convert import embedded_gguf

        try:
            return embedded_gguf()
        except SharpError:
            return None
    path = Path(from_gguf).expanduser()
    if not path.is_file():
        raise SharpError(f"--from-gguf {from_gguf}: no such file; pass a .gguf file, 'auto' or 'none'")
    return path


@dataclass
class QuantizeOptions:
    """How ``quantize_model_folder`` quantizes (the CLI's flags, their defaults here)."""

    bits: int = 4  # bits per weight not taken from GGUF codes
    group_size: int = 64  # group size of the weights not taken from GGUF codes
    recovery_dtype: str = "float16"  # dtype of float recovery factors
    recovery_bits: Optional[int] = None  # quantize the recovery factors too, to this many bits
    recovery_group_size: Optional[int] = None  # None: the largest up to group_size that divides the rank
    embedding_bits: Optional[int] = None  # re-quantize the embedding to this many bits (None: its GGUF codes)
    scales_dtype: str = "float16"  # of the scales and biases of codes made here
    calibration: Optional[Sequence[Union[str, Path]]] = None  # fit the tied embedding's codes by GPTQ on these files
    calibration_windows: int = 8  # windows of 256 tokens per calibration file
    from_gguf: str = "auto"  # keep this GGUF's codes where they match: a path, auto or none

    def record(self) -> dict:
        """What config.json records ("sharp_quantize") about how the folder was made, so it can
        be told apart from one made with other options."""
        c = self.calibration
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "recovery": self.recovery_bits or self.recovery_dtype,
            "recovery_group_size": self.recovery_group_size,
            "embedding_bits": self.embedding_bits,
            "embedding_fit": ("gptq" if c else "round") if self.embedding_bits else None,
            "calibration": [str(f) for f in c] if c else None,
            "calibration_windows": self.calibration_windows if c else None,
            "scales_dtype": self.scales_dtype,
        }

    def check(self) -> None:
        """Raise SharpError naming the first option that cannot work."""
        check_options(
            self.bits, self.group_size, self.recovery_dtype, self.recovery_bits, self.embedding_bits, self.scales_dtype
        )
        if self.calibration and self.embedding_bits is None:
            raise SharpError(
                "--calibration fits the embedding's re-quantized codes: pass --embedding-bits too (5 is within 2% on "
                "SmolLM2)"
            )
        if self.calibration and self.calibration_windows < 1:
            raise SharpError(f"--calibration-windows must be at least 1, got {self.calibration_windows}")
        for f in self.calibration or ():
            if not Path(f).is_file():
                raise SharpError(
                    f"calibration file {f} does not exist: pass text files such as data/*/train.jsonl (python -m "
                    "sharp_mlx.data.corpora makes them)"
                )


def options_record(**options) -> dict:
    """``QuantizeOptions(**options).record()``."""
    return QuantizeOptions(**options).record()


def quantize_model_folder(
    model_dir: Union[str, Path],
    out: Union[str, Path],
    options: Optional[QuantizeOptions] = None,
    force: bool = False,
    tokenizer: bool = False,
    **fields,
) -> dict:
    """Quantize the model folder ``model_dir`` into ``out`` as ``options`` say (or a
    ``QuantizeOptions`` of ``fields``); returns what was done, with bytes on disk. With
    ``calibration`` the tied embedding's ``embedding_bits`` codes are fitted by GPTQ
    (``sharp_mlx.quant.gptq``) instead of rounded to nearest. ``tokenizer``: refuse a folder without one."""
    o = options if options is not None else QuantizeOptions(**fields)
    model_dir, out = Path(model_dir), Path(out)
    o.check()
    if out.exists() and not force:
        raise SharpError(f"{out} already exists: pass --force to replace it, or choose another --out")
    if out.resolve() == model_dir.resolve():
        raise SharpError(f"--out {out} is the input folder: write the quantized model to another folder")
    read_config(model_dir)
    if tokenizer:  # the output gets a copy of it: the command writes no tokenizer-less folder
        require_tokenizer(model_dir)
    with claim_output(out, need=folder_weight_bytes(model_dir) // 3):  # one writer, room checked, before the work
        return _quantize_folder(model_dir, out, o, force)


def _quantize_folder(model_dir: Path, out: Path, o: QuantizeOptions, force: bool) -> dict:
    model, config = load_model(model_dir)
    if o.calibration and not config.get("tie_word_embeddings", True):
        raise SharpError(
            f"{model_dir} has its own output layer (tie_word_embeddings is false): --calibration fits a tied "
            "embedding only; drop it"
        )
    if is_quantized(model, config):
        q = config.get("quantization", {})
        raise SharpError(
            f"{model_dir} is already quantized ({q.get('bits')}-bit, group size {q.get('group_size')}): quantize the "
            "float model it came from"
        )
    gguf = resolve_gguf(o.from_gguf)
    codes, mismatched = gguf_codes(gguf, model, config) if gguf is not None else ({}, 0)
    if gguf is not None and o.from_gguf != "auto" and not codes:
        raise SharpError(
            f"no weight of {model_dir} matches the codes in {gguf}: pass the GGUF the model was imported from, or "
            "--from-gguf none"
        )
    n_gguf = len(codes) - (
        o.embedding_bits is not None and "model.embed_tokens" in codes
    )  # a re-quantized embedding drops its code
    fit_seconds = None
    if o.calibration:  # the embedding gets GPTQ's codes, which quantize() then keeps like a GGUF's
        from mlx_lm.utils import load_tokenizer

        from .gptq import gptq_codes, output_hessian

        tic = time.perf_counter()
        hessian = output_hessian(
            model, load_tokenizer(model_dir), [Path(f) for f in o.calibration], o.calibration_windows
        )
        codes["model.embed_tokens"] = gptq_codes(
            model.model.embed_tokens.weight, hessian, o.embedding_bits, o.group_size, SCALES_DTYPES[o.scales_dtype]
        )
        fit_seconds = round(time.perf_counter() - tic, 1)
    model, config = quantize(
        model,
        config,
        o.bits,
        o.group_size,
        o.recovery_dtype,
        codes,
        o.recovery_bits,
        None if o.calibration else o.embedding_bits,
        o.scales_dtype,
        o.recovery_group_size,
    )
    config["sharp_quantize"] = o.record()
    with atomic_dir(out, force=force) as tmp:
        write_model(tmp, model, config)
        copy_tokenizer(model_dir, tmp)
    return {
        "model": str(model_dir),
        "out": str(out),
        "gguf": str(gguf) if n_gguf else None,
        "gguf_codes": n_gguf,
        "options": config["sharp_quantize"],
        "embedding_fit_s": fit_seconds,
        "gguf_mismatched": mismatched if n_gguf else 0,
        "quantized": sum(1 for k, _ in tree_flatten(model.parameters()) if k.endswith("scales")),
        "quantization": config["quantization"],
        "bytes_before": folder_bytes(model_dir),
        "bytes_after": folder_bytes(out),
    }
