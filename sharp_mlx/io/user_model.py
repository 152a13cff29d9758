"""The main job on a user's model: its folder, its name, and a share map and budgets derived from it.

    python -m sharp_mlx.pipeline --model ~/hf/Llama-3.2-1B          # a Hugging Face folder, used in place
    python -m sharp_mlx.pipeline --model meta-llama/Llama-3.2-1B    # a hub id, imported into models/
    python -m sharp_mlx.pipeline --model model.gguf --depth 0.5:0.97

The default recipe's share map names SmolLM2-135M's layers (nine targets chosen by measured
damage among 30). On any other model the share map is ``next`` (every other layer borrows the one
before it) over a span given as a fraction of depth: ``DEPTH`` = 0.37:0.97 is SmolLM2's 11:29 of
30, and on a 16-layer model it is 6:15. ``--share`` and ``--layers`` given on the command line
win. The targets by measured damage on the user's model are sharp_mlx.advise's to find.
"""

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Optional, Tuple

from ..errors import SharpError
from ..recipes import Recipe

DEPTH = "0.37:0.97"  # SmolLM2's 11:29 of 30 layers, as fractions of depth
MODELS = Path("models")


def parse_depth(depth: str) -> Tuple[float, float]:
    try:
        lo, hi = (float(x) for x in depth.split(":"))
    except ValueError:
        raise SharpError(f"--depth {depth!r} is not of the form A:B with fractions of depth, such as {DEPTH}")
    if not 0.0 <= lo < hi <= 1.0:
        raise SharpError(f"--depth {depth!r}: need 0 <= A < B <= 1 (fractions of the model's depth), e.g. {DEPTH}")
    return lo, hi


def depth_layers(depth: str, num_layers: int) -> str:
    """The layer range A:B (end excluded) covering the fractions ``depth`` of ``num_layers`` blocks."""
    lo, hi = parse_depth(depth)
    a, b = round(lo * num_layers), math.floor(hi * num_layers)
    if b - a < 2:
        raise SharpError(
            f"--depth {depth} covers layers {a}:{b} of {num_layers}, fewer than the 2 that one target and its "
            "reference need: widen it"
        )
    return f"{a}:{b}"


def model_name(source: str) -> str:
    """A folder name for outputs: the source's last path part, lower case, without .gguf."""
    name = Path(source.rstrip("/")).name
    return (name[: -len(".gguf")] if name.lower().endswith(".gguf") else name).lower()


def model_folder(source: str, force: bool = False) -> Path:
    """A loadable model folder for ``source``: a model folder as it is (Hugging Face safetensors folders
    load directly); a GGUF or a hub id imported into models/<name> once (its dtype kept)."""
    from ..convert import HUB_ID, import_model

    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not path.exists() and not HUB_ID.match(source):
        raise SharpError(f"--model {source!r} is neither a model folder, a .gguf file nor a hub id like 'org/name'")
    out = MODELS / model_name(source)
    if (out / "config.json").exists() and not force:
        return out
    return import_model(source, out, force=True)


def num_layers(folder: Path) -> int:
    from .checkpoint import read_config

    return read_config(folder)["num_hidden_layers"]


def recipe_for(r: Recipe, folder: Path, given: set, depth: Optional[str] = None) -> Recipe:
    """The recipe ``r`` made for the model in ``folder``: ``next`` over ``depth`` unless --share/--layers
    were given; a rank above the model's smaller width is cut to it."""
    from .checkpoint import read_config

    config = read_config(folder)
    n = config["num_hidden_layers"]
    share = r.share if "share" in given else "next"
    from ..models.sharemap import share_kind

    if "layers" in given or not share_kind(share).takes_layers:  # a JSON map names its own layers
        layers = r.layers
    else:
        layers = depth_layers(depth or DEPTH, n)
    rank = min(r.rank, config["hidden_size"], config["intermediate_size"])
    return replace(r, share=share, layers=layers, rank=rank)


def describe(folder: Path, r: Recipe) -> str:
    from ..models.sharemap import parse_share

    share = parse_share(r.share, num_layers(folder), layers=r.layers)
    return f"{folder}: {num_layers(folder)} layers, share map {json.dumps({str(k): v for k, v in share.items()})}"
