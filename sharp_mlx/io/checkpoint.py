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

from ..errors import SharpError
from ..models import llama as model_module
from ..models.llama import Model, ModelArgs, SharpArgs
from .integrity import check_finite, verify_checksums, write_checksums
from .outputs import claim_output, is_write_error, write_error
from .weightfiles import weight_files

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
    except UnicodeDecodeError as e:
        raise SharpError(
            f"{path / 'config.json'} is not UTF-8 text ({e.reason} at byte {e.start}): re-import the model"
        )
    check_config_shape(path, config)
    asks_for_code(path, config)
    if config.get("model_type") not in SUPPORTED_TYPES:
        raise SharpError(
            f"{path} holds a {config.get('model_type')!r} model; sharp_mlx supports model_type "
            f"{', '.join(SUPPORTED_TYPES)}: pass a Llama-family model"
        )
    weight_files(path)
    return config


REQUIRED = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")


def check_config_shape(path: Path, config) -> None:
    """config.json is a JSON object, and a Llama's holds a whole number >= 1 for each size."""
    if not isinstance(config, dict):
        raise SharpError(
            f"{path / 'config.json'} holds a JSON {type(config).__name__}, not an object of settings: re-import the "
            "model"
        )
    if config.get("model_type") not in SUPPORTED_TYPES:
        return
    for key in REQUIRED:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            what = "lacks" if key not in config else f"has {key} = {value!r} instead of a whole number >= 1 for"
            raise SharpError(f"{path / 'config.json'} {what} {key}: re-import the model")


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
    if not lazy:
        check_finite(model, str(path), "the model is broken (a diverged training run?); re-train or re-import it")
    return model, config


def verify(path: PathLike) -> int:
    """Check the recorded checksums of a model folder's weights files; return how many were checked."""
    read_config(path)
    return verify_checksums(path, weight_files(path))


def load(path: PathLike, lazy: bool = False) -> Tuple[Model, TokenizerWrapper]:
    """(model, tokenizer) of a model folder; weights are materialised unless ``lazy``."""
    model, config = load_model(path, lazy=lazy)
    require_tokenizer(path)
    try:
        return model, load_tokenizer(Path(path), eos_token_ids=config.get("eos_token_id"))
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise SharpError(f"{path}: cannot read its tokenizer ({str(e).splitlines()[0]}): re-import the model")


def require_tokenizer(path: PathLike) -> None:
    """A model folder holds a tokenizer (tokenizer.json or a sentencepiece tokenizer.model)."""
    path = Path(path)
    if path.is_dir() and not any((path / n).exists() for n in ("tokenizer.json", "tokenizer.model")):
        raise SharpError(
            f"{path} has no tokenizer (tokenizer.json or tokenizer.model): copy the tokenizer files of the model it "
            "came from into it, or re-import it"
        )


@contextlib.contextmanager
def atomic_dir(out: PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` only once everything in it is written."""
    out = Path(out)
    with claim_output(out):  # the lock and leftovers' cleanup, if the command has not claimed it already
        if out.exists() and not force:
            raise SharpError(f"{out} already exists: pass --force to replace it, or choose another output folder")
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            yield tmp
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_write_error(e):
                raise write_error(out, e) from e
            raise
        _swap(tmp, out)


def _swap(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an ``out`` already there is moved aside first and put back if that fails."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except OSError as e:
        if old.exists() and not out.exists():
            old.rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out, e) from e
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
    check_finite(model, f"not writing {folder.name.split('.tmp-')[0].lstrip('.')}", "nothing was saved")
    save_model(folder, model)
    save_config(config, folder / "config.json")
    write_checksums(folder)


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
