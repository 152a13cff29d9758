"""A Llama whose target layers borrow an earlier layer's MLP plus low-rank recovery factors.

Pure model file: arrays in, arrays out, importing nothing but mlx and mlx-lm (whose llama it builds
on), so a checkpoint folder carries a copy of it as mlx-lm's ``model_file``. Sharing is described by
``config["sharp"]``, e.g. ``{"share": {"15": 14, "17": 16}, "rank": 64}``: ``share`` maps a target
to the reference whose MLP it runs (``null``: none, the recovery alone; at rank 0 a pruned MLP),
``rank`` is an int or a ``{target: rank}`` map, ``"recovery"`` names the kind (``RECOVERY_KINDS``:
``plain``, W_t ~= W_r + B A, or ``scaled``, W_t ~= diag(out) W_r diag(in) + B A), and
``"reference_rank"`` gives references factors of their own around a jointly fitted stored W_s
(``sharp_mlx.recovery.joint``). Each MLP lives at exactly one path (``model.layers.{r}.mlp``); a
target block owns none and is handed its reference's at call time. Recovery factors are plain
arrays, so ``nn.quantize`` leaves them in float. ``recovered_mlp`` defines what a target computes,
``LlamaModel.run`` is the one walk over the blocks, ``Model.head`` the one head.
"""

import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask

PROJECTIONS = ("gate", "up", "down")


def projection_shapes(dim: int, hidden_dim: int) -> Dict[str, tuple]:
    """{projection: (in, out)} of a Llama MLP."""
    return {"gate": (dim, hidden_dim), "up": (dim, hidden_dim), "down": (hidden_dim, dim)}


class PlainKind:
    """W_t ~= W_r + B A: the borrowed weight as it is, plus low-rank factors."""

    name = "plain"
    needs_reference = False  # a target with no reference (null) runs the factors alone

    def vectors(self, n_in: int, n_out: int) -> Dict[str, mx.array]:
        """Extra per-projection parameters, by suffix, at their neutral values."""
        return {}

    def borrow(self, x: mx.array, proj: Callable, p, name: str) -> mx.array:
        """x times the borrowed weight as this kind transforms it (``proj(x)`` = x W_r^T)."""
        return proj(x)

    def merge(self, w: mx.array, p, name: str) -> mx.array:
        """The transformed borrowed weight (out, in) itself, for a dense export."""
        return w


class ScaledKind(PlainKind):
    """W_t ~= diag(out) W_r diag(in) + B A: each borrowed weight also scaled by row and column."""

    name = "scaled"
    needs_reference = True

    def vectors(self, n_in, n_out):
        return {"in": mx.ones((n_in,)), "out": mx.ones((n_out,))}

    def borrow(self, x, proj, p, name):
        return proj(x * p[f"{name}_in"]) * p[f"{name}_out"]

    def merge(self, w, p, name):
        return p[f"{name}_out"].astype(mx.float32)[:, None] * w * p[f"{name}_in"].astype(mx.float32)[None, :]


# A new recovery kind is one class here, registered by name (config "recovery": name).
RECOVERY_KINDS = {k.name: k for k in (PlainKind(), ScaledKind())}


def recovery_kind(name: str) -> PlainKind:
    if name not in RECOVERY_KINDS:
        raise ValueError(f"unknown recovery kind {name!r}: use one of {', '.join(RECOVERY_KINDS)}")
    return RECOVERY_KINDS[name]


def vector_names(kind: str) -> tuple:
    """Names of a kind's per-projection vectors, e.g. ``gate_in``, ``gate_out``, ... for scaled."""
    return tuple(f"{name}_{suffix}" for name in PROJECTIONS for suffix in recovery_kind(kind).vectors(1, 1))


def _ranks(value, name: str) -> Union[int, Dict[int, int]]:
    """An int rank or a {layer: rank} map from a config, ValueError naming anything else."""

    def whole(k, where):
        try:
            if isinstance(k, bool):
                raise TypeError
            return operator.index(k)
        except TypeError:
            raise ValueError(f"{name} {k!r}{where} is not a whole number: give an int, or a map {{layer: int}}")

    if isinstance(value, dict):
        out = {}
        for t, k in value.items():
            if not str(t).strip().isdigit():
                raise ValueError(f"{name} map key {t!r} is not a layer number")
            out[int(t)] = whole(k, f" for layer {t}")
        return out
    return whole(value, "")


