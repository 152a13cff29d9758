"""Single Layer Warmup: fit each target's recovery factors so MLP_r(x) + recovery(x) ~= MLP_t(x).

Inputs x are the real inputs of MLP_t in the original model (see capture.py); the loss is the
relative L2 error of the MLP output. Three stages, each optional and measured:

1. init: ``zero`` (b = 0: direct sharing, the paper's start), ``svd`` (truncated SVD of
   W_t - W_r per projection) or ``asvd`` (the same, weighted by the input covariance, so the
   rank is spent where the real inputs are: best rank-k fit of ||X (W_t - W_r)^T||). Down is
   left at zero when stage 2 follows, which replaces it.
2. ``closed_form_down``: with gate/up fixed, the down factors are a reduced-rank regression of
   the remaining output error on the student's own hidden activations, solved exactly.
3. ``steps`` of Adam on all six factors (and the recovery kind's vectors, if any) with
   warmup + cosine decay, minibatches of rows.

With recovery kind ``scaled`` each borrowed weight also gets a row and a column scaling, W_t ~= diag(out) W_r
diag(in) + B A; the vectors start at one, where the two closed-form stages are exact, and
only Adam moves them.

Layers are independent: they run one after the other, or split across the processes of an
``mx.distributed`` group (see sharp_mlx.recovery.distributed), each fitting its own targets with the
same seeds, so the result does not depend on the number of processes. The decompositions run with one
BLAS thread: LAPACK's many small calls on spinning threads were 10-40x slower (an SVD of
1536x576 took 27 s instead of 0.75 s) whenever another process shared the cores.
"""

from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from ..models.llama import PROJECTIONS as PROJ
from ..models.llama import Recovery, lowrank, projection_shapes, recovered_mlp, recovery_kind
from ..recipes import PAPER
from . import distributed


@dataclass
class SLWConfig:
    init: str = PAPER.init  # zero | svd | asvd
    closed_form_down: bool = PAPER.closed_form
    steps: int = PAPER.slw_steps
    lr: float = PAPER.slw_lr
    warmup: int = 20
    batch_rows: int = PAPER.slw_batch_rows
    damping: float = 1e-2  # of the mean eigenvalue, keeps the covariance inverse stable
    holdout: float = 0.1  # fraction of rows kept out of the fit to report the error on
    seed: int = PAPER.seed
    # scaled kind: "ones" starts the vectors at one; "lsq" fits them by least squares (zero
    # allowed) before the factors fit what is left, and keeps whichever of that start and the
    # all-zero one (nothing borrowed: the control's start) holds out better
    scales_init: str = PAPER.scales_init


def mx_weights_of(mlp) -> Dict[str, mx.array]:
    """{gate, up, down}: float32 (out, in) weights of an mlx-lm MLP as MLX arrays (dequantized if
    needed; a float32 weight is the model's own array, not a copy)."""
    out = {}
    for p in PROJ:
        lin = getattr(mlp, f"{p}_proj")
        w = (
            mx.dequantize(lin.weight, lin.scales, lin.biases, lin.group_size, lin.bits)
            if hasattr(lin, "scales")
            else lin.weight
        )
        out[p] = w.astype(mx.float32)
    return out


def weights_of(mlp) -> Dict[str, np.ndarray]:
    """``mx_weights_of`` as read-only numpy arrays: views of the model's own float32 weights, no copy."""
    return numpy_views(mx_weights_of(mlp))


def as_mx(v: Optional[np.ndarray]) -> Optional[mx.array]:
    """An MLX array of ``v``: the array itself where ``v`` is a view of one (``numpy_views``), else a copy."""
    if v is None:
        return None
    base = v.base
    if isinstance(base, memoryview) and isinstance(base.obj, mx.array) and base.obj.shape == v.shape:
        return base.obj
    return mx.array(v)


def numpy_views(weights: Dict[str, mx.array]) -> Dict[str, np.ndarray]:
    """Read-only numpy views of MLX arrays (sharing their memory)."""
    mx.eval(weights)
    out = {}
    for p, w in weights.items():
        out[p] = np.asarray(w)
        out[p].flags.writeable = False
    return out


