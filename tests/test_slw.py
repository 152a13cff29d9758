"""Single Layer Warmup on small random MLPs: each stage must lower the error it targets."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY, correlated_inputs, random_mlp, tiny_model

from sharp_mlx.models.llama import vector_names
from sharp_mlx.recovery import slw
from sharp_mlx.recovery.slw import (
    PROJ,
    SLWConfig,
    fit_layer,
    lowrank_fit,
    mlp_apply,
    reduced_rank_regression,
    refit_down,
    run_slw,
    weights_of,
)

mlp, inputs = random_mlp, correlated_inputs  # shared with the other SLW tests (conftest)


def test_full_rank_fit_is_exact():
    rng = np.random.default_rng(0)
    delta = rng.normal(size=(16, 24)).astype(np.float32)
    for x in (None, rng.normal(size=(500, 16)).astype(np.float32)):
        a, b = lowrank_fit(delta, 16, x, damping=1e-6)
        assert np.allclose(a @ b, delta, atol=1e-3)


def test_activation_aware_fit_beats_plain_svd_on_real_inputs():
    rng = np.random.default_rng(1)
    delta = rng.normal(size=(64, 96)).astype(np.float32)
    x = inputs()
    errs = {}
    for name, xin in (("svd", None), ("asvd", x)):
        a, b = lowrank_fit(delta, 8, xin, damping=1e-4)
        errs[name] = np.linalg.norm(x @ (delta - a @ b))
    assert errs["asvd"] < 0.9 * errs["svd"]


def test_reduced_rank_regression_recovers_a_low_rank_map():
    rng = np.random.default_rng(2)
    h = rng.normal(size=(1000, 40))
    true = rng.normal(size=(40, 3)) @ rng.normal(size=(3, 30))
    a, b = reduced_rank_regression(h, h @ true, 3, damping=1e-8)
    assert np.allclose(a @ b, true, atol=1e-3)


def test_refit_down_in_chunks_of_rows_equals_one_chunk(monkeypatch):
    """The regression's moments summed over chunks (the hidden activations never all held) give
    the factors of one pass over every row."""
    ref, target = weights_of(mlp(1)), weights_of(mlp(2))
    x, rank, cfg = inputs(n=2500), 8, SLWConfig()
    rec = slw.init_recovery(ref, target, x, rank, cfg)
    whole = refit_down(ref, target, x, rec, rank, cfg)
    monkeypatch.setattr(slw, "MOMENT_ROWS", 700)  # 4 chunks, the last one short
    chunked = refit_down(ref, target, x, rec, rank, cfg)
    a, b = whole["down_a"] @ whole["down_b"], chunked["down_a"] @ chunked["down_b"]
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    assert not np.array_equal(whole["down_a"], rec["down_a"])  # it did fit something


def test_weights_of_are_read_only_views_of_the_models_arrays():
    m = mlp(1)
    w = weights_of(m)
    assert not w["up"].flags.writeable and slw.as_mx(w["up"]) is not None
    assert np.shares_memory(w["up"], np.asarray(m.up_proj.weight))


@pytest.mark.parametrize("with_reference", [True, False])
def test_each_stage_lowers_the_error(with_reference):
    ref, target = (mlp(1) if with_reference else None), mlp(2)
    cfg = SLWConfig(steps=60, lr=3e-3, batch_rows=256)
    out = fit_layer(ref, target, inputs(), rank=16, cfg=cfg)
    e = out["errors"]
    assert e["closed_form_down"] < min(e["init"], e["none"])  # init: gate and up fitted, down left to the closed form
    assert e["final"] == min(e["adam"], e["closed_form_down"])
    assert e["final"] < 0.8 * e["none"]
    alone = fit_layer(ref, target, inputs(), rank=16, cfg=SLWConfig(closed_form_down=False, steps=0))["errors"]
    assert (
        alone["final"] == pytest.approx(alone["init"]) and alone["init"] < alone["none"]
    )  # the init of all three alone


def test_zero_init_starts_at_direct_sharing_and_adam_improves_it():
    ref, target = mlp(1), mlp(2)
    out = fit_layer(
        ref,
        target,
        inputs(),
        rank=16,
        cfg=SLWConfig(init="zero", closed_form_down=False, steps=80, lr=3e-3, batch_rows=256),
    )
    assert out["errors"]["init"] == pytest.approx(out["errors"]["none"])
    assert out["errors"]["adam"] < 0.9 * out["errors"]["none"]


def test_mlp_apply_with_scaling_vectors_equals_dense_weights():
    rng = np.random.default_rng(3)
    w = {
        p: rng.normal(size=s).astype(np.float32) for p, s in (("gate", (96, 64)), ("up", (96, 64)), ("down", (64, 96)))
    }
    rec = {}
    for p in PROJ:
        n_out, n_in = w[p].shape
        rec.update(
            {
                f"{p}_a": rng.normal(size=(n_in, 3)),
                f"{p}_b": rng.normal(size=(3, n_out)),
                f"{p}_in": 1 + 0.3 * rng.normal(size=n_in),
                f"{p}_out": 1 + 0.3 * rng.normal(size=n_out),
            }
        )
    rec = {k: v.astype(np.float32) for k, v in rec.items()}
    dense = {
        p: mx.array(rec[f"{p}_out"][:, None] * w[p] * rec[f"{p}_in"][None, :] + (rec[f"{p}_a"] @ rec[f"{p}_b"]).T)
        for p in PROJ
    }
    x = mx.array(inputs(32))
    got = mlp_apply({p: mx.array(v) for p, v in w.items()}, x, {k: mx.array(v) for k, v in rec.items()}, kind="scaled")
    assert np.allclose(np.array(got), np.array(mlp_apply(dense, x)), rtol=1e-3, atol=1e-3)


def test_scaling_vectors_start_at_one_and_adam_moves_them():
    ref, target = mlp(1), mlp(2)
    cfg = SLWConfig(steps=60, lr=3e-3, batch_rows=256)
    plain = fit_layer(ref, target, inputs(), rank=16, cfg=cfg)
    scaled = fit_layer(ref, target, inputs(), rank=16, cfg=cfg, kind="scaled")
    e, f = scaled["errors"], scaled["factors"]
    # At one the closed-form stages are those of the plain fit, exactly.
    assert e["init"] == pytest.approx(plain["errors"]["init"]) and e["closed_form_down"] == pytest.approx(
        plain["errors"]["closed_form_down"]
    )
    assert e["final"] == e["adam"] < e["closed_form_down"] < e["none"]
    for p in PROJ:
        assert f[f"{p}_in"].shape == (target[f"{p}_proj"].weight.shape[1],) and f[f"{p}_out"].shape == (
            target[f"{p}_proj"].weight.shape[0],
        )
        assert np.abs(f[f"{p}_in"] - 1).max() > 1e-2 and np.abs(f[f"{p}_out"] - 1).max() > 1e-2, p
    with pytest.raises(ValueError, match="without a reference"):
        fit_layer(None, target, inputs(), rank=16, cfg=cfg, kind="scaled")


@pytest.mark.parametrize("scales", [False, True])
def test_run_slw_writes_factors_into_the_model(scales):
    original, _ = tiny_model()
    shared, _ = tiny_model(share={3: 2, 4: 2}, rank=8, scales=scales)
    x = {t: inputs(512, seed=t) for t in (3, 4)}
    report = run_slw(shared, original, x, SLWConfig(steps=10, batch_rows=128), log=lambda *_: None)
    assert set(report) == {3, 4}
    for t in (3, 4):
        rec = shared.model.layers[t].recovery
        assert mx.abs(rec.down_b).max().item() > 0
        if scales:  # Adam's result is kept here, and with it the vectors it moved
            assert report[t]["final"] == report[t]["adam"]
            assert all(mx.abs(rec[k] - 1).max().item() > 1e-3 for k in vector_names("scaled")), t
        w = {p: mx.array(v) for p, v in weights_of(shared.model.layers[2].mlp).items()}
        got = mlp_apply(w, mx.array(x[t][:64]), dict(rec.parameters()), kind=rec.kind)
        assert np.allclose(
            np.array(got),
            np.array(shared.model.layers[t].recovery(mx.array(x[t][:64]), shared.model.mlp_of(t))),
            atol=1e-4,
        )


def test_lsq_scales_recover_a_scaled_copy_and_scale_a_useless_weight_away():
    from sharp_mlx.recovery.slw import lsq_scales

    rng = np.random.default_rng(4)
    w_r = rng.normal(size=(24, 16))
    s_out, s_in = rng.uniform(0.5, 2, 24), rng.uniform(0.5, 2, 16)
    x = inputs(1024, 16)
    cov = x.T @ x / len(x)
    o, i = lsq_scales(s_out[:, None] * w_r * s_in[None, :], w_r, cov)
    assert np.allclose(o[:, None] * w_r * i[None, :], s_out[:, None] * w_r * s_in[None, :], atol=1e-3)
    # An unrelated weight: least squares leaves little of it (the fit never exceeds ||W_t||).
    w_t = rng.normal(size=(24, 16))
    o, i = lsq_scales(w_t, w_r, cov)
    resid = w_t - o[:, None] * w_r * i[None, :]
    assert np.trace(resid @ cov @ resid.T) <= np.trace(w_t @ cov @ w_t.T) + 1e-6


def test_lsq_scale_init_is_never_worse_than_the_control_when_the_borrowed_weight_is_useless():
    """A reference unrelated to the target: SHARP with least-squares scales starts (after the
    closed-form fits) no worse than the control, the same rank with nothing borrowed."""
    target, x = mlp(2), inputs()
    for rank in (4, 16):
        cfg = SLWConfig(steps=0)
        control = fit_layer(None, target, x, rank=rank, cfg=cfg)["errors"]
        ones = fit_layer(mlp(7), target, x, rank=rank, cfg=cfg, kind="scaled")["errors"]
        lsq = fit_layer(mlp(7), target, x, rank=rank, cfg=SLWConfig(steps=0, scales_init="lsq"), kind="scaled")[
            "errors"
        ]
        assert lsq["final"] <= control["final"] + 1e-6, rank
        assert lsq["final"] <= ones["final"] + 1e-6, rank


def test_lsq_scale_init_starts_far_ahead_on_a_scaled_copy():
    """When the target's weights are the reference's scaled by rows and columns, least squares
    finds the scales and the start is nearly exact; vectors of one leave the whole difference."""
    ref = mlp(1)
    target = mlp(1)
    rng = np.random.default_rng(0)
    for p in PROJ:
        lin = target[f"{p}_proj"]
        n_out, n_in = lin.weight.shape
        lin.weight = (
            mx.array(rng.uniform(0.5, 1.5, (n_out, 1)), dtype=mx.float32)
            * lin.weight
            * mx.array(rng.uniform(0.5, 1.5, (1, n_in)), dtype=mx.float32)
        )
    cfg = SLWConfig(steps=0)
    ones = fit_layer(ref, target, inputs(), rank=2, cfg=cfg, kind="scaled")["errors"]
    lsq = fit_layer(ref, target, inputs(), rank=2, cfg=SLWConfig(steps=0, scales_init="lsq"), kind="scaled")["errors"]
    assert lsq["final"] < 0.1 * ones["final"], (lsq, ones)


def _end_to_end_kl(model, original, windows):
    """Mean KL(original || model) of the next-token distributions over ``windows``."""
    p = mx.softmax(original(windows), axis=-1)
    logq = model(windows) - mx.logsumexp(model(windows), axis=-1, keepdims=True)
    logp = mx.log(p + 1e-12)
    return (p * (logp - logq)).sum(-1).mean().item()


def test_sequential_slw_lowers_the_end_to_end_loss_against_independent_slw():
    """Targets fitted in order, each on the inputs of the model whose earlier targets are already
    fitted, end closer to the original than targets all fitted on the original's inputs."""
    from sharp_mlx.models.sharemap import share_model
    from sharp_mlx.recovery.capture import StudentInputs, capture_mlp_inputs, mlp_inputs_of

    original, config = tiny_model(seed=3)
    windows = mx.array(np.random.default_rng(0).integers(0, TINY["vocab_size"], (16, 32)).astype(np.int32))
    share = {2: 1, 3: 1, 4: 1, 5: 1}  # one reference for four targets: the errors compound
    cfg = SLWConfig(steps=20, batch_rows=256)
    # A target's own inputs, read off the original, equal what capture_mlp_inputs records.
    assert np.array_equal(
        mlp_inputs_of(original, windows, 3), capture_mlp_inputs(original, windows, [3])["mlp_inputs"][3]
    )
    kl = {}
    for order in ("independent", "sequential"):
        mx.random.seed(0)
        model, _ = share_model(original, config, share, 4)
        inputs = (
            capture_mlp_inputs(original, windows, sorted(share))["mlp_inputs"]
            if order == "independent"
            else StudentInputs(windows, sorted(share))
        )
        run_slw(model, original, inputs, cfg, log=lambda *_: None)
        kl[order] = _end_to_end_kl(model, original, windows)
    assert kl["sequential"] < kl["independent"], kl


