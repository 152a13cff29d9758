"""Jointly fitted shared weight: one stored MLP per group, and every layer of the group recovers from it.

SHARP keeps a reference's MLP as it is (W_s = W_r) and fits each target's low-rank recovery on
it. Here, as in Relaxed Recursive Transformers and Basis Sharing, the reference gets a recovery
of its own and the stored weight itself is fitted with all the group's factors:

    W_r ~= W_s + B_r A_r,    W_t ~= W_s + B_t A_t    for every target t that borrows from r,

so W_s may settle between the group's layers instead of at W_r. W_s is stored once, at the
reference's own path ``model.layers.{r}.mlp`` (config ``"reference_rank"``, see sharp_mlx.models.llama);
SHARP is the case reference rank 0.

``fit_group`` starts at SHARP's point (W_s = W_r; the reference's factors with b = 0, so it is
exact; each target's factors from ``slw.best_start``, the start ``slw.fit_layer``
chooses), then runs ``cfg.steps`` of Adam (``slw.adam_refine``'s warmup +
cosine schedule) on W_s, the reference's and every target's factors together. The loss is the sum
over the group's layers of each one's squared relative L2 MLP-output error on minibatches of its
own inputs, towards the original MLP's outputs. The end is kept only if its summed held-out
error is below the start's, so a group never ends worse than SHARP's start. With reference rank
0, W_s stays W_r and only the targets' factors move (SLW, in one Adam run over the group).

``run_joint`` fits every group of a shared model from inputs captured on the original model, of
the references as well as the targets (``capture.capture_mlp_inputs(original, windows,
references + targets)``), and writes W_s and the factors into the model.
"""

from typing import Callable, Dict, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from ..errors import SharpError
from ..models.llama import PROJECTIONS as PROJ
from ..models.llama import QuantizedRecovery, Recovery
from .slw import (
    SLWConfig,
    adam_schedule,
    as_mx,
    best_start,
    holdout_rows,
    mlp_apply,
    rel_error,
    weights_of,
)

Factors = Dict[str, np.ndarray]


def _split(x: np.ndarray, cfg: SLWConfig):
    """(fit rows, held-out rows) of one layer's inputs, as slw.fit_layer splits them."""
    fit, hold = holdout_rows(len(x), cfg)
    return x[fit].astype(np.float32), x[hold].astype(np.float32)