def mlp_apply(
    w: Dict[str, mx.array],
    x: mx.array,
    rec: Optional[Dict[str, mx.array]] = None,
    return_hidden: bool = False,
    kind: str = "plain",
):
    """``model.recovered_mlp`` on weight dicts: borrowed (out, in) weights ``w`` (None weights:
    recovery only) and recovery parameters ``rec`` of ``kind`` (None: the MLP alone)."""
    borrowed = None if w.get("gate") is None else (lambda name, v: v @ w[name].T)
    delta = None if rec is None else (lambda name, v: lowrank(v, rec[f"{name}_a"], rec[f"{name}_b"]))
    return recovered_mlp(x, borrowed, delta, rec, kind, return_hidden)


def rel_error(pred: mx.array, target: mx.array) -> float:
    return (mx.linalg.norm(pred - target) / mx.linalg.norm(target)).item()


def gram(x) -> np.ndarray:
    """x^T x in float64, the product itself done by MLX's BLAS in float32 (n can be large)."""
    x = mx.array(x, dtype=mx.float32)
    product = np.array(x.T @ x, dtype=np.float64)  # straight to float64: no float32 copy beside it
    mx.clear_cache()  # MLX keeps freed buffers for reuse: the (d, d) product's would stay resident
    return product


class Whitener:
    """The damped input covariance C = q diag(lam) q^T of rows x, applied as C^(1/2) m and
    C^(-1/2) m without forming either (d, d) matrix: one (d, d) array, q, is kept (d = 8,192 on a
    1B model's down projection: 0.5 GB in float64 each matrix saved)."""

    def __init__(self, x: np.ndarray, damping: float):
        g = gram(x)
        g /= len(x)
        lam, self.q = np.linalg.eigh(g)
        del g
        lam = np.maximum(lam, 0) + damping * max(lam.mean(), 1e-12)
        self.s = np.sqrt(lam)

    def root(self, m: np.ndarray) -> np.ndarray:
        return self.q @ (self.s[:, None] * (self.q.T @ m))

    def inv_root(self, m: np.ndarray) -> np.ndarray:
        return self.q @ ((self.q.T @ m) / self.s[:, None])


def lowrank_fit(delta_t: np.ndarray, rank: int, x: Optional[np.ndarray], damping: float, roots=None):
    """Factors (a (in, k), b (k, out)) with a @ b the best rank-k fit of delta_t (in, out),
    in the plain Frobenius norm or, given inputs x (n, in), in ||x (delta_t - a b)||
    (``roots``: ``Whitener(x, damping)`` if already computed)."""
    if x is None:
        u, s, vt = np.linalg.svd(delta_t.astype(np.float64), full_matrices=False)
        a, b = u[:, :rank] * np.sqrt(s[:rank]), np.sqrt(s[:rank])[:, None] * vt[:rank]
    else:
        w = roots or Whitener(x, damping)
        u, s, vt = np.linalg.svd(w.root(delta_t), full_matrices=False)
        a, b = w.inv_root(u[:, :rank] * np.sqrt(s[:rank])), np.sqrt(s[:rank])[:, None] * vt[:rank]
    return a.astype(np.float32), b.astype(np.float32)


def reduced_rank_regression(h: np.ndarray, r: np.ndarray, rank: int, damping: float):
    """(a (d_in, k), b (k, d_out)) minimising ||h a b - r|| (ridge-damped), exactly."""
    hr = np.array(mx.array(h, dtype=mx.float32).T @ mx.array(r, dtype=mx.float32), dtype=np.float64)
    return rrr_from_moments(gram(h), hr, rank, damping)


def rrr_from_moments(g: np.ndarray, hr: np.ndarray, rank: int, damping: float):
    """``reduced_rank_regression`` from the moments g = h^T h (d_in, d_in; damped in place, so
    consumed) and hr = h^T r (d_in, d_out), both float64. Memory: g and the solver's copy of it,
    nothing else of that size (on a 1B model's down projection each is 0.5 GB)."""
    ridge = damping * np.trace(g) / len(g)
    g[np.diag_indices_from(g)] += ridge
    m_ols = np.linalg.solve(g, hr)  # (d_in, d_out)
    del g
    # The top right singular vectors of the fitted values h m_ols, from their (d_out, d_out) gram
    # m_ols^T G m_ols, where G m_ols = hr - ridge m_ols (the damped system solved above).
    _, vecs = np.linalg.eigh(m_ols.T @ (hr - ridge * m_ols))
    v = vecs[:, ::-1][:, :rank]  # (d_out, k)
    return (m_ols @ v).astype(np.float32), v.T.astype(np.float32)


