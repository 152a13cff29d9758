"""Share maps: parse them, count what they save, and build the shared (or pruned) model.

A share map ``{target: reference}`` says which earlier layer's MLP each target layer runs
(``None``: no borrowed MLP, the recovery factors alone; see sharp_mlx.models.llama). Specs:

    next      with layers A:B   every other layer of [A, B) borrows from the one before it
    next:K    with layers A:B   one reference serves the K layers after it: A, A+K+1, ...
    {"15": 14, "17": 16}        an explicit map in JSON, or the path of a .json file holding one
    auto      with cut F        the pairs `python -m sharp_mlx.analyze` found most alike,
                                greedily, until the stored MLP parameters drop by F

``layers`` follows Python slice semantics ("14:30", "-16:", ":"); None means every layer. The
paper keeps quality best by sharing in the later part of the stack.
"""

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import SharpError
from .llama import Model, ModelArgs, SharpArgs, projection_shapes, recovery_kind

ShareMap = Dict[int, Optional[int]]
Rank = Union[int, Dict[int, int]]
SPECS = "'next', 'next:K', 'auto', a JSON map like '{\"15\": 14}', or the path of a .json file holding one"
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def parse_layers(layers: Optional[str], num_layers: int) -> range:
    """The layer range of an "A:B" slice (negative and omitted bounds as in Python)."""
    if layers is None:
        return range(num_layers)
    parts = str(layers).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        bounds = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise SharpError(f"layer range {layers!r} is not of the form A:B (a Python slice such as 14:30, -16: or :)")
    if any(b is not None and not -num_layers <= b <= num_layers for b in bounds):
        raise SharpError(
            f"layer range {layers!r} reaches outside the model's layers 0..{num_layers - 1}: use bounds within "
            f"-{num_layers}..{num_layers}"
        )
    start, stop, _ = slice(*bounds).indices(num_layers)
    if stop - start < 2:
        raise SharpError(
            f"layer range {layers!r} holds {max(stop - start, 0)} layer(s) of 0..{num_layers - 1}; a reference and a "
            f"target need at least two, e.g. {num_layers // 2}:{num_layers}"
        )
    return range(start, stop)


def next_map(span: range, k: int = 1) -> ShareMap:
    """References span.start, then every k+1 layers; each serves the k layers after it in span."""
    return {t: ref for ref in span[:: k + 1] for t in range(ref + 1, min(ref + k + 1, span.stop))}


def _group_size(spec: str) -> int:
    k = spec.partition(":")[2]
    if not k.isdigit() or int(k) < 1:
        raise SharpError(
            f"share spec {spec!r}: K in next:K must be a whole number >= 1 (layers served per reference), e.g. next:2"
        )
    return int(k)


def json_map(spec: str) -> ShareMap:
    """An explicit map from JSON text or a .json file: {"target": reference or null}."""
    source, text = "share map", spec
    if not spec.lstrip().startswith("{"):
        path = Path(spec)
        if not path.is_file():
            raise SharpError(f"share map file {spec} does not exist; a share spec is {SPECS}")
        source, text = f"share map file {path}", path.read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise SharpError(
            f'{source} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): write it like {{"15": 14, '
            f'"17": 16}}'
        )
    if not isinstance(raw, dict):
        raise SharpError(
            f'{source} is a JSON {type(raw).__name__}, not an object: write it like {{"15": 14, "17": 16}}'
        )
    share = {}
    for t, r in raw.items():
        if not re.fullmatch(r"\d+", t.strip()):
            raise SharpError(f'{source}: target {t!r} is not a layer number; keys are target layers like "15"')
        if r is not None and (isinstance(r, bool) or not isinstance(r, int)):
            raise SharpError(
                f"{source}: reference {r!r} of target {t} must be a layer number or null (no borrowed MLP)"
            )
        share[int(t)] = r
    return share


def check_share(share: ShareMap, num_layers: int) -> None:
    """Raise SharpError naming the first problem of ``share`` for a model of num_layers layers."""
    if not share:
        raise SharpError('the share map is empty: name at least one target layer, e.g. {"15": 14}')
    try:
        # Ranks are checked against the model's sizes when the model is built; here only the map.
        SharpArgs(share=share).validate(num_layers, hidden_size=1, intermediate_size=1)
    except ValueError as e:
        raise SharpError(str(e))


