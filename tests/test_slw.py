"""Single Layer Warmup on small random MLPs: each stage must lower the error it targets."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import llama

from conftest import TINY, tiny_model
from sharp_mlx.slw import SLWConfig, fit_layer, lowrank_fit, mlp_apply, reduced_rank_regression, run_slw, weights_of


def mlp(seed):
    mx.random.seed(seed)
    m = llama.MLP(llama.ModelArgs.from_dict(TINY))
    mx.eval(m.parameters())
    return m


def inputs(n=2048, dim=TINY["hidden_size"], seed=0):
    """Correlated inputs (a random low-dimensional-ish covariance), as real activations are."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) * (0.9 ** np.arange(dim))[:, None]
    return (rng.normal(size=(n, dim)) @ mix).astype(np.float32)


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


@pytest.mark.parametrize("with_reference", [True, False])
def test_each_stage_lowers_the_error(with_reference):
    ref, target = (mlp(1) if with_reference else None), mlp(2)
    cfg = SLWConfig(steps=60, lr=3e-3, batch_rows=256)
    out = fit_layer(ref, target, inputs(), rank=16, cfg=cfg)
    e = out["errors"]
    assert e["init"] < e["none"]
    assert e["closed_form_down"] < e["init"]
    assert e["final"] == min(e["adam"], e["closed_form_down"])
    assert e["final"] < 0.8 * e["none"]


def test_zero_init_starts_at_direct_sharing_and_adam_improves_it():
    ref, target = mlp(1), mlp(2)
    out = fit_layer(ref, target, inputs(), rank=16, cfg=SLWConfig(init="zero", closed_form_down=False, steps=80, lr=3e-3, batch_rows=256))
    assert out["errors"]["init"] == pytest.approx(out["errors"]["none"])
    assert out["errors"]["adam"] < 0.9 * out["errors"]["none"]


def test_run_slw_writes_factors_into_the_model():
    original, _ = tiny_model()
    shared, _ = tiny_model(share={3: 2, 4: 2}, rank=8)
    x = {t: inputs(512, seed=t) for t in (3, 4)}
    report = run_slw(shared, original, x, SLWConfig(steps=10, batch_rows=128), log=lambda *_: None)
    assert set(report) == {3, 4}
    for t in (3, 4):
        rec = shared.model.layers[t].recovery
        assert mx.abs(rec.down_b).max().item() > 0
        w = {p: mx.array(v) for p, v in weights_of(shared.model.layers[2].mlp).items()}
        got = mlp_apply(w, mx.array(x[t][:64]), dict(rec.parameters()))
        assert np.allclose(np.array(got), np.array(shared.model.layers[t].recovery(mx.array(x[t][:64]), shared.model.mlp_of(t))), atol=1e-4)