def lsq_scales(
    w_t: np.ndarray, w_r: np.ndarray, cov: Optional[np.ndarray] = None, iters: int = 20, damping: float = 1e-6
):
    """(out (rows,), in (cols,)) minimising ||X (W_t - diag(out) W_r diag(in))^T|| by alternating
    least squares from in = 1 (``cov`` = X^T X of the inputs; None: the plain Frobenius norm).
    Both may reach zero: a useless borrowed weight is scaled away."""
    w_t, w_r = w_t.astype(np.float64), w_r.astype(np.float64)
    c = np.eye(w_t.shape[1]) if cov is None else cov.astype(np.float64)
    s_in = np.ones(w_t.shape[1])
    t_c = w_t @ c  # rows of W_t C
    for _ in range(iters):
        m = w_r * s_in[None, :]  # diag(...) W_r diag(in), row by row
        s_out = (t_c * m).sum(1) / np.maximum(((m @ c) * m).sum(1), 1e-12)
        a = c * (w_r.T @ (w_r * (s_out**2)[:, None]))  # C o (W_r^T diag(out^2) W_r)
        b = (w_r * (s_out[:, None] * t_c)).sum(0)
        s_in = np.linalg.solve(a + damping * np.trace(a) / len(a) * np.eye(len(a)), b)
    return s_out.astype(np.float32), s_in.astype(np.float32)


def init_recovery(
    ref: Optional[Dict[str, np.ndarray]],
    target: Dict[str, np.ndarray],
    x: np.ndarray,
    rank: int,
    cfg: SLWConfig,
    kind: str = "plain",
    vectors: Optional[Dict[str, np.ndarray]] = None,
    roots=None,
) -> Dict[str, np.ndarray]:
    """Initial factors by cfg.init, fitted to what the borrowed weights leave once scaled by
    ``vectors`` (default: the kind's vectors at their neutral values); x are fit rows (n, D) of
    the target's real inputs (``roots``: ``Whitener(x, cfg.damping)``, if already computed)."""
    if cfg.init == "zero":
        mx.random.seed(cfg.seed)
        rec = Recovery(x.shape[1], target["gate"].shape[0], rank, kind)
        return {k: np.array(v) for k, v in tree_flatten(rec.parameters())}
    rec = dict(vectors or {})
    asvd = cfg.init == "asvd"
    x_roots = (roots or Whitener(x, cfg.damping)) if asvd else None  # gate and up share their inputs
    for p in PROJ:
        if (
            p == "down" and cfg.closed_form_down
        ):  # refit_down solves down exactly from what gate and up do: start it at zero
            rec["down_a"], rec["down_b"] = (
                np.zeros((target["down"].shape[1], rank), np.float32),
                np.zeros((rank, x.shape[1]), np.float32),
            )
            continue
        delta = target[p] - (transformed(ref, rec, p) if ref is not None else 0.0)  # (out, in)
        if not asvd:
            rec[f"{p}_a"], rec[f"{p}_b"] = lowrank_fit(delta.T, rank, None, cfg.damping)
        elif p == "down":  # its inputs are the target's hidden activations
            _, h = mlp_apply({q: as_mx(v) for q, v in target.items()}, mx.array(x), return_hidden=True)
            rec[f"{p}_a"], rec[f"{p}_b"] = lowrank_fit(delta.T, rank, np.array(h), cfg.damping)
        else:
            rec[f"{p}_a"], rec[f"{p}_b"] = lowrank_fit(delta.T, rank, x, cfg.damping, x_roots)
    for p, (n_in, n_out) in projection_shapes(x.shape[1], target["gate"].shape[0]).items():
        for suffix, v in recovery_kind(kind).vectors(n_in, n_out).items():  # neutral unless given
            rec.setdefault(f"{p}_{suffix}", np.array(v, dtype=np.float32))
    return rec


def transformed(ref: Dict[str, np.ndarray], rec: Dict[str, np.ndarray], p: str) -> np.ndarray:
    """The borrowed weight of projection ``p`` as the vectors in ``rec`` scale it (as it is without)."""
    if f"{p}_in" not in rec:
        return ref[p]
    return rec[f"{p}_out"][:, None] * ref[p] * rec[f"{p}_in"][None, :]