def parse_share(
    spec: str,
    num_layers: int,
    layers: Optional[str] = None,
    similarity: Union[None, dict, str, Path] = None,
    cut: Optional[float] = None,
    rank: int = 0,
    adjacent_only: bool = True,
    keep_ends: bool = True,
    kind: str = "plain",
) -> ShareMap:
    """The share map of ``spec`` (see the module docstring) for a model of num_layers layers.

    ``similarity``, ``cut``, ``rank``, ``adjacent_only``, ``keep_ends`` and ``kind`` only serve
    ``auto``: the analysis (a dict or the path of analysis.json), the fraction of stored MLP
    parameters to remove net of the rank-``rank`` recovery (of recovery kind ``kind``), whether a
    reference must be the layer right before its target, and whether the first and last layers
    stay unshared.
    """
    how = share_kind(spec)
    if not how.takes_layers and layers is not None:
        raise SharpError(f"a layer range ({layers}) applies to next, next:K and auto, not to an explicit share map")
    options = dict(
        similarity=similarity, cut=cut, rank=rank, adjacent_only=adjacent_only, keep_ends=keep_ends, recovery=kind
    )
    share = how.build(spec.strip(), num_layers, parse_layers(layers, num_layers) if how.takes_layers else None, options)
    check_share(share, num_layers)
    return share


@dataclass(frozen=True)
class ShareKind:
    """One way to write a share map: ``matches(spec)`` says whether a spec is of this kind,
    ``build(spec, num_layers, span, options)`` makes the map (``span``: the layer range, for
    the kinds that take one)."""

    name: str
    takes_layers: bool
    matches: Callable[[str], bool]
    build: Callable[[str, int, Optional[range], dict], ShareMap]


def _auto(spec: str, num_layers: int, span: range, o: dict) -> ShareMap:
    return auto_map(
        o["similarity"], num_layers, o["cut"], o["rank"], span, o["adjacent_only"], o["keep_ends"], o["recovery"]
    )


# A new share-map kind is one ShareKind here (tried in order).
SHARE_KINDS = (
    ShareKind(
        "next",
        True,
        lambda s: s == "next" or s.startswith("next:"),
        lambda s, n, span, o: next_map(span, 1 if s == "next" else _group_size(s)),
    ),
    ShareKind("auto", True, lambda s: s == "auto", _auto),
    ShareKind(
        "json",
        False,
        lambda s: s.startswith("{") or s.endswith(".json") or Path(s).is_file(),
        lambda s, n, span, o: json_map(s),
    ),
)


def share_kind(spec: str) -> ShareKind:
    """The kind of a share spec (raises SharpError for none)."""
    spec = spec.strip()
    for kind in SHARE_KINDS:
        if kind.matches(spec):
            return kind
    raise SharpError(f"unknown share spec {spec!r}: use {SPECS}")


def read_analysis(similarity: Union[None, dict, str, Path]) -> dict:
    """The analysis ``auto`` ranks pairs by: a dict or the path of analysis.json."""
    if similarity is None:
        raise SharpError(
            "share spec 'auto' needs a similarity analysis: run `python -m sharp_mlx.analyze` and pass its "
            "analysis.json"
        )
    if not isinstance(similarity, dict):
        path = Path(similarity)
        if not path.is_file():
            raise SharpError(f"analysis file {path} does not exist: run `python -m sharp_mlx.analyze` to write one")
        try:
            similarity = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SharpError(f"analysis file {path} is not valid JSON ({e.msg}): rerun `python -m sharp_mlx.analyze`")
    pairs = similarity.get("pairs") if isinstance(similarity, dict) else None
    if (
        not isinstance(pairs, list)
        or not isinstance(similarity.get("config"), dict)
        or not all(isinstance(p, dict) and {"reference", "target", "rel_error"} <= p.keys() for p in pairs)
    ):
        raise SharpError(
            "the similarity given to 'auto' is not an analysis from `python -m sharp_mlx.analyze` (it needs "
            '"config" and "pairs" with reference, target, rel_error)'
        )
    return similarity