@dataclass
class SharpArgs:
    """The share map, recovery rank, recovery kind and reference rank; an empty map is the original model."""

    share: Dict[int, Optional[int]] = field(default_factory=dict)
    rank: Union[int, Dict[int, int]] = 0
    kind: str = "plain"
    # rank of each reference's own (plain) recovery over the jointly fitted stored weight; 0: W_s = W_r, SHARP
    reference_rank: Union[int, Dict[int, int]] = 0

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "SharpArgs":
        d = d or {}
        share = {int(t): (None if r is None else int(r)) for t, r in d.get("share", {}).items()}
        rank = d.get("rank", 0)
        if isinstance(rank, dict):
            rank = {int(t): int(k) for t, k in rank.items()}
        return cls(
            share=share,
            rank=rank,
            kind=d.get("recovery", "scaled" if d.get("scales") else "plain"),
            reference_rank=_ranks(d.get("reference_rank", 0), "reference_rank"),
        )

    def __post_init__(self):
        self.reference_rank = _ranks(self.reference_rank, "reference_rank")

    def to_dict(self) -> dict:
        def jsonable(r):
            return r if isinstance(r, int) else {str(t): k for t, k in r.items()}

        d = {"share": {str(t): r for t, r in sorted(self.share.items())}, "rank": jsonable(self.rank)}
        if self.kind != "plain":  # plain configs stay as they were
            d["recovery"] = self.kind
        if self.reference_rank:  # and so do configs without reference recovery
            d["reference_rank"] = jsonable(self.reference_rank)
        return d

    @property
    def references(self) -> list:
        """The layers some target borrows from, ascending."""
        return sorted({r for r in self.share.values() if r is not None})

    def rank_of(self, layer: int) -> int:
        if layer not in self.share:
            return 0
        return self.rank.get(layer, 0) if isinstance(self.rank, dict) else self.rank

    def reference_rank_of(self, layer: int) -> int:
        """The rank of a reference's own recovery (0 for a layer that is no reference)."""
        if layer not in self.references:
            return 0
        r = self.reference_rank
        return r.get(layer, 0) if isinstance(r, dict) else r

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
                raise ValueError(
                    f"share map target {t} borrows from layer {r}, which is not before it: use a reference < {t}"
                )
            if r in self.share:
                raise ValueError(
                    f"share map reference {r} (for target {t}) is itself a target: point {t} at a layer that keeps "
                    "its MLP"
                )
        max_rank = min(hidden_size, intermediate_size)
        ranks = self.rank.items() if isinstance(self.rank, dict) else [(t, self.rank) for t in self.share]
        for t, k in ranks:
            if t not in self.share:
                raise ValueError(f"rank given for layer {t}, which is not a target of the share map")
            if not 0 <= k <= max_rank:
                raise ValueError(f"recovery rank {k} for layer {t} must be between 0 and {max_rank}")
        kind = recovery_kind(self.kind)
        if kind.name != "plain":
            for t, r in sorted(self.share.items()):
                if r is None and kind.needs_reference:
                    raise ValueError(
                        f"recovery {kind.name} transforms borrowed weights, but target {t} borrows none (reference "
                        "null): give it a reference or use recovery plain"
                    )
                if self.rank_of(t) == 0:
                    raise ValueError(
                        f"recovery {kind.name} sits beside the low-rank factors, but target {t} has rank 0: give it a "
                        "rank >= 1 or use recovery plain"
                    )
        self._validate_reference_rank(max_rank)

    def _validate_reference_rank(self, max_rank: int) -> None:
        refs, ranks = self.references, self.reference_rank
        if isinstance(ranks, dict):
            given = ranks.items()
        elif ranks and not refs:
            raise ValueError(
                f"reference_rank {ranks} is given, but no target of the share map borrows from a reference: drop "
                "reference_rank or give a target a reference"
            )
        else:
            given = [(r, ranks) for r in refs]
        for r, k in given:
            if r not in refs:
                raise ValueError(
                    f"reference_rank given for layer {r}, which is not a reference of the share map (references: "
                    f"{', '.join(map(str, refs)) or 'none'})"
                )
            if not 0 <= k <= max_rank:
                raise ValueError(f"reference_rank {k} for reference {r} must be between 0 and {max_rank}")


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


FACTORS = tuple(f"{name}_{f}" for name in PROJECTIONS for f in ("a", "b"))


def recovered_mlp(
    x: mx.array,
    borrowed: Optional[Callable],
    delta: Optional[Callable],
    p=None,
    kind: str = "plain",
    hidden: bool = False,
):
    """What a target layer computes, the one definition the model, SLW and the dense export use:
    each projection is ``delta(name, x)`` (the low-rank recovery, None: none) plus, when there is a
    borrowed MLP, ``borrowed(name, x)`` = x W_r^T as the recovery kind transforms it (its vectors
    in ``p``; None: no recovery parameters, the borrowed weight as it is); then swiglu(gate, up)
    and down. ``hidden``: also return swiglu(gate, up)."""
    k = recovery_kind(kind if p is not None else "plain")

    def project(name: str, v: mx.array):
        y = delta(name, v) if delta is not None else None
        if borrowed is None:
            return y
        b = k.borrow(v, lambda u: borrowed(name, u), p, name)
        return b if y is None else y + b

    h = swiglu(project("gate", x), project("up", x))
    y = project("down", h)
    return (y, h) if hidden else y