def lsq_vectors(ref: Dict[str, np.ndarray], target: Dict[str, np.ndarray], x: np.ndarray) -> Dict[str, np.ndarray]:
    """Scaling vectors of every projection by ``lsq_scales``, each in its own inputs' norm."""
    h = np.array(mlp_apply({q: as_mx(v) for q, v in target.items()}, mx.array(x), return_hidden=True)[1])
    out = {}
    for p in PROJ:
        out[f"{p}_out"], out[f"{p}_in"] = lsq_scales(target[p], ref[p], gram(h if p == "down" else x) / len(x))
    return out


MOMENT_ROWS = 4096  # rows of hidden activations at a time in refit_down (4096 x 8192 x 4 B = 134 MB on a 1B)


def refit_down(
    ref,
    target,
    x: np.ndarray,
    rec: Dict[str, np.ndarray],
    rank: int,
    cfg: SLWConfig,
    kind: str = "plain",
    y: Optional[np.ndarray] = None,
) -> Dict[str, np.ndarray]:
    """Down factors solved exactly on the student's own hidden activations, towards the outputs
    ``y`` (None: the target MLP's own on ``x``). The regression's moments are summed over chunks
    of rows: the hidden activations of all rows (rows x MLP width) are never held at once."""
    target_w = {p: as_mx(v) for p, v in target.items()} if y is None else None
    student = {p: (as_mx(ref[p]) if ref is not None else None) for p in PROJ}
    no_down = {**{k: mx.array(v) for k, v in rec.items()}, "down_b": mx.zeros_like(mx.array(rec["down_b"]))}
    width, dim = target["gate"].shape[0], x.shape[1]
    g, hr = np.zeros((width, width)), np.zeros((width, dim))  # float64 sums of the chunks' float32 moments
    for start in range(0, len(x), MOMENT_ROWS):
        xc = mx.array(x[start : start + MOMENT_ROWS])
        yc = mlp_apply(target_w, xc) if y is None else mx.array(y[start : start + MOMENT_ROWS], dtype=mx.float32)
        base, h = mlp_apply(student, xc, no_down, return_hidden=True, kind=kind)
        gc, hrc = h.T @ h, h.T @ (yc - base)
        g += np.asarray(gc)  # in place from a float32 view: no float64 copy of the chunk's gram
        hr += np.asarray(hrc)
        del gc, hrc
        mx.clear_cache()
    del target_w, student, no_down
    a, b = rrr_from_moments(g, hr, rank, cfg.damping)
    return {**rec, "down_a": a, "down_b": b}


