"""Load and save model folders: config.json + safetensors + tokenizer files, written atomically.

A folder this package writes is an mlx-lm model folder. When layers share MLPs its config.json
has a ``"sharp"`` section and names a copy of ``model.py`` as mlx-lm's ``model_file``, so that
``mlx_lm.load(path, trust_remote_code=True)`` opens it too.
"""

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import load_tokenizer, save_config, save_model

from . import model as model_module
from .errors import SharpError
from .model import Model, ModelArgs, SharpArgs

MODEL_FILE = "sharp_model.py"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
SUPPORTED_TYPES = ("llama", "mistral")
PathLike = Union[str, Path]


def read_config(path: PathLike) -> dict:
    """config.json of a model folder, with a one-line error for every way it can be missing."""
    path = Path(path)
    if not path.exists():
        raise SharpError(
            f"model folder {path} does not exist: run `python -m sharp_mlx.convert` to import one, or pass an "
            "existing folder"
        )
    if not path.is_dir():
        raise SharpError(
            f"{path} is a file, not a model folder: pass the folder holding config.json (import a .gguf with `python "
            "-m sharp_mlx.convert --source FILE`)"
        )
    if not (path / "config.json").exists():
        raise SharpError(
            f"{path} is not a model folder (no config.json): pass a folder made by `python -m sharp_mlx.convert`"
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise SharpError(f"{path / 'config.json'} is not valid JSON ({e}): re-import the model")
    asks_for_code(path, config)
    if config.get("model_type") not in SUPPORTED_TYPES:
        raise SharpError(
            f"{path} holds a {config.get('model_type')!r} model; sharp_mlx supports model_type "
            f"{', '.join(SUPPORTED_TYPES)}: pass a Llama-family model"
        )
    if not list(path.glob("model*.safetensors")):
        raise SharpError(f"{path} has a config.json but no model*.safetensors weights: re-import or re-save the model")
    return config


def asks_for_code(path: Path, config: dict) -> None:
    """Refuse a folder whose config.json or tokenizer_config.json names its own Python code
    (``auto_map``): nothing from a model folder is ever run here."""
    for name in ("config.json", "tokenizer_config.json"):
        cfg = config if name == "config.json" else _json_or_empty(path / name)
        if cfg.get("auto_map"):
            raise SharpError(
                f"{path / name} asks to run the folder's own code (auto_map): sharp_mlx runs no code from model "
                "folders; "
                f"if it is a standard Llama, import it without the code: `python -m sharp_mlx.convert --source {path} "
                "--trust-remote-code`"
            )


def _json_or_empty(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def load_model(path: PathLike, lazy: bool = False) -> Tuple[Model, dict]:
    """The model of a folder this package (or mlx-lm, for a plain Llama) wrote, and its config."""
    path = Path(path)
    read_config(path)
    try:
        # Our own classes, whatever model_file the config names: nothing from the folder is run.
        model, config = mlx_lm_load_model(
            path,
            lazy=lazy,
            model_config={"model_file": None},
            get_model_classes=lambda config: (Model, ModelArgs),
        )
    except (ValueError, KeyError) as e:
        raise SharpError(
            f"{path}: its weights do not match its config.json ({str(e).splitlines()[0]}): re-save the model"
        )
    except RuntimeError as e:
        raise SharpError(
            f"{path}: cannot read its safetensors ({str(e).splitlines()[0]}): the file is truncated or corrupt, "
            "re-save the model"
        )
    config.pop("model_file", None)
    return model, config


def load(path: PathLike, lazy: bool = False) -> Tuple[Model, TokenizerWrapper]:
    """(model, tokenizer) of a model folder; weights are materialised unless ``lazy``."""
    model, config = load_model(path, lazy=lazy)
    return model, load_tokenizer(Path(path), eos_token_ids=config.get("eos_token_id"))


@contextlib.contextmanager
def atomic_dir(out: PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` only once everything in it is written."""
    out = Path(out)
    if out.exists() and not force:
        raise SharpError(f"{out} already exists: pass --force to replace it, or choose another output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def copy_tokenizer(src: PathLike, dst: PathLike) -> None:
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy(Path(src) / name, Path(dst) / name)


def write_model(folder: Path, model: nn.Module, config: dict) -> None:
    """Weights and config.json into an existing folder; the model file travels when layers share."""
    config = {k: v for k, v in config.items() if k not in ("sharp", "model_file")}
    sharp = model.args.sharp_args if isinstance(model, Model) else SharpArgs()
    if sharp.share:
        config["sharp"] = sharp.to_dict()
        config["model_file"] = MODEL_FILE
        shutil.copy(model_module.__file__, folder / MODEL_FILE)
    save_model(folder, model)
    save_config(config, folder / "config.json")


def save(
    out: PathLike,
    model: nn.Module,
    config: dict,
    tokenizer_from: Optional[PathLike] = None,
    force: bool = False,
) -> Path:
    """Write a model folder atomically; tokenizer files are copied from ``tokenizer_from``."""
    with atomic_dir(out, force=force) as tmp:
        write_model(tmp, model, config)
        if tokenizer_from is not None:
            copy_tokenizer(tokenizer_from, tmp)
    return Path(out)


def parameter_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
