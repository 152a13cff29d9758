"""Which safetensors files a model folder holds its weights in: exactly what the folder says.

With ``model.safetensors.index.json``: exactly the files its weight map names, each present.
Without: ``model.safetensors`` alone, or a complete ``model-0000k-of-0000n.safetensors`` set.
Any other ``model*.safetensors`` beside them (a backup, an old shard) would be merged by a loader
that globs, its tensors winning, so it is refused by name; so is a tensor found in two files.
"""

import json
import re
import struct
from pathlib import Path
from typing import Dict, List, Union

from ..errors import SharpError

INDEX = "model.safetensors.index.json"
SHARD = re.compile(r"^model-(\d+)-of-(\d+)\.safetensors$")
PathLike = Union[str, Path]


def tensor_names(path: Path) -> List[str]:
    """The tensor names in a safetensors file's header (the data is not read)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError("header size is implausible")
            header = json.loads(f.read(size))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise SharpError(
            f"{path}: cannot read its safetensors header ({str(e).splitlines()[0] or type(e).__name__}): the file is "
            "truncated or corrupt, re-save the model"
        )
    return [k for k in header if k != "__metadata__"]


def _from_index(folder: Path, present: List[str]) -> List[str]:
    index = folder / INDEX
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise SharpError(f"{index} is not a valid index ({type(e).__name__}: {e}): re-save the model")
    for name in names:
        if not (folder / name).is_file():
            raise SharpError(f"{folder / name} is missing: {index} lists it; re-copy or re-save the model")
    extra = [p for p in present if p not in names]
    if extra:
        raise SharpError(
            f"{folder / extra[0]} is not among the weights files {index.name} lists: move it out of the folder"
        )
    return names


def _without_index(folder: Path, present: List[str]) -> List[str]:
    if present == ["model.safetensors"]:
        return present
    shards = [n for n in present if SHARD.match(n)]
    if "model.safetensors" in present:
        extra = next(n for n in present if n != "model.safetensors")
        raise SharpError(f"{folder / extra} is not part of the weights (model.safetensors): move it out of the folder")
    if not shards:
        raise SharpError(
            f"{folder / present[0]} is not a weights file name this package reads (model.safetensors or "
            "model-0000k-of-0000n.safetensors): rename it or re-save the model"
        )
    total = int(SHARD.match(shards[0])[2])
    width = len(SHARD.match(shards[0])[1])
    expected = [f"model-{k:0{width}d}-of-{total:0{width}d}.safetensors" for k in range(1, total + 1)]
    extra = [n for n in present if n not in expected]
    if extra:
        raise SharpError(
            f"{folder / extra[0]} is not part of the weights set {expected[0]} .. {expected[-1]}: move it out of "
            "the folder"
        )
    missing = [n for n in expected if n not in present]
    if missing:
        raise SharpError(f"{folder / missing[0]} is missing from the set of {total} weights files: re-copy the model")
    return expected


def weight_files(folder: PathLike) -> List[Path]:
    """The weights files of ``folder`` (see the module docstring); SharpError for anything else."""
    folder = Path(folder)
    present = sorted(p.name for p in folder.glob("model*.safetensors"))
    if not (folder / INDEX).exists() and not present:
        raise SharpError(
            f"{folder} has a config.json but no model*.safetensors weights: re-import or re-save the model"
        )
    names = _from_index(folder, present) if (folder / INDEX).exists() else _without_index(folder, present)
    if len(names) > 1:
        seen: Dict[str, str] = {}
        for name in names:
            for t in tensor_names(folder / name):
                if t in seen:
                    raise SharpError(
                        f"tensor {t} is in both {folder / seen[t]} and {folder / name}: keep one copy (re-save the "
                        "model)"
                    )
                seen[t] = name
    return [folder / n for n in names]