def auto_map(
    similarity,
    num_layers: int,
    cut: Optional[float],
    rank: int,
    span: range,
    adjacent_only: bool,
    keep_ends: bool,
    kind: str = "plain",
) -> ShareMap:
    """Greedy: take (reference, target) pairs from the lowest relative MLP error up, skipping a
    target already taken or used as a reference and a reference that is a target, until the
    stored-MLP cut net of recovery reaches ``cut``."""
    analysis = read_analysis(similarity)
    config = analysis["config"]
    if config.get("num_hidden_layers") != num_layers:
        raise SharpError(
            f"the analysis is of a {config.get('num_hidden_layers')}-layer model, this one has {num_layers}: rerun "
            "`python -m sharp_mlx.analyze --model` on this model"
        )
    if cut is None or not 0 < cut < 1:
        raise SharpError(
            f"share spec 'auto' needs a cut between 0 and 1 (fraction of stored MLP parameters to remove), got {cut}"
        )
    pairs = sorted(analysis["pairs"], key=lambda p: p["rel_error"])
    share: ShareMap = {}
    for p in pairs:
        t, r = p["target"], p["reference"]
        if t not in span or (keep_ends and t in (0, num_layers - 1)) or (adjacent_only and r != t - 1):
            continue
        if t in share or t in share.values() or r in share:
            continue
        share[t] = r
        reached = savings(config, share, rank, kind)["mlp_cut"]
        if reached >= cut:
            return share
    reached = savings(config, share, rank, kind)["mlp_cut"] if share else 0.0
    raise SharpError(
        f"auto reaches only a {reached:.1%} stored-MLP cut (at rank {rank}, {len(share)} targets, "
        f"adjacent_only={adjacent_only}) short of the {cut:.1%} asked: "
        "ask for a smaller cut or rank, a wider layer range, or references anywhere earlier (analyze with "
        "--all-pairs, adjacent_only=False)"
    )


def allocate_ranks(weights: Dict[int, float], total: int, step: int = 16) -> Dict[int, int]:
    """Split a total recovery rank over targets in proportion to ``weights`` (one per target, >= 0),
    in multiples of ``step``, each target at least ``step``; largest remainders round up."""
    units = total // step
    if units < len(weights):
        raise SharpError(
            f"a total rank of {total} cannot give each of {len(weights)} targets at least {step}: raise --rank"
        )
    spare, norm = units - len(weights), sum(weights.values())
    exact = {t: spare * (w / norm if norm > 0 else 1 / len(weights)) for t, w in weights.items()}
    alloc = {t: 1 + int(x) for t, x in exact.items()}
    for t in sorted(exact, key=lambda t: int(exact[t]) - exact[t])[: units - sum(alloc.values())]:
        alloc[t] += 1
    return {t: k * step for t, k in sorted(alloc.items())}


def _param_counts(config: dict) -> Tuple[ModelArgs, int, int, int]:
    """(args, parameters of one MLP, of everything but the MLPs, of one layer but its MLP) of a Llama config."""
    args = ModelArgs.from_dict({**config, "sharp": None})
    h, m, n_layers = args.hidden_size, args.intermediate_size, args.num_hidden_layers
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    head_dim = args.head_dim or h // heads
    mlp = 3 * h * m + (2 * m + h if args.mlp_bias else 0)
    attention = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim
    if args.attention_bias:
        attention += (heads + 2 * kv_heads) * head_dim + h
    embeddings = args.vocab_size * h * (1 if args.tie_word_embeddings else 2)
    layer = attention + 2 * h  # two norms a layer
    return args, mlp, embeddings + h + n_layers * layer, layer  # + final norm


def savings(config: dict, share: ShareMap, rank: Rank, kind: str = "plain", reference_rank: Rank = 0) -> dict:
    """Exact parameter counts of sharing ``share`` at ``rank`` with recovery ``kind`` (its
    vectors included: ``scaled`` adds in + out per projection, one rank's worth) in the model of
    ``config``; ``reference_rank`` adds each reference's own (plain) factors to the recovery."""
    args, mlp, rest, _ = _param_counts(config)
    try:
        sharp = SharpArgs(share=dict(share), rank=rank, kind=kind, reference_rank=reference_rank)
    except ValueError as e:
        raise SharpError(str(e))
    try:
        sharp.validate(args.num_hidden_layers, args.hidden_size, args.intermediate_size)
    except ValueError as e:
        raise SharpError(str(e))
    n_layers, n_targets = args.num_hidden_layers, len(share)
    shapes = projection_shapes(args.hidden_size, args.intermediate_size).values()
    per_target = sum(v.size for n_in, n_out in shapes for v in recovery_kind(kind).vectors(n_in, n_out).values())
    per_rank = 3 * (args.hidden_size + args.intermediate_size)
    recovery = sum(per_rank * sharp.rank_of(t) + per_target for t in share)
    recovery += sum(per_rank * sharp.reference_rank_of(r) for r in sharp.references)
    mlp_before, unstored = n_layers * mlp, n_targets * mlp
    before = rest + mlp_before
    return {
        "layers": n_layers,
        "targets": n_targets,
        "mlp_params": mlp_before,
        "mlp_params_stored": mlp_before - unstored,
        "recovery_params": recovery,
        "params_before": before,
        "params_after": before - unstored + recovery,
        "mlp_unstored": unstored / mlp_before,
        "mlp_cut": (unstored - recovery) / mlp_before,
        "total_cut": (unstored - recovery) / before,
    }


