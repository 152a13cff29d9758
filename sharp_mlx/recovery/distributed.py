"""Several processes, one job, over MLX's own distributed layer (``mx.distributed``).

Started by ``mlx.launch`` (ring, MPI or any backend MLX offers), every process runs the same
command; ``group()`` says which one it is. Without a launcher the group has one process and
everything here is a no-op, so single-process behaviour is unchanged.

- SLW: target layers are independent, so rank r fits ``shard(targets)`` (every size-th target
  from the r-th) and the fitted factors are summed into every process (``all_sum`` with zeros
  where a rank fitted nothing).
- SFT: data parallel. Each rank reads its own slice of every global batch (see
  ``data.batches(shard=...)``) and the gradients are averaged (``nn.average_gradients``),
  weighted by each rank's trained tokens.
- Only rank 0 writes files (``is_main``); the others compute the same result.
"""

import json
from typing import Dict, List, Sequence, TypeVar

import mlx.core as mx
import numpy as np

T = TypeVar("T")


def group() -> mx.distributed.Group:
    """The group of processes this one belongs to (a group of one without a launcher)."""
    return mx.distributed.init()


def is_main(g: mx.distributed.Group) -> bool:
    return g.rank() == 0


def shard(items: Sequence[T], g: mx.distributed.Group) -> List[T]:
    """This rank's share of ``items``: every size-th from the rank-th (balanced to one item)."""
    return list(items)[g.rank() :: g.size()]


def all_sum(x: mx.array, g: mx.distributed.Group) -> mx.array:
    """The sum of ``x`` over the group (``x`` itself for a group of one)."""
    return mx.distributed.all_sum(x, group=g, stream=mx.cpu) if g.size() > 1 else x


def gather_owned(arrays: Dict[str, mx.array], owned: bool, g: mx.distributed.Group) -> Dict[str, mx.array]:
    """Every rank's copy of arrays that exactly one rank holds (``owned``); the rest pass zeros."""
    if g.size() == 1:
        return arrays
    return {k: all_sum(v if owned else mx.zeros_like(v), g) for k, v in arrays.items()}


def gather_json(obj, g: mx.distributed.Group) -> list:
    """[rank 0's obj, rank 1's obj, ...] of a JSON-serialisable value from every rank."""
    if g.size() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
    lengths = np.zeros(g.size(), dtype=np.int32)
    lengths[g.rank()] = len(data)
    lengths = np.array(all_sum(mx.array(lengths), g))
    padded = np.zeros((g.size(), int(lengths.max())), dtype=np.int32)
    padded[g.rank(), : len(data)] = data
    rows = np.array(all_sum(mx.array(padded), g))
    return [json.loads(bytes(row[:n].astype(np.uint8)).decode()) for row, n in zip(rows, lengths)]
