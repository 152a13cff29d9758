"""A Llama whose target layers borrow an earlier layer's MLP plus low-rank recovery factors.

Pure model file: arrays in, arrays out. It builds on mlx-lm's llama (attention, MLP, norms,
masks, cache, sanitize) and imports nothing but mlx and mlx-lm, so a checkpoint folder can carry
a copy of it as mlx-lm's ``model_file`` and stock ``mlx_lm.load`` can open it.

Sharing is described by ``config["sharp"]``:

    {"share": {"15": 14, "17": 16}, "rank": 64}

``share`` maps a target layer to the reference layer whose MLP it runs (``null``: no borrowed
MLP, the recovery factors alone; with rank 0 that is a pruned MLP). ``rank`` is an int or a
``{target: rank}`` map. ``"scales": true`` (absent when false) gives every projection of every
target two more vectors, ``{p}_in`` and ``{p}_out``: W_t ~= diag(out) W_r diag(in) + B A. Each
MLP lives at exactly one path (``model.layers.{r}.mlp``); a target block owns no MLP and is
handed its reference's at call time. Recovery factors and vectors are plain arrays, so
``nn.quantize`` leaves them in float.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask


@dataclass
class SharpArgs:
    """The share map, recovery rank and whether targets scale their borrowed weights' rows and
    columns; an empty map is the original model."""

    share: Dict[int, Optional[int]] = field(default_factory=dict)
    rank: Union[int, Dict[int, int]] = 0
    scales: bool = False

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "SharpArgs":
        d = d or {}
        share = {int(t): (None if r is None else int(r)) for t, r in d.get("share", {}).items()}
        rank = d.get("rank", 0)
        if isinstance(rank, dict):
            rank = {int(t): int(k) for t, k in rank.items()}
        return cls(share=share, rank=rank, scales=bool(d.get("scales", False)))

    def to_dict(self) -> dict:
        rank = self.rank if isinstance(self.rank, int) else {str(t): k for t, k in self.rank.items()}
        d = {"share": {str(t): r for t, r in sorted(self.share.items())}, "rank": rank}
        return {**d, "scales": True} if self.scales else d  # old configs stay as they were

    def rank_of(self, layer: int) -> int:
        if layer not in self.share:
            return 0
        return self.rank.get(layer, 0) if isinstance(self.rank, dict) else self.rank

    def validate(self, num_layers: int, hidden_size: int, intermediate_size: int) -> None:
        """Raise ValueError naming the first problem with this map."""
        for t, r in sorted(self.share.items()):
            if not 0 <= t < num_layers:
                raise ValueError(f"share map target {t} is out of range: the model has layers 0..{num_layers - 1}")
            if r is None:
                continue
            if not 0 <= r < num_layers:
                raise ValueError(f"share map reference {r} (for target {t}) is out of range 0..{num_layers - 1}")
            if r >= t:
                raise ValueError(f"share map target {t} borrows from layer {r}, which is not before it: use a reference < {t}")
            if r in self.share:
                raise ValueError(f"share map reference {r} (for target {t}) is itself a target: point {t} at a layer that keeps its MLP")
        max_rank = min(hidden_size, intermediate_size)
        ranks = self.rank.items() if isinstance(self.rank, dict) else [(t, self.rank) for t in self.share]
        for t, k in ranks:
            if t not in self.share:
                raise ValueError(f"rank given for layer {t}, which is not a target of the share map")
            if not 0 <= k <= max_rank:
                raise ValueError(f"recovery rank {k} for layer {t} must be between 0 and {max_rank}")
        if self.scales:
            for t, r in sorted(self.share.items()):
                if r is None:
                    raise ValueError(f"scales need borrowed weights to scale, but target {t} borrows none (reference null): give it a reference or drop scales")
                if self.rank_of(t) == 0:
                    raise ValueError(f"scales sit beside the low-rank factors, but target {t} has rank 0: give it a rank >= 1 or drop scales")


@dataclass
class ModelArgs(llama.ModelArgs):
    sharp: Optional[dict] = None
    quantization: Optional[dict] = None

    def __post_init__(self):
        super().__post_init__()
        self.sharp_args = SharpArgs.from_dict(self.sharp)
        self.sharp_args.validate(self.num_hidden_layers, self.hidden_size, self.intermediate_size)


def lowrank(x: mx.array, a: mx.array, b: mx.array) -> mx.array:
    """The recovery delta x (B A)^T of one projection, computed as (x @ a) @ b, never formed."""
    return (x @ a) @ b


PROJECTIONS = ("gate", "up", "down")
FACTORS = tuple(f"{name}_{f}" for name in PROJECTIONS for f in ("a", "b"))


def vectors(scales: bool) -> tuple:
    """Names of the scaling vectors: ``{p}_in`` (in,) and ``{p}_out`` (out,) per projection."""
    return tuple(f"{name}_{side}" for name in PROJECTIONS for side in ("in", "out")) if scales else ()


class Recovery(nn.Module):
    """Low-rank factors on gate, up and down of a borrowed MLP: W_t ~= W_r + B_t A_t; with
    ``scales`` also a column and a row scaling of each borrowed weight:
    W_t ~= diag(out) W_r diag(in) + B_t A_t.

    Stored transposed, as mlx-lm's LoRA does: ``*_a`` is (in, rank), ``*_b`` is (rank, out).
    ``*_b`` starts at zero and the vectors ``*_in`` (in,), ``*_out`` (out,) at one, so a fresh
    target equals direct sharing.
    """

    def __init__(self, dim: int, hidden_dim: int, rank: int, scales: bool = False):
        super().__init__()
        for name, n_in, n_out in zip(PROJECTIONS, (dim, dim, hidden_dim), (hidden_dim, hidden_dim, dim)):
            bound = n_in**-0.5
            setattr(self, f"{name}_a", mx.random.uniform(-bound, bound, (n_in, rank)))
            setattr(self, f"{name}_b", mx.zeros((rank, n_out)))
            if scales:
                setattr(self, f"{name}_in", mx.ones((n_in,)))
                setattr(self, f"{name}_out", mx.ones((n_out,)))

    @property
    def scaled(self) -> bool:
        return "gate_in" in self

    def delta(self, x: mx.array, name: str) -> mx.array:
        return lowrank(x, self[f"{name}_a"], self[f"{name}_b"])

    def borrowed(self, x: mx.array, proj: nn.Module, name: str) -> mx.array:
        """x (diag(out) W_r diag(in))^T = (x * in) W_r^T * out, or x W_r^T without scales."""
        if not self.scaled:
            return proj(x)
        return proj(x * self[f"{name}_in"]) * self[f"{name}_out"]

    def __call__(self, x: mx.array, mlp: Optional[nn.Module]) -> mx.array:
        gate = self.delta(x, "gate")
        up = self.delta(x, "up")
        if mlp is not None:
            gate = gate + self.borrowed(x, mlp.gate_proj, "gate")
            up = up + self.borrowed(x, mlp.up_proj, "up")
        h = swiglu(gate, up)
        out = self.delta(h, "down")
        return out if mlp is None else out + self.borrowed(h, mlp.down_proj, "down")


class QuantizedRecovery(Recovery):
    """Recovery factors as affine codes. Each factor is stored transposed, (out, in) as a
    QuantizedLinear weight is, so its groups run along its input; ``*_scales`` and ``*_biases``
    sit beside it. The rank must be a multiple of the group size. Scaling vectors, if any, stay
    float (they are tiny). (``code_bits``, not ``bits``: mlx-lm takes a module with ``bits`` for
    a QuantizedLinear.)"""

    def __init__(self, dim: int, hidden_dim: int, rank: int, group_size: int = 64, bits: int = 8, mode: str = "affine", scales: bool = False):
        nn.Module.__init__(self)
        if rank % group_size or dim % group_size or hidden_dim % group_size:
            raise ValueError(f"recovery rank {rank} and sizes {dim}, {hidden_dim} must be multiples of the group size {group_size}")
        self.group_size, self.code_bits, self.mode = group_size, bits, mode
        for name, n_in, n_out in zip(PROJECTIONS, (dim, dim, hidden_dim), (hidden_dim, hidden_dim, dim)):
            self._set(f"{name}_a", mx.zeros((rank, n_in)))
            self._set(f"{name}_b", mx.zeros((n_out, rank)))
            if scales:
                self[f"{name}_in"], self[f"{name}_out"] = mx.ones((n_in,)), mx.ones((n_out,))
        self.freeze()

    def _set(self, key: str, w_t: mx.array) -> None:
        q = mx.quantize(w_t, self.group_size, self.code_bits, mode=self.mode)
        self[key], self[f"{key}_scales"] = q[0], q[1]
        if len(q) > 2:
            self[f"{key}_biases"] = q[2]

    @classmethod
    def from_recovery(cls, rec: Recovery, group_size: int, bits: int, mode: str = "affine") -> "QuantizedRecovery":
        (dim, rank), hidden_dim = rec.gate_a.shape, rec.gate_b.shape[1]
        q = cls(dim, hidden_dim, rank, group_size, bits, mode, rec.scaled)  # lazy zero codes, replaced unevaluated
        for key in FACTORS:
            q._set(key, rec[key].T)
        for key in vectors(rec.scaled):
            q[key] = rec[key]
        return q

    def to_quantized(self, group_size: int, bits: int, mode: str = "affine", **_) -> "QuantizedRecovery":
        """Already quantized: ``mlx_lm.load`` calls this for every path its config lists."""
        if (group_size, bits, mode) != (self.group_size, self.code_bits, self.mode):
            raise ValueError(f"recovery quantized with group size {self.group_size}, {self.code_bits} bits cannot become group size {group_size}, {bits} bits")
        return self

    def dequantized(self) -> Recovery:
        """The same factors as float arrays (the scales' dtype); the vectors as they are."""
        rec = Recovery.__new__(Recovery)  # no random init: the global RNG state stays as it was
        nn.Module.__init__(rec)
        for key in FACTORS:
            rec[key] = mx.dequantize(self[key], self[f"{key}_scales"], self.get(f"{key}_biases"), self.group_size, self.code_bits, mode=self.mode).T
        for key in vectors(self.scaled):
            rec[key] = self[key]
        return rec

    def delta(self, x: mx.array, name: str) -> mx.array:
        for f in ("a", "b"):
            key = f"{name}_{f}"
            x = mx.quantized_matmul(x, self[key], self[f"{key}_scales"], self.get(f"{key}_biases"), transpose=True,
                                    group_size=self.group_size, bits=self.code_bits, mode=self.mode)
        return x


class Block(llama.TransformerBlock):
    """mlx-lm's block, except that the MLP to run is an argument (a target owns none)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, use_sliding=args.layer_types[layer] == "sliding_attention")
        if layer in args.sharp_args.share:
            del self["mlp"]
            rank, scales = args.sharp_args.rank_of(layer), args.sharp_args.scales
            q = (args.quantization or {}).get(f"model.layers.{layer}.recovery")
            if rank > 0 and q:
                self.recovery = QuantizedRecovery(args.hidden_size, args.intermediate_size, rank, q["group_size"], q["bits"], q.get("mode", "affine"), scales)
            elif rank > 0:
                self.recovery = Recovery(args.hidden_size, args.intermediate_size, rank, scales)

    def __call__(self, x, mask=None, cache=None, mlp: Optional[nn.Module] = None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        y = self.post_attention_layernorm(h)
        if "recovery" in self:
            return h + self.recovery(y, mlp)
        return h if mlp is None else h + mlp(y)


class LlamaModel(llama.LlamaModel):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.layers = [Block(args, i) for i in range(args.num_hidden_layers)]
        share = args.sharp_args.share
        # Which layer's MLP each layer runs (None: it runs none).
        self.mlp_owner = [share.get(i, i) for i in range(args.num_hidden_layers)]

    def mlp_of(self, layer: int) -> Optional[nn.Module]:
        owner = self.mlp_owner[layer]
        return None if owner is None else self.layers[owner]["mlp"]

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        cache = cache if cache is not None else [None] * len(self.layers)
        fa_mask = create_attention_mask(h, cache[self.fa_idx])
        swa_mask = None
        if self.swa_idx is not None:
            swa_mask = create_attention_mask(h, cache[self.swa_idx], window_size=self.sliding_window)
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            mask = swa_mask if layer.use_sliding else fa_mask
            h = layer(h, mask, cache=c, mlp=self.mlp_of(i))
        return self.norm(h)


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)
        self.args = args
        self.model_type = args.model_type
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def shard(self, group=None):
        raise NotImplementedError("tensor-parallel sharding of a shared model is not supported")