class Recovery(nn.Module):
    """The recovery parameters of one target: low-rank factors on gate, up and down of a
    borrowed MLP, W_t ~= W_r + B_t A_t, plus whatever vectors its kind adds (``scaled``:
    W_t ~= diag(out) W_r diag(in) + B_t A_t).

    Stored transposed, as mlx-lm's LoRA does: ``*_a`` is (in, rank), ``*_b`` is (rank, out).
    ``*_b`` starts at zero and the vectors at their neutral values, so a fresh target equals
    direct sharing.
    """

    def __init__(self, dim: int, hidden_dim: int, rank: int, kind: str = "plain"):
        super().__init__()
        self._kind = kind
        for name, (n_in, n_out) in projection_shapes(dim, hidden_dim).items():
            bound = n_in**-0.5
            setattr(self, f"{name}_a", mx.random.uniform(-bound, bound, (n_in, rank)))
            setattr(self, f"{name}_b", mx.zeros((rank, n_out)))
            for suffix, v in recovery_kind(kind).vectors(n_in, n_out).items():
                setattr(self, f"{name}_{suffix}", v)

    @property
    def kind(self) -> str:
        return self._kind

    def delta(self, x: mx.array, name: str) -> mx.array:
        return lowrank(x, self[f"{name}_a"], self[f"{name}_b"])

    def factors(self, name: str):
        """(a (in, rank), b (rank, out)) of one projection, float."""
        return self[f"{name}_a"], self[f"{name}_b"]

    def __call__(self, x: mx.array, mlp: Optional[nn.Module], hidden: bool = False) -> mx.array:
        borrowed = None if mlp is None else lambda name, v: mlp[f"{name}_proj"](v)
        return recovered_mlp(x, borrowed, lambda name, v: self.delta(v, name), self, self.kind, hidden)

    def merged(self, name: str, w: Optional[mx.array], shape: tuple) -> mx.array:
        """The dense (out, in) weight this target runs for one projection, given the borrowed
        one ``w`` (float32; None: nothing borrowed)."""
        a, b = (f.astype(mx.float32) for f in self.factors(name))
        base = mx.zeros(shape) if w is None else recovery_kind(self.kind).merge(w, self, name)
        return base + (a @ b).T  # (in, rank) @ (rank, out) -> (out, in)


class QuantizedRecovery(Recovery):
    """Recovery factors as affine codes. Each factor is stored transposed, (out, in) as a
    QuantizedLinear weight is, so its groups run along its input; ``*_scales`` and ``*_biases``
    sit beside it. The rank must be a multiple of the group size. Scaling vectors, if any, stay
    float (they are tiny). (``code_bits``, not ``bits``: mlx-lm takes a module with ``bits`` for
    a QuantizedLinear.)"""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        rank: int,
        group_size: int = 64,
        bits: int = 8,
        mode: str = "affine",
        kind: str = "plain",
    ):
        nn.Module.__init__(self)
        if rank % group_size or dim % group_size or hidden_dim % group_size:
            raise ValueError(
                f"recovery rank {rank} and sizes {dim}, {hidden_dim} must be multiples of the group size {group_size}"
            )
        self.group_size, self.code_bits, self.mode, self._kind = group_size, bits, mode, kind
        for name, (n_in, n_out) in projection_shapes(dim, hidden_dim).items():
            self._set(f"{name}_a", mx.zeros((rank, n_in)))
            self._set(f"{name}_b", mx.zeros((n_out, rank)))
            for suffix, v in recovery_kind(kind).vectors(n_in, n_out).items():
                self[f"{name}_{suffix}"] = v
        self.freeze()

    def _set(self, key: str, w_t: mx.array) -> None:
        q = mx.quantize(w_t, self.group_size, self.code_bits, mode=self.mode)
        self[key], self[f"{key}_scales"] = q[0], q[1]
        if len(q) > 2:
            self[f"{key}_biases"] = q[2]

    @classmethod
    def from_recovery(cls, rec: Recovery, group_size: int, bits: int, mode: str = "affine") -> "QuantizedRecovery":
        (dim, rank), hidden_dim = rec.gate_a.shape, rec.gate_b.shape[1]
        q = cls(dim, hidden_dim, rank, group_size, bits, mode, rec.kind)  # lazy zero codes, replaced unevaluated
        for key in FACTORS:
            q._set(key, rec[key].T)
        for key in vector_names(rec.kind):
            q[key] = rec[key]
        return q

    def to_quantized(self, group_size: int, bits: int, mode: str = "affine", **_) -> "QuantizedRecovery":
        """Already quantized: ``mlx_lm.load`` calls this for every path its config lists."""
        if (group_size, bits, mode) != (self.group_size, self.code_bits, self.mode):
            raise ValueError(
                f"recovery quantized with group size {self.group_size}, {self.code_bits} bits cannot become group "
                f"size {group_size}, {bits} bits"
            )
        return self

    def dequantized(self) -> Recovery:
        """The same factors as float arrays (the scales' dtype); the vectors as they are."""
        rec = Recovery.__new__(Recovery)  # no random init: the global RNG state stays as it was
        nn.Module.__init__(rec)
        rec._kind = self.kind
        for key in FACTORS:
            rec[key] = self.factor(key)
        for key in vector_names(self.kind):
            rec[key] = self[key]
        return rec

    def factor(self, key: str) -> mx.array:
        """One factor dequantized, in its float layout ((in, rank) or (rank, out))."""
        return mx.dequantize(
            self[key], self[f"{key}_scales"], self.get(f"{key}_biases"), self.group_size, self.code_bits, mode=self.mode
        ).T

    def factors(self, name: str):
        return self.factor(f"{name}_a"), self.factor(f"{name}_b")

    def delta(self, x: mx.array, name: str) -> mx.array:
        for f in ("a", "b"):
            key = f"{name}_{f}"
            x = mx.quantized_matmul(
                x,
                self[key],
                self[f"{key}_scales"],
                self.get(f"{key}_biases"),
                transpose=True,
                group_size=self.group_size,
                bits=self.code_bits,
                mode=self.mode,
            )
        return x