def fit_group(
    ref_mlp: nn.Module,
    target_mlps: Sequence[nn.Module],
    ref_inputs: Optional[np.ndarray],
    target_inputs: Sequence[np.ndarray],
    rank: Union[int, Sequence[int]],
    reference_rank: int,
    cfg: SLWConfig,
    progress: Optional[Callable] = None,
    kind: str = "plain",
) -> Dict[str, object]:
    """Fit one group: the stored weight W_s, the reference's factors and every target's.

    ``ref_mlp`` and ``target_mlps`` are the original model's MLPs (W_r, W_t); ``ref_inputs`` and
    ``target_inputs`` the rows (n, D) each of them is fed (``ref_inputs`` may be None when
    ``reference_rank`` is 0: the reference then runs W_r exactly). ``rank``: the targets' rank,
    one for all or one each (0: a target that runs W_s as it is); ``kind``: the targets'
    recovery kind (a reference's is plain). ``progress(step, loss)`` is called after each Adam step.

    Returns {"stored": {gate, up, down: float32 (out, in)}, "reference": factors ({} at reference
    rank 0), "targets": [factors ({} at rank 0), ...], "errors": {"reference": {...}, "targets":
    [{...}, ...], "sum": {...}, "kept": "start" | "end"}}: held-out relative errors per layer at
    the start (SHARP's point), the end of Adam and the final (kept) parameters; targets also give
    "none", direct sharing of W_r."""
    ranks = [rank] * len(target_mlps) if isinstance(rank, int) else list(rank)
    if not target_mlps or len(ranks) != len(target_mlps) or len(target_inputs) != len(target_mlps):
        raise ValueError(
            f"a group needs one or more targets, each with its inputs and rank: got {len(target_mlps)} targets, "
            f"{len(target_inputs)} inputs, {len(ranks)} ranks"
        )
    if reference_rank > 0 and ref_inputs is None:
        raise ValueError("reference_rank > 0 fits the reference too: pass its inputs (ref_inputs)")
    w_r = weights_of(ref_mlp)
    dim, hidden = w_r["gate"].shape[1], w_r["gate"].shape[0]
    # The group's layers: the reference first (measured when its inputs are given), then the targets.
    teachers = ([w_r] if ref_inputs is not None else []) + [weights_of(m) for m in target_mlps]
    kinds = ["plain"] * (ref_inputs is not None) + [kind] * len(target_mlps)
    splits = [_split(x, cfg) for x in ([ref_inputs] if ref_inputs is not None else []) + list(target_inputs)]
    y_hold = [mlp_apply({p: as_mx(v) for p, v in w.items()}, mx.array(h)) for w, (_, h) in zip(teachers, splits)]
    first = len(teachers) - len(target_mlps)  # index of the first target

    with threadpool_limits(limits=1, user_api="blas"):  # as slw.fit_layer: LAPACK's small calls on one thread
        start: List[Factors] = [{}] * first
        wr = {p: as_mx(v) for p, v in w_r.items()}
        for w_t, (x_fit, x_hold), y, k in zip(teachers[first:], splits[first:], y_hold[first:], ranks):
            rec = {}
            if k > 0:  # the start slw.fit_layer would choose, the borrowed MLP as it is among the candidates

                def err(f, xh=mx.array(x_hold), y=y):
                    return rel_error(mlp_apply(wr, xh, {n: mx.array(v) for n, v in f.items()}, kind=kind), y)

                rec = best_start(w_r, w_t, x_fit, k, cfg, kind, None, err)[0]
            start.append(rec)
    if reference_rank > 0:
        mx.random.seed(cfg.seed)
        fresh = Recovery(dim, hidden, reference_rank)  # b = 0: the reference starts at W_r exactly
        start[0] = {k: np.array(v) for k, v in tree_flatten(fresh.parameters())}

    def held_out(stored: Dict[str, np.ndarray], factors: List[Factors]) -> List[float]:
        w = {p: mx.array(v) for p, v in stored.items()}
        return [
            rel_error(mlp_apply(w, mx.array(h), {k: mx.array(v) for k, v in f.items()} or None, kind=kd), y)
            for (_, h), f, kd, y in zip(splits, factors, kinds, y_hold)
        ]

    errors = {"start": held_out(w_r, start)}
    stored, factors = w_r, start
    if cfg.steps > 0:
        end_stored, end = _adam(w_r, teachers, splits, kinds, start, reference_rank > 0, cfg, progress)
        errors["end"] = held_out(end_stored, end)
        if sum(errors["end"]) < sum(errors["start"]):  # never worse than SHARP's start
            stored, factors = end_stored, end
    kept = "end" if factors is not start else "start"
    errors["final"] = errors[kept]
    direct = held_out(w_r, [{}] * len(teachers))

    def per_layer(j: int) -> Dict[str, float]:
        e = {stage: errors[stage][j] for stage in ("start", "end", "final") if stage in errors}
        return e if j < first else {"none": direct[j], **e}

    report = {
        "reference": per_layer(0) if first else {stage: 0.0 for stage in errors},  # unmeasured: W_r exactly
        "targets": [per_layer(j) for j in range(first, len(teachers))],
        "sum": {stage: float(sum(errors[stage])) for stage in ("start", "end", "final") if stage in errors},
        "kept": kept,
    }
    return {
        "stored": {p: np.asarray(v, dtype=np.float32) for p, v in stored.items()},
        "reference": factors[0] if reference_rank > 0 else {},
        "targets": factors[first:],
        "errors": report,
    }


def _adam(
    w_r: Dict[str, np.ndarray],
    teachers: List[Dict[str, np.ndarray]],
    splits: list,
    kinds: List[str],
    start: List[Factors],
    train_stored: bool,
    cfg: SLWConfig,
    progress: Optional[Callable],
):
    """cfg.steps of Adam on every layer's factors, and on W_s when ``train_stored``; the loss is
    the sum of the layers' squared relative errors on minibatches of their own fit rows."""
    fixed = {p: as_mx(v) for p, v in w_r.items()}
    params = {"factors": [{k: mx.array(v) for k, v in f.items()} for f in start]}
    if train_stored:
        params["stored"] = dict(fixed)
    opt = optim.Adam(learning_rate=adam_schedule(cfg))
    rng = np.random.default_rng(cfg.seed)
    teacher_fns = [_teacher(t) for t in teachers]

    def loss_fn(p, xs, ys):
        w = p.get("stored", fixed)
        total = 0.0
        for f, kd, xb, yb in zip(p["factors"], kinds, xs, ys):
            total = total + ((mlp_apply(w, xb, f or None, kind=kd) - yb) ** 2).sum() / (yb**2).sum()
        return total

    grad_fn = mx.value_and_grad(loss_fn)
    for step in range(cfg.steps):
        xs = [mx.array(x_fit[rng.integers(0, len(x_fit), cfg.batch_rows)]) for x_fit, _ in splits]
        loss, grads = grad_fn(params, xs, [fn(xb) for fn, xb in zip(teacher_fns, xs)])
        opt.update(params, grads)
        mx.eval(params, opt.state, loss)
        if progress:
            progress(step, loss.item())
    stored = params.get("stored", fixed)
    return (
        {p: np.array(v) for p, v in stored.items()},
        [{k: np.array(v) for k, v in f.items()} for f in params["factors"]],
    )