def test_block_objective_fits_what_makes_the_block_output_the_originals():
    """With the original given, StudentInputs returns (inputs, outputs): at the first target the
    student's states are the original's, so the outputs are MLP_t's own; fitting later targets
    to them ends closer to the original, end to end, than fitting each MLP alone independently."""
    from sharp_mlx.models.sharemap import share_model
    from sharp_mlx.recovery.capture import StudentInputs, capture_mlp_inputs

    original, config = tiny_model(seed=3)
    windows = mx.array(np.random.default_rng(0).integers(0, TINY["vocab_size"], (16, 32)).astype(np.int32))
    share = {2: 1, 3: 1, 4: 1, 5: 1}
    mx.random.seed(0)
    model, _ = share_model(original, config, share, 4)
    x, y = StudentInputs(windows, sorted(share), original=original)(model, 2)
    assert np.array_equal(x, capture_mlp_inputs(original, windows, [2])["mlp_inputs"][2])
    want = np.array(original.model.layers[2].mlp(mx.array(x.astype(np.float32))))
    assert np.abs(y - want).max() < 1e-2 * np.abs(want).max()

    cfg = SLWConfig(steps=20, batch_rows=256)
    kl = {}
    for objective in ("independent", "block"):
        mx.random.seed(0)
        model, _ = share_model(original, config, share, 4)
        inputs = (
            capture_mlp_inputs(original, windows, sorted(share))["mlp_inputs"]
            if objective == "independent"
            else StudentInputs(windows, sorted(share), original=original)
        )
        run_slw(model, original, inputs, cfg, log=lambda *_: None)
        kl[objective] = _end_to_end_kl(model, original, windows)
    assert kl["block"] < kl["independent"], kl