def adam_schedule(cfg: SLWConfig):
    """SLW's Adam learning rate: linear warmup, then cosine decay."""
    warmup = min(cfg.warmup, cfg.steps // 2)  # a short run still reaches the peak rate
    return optim.join_schedules(
        [optim.linear_schedule(0.0, cfg.lr, warmup), optim.cosine_decay(cfg.lr, max(cfg.steps - warmup, 1))], [warmup]
    )


def holdout_rows(n: int, cfg: SLWConfig):
    """(fit rows, held-out rows): indices of a seeded permutation of n rows, cfg.holdout of them held out."""
    rows = np.random.default_rng(cfg.seed).permutation(n)
    n_hold = max(1, int(n * cfg.holdout))
    return rows[n_hold:], rows[:n_hold]


def adam_refine(
    ref,
    target,
    x_fit: np.ndarray,
    rec: Dict[str, np.ndarray],
    cfg: SLWConfig,
    progress: Optional[Callable] = None,
    kind: str = "plain",
    y_fit: Optional[np.ndarray] = None,
) -> Dict[str, np.ndarray]:
    """cfg.steps of Adam on the relative L2 error over random minibatches of rows; every entry
    of ``rec`` (factors and any scaling vectors) is trained. The outputs to reach are ``y_fit``'s
    rows (None: the target MLP's own)."""
    tw = {p: as_mx(v) for p, v in target.items()}
    rw = {p: (as_mx(ref[p]) if ref is not None else None) for p in PROJ}
    params = {k: mx.array(v) for k, v in rec.items()}
    opt = optim.Adam(learning_rate=adam_schedule(cfg))
    rng = np.random.default_rng(cfg.seed)

    def loss_fn(p, xb, yb):
        return ((mlp_apply(rw, xb, p, kind=kind) - yb) ** 2).sum() / (yb**2).sum()

    grad_fn = mx.value_and_grad(loss_fn)

    @mx.compile
    def target_of(xb):
        return mlp_apply(tw, xb)

    for step in range(cfg.steps):
        rows = rng.integers(0, len(x_fit), cfg.batch_rows)
        xb = mx.array(x_fit[rows].astype(np.float32))
        yb = target_of(xb) if y_fit is None else mx.array(y_fit[rows].astype(np.float32))
        loss, grads = grad_fn(params, xb, yb)
        opt.update(params, grads)
        mx.eval(params, opt.state, loss)
        if progress:
            progress(step, loss.item())
    return {k: np.array(v) for k, v in params.items()}


def start_candidates(ref, target, x_fit: np.ndarray, rank: int, cfg: SLWConfig, kind: str = "plain"):
    """The starts SLW chooses from, as (vectors, init) pairs: ``cfg.init``'s (from the kind's
    neutral vectors, and from least-squares ones under ``scales_init`` "lsq"); the borrowed MLP as
    it is, zero factors and unit vectors, which a weight-space start throws away when the two
    layers' hidden units do not line up; and, under "lsq" (the main job's recipe), the control's
    (vectors at zero: nothing borrowed, the factors fit the whole MLP at the same stored size).
    The plain kind cannot express the control, and "ones" asks for vectors that start at one."""
    starts = [(None, cfg.init)]
    if ref is None:
        return starts
    scaled = kind == "scaled"
    if cfg.scales_init == "lsq" and scaled:
        starts.append((lsq_vectors(ref, target, x_fit), cfg.init))
    if cfg.init != "zero":
        starts.append((None, "zero"))
    if cfg.scales_init == "lsq" and scaled:
        shapes = projection_shapes(x_fit.shape[1], target["gate"].shape[0])
        zeros = {}
        for p, (n_in, n_out) in shapes.items():
            zeros.update({f"{p}_in": np.zeros(n_in, np.float32), f"{p}_out": np.zeros(n_out, np.float32)})
        starts.append((zeros, cfg.init))
    return starts


def best_start(ref, target, x_fit, rank: int, cfg: SLWConfig, kind: str, y_fit, err: Callable):
    """(factors, {"init": ..., "closed_form_down": ...}) of the start candidate (``start_candidates``,
    each as it is and with its down factors solved in closed form) with the least held-out error
    ``err(factors)``, judged on outputs: the stages reported are the chosen candidate's."""
    roots = Whitener(x_fit, cfg.damping) if cfg.init == "asvd" else None  # the starts share their inputs' root
    best = None
    for vectors, init in start_candidates(ref, target, x_fit, rank, cfg, kind):
        c = replace(cfg, init=init)
        rec = init_recovery(ref, target, x_fit, rank, c, kind, vectors, roots if init == "asvd" else None)
        if init == "zero" and vectors is not None:  # a zero start keeps its vectors (init_recovery draws fresh ones)
            rec = {**rec, **vectors}
        stages = [(rec, {"init": err(rec)})]
        if cfg.closed_form_down:
            down = refit_down(ref, target, x_fit, rec, rank, cfg, kind, y_fit)
            stages.append((down, {**stages[0][1], "closed_form_down": err(down)}))
        for r, stage in stages:
            e = list(stage.values())[-1]
            if best is None or e < best[2]:
                best = (r, {**stages[-1][1]}, e)
    return best[0], best[1]


def fit_layer(
    ref_mlp: Optional[nn.Module],
    target_mlp: nn.Module,
    x: np.ndarray,
    rank: int,
    cfg: SLWConfig,
    progress: Optional[Callable] = None,
    kind: str = "plain",
    y: Optional[np.ndarray] = None,
) -> Dict[str, object]:
    """Fit one target's factors (and its kind's vectors) on its captured inputs
    x (n, D); returns them and the held-out relative error after each stage ({"none", "init",
    "closed_form_down", "adam"}, and "final" for the parameters kept). With closed_form_down,
    "init" has gate and up fitted and down still borrowed as it is.

    ``y`` (n, D), if given, are the outputs to fit instead of MLP_t(x): the block-output
    objective, where they are what the MLP must add for the block to give the original's output."""
    if recovery_kind(kind).needs_reference and ref_mlp is None:
        raise ValueError(f"recovery {kind} transforms borrowed weights: a target without a reference has none")
    rw = mx_weights_of(ref_mlp) if ref_mlp is not None else {p: None for p in PROJ}
    ref = numpy_views(rw) if ref_mlp is not None else None  # the same memory
    tw = mx_weights_of(target_mlp)  # dequantized once, for the fits (as views) and the held-out outputs
    target = numpy_views(tw)
    fit, hold = holdout_rows(len(x), cfg)
    x_hold, x_fit = x[hold].astype(np.float32), x[fit].astype(np.float32)
    y_fit = None if y is None else y[fit].astype(np.float32)
    xh = mx.array(x_hold)
    y_hold = mlp_apply(tw, xh) if y is None else mx.array(y[hold].astype(np.float32))

    def err(rec):
        return (
            rel_error(mlp_apply(rw, xh, {k: mx.array(v) for k, v in rec.items()} if rec else None, kind=kind), y_hold)
            if (ref is not None or rec)
            else 1.0
        )

    errors = {"none": err(None)}
    with threadpool_limits(limits=1, user_api="blas"):
        rec, stage = best_start(ref, target, x_fit, rank, cfg, kind, y_fit, err)
        errors.update(stage)
    if cfg.steps > 0:
        refined = adam_refine(ref, target, x_fit, rec, cfg, progress, kind, y_fit)
        errors["adam"] = err(refined)
        # Adam can overshoot, or wander from a start it cannot improve: keep whichever holds out better.
        if errors["adam"] <= err(rec):
            rec = refined
    errors["final"] = err(rec)
    return {"factors": rec, "errors": errors}


def run_slw(model, original, inputs, cfg: SLWConfig, log: Callable = print, group=None) -> Dict[int, Dict[str, float]]:
    """Fit every target of ``model`` (a shared Model) against ``original``'s MLPs on captured
    inputs {target: rows}; writes the factors (and any scaling vectors) into ``model`` and
    returns the per-layer errors. ``inputs`` may instead be a ``capture.StudentInputs``: SLW in
    sequence, each target's rows read from ``model`` once the targets before it are fitted (as
    GPTQ does), so later fits see, and can correct, the earlier ones' errors.

    Under a ``group`` of several processes, each passes the inputs of its own targets
    (``distributed.shard`` of them all); every process ends with every target's factors and the
    whole report."""
    report = {}
    inner = model.model
    quiet = group is not None and not distributed.is_main(group)
    sequential = callable(inputs)
    if sequential and group is not None and group.size() > 1:
        raise ValueError("SLW in sequence fits one target after another: run it in one process")
    for t in tqdm(sorted(inputs.targets if sequential else inputs), desc="SLW", unit="layer", disable=quiet):
        layer = inner.layers[t]
        if "recovery" not in layer:
            continue
        rank = layer.recovery.gate_a.shape[1]
        bar = tqdm(total=cfg.steps, desc=f"  layer {t}", unit="step", leave=False, disable=quiet)

        def progress(step, loss):
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")

        rows = inputs(model, t) if sequential else inputs[t]
        x, y = rows if isinstance(rows, tuple) else (rows, None)  # (inputs, outputs): the block objective
        out = fit_layer(inner.mlp_of(t), original.model.layers[t].mlp, x, rank, cfg, progress, layer.recovery.kind, y)
        bar.close()
        layer.recovery.update({k: mx.array(v) for k, v in out["factors"].items()})
        mx.clear_cache()  # one target's fit state at a time: nothing of it stays cached for the next
        report[t] = out["errors"]
        log(
            f"layer {t:2d} <- {inner.mlp_owner[t]}: rel. error "
            + ", ".join(f"{k} {v:.3f}" for k, v in out["errors"].items())
        )
    if group is not None and group.size() > 1:
        for t, layer in enumerate(inner.layers):
            if "recovery" in layer:
                layer.recovery.update(distributed.gather_owned(dict(layer.recovery.parameters()), t in report, group))
        parts = distributed.gather_json({str(t): e for t, e in report.items()}, group)
        report = {int(t): e for part in parts for t, e in part.items()}
    mx.eval(model.parameters())
    return dict(sorted(report.items()))
