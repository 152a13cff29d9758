"""Checks on an output folder before the work, and what a failed write leaves.

``claim_output`` is taken by each writing command before it loads anything: it locks the folder
(``sharp_mlx.io.locking``), cleans up what killed runs left beside it (``.NAME.tmp-PID`` halves of a
write, a ``.NAME.old-PID`` model hidden by a ``--force`` swap, restored when the new one is
missing), and checks that the parent is writable and has room for the estimated output.
``write_error`` turns a disk that fills or turns read-only during a write into one line.
"""

import contextlib
import errno
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from ..errors import SharpError
from .locking import folder_lock, pid_alive

PathLike = Union[str, Path]
MB = 1e6
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES)
MARGIN = 1.05  # room asked beyond the estimate: config, tokenizer, rounding


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: PathLike) -> int:
    return shutil.disk_usage(existing_ancestor(Path(path))).free


def check_room(out: PathLike, need: Optional[int]) -> None:
    """The first existing folder above ``out`` is writable and its disk has room for ``need`` bytes."""
    out = Path(out)
    base = existing_ancestor(out.absolute().parent)
    if not os.access(base, os.W_OK):
        raise SharpError(f"cannot write {out}: {base} is not writable: choose another output folder")
    if need:
        free = shutil.disk_usage(base).free
        if free < need * MARGIN:
            raise SharpError(
                f"not enough room for {out}: about {need * MARGIN / MB:.1f} MB needed, {free / MB:.1f} MB free on the "
                f"disk of {base}: free space or choose another output folder"
            )


LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def clean_leftovers(out: PathLike, log: Callable[[str], None] = _stderr) -> list:
    """Remove ``.NAME.tmp-PID`` left by dead runs beside ``out``, and restore a hidden
    ``.NAME.old-PID`` where ``out`` is missing (remove it where ``out`` is there); return what was done.
    Call it holding ``out``'s lock."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    done = []
    for p in sorted(out.parent.iterdir()):
        m = LEFTOVER.match(p.name)
        if not m or m["name"] != out.name or pid_alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not out.exists():
            p.rename(out)
            done.append(f"restored {out} from {p.name}, hidden by process {m['pid']} that was stopped mid-replace")
        else:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
            what = "an unfinished write" if m["kind"] == "tmp" else "the replaced model"
            done.append(f"removed {p.name}, {what} of process {m['pid']} that is no longer running")
    for line in done:
        log(f"{out}: {line}")
    return done


@contextlib.contextmanager
def claim_output(out: PathLike, need: Optional[int] = None, log: Callable[[str], None] = _stderr) -> Iterator[Path]:
    """Lock ``out``, clean what killed runs left beside it, and check there is room, before any work."""
    out = Path(out)
    with folder_lock(out, log=log):
        clean_leftovers(out, log=log)
        check_room(out, need)
        yield out


def is_write_error(e: BaseException) -> bool:
    """A disk that is full or read-only (or otherwise refuses bytes), from Python or from MLX."""
    if isinstance(e, OSError):
        return e.errno in WRITE_ERRNOS
    return isinstance(e, RuntimeError) and str(e).startswith("[write]")


def write_error(out: PathLike, e: BaseException) -> SharpError:
    """The one-line error of a write to ``out`` that the disk refused (``is_write_error(e)``)."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    try:
        free = f"{free_bytes(out) / MB:.1f} MB free there"
    except OSError:
        free = "free space unknown"
    return SharpError(
        f"writing {out} failed ({reason}; {free}): nothing was written; free space or choose another output folder"
    )


def model_bytes(config: dict, bytes_per_weight: float) -> int:
    """Estimated bytes of a Llama of ``config`` stored at ``bytes_per_weight`` (MLPs counted at every layer)."""
    h, n = int(config.get("hidden_size", 0)), int(config.get("num_hidden_layers", 0))
    mlp = int(config.get("intermediate_size", 0))
    heads = int(config.get("num_attention_heads", 1)) or 1
    kv = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim") or h // heads)
    attn = h * head_dim * heads * 2 + h * head_dim * kv * 2
    vocab = int(config.get("vocab_size", 0)) * h * (1 if config.get("tie_word_embeddings", True) else 2)
    return int((vocab + n * (attn + 3 * h * mlp)) * bytes_per_weight)


def folder_weight_bytes(folder: PathLike) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
