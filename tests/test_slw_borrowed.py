"""SLW keeps the borrowed function: a target whose MLP computes nearly its reference's function,
with weights that look unrelated (the hidden units in another order), must end no worse than
borrowing it as it is, and far below the control that borrows nothing."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import correlated_inputs, random_mlp

from sharp_mlx.recovery.joint import fit_group
from sharp_mlx.recovery.slw import SLWConfig, fit_layer, mlp_apply, weights_of

RANK = 8


def rearranged(ref, noise: float = 0.02, seed: int = 5):
    """An MLP computing nearly ``ref``'s function: its hidden units permuted (gate and up rows, down
    columns), plus Gaussian noise of ``noise`` times each weight's standard deviation."""
    rng = np.random.default_rng(seed)
    w = weights_of(ref)
    perm = rng.permutation(w["gate"].shape[0])
    out = random_mlp(99)
    for p, v in (("gate", w["gate"][perm]), ("up", w["up"][perm]), ("down", w["down"][:, perm])):
        v = v + noise * v.std() * rng.normal(size=v.shape)
        getattr(out, f"{p}_proj").weight = mx.array(v.astype(np.float32))
    return out


@pytest.fixture(scope="module")
def pair():
    ref = random_mlp(1)
    target = rearranged(ref)
    x = correlated_inputs()
    control = fit_layer(None, target, x, RANK, SLWConfig(steps=40, lr=3e-3, batch_rows=256))["errors"]["final"]
    return ref, target, x, control


CASES = [
    dict(kind="plain", cfg=dict(init="asvd")),
    dict(kind="plain", cfg=dict(init="svd")),
    dict(kind="plain", cfg=dict(init="zero")),
    dict(kind="plain", cfg=dict(init="asvd", closed_form_down=False)),
    dict(kind="scaled", cfg=dict(init="asvd")),
    dict(kind="scaled", cfg=dict(init="asvd", scales_init="lsq")),
    dict(kind="scaled", cfg=dict(init="svd", scales_init="lsq")),
    dict(kind="scaled", cfg=dict(init="asvd", scales_init="lsq"), block=True),  # the main job's recipe
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join([c["kind"], *map(str, c["cfg"].values())]))
def test_every_fit_keeps_the_borrowed_function(pair, case):
    ref, target, x, control = pair
    y = None
    if case.get("block"):  # the block objective: outputs to reach other than the MLP's own (here a small shift)
        y = np.array(mlp_apply({p: mx.array(v) for p, v in weights_of(target).items()}, mx.array(x)))
        y = y + 0.01 * y.std() * np.random.default_rng(3).normal(size=y.shape).astype(np.float32)
    cfg = SLWConfig(steps=40, lr=3e-3, batch_rows=256, **case["cfg"])
    e = fit_layer(ref, target, x, RANK, cfg, kind=case["kind"], y=y)["errors"]
    assert e["none"] < 0.1 < control  # the premise: borrowing alone is good, the control is not
    assert e["final"] <= e["none"] + 1e-6
    assert e["final"] < 0.2 * control


def test_joint_start_keeps_the_borrowed_function(pair):
    ref, target, x, control = pair
    out = fit_group(ref, [target], None, [x], RANK, 0, SLWConfig(steps=0))
    e = out["errors"]["targets"][0]
    assert e["final"] <= e["none"] + 1e-6 and e["final"] < 0.2 * control