def _teacher(w: Dict[str, np.ndarray]) -> Callable:
    """The original MLP of weights ``w`` as a compiled function of its input rows."""
    weights = {p: mx.array(v) for p, v in w.items()}
    return mx.compile(lambda xb: mlp_apply(weights, xb))


def groups_of(model) -> Dict[int, List[int]]:
    """{reference: [its targets, ascending]} of a shared Model (targets borrowing nothing left out)."""
    out: Dict[int, List[int]] = {}
    for t, r in enumerate(model.model.mlp_owner):
        if r is not None and r != t:
            out.setdefault(r, []).append(t)
    return dict(sorted(out.items()))


def _float_recovery(layer, i: int):
    rec = layer.get("recovery")
    if isinstance(rec, QuantizedRecovery):
        raise SharpError(f"layer {i}'s recovery is quantized: fit the float model, then quantize it")
    return rec


def run_joint(
    model, original, inputs: Dict[int, np.ndarray], cfg: SLWConfig, log: Callable = print
) -> Dict[int, Dict[str, float]]:
    """Fit every group of ``model`` (a shared, float Model) against ``original``'s MLPs and write
    the result into ``model``: W_s into the reference's MLP, the factors into the recoveries.

    ``inputs`` {layer: rows (n, D)} are the MLP inputs captured on the original. Every group with
    a layer in ``inputs`` is fitted, and needs the rows of all its targets, and of its reference
    when that has a recovery (reference_rank > 0; at 0, W_s stays W_r and only the targets'
    factors are fitted). Targets borrowing no MLP belong to no group: fit them with slw.run_slw.
    Returns {layer: held-out errors ("none" for targets, "start", "end", "final"), with "group":
    its reference} for every layer fitted, references included."""
    if callable(inputs):
        raise SharpError("the joint fit takes MLP inputs captured on the original ({layer: rows}), not SLW in sequence")
    inner, sharp = model.model, model.args.sharp_args
    groups = {r: ts for r, ts in groups_of(model).items() if r in inputs or any(t in inputs for t in ts)}
    report: Dict[int, Dict[str, float]] = {}
    for r, targets in tqdm(groups.items(), desc="joint", unit="group"):
        ref_rank = sharp.reference_rank_of(r)
        needed = targets + ([r] if ref_rank > 0 else [])
        missing = [i for i in needed if i not in inputs]
        if missing:
            raise SharpError(
                f"the group of reference {r} (targets {targets}) needs the MLP inputs of layers {missing} too: capture "
                f"them with capture_mlp_inputs(original, windows, {sorted(needed)})"
            )
        bad = [i for i in needed if isinstance(inputs[i], tuple)]
        if bad:
            raise SharpError(f"inputs of layers {bad} are (inputs, outputs) pairs: the joint fit takes MLP inputs only")
        if "mlp" not in original.model.layers[r] or any("mlp" not in original.model.layers[t] for t in targets):
            raise SharpError("the joint fit needs the original, unshared model as `original`")
        stored_mlp = inner.layers[r].mlp
        if any(hasattr(stored_mlp[f"{p}_proj"], "scales") for p in PROJ):
            raise SharpError(f"layer {r}'s MLP is quantized: fit the float model, then quantize it")
        recs = [_float_recovery(inner.layers[t], t) for t in targets]
        ref_rec = _float_recovery(inner.layers[r], r)
        bar = tqdm(total=cfg.steps, desc=f"  group {r}", unit="step", leave=False)

        def progress(step, loss):
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")

        out = fit_group(
            original.model.layers[r].mlp,
            [original.model.layers[t].mlp for t in targets],
            inputs[r] if r in inputs else None,
            [inputs[t] for t in targets],
            [0 if rec is None else rec.gate_a.shape[1] for rec in recs],
            ref_rank,
            cfg,
            progress,
            sharp.kind,
        )
        bar.close()
        for p in PROJ:
            lin = stored_mlp[f"{p}_proj"]
            lin.weight = mx.array(out["stored"][p]).astype(lin.weight.dtype)
        for rec, factors in [(ref_rec, out["reference"])] + list(zip(recs, out["targets"])):
            if rec is not None:
                rec.update({k: mx.array(v).astype(rec[k].dtype) for k, v in factors.items()})
        e = out["errors"]
        report[r] = {**e["reference"], "group": r}
        report.update({t: {**te, "group": r} for t, te in zip(targets, e["targets"])})
        log(
            f"group {r} -> {', '.join(map(str, targets))}: held-out rel. error summed "
            + ", ".join(f"{k} {v:.3f}" for k, v in e["sum"].items())
            + f" (kept {e['kept']})"
        )
    mx.eval(model.parameters())
    return dict(sorted(report.items()))