class Block(llama.TransformerBlock):
    """mlx-lm's block, except that the MLP to run is an argument (a target owns none). A target
    with rank > 0, and a reference with reference_rank > 0 (which keeps its MLP, the stored W_s),
    has a ``recovery``; a reference's is always of kind plain."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__(args, use_sliding=args.layer_types[layer] == "sliding_attention")
        sharp = args.sharp_args
        if layer in sharp.share:
            del self["mlp"]
            rank, kind = sharp.rank_of(layer), sharp.kind
        else:
            rank, kind = sharp.reference_rank_of(layer), "plain"
        if rank == 0:
            return
        q = (args.quantization or {}).get(f"model.layers.{layer}.recovery")
        if q:
            self.recovery = QuantizedRecovery(
                args.hidden_size,
                args.intermediate_size,
                rank,
                q["group_size"],
                q["bits"],
                q.get("mode", "affine"),
                kind,
            )
        else:
            self.recovery = Recovery(args.hidden_size, args.intermediate_size, rank, kind)

    def attend(self, x, mask=None, cache=None) -> mx.array:
        """The residual stream after this block's attention: what its MLP's norm reads."""
        return x + self.self_attn(self.input_layernorm(x), mask, cache)

    def __call__(self, x, mask=None, cache=None, mlp: Optional[nn.Module] = None):
        h = self.attend(x, mask, cache)
        y = self.post_attention_layernorm(h)
        if "recovery" in self:  # a target's over its reference's MLP, or a reference's over its own
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

    def run(
        self, h: mx.array, start: int = 0, stop: Optional[int] = None, cache=None, hook: Optional[Callable] = None
    ) -> mx.array:
        """Hidden states after blocks start..stop-1, from the hidden states entering ``start``.

        ``hook(i, block, h, mask, cache, mlp)``, if given, runs each block instead of
        ``block(h, mask, cache=cache, mlp=mlp)`` (to record its inputs, or checkpoint it)."""
        stop = len(self.layers) if stop is None else stop
        cache = cache if cache is not None else [None] * len(self.layers)
        fa_mask = create_attention_mask(h, cache[self.fa_idx])
        swa_mask = None
        if self.swa_idx is not None:
            swa_mask = create_attention_mask(h, cache[self.swa_idx], window_size=self.sliding_window)
        for i in range(start, stop):
            layer, mask = self.layers[i], swa_mask if self.layers[i].use_sliding else fa_mask
            if hook is None:
                h = layer(h, mask, cache=cache[i], mlp=self.mlp_of(i))
            else:
                h = hook(i, layer, h, mask, cache[i], self.mlp_of(i))
        return h

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        return self.norm(self.run(h, cache=cache))


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)
        self.args = args
        self.model_type = args.model_type
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def head(self, h: mx.array) -> mx.array:
        """Logits (B, L, V) from the last block's hidden states (final norm, then the output layer)."""
        h = self.model.norm(h)
        return self.model.embed_tokens.as_linear(h) if self.args.tie_word_embeddings else self.lm_head(h)

    def shard(self, group=None):
        raise NotImplementedError("tensor-parallel sharding of a shared model is not supported")