def savings_line(
    config: dict, share: ShareMap, rank: Rank, baseline: str = "sharp", kind: str = "plain", reference_rank: Rank = 0
) -> str:
    """What building ``baseline`` (a name in BASELINES) at the targets of ``share`` saves."""
    b = BASELINES[baseline]
    s = savings(config, share, rank if b.recovered else 0, kind, reference_rank if b.recovered else 0)
    if b.removes_layers:
        removed = s["targets"] * _param_counts(config)[3] + s["mlp_params"] - s["mlp_params_stored"]
        return (
            f"{s['targets']} of {s['layers']} layers removed (attention and MLP): all params "
            f"-{removed / s['params_before']:.1%}"
        )
    what = "MLPs shared with scaling vectors" if b.name == "sharp" and kind == "scaled" else b.what
    return (
        f"{s['targets']} of {s['layers']} {what}: stored MLP params -{s['mlp_cut']:.1%} (recovery included), "
        f"all params -{s['total_cut']:.1%}"
    )


def stored_params(folder: Union[str, Path]) -> int:
    """Parameters stored in a model folder, summed from its safetensors headers (no weight is
    read). Of a float folder this is its parameter count; of a quantized one, the packed arrays'.
    Every stored array counts: a reference's own recovery factors as well as the targets'."""
    total = 0
    for f in Path(folder).glob("model*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))  # the header's length, then the header (JSON)
            header = json.loads(fh.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def lora_rank_for(config: dict, budget: int, blocks: int) -> int:
    """The LoRA rank on every linear layer of the last ``blocks`` blocks of ``config``'s model
    (as ``mlx_lm.tuner.utils.linear_to_lora_layers`` puts it) whose trainable count is closest to
    ``budget``. A target with no MLP (reference None) has attention projections only."""
    h, inter, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    attention = 2 * (h + heads * hd) + 2 * (h + kv * hd)  # q, o and k, v: in + out per rank
    no_mlp = {int(t) for t, r in ((config.get("sharp") or {}).get("share") or {}).items() if r is None}
    per_rank = sum(attention + (0 if i in no_mlp else 3 * (h + inter)) for i in range(n - blocks, n))
    return max(1, round(budget / per_rank))


def _require_plain(model, config: dict, what: str) -> Dict[str, mx.array]:
    """The weights of an unshared float model, by Hugging Face name."""
    if (config.get("sharp") or {}).get("share"):
        raise SharpError(
            f"{what} needs the original model; this one already shares layers "
            f"{sorted(int(t) for t in config['sharp']['share'])}"
        )
    weights = dict(tree_flatten(model.parameters()))
    if any(k.endswith(".scales") for k in weights):
        raise SharpError(f"{what} needs a float model: apply it to the unquantized model, then quantize the result")
    return weights


def share_model(
    original_model, original_config: dict, share: ShareMap, rank: Rank, kind: str = "plain", reference_rank: Rank = 0
) -> Tuple[Model, dict]:
    """The shared model built from a loaded original: the same weights minus the targets' MLPs,
    fresh recovery factors (b = 0, and the kind's vectors at their neutral values, so it starts
    as direct sharing), config with a "sharp" section. ``reference_rank`` > 0 gives the
    references fresh factors of their own too (b = 0: W_s = W_r, until sharp_mlx.recovery.joint fits them)."""
    weights = _require_plain(original_model, original_config, "share_model")
    try:
        sharp = SharpArgs(share=dict(share), rank=rank, kind=kind, reference_rank=reference_rank)
        config = {**original_config, "sharp": sharp.to_dict()}
        model = Model(ModelArgs.from_dict(config))
    except ValueError as e:
        raise SharpError(str(e))
    fresh = dict(tree_flatten(model.parameters()))
    # Only the recovery factors keep their fresh values (lazy: the rest is never computed).
    model.load_weights([(k, weights[k] if ".recovery." not in k else v) for k, v in fresh.items()])
    mx.eval(model.parameters())
    return model, config


def prune_layers(original_model, config: dict, layers: Iterable[int]) -> Tuple[Model, dict]:
    """A plain Llama without ``layers`` (the layer-pruning baseline); the rest renumbered."""
    weights = _require_plain(original_model, config, "prune_layers")
    n_layers = config["num_hidden_layers"]
    drop = sorted(set(layers))
    if not drop or not all(0 <= i < n_layers for i in drop) or len(drop) == n_layers:
        raise SharpError(f"layers to prune {drop} must be a non-empty proper subset of 0..{n_layers - 1}")
    keep = [i for i in range(n_layers) if i not in drop]
    new_index = {old: new for new, old in enumerate(keep)}
    pruned = {}
    for k, v in weights.items():
        m = LAYER_KEY.match(k)
        if m is None:
            pruned[k] = v
        elif int(m.group(1)) in new_index:
            pruned[f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = v
    new_config = {k: v for k, v in config.items() if k != "sharp"}
    new_config.update(num_hidden_layers=len(keep), pruned_layers=drop)
    if config.get("layer_types"):
        new_config["layer_types"] = [config["layer_types"][i] for i in keep]
    model = Model(ModelArgs.from_dict(new_config))
    model.load_weights(list(pruned.items()))
    mx.eval(model.parameters())
    return model, new_config


@dataclass(frozen=True)
class Baseline:
    """What to build at a share map's targets: SHARP itself or a comparison model."""

    name: str
    what: str  # for the savings line
    recovered: bool  # its targets get recovery factors (which SLW fits)
    borrows: bool  # its targets run their reference's MLP
    removes_layers: bool = False  # the target layers are dropped altogether

    def targets(self, share: ShareMap) -> ShareMap:
        return dict(share) if self.borrows else {t: None for t in share}

    def build(
        self, original_model, config: dict, share: ShareMap, rank: Rank, kind: str = "plain", reference_rank: Rank = 0
    ) -> Tuple[Model, dict]:
        if self.removes_layers:
            return prune_layers(original_model, config, sorted(share))
        refs = reference_rank if self.recovered and self.borrows else 0  # only SHARP's references are recovered
        return share_model(original_model, config, self.targets(share), rank if self.recovered else 0, kind, refs)


# A new baseline is one Baseline here (and, if it builds something new, its build method).
BASELINES = {
    b.name: b
    for b in (
        Baseline("sharp", "MLPs shared", recovered=True, borrows=True),
        Baseline("direct", "MLPs shared, no recovery", recovered=False, borrows=True),
        Baseline("mlp-prune", "MLPs removed (no MLP at the targets)", recovered=False, borrows=False),
        Baseline("layer-prune", "layers removed", recovered=False, borrows=False, removes_layers=True),
        Baseline("lowrank", "MLPs replaced by low-rank factors, nothing borrowed", recovered=True, borrows=False),
    )
}


def least_damage_targets(damage: Dict[int, float], k: int) -> List[int]:
    """The ``k`` layers of ``damage`` ({candidate target t, borrowing t - 1: its measured damage})
    with the least summed damage and no two adjacent (a target's reference keeps its MLP), by
    dynamic programming over the layers in order."""
    layers = sorted(damage)
    if k > (len(layers) + 1) // 2:
        raise SharpError(f"cannot choose {k} non-adjacent targets among {len(layers)} candidates: ask for fewer")
    inf = (float("inf"), [])
    # best[i][j]: the least damage (and the targets) choosing j of layers[:i]
    best = [[(0.0, [])] + [inf] * k] + [[inf] * (k + 1) for _ in layers]
    for i, t in enumerate(layers, 1):
        before = i - 2 if i >= 2 and layers[i - 2] == t - 1 else i - 1  # without the layer t borrows from
        for j in range(k + 1):
            take = inf if j == 0 else (best[before][j - 1][0] + damage[t], best[before][j - 1][1] + [t])
            best[i][j] = min(best[i - 1][j], take, key=lambda c: c[0])
    return best[-1][k][1]
