"""Weights that are finite, and weights files that are the bytes that were written.

- ``first_nonfinite``: the name of the first float tensor holding a NaN or an infinity (one
  ``isfinite().all()`` per tensor, evaluated together). Every stage checks its weights before the
  rename, and every command that loads a model refuses non-finite weights.
- ``write_checksums`` / ``verify_checksums``: each folder this package writes records a checksum
  of each weights file in ``CHECKSUMS``; ``python -m sharp_mlx.verify`` checks them and names a
  corrupted file. ``experiments/results/integrity_cost.md`` measures both checks at load.
"""

import hashlib
import json
import math
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import SharpError

CHECKSUMS = "checksums.json"
ALGORITHM = "sha256"
CHUNK = 1 << 22
PathLike = Union[str, Path]


def first_nonfinite(named: Iterable[Tuple[str, mx.array]]) -> Optional[str]:
    """The first name whose float array holds a non-finite value (None: all finite).

    A sum is NaN or infinite whenever a term is, and costs a fifth of ``isfinite().all()`` on a
    CPU (experiments/results/integrity_cost.md); a tensor whose sum is not finite (a NaN, an infinity,
    or a sum that overflows, as float16 ones can) is then checked element by element."""
    named = [(k, v) for k, v in named if mx.issubdtype(v.dtype, mx.floating)]
    if not named:
        return None
    sums = mx.stack([v.sum().astype(mx.float32) for _, v in named])
    mx.eval(sums)
    suspects = [(k, v) for (k, v), s in zip(named, sums.tolist()) if not math.isfinite(s)]
    if not suspects:
        return None
    flags = mx.stack([mx.isfinite(v).all() for _, v in suspects])
    mx.eval(flags)
    bad = [k for (k, _), ok in zip(suspects, flags.tolist()) if not ok]
    return bad[0] if bad else None


def check_finite(model: nn.Module, what: str, fix: str) -> None:
    """Refuse a model with a non-finite parameter: ``{what}: weight NAME is not finite (NaN or inf): {fix}``."""
    name = first_nonfinite(tree_flatten(model.parameters()))
    if name is not None:
        raise SharpError(f"{what}: weight {name} is not finite (NaN or inf): {fix}")


def file_digest(path: PathLike) -> str:
    h = hashlib.new(ALGORITHM)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: PathLike) -> Dict[str, str]:
    """Record the checksum of each ``*.safetensors`` in ``folder`` (in ``CHECKSUMS``)."""
    folder = Path(folder)
    files = {f.name: file_digest(f) for f in sorted(folder.glob("*.safetensors"))}
    (folder / CHECKSUMS).write_text(json.dumps({"algorithm": ALGORITHM, "files": files}, indent=1) + "\n")
    return files


def read_checksums(folder: PathLike) -> Optional[Dict[str, str]]:
    """The recorded checksums of ``folder`` (None: it records none, e.g. a folder from another tool)."""
    path = Path(folder) / CHECKSUMS
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        assert data.get("algorithm") == ALGORITHM and isinstance(files, dict)
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
        raise SharpError(f"{path} is not a checksum record this package wrote: re-save the model, or delete it")
    return files


def verify_checksums(folder: PathLike, files: Optional[Iterable[PathLike]] = None) -> int:
    """Check each weights file of ``folder`` against its recorded checksum; return how many were
    checked (0 when the folder records none). SharpError names the first file that differs."""
    folder = Path(folder)
    recorded = read_checksums(folder)
    if recorded is None:
        return 0
    names = [Path(f).name for f in files] if files is not None else sorted(recorded)
    for name in names:
        if name not in recorded:
            raise SharpError(
                f"{folder / name} has no recorded checksum in {folder / CHECKSUMS}: it was not written with the model; "
                "remove it or re-save the model"
            )
        if not (folder / name).exists():
            raise SharpError(f"{folder / name} is missing (its checksum is recorded): re-save or re-copy the model")
        if file_digest(folder / name) != recorded[name]:
            raise SharpError(
                f"{folder / name} is corrupted: its {ALGORITHM} differs from the one recorded when it was written; "
                "re-save or re-copy the model"
            )
    return len(names)


def strict_json(value):
    """``value`` with every non-finite float replaced by None, so ``json.dumps(allow_nan=False)`` holds."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value
