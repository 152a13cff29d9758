"""Share maps: every spec parses to the exact map, every mistake is a one-line SharpError, the
parameter accounting is exact, and the shared and pruned models are what they claim to be."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import TINY, direct_sharing_reference, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask

import sharp_mlx
from sharp_mlx.errors import SharpError
from sharp_mlx.models.llama import SharpArgs
from sharp_mlx.models.sharemap import parse_share, prune_layers, savings, savings_line, share_model

TOKENS = mx.array([[5, 17, 3, 99, 42, 7, 7, 1, 60, 23, 88, 14]])
SMOL = dict(
    model_type="llama",
    hidden_size=576,
    num_hidden_layers=30,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    vocab_size=49152,
    tie_word_embeddings=True,
)


def n_params(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def analysis(errors, config=TINY):
    """A minimal analysis.json: {(reference, target): rel_error}."""
    return {"config": config, "pairs": [{"reference": r, "target": t, "rel_error": e} for (r, t), e in errors.items()]}


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, layers, expected",
    [
        ("next", "14:30", {15: 14, 17: 16, 19: 18, 21: 20, 23: 22, 25: 24, 27: 26, 29: 28}),
        ("next:1", "14:30", {15: 14, 17: 16, 19: 18, 21: 20, 23: 22, 25: 24, 27: 26, 29: 28}),
        ("next:2", "14:30", {15: 14, 16: 14, 18: 17, 19: 17, 21: 20, 22: 20, 24: 23, 25: 23, 27: 26, 28: 26}),
        (
            "next:3",
            "-16:",
            {15: 14, 16: 14, 17: 14, 19: 18, 20: 18, 21: 18, 23: 22, 24: 22, 25: 22, 27: 26, 28: 26, 29: 26},
        ),
        ("next", "20:25", {21: 20, 23: 22}),
        ("next", ":-26", {1: 0, 3: 2}),
        ("next:4", "10:16", {11: 10, 12: 10, 13: 10, 14: 10}),
        (" next ", "28:30", {29: 28}),
    ],
)
def test_next_maps(spec, layers, expected):
    assert parse_share(spec, 30, layers) == expected


def test_next_over_all_layers_by_default():
    assert parse_share("next", 6) == {1: 0, 3: 2, 5: 4}


def test_explicit_maps_from_text_and_file(tmp_path):
    assert parse_share('{"15": 14, "17": 16}', 30) == {15: 14, 17: 16}
    assert parse_share('{"15": 14, "16": 14, "17": null}', 30) == {15: 14, 16: 14, 17: None}
    path = tmp_path / "share.json"
    path.write_text(json.dumps({"29": 27, "28": 27}))
    assert parse_share(str(path), 30) == {28: 27, 29: 27}


@given(num_layers=st.integers(2, 48), data=st.data(), k=st.integers(1, 8), negative=st.booleans())
@settings(max_examples=200, deadline=None)
def test_next_k_property(num_layers, data, k, negative):
    """Every next:K map validates, stays inside [A, B), serves each reference's K followers."""
    a = data.draw(st.integers(0, num_layers - 2))
    b = data.draw(st.integers(a + 2, num_layers))
    spec = f"{a - num_layers}:{b - num_layers if b < num_layers else ''}" if negative else f"{a}:{b}"
    share = parse_share(f"next:{k}", num_layers, spec)
    SharpArgs(share=share, rank=0).validate(num_layers, 1, 1)
    assert all(a <= r < t < b and t - r <= k for t, r in share.items())
    n = b - a
    assert len(share) == n - math.ceil(n / (k + 1))  # every layer of [A, B) not a reference
    refs = sorted(set(share.values()))
    assert refs[0] == a and all(y - x == k + 1 for x, y in zip(refs, refs[1:]))
    if k == 1:
        assert parse_share("next", num_layers, spec) == share


@pytest.mark.parametrize(
    "spec, layers, needle",
    [
        ("nope", None, "unknown share spec 'nope'"),
        ("next:0", "1:5", "next:0"),
        ("next:x", "1:5", "whole number >= 1"),
        ("next", "5:5", "'5:5' holds 0 layer"),
        ("next", "7:8", "need at least two"),
        ("next", "1:40", "'1:40' reaches outside"),
        ("next", "-31:", "reaches outside"),
        ("next", "1:5:2", "not of the form A:B"),
        ("next", "a:b", "not of the form A:B"),
        ('{"3": 5}', None, "borrows from layer 5, which is not before it"),
        ('{"3": 3}', None, "not before it"),
        ('{"3": 2, "2": 1}', None, "reference 2 (for target 3) is itself a target"),
        ('{"40": 1}', None, "target 40 is out of range"),
        ('{"3": -1}', None, "reference -1 (for target 3) is out of range"),
        ("{}", None, "share map is empty"),
        ("{3: 2}", None, "not valid JSON"),
        ("[3, 2]", None, "unknown share spec"),
        ('{"a": 1}', None, "target 'a' is not a layer number"),
        ('{"3": "2"}', None, "reference '2' of target 3"),
        ('{"3": true}', None, "reference True of target 3"),
        ('{"3": 2}', "1:5", "not to an explicit share map"),
        ("missing.json", None, "missing.json does not exist"),
    ],
)
def test_parse_errors_name_the_bad_value(spec, layers, needle):
    with pytest.raises(SharpError) as e:
        parse_share(spec, 30, layers)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_json_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"15": 14,}')
    with pytest.raises(SharpError, match="bad.json is not valid JSON"):
        parse_share(str(bad), 30)
    bad.write_text("[1, 2]")
    with pytest.raises(SharpError, match="is a JSON list, not an object"):
        parse_share(str(bad), 30)


# -- auto ------------------------------------------------------------------------------------

ADJACENT = {(0, 1): 0.1, (1, 2): 0.5, (2, 3): 0.2, (3, 4): 0.3, (4, 5): 0.05}


def test_auto_picks_greedily_until_the_cut():
    sim = analysis(ADJACENT)
    # One MLP of six is 16.7% of the MLPs. Layer 5 (last) is protected; 4 and 2 are blocked
    # because 3 became a target and 2 became a reference.
    assert parse_share("auto", 6, similarity=sim, cut=0.1) == {1: 0}
    assert parse_share("auto", 6, similarity=sim, cut=0.3) == {1: 0, 3: 2}
    assert parse_share("auto", 6, similarity=sim, cut=0.1, keep_ends=False) == {5: 4}
    assert parse_share("auto", 6, layers="2:6", similarity=sim, cut=0.1) == {3: 2}
    # Rank 8 recovery (3 * (64 + 96) * 8 = 3840 of an MLP's 18432) makes one target net 13.2%.
    assert parse_share("auto", 6, similarity=sim, cut=0.15, rank=0) == {1: 0}
    assert parse_share("auto", 6, similarity=sim, cut=0.15, rank=8) == {1: 0, 3: 2}
    with pytest.raises(SharpError, match="reaches only a 33.3% stored-MLP cut"):
        parse_share("auto", 6, similarity=sim, cut=0.5)


def test_auto_references_anywhere_earlier(tmp_path):
    sim = analysis({**ADJACENT, (0, 2): 0.01, (0, 3): 0.02})
    assert parse_share("auto", 6, similarity=sim, cut=0.1) == {1: 0}
    assert parse_share("auto", 6, similarity=sim, cut=0.3, adjacent_only=False) == {2: 0, 3: 0}
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(sim))
    assert parse_share("auto", 6, similarity=str(path), cut=0.3, adjacent_only=False) == {2: 0, 3: 0}


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"cut": 0.2}, "needs a similarity analysis"),
        ({"similarity": analysis(ADJACENT)}, "needs a cut between 0 and 1"),
        ({"similarity": analysis(ADJACENT), "cut": 1.5}, "got 1.5"),
        (
            {"similarity": analysis(ADJACENT, {**TINY, "num_hidden_layers": 8}), "cut": 0.2},
            "8-layer model, this one has 6",
        ),
        ({"similarity": {"pairs": [{"target": 1}]}, "cut": 0.2}, "not an analysis"),
        ({"similarity": "no/analysis.json", "cut": 0.2}, "does not exist"),
        ({"similarity": analysis(ADJACENT), "cut": 0.2, "rank": 65}, "between 0 and 64"),
    ],
)
def test_auto_errors(kwargs, needle):
    with pytest.raises(SharpError) as e:
        parse_share("auto", 6, **kwargs)
    assert needle in str(e.value)


# -- accounting ------------------------------------------------------------------------------


def test_savings_tiny_by_hand():
    # MLP 3*64*96 = 18432; attention 64*64*2 + 64*32*2 = 12288; norms 2*64; embedding 101*64; final norm 64.
    mlp, per_layer = 18432, 18432 + 12288 + 128
    total = 6 * per_layer + 101 * 64 + 64
    recovery = 2 * 3 * (64 + 96) * 8
    s = savings(TINY, {2: 1, 4: 3}, 8)
    assert s == {
        "layers": 6,
        "targets": 2,
        "mlp_params": 6 * mlp,
        "mlp_params_stored": 4 * mlp,
        "recovery_params": recovery,
        "params_before": total,
        "params_after": total - 2 * mlp + recovery,
        "mlp_unstored": 2 / 6,
        "mlp_cut": (2 * mlp - recovery) / (6 * mlp),
        "total_cut": (2 * mlp - recovery) / total,
    }
    original, config = tiny_model()
    shared, _ = share_model(original, config, {2: 1, 4: 3}, 8)
    assert (n_params(original), n_params(shared)) == (s["params_before"], s["params_after"])
    assert savings(TINY, {2: 1}, {2: 4})["recovery_params"] == 3 * 160 * 4
    with pytest.raises(SharpError, match="between 0 and 64"):
        savings(TINY, {2: 1}, 100)


def test_savings_smollm2():
    """8 targets at rank 64: 26.7% of MLP weights unstored, 22.6% net of recovery, 13.4% of all."""
    share = parse_share("next", 30, "14:30")
    s = savings(SMOL, share, 64)
    mlp = 3 * 576 * 1536  # 2,654,208
    assert s["params_before"] == 134_515_008 and s["mlp_params"] == 30 * mlp == 79_626_240
    assert s["recovery_params"] == 8 * 3 * (576 + 1536) * 64 == 3_244_032
    assert s["params_after"] == 134_515_008 - 8 * mlp + 3_244_032 == 116_525_376
    assert (round(s["mlp_unstored"], 4), round(s["mlp_cut"], 4), round(s["total_cut"], 4)) == (0.2667, 0.2259, 0.1337)
    assert (
        savings_line(SMOL, share, 64)
        == "8 of 30 MLPs shared: stored MLP params -22.6% (recovery included), all params -13.4%"
    )


def test_savings_count_scaling_vectors_as_one_rank():
    """in + out per projection = one rank unit: rank 63 with scales stores what rank 64 does."""
    share = parse_share("next", 30, "14:30")
    plain, scaled = savings(SMOL, share, 64), savings(SMOL, share, 63, kind="scaled")
    assert scaled == plain and scaled["recovery_params"] == 8 * 3 * ((576 + 1536) * 63 + 576 + 1536)
    assert (
        savings_line(SMOL, share, 63, kind="scaled")
        == "8 of 30 MLPs shared with scaling vectors: stored MLP params -22.6% (recovery included), all params -13.4%"
    )
    original, config = tiny_model()
    model, model_config = share_model(original, config, {2: 1, 4: 3}, {2: 8, 4: 3}, kind="scaled")
    assert model_config["sharp"] == {"share": {"2": 1, "4": 3}, "rank": {"2": 8, "4": 3}, "recovery": "scaled"}
    s = savings(TINY, {2: 1, 4: 3}, {2: 8, 4: 3}, kind="scaled")
    assert s["recovery_params"] == 3 * (64 + 96) * (9 + 4) and n_params(model) == s["params_after"]
    with pytest.raises(SharpError, match="target 4 borrows none"):
        savings(TINY, {2: 1, 4: None}, 8, kind="scaled")
    with pytest.raises(SharpError, match="target 4 borrows none"):
        share_model(original, config, {2: 1, 4: None}, 8, kind="scaled")


def test_savings_match_the_real_config(real_model_dir):
    config = json.loads((real_model_dir / "config.json").read_text())
    assert savings(config, {15: 14}, 64) == savings(SMOL, {15: 14}, 64)


# -- building models -------------------------------------------------------------------------


def test_share_model_equals_direct_sharing():
    share = {2: 1, 4: 3, 5: 3}
    original, config = tiny_model()
    weights = dict(tree_flatten(original.parameters()))
    ref = direct_sharing_reference(weights, config, share)
    shared, shared_config = share_model(original, config, share, 8)
    assert shared_config["sharp"] == {"share": {"2": 1, "4": 3, "5": 3}, "rank": 8}
    assert "sharp" not in config or not config["sharp"]["share"]  # the original config is untouched
    assert np.allclose(np.array(shared(TOKENS)), np.array(ref(TOKENS)), atol=1e-5)
    assert all(not mx.any(shared.model.layers[t].recovery.gate_b).item() for t in share)


def test_share_model_without_reference_is_mlp_pruning():
    """Reference None at rank 0: the target runs no MLP, as if its MLP weights were zero."""
    original, config = tiny_model()
    zeroed = dict(tree_flatten(original.parameters()))
    for p in ("gate_proj", "up_proj", "down_proj"):
        zeroed[f"model.layers.3.mlp.{p}.weight"] = mx.zeros_like(zeroed[f"model.layers.3.mlp.{p}.weight"])
    ref = llama.Model(llama.ModelArgs.from_dict(config))
    ref.load_weights(list(zeroed.items()))
    pruned, _ = share_model(original, config, {3: None}, 0)
    assert np.allclose(np.array(pruned(TOKENS)), np.array(ref(TOKENS)), atol=1e-5)
    lowrank_only, _ = share_model(original, config, {3: None, 4: 2}, 4)
    assert "recovery" in lowrank_only.model.layers[3] and lowrank_only.model.mlp_of(3) is None


def test_share_model_refuses_a_shared_model():
    shared, config = tiny_model(share={3: 2}, rank=2)
    with pytest.raises(SharpError, match="already shares layers \\[3\\]"):
        share_model(shared, config, {5: 4}, 2)
    original, config = tiny_model()
    with pytest.raises(SharpError, match="not before it"):
        share_model(original, config, {3: 4}, 2)


def test_prune_layers_runs_the_kept_layers():
    original, config = tiny_model()
    pruned, pruned_config = prune_layers(original, config, [4, 1])
    assert pruned_config["num_hidden_layers"] == 4 and pruned_config["pruned_layers"] == [1, 4]
    inner = original.model
    h = inner.embed_tokens(TOKENS)
    mask = create_attention_mask(h, None)
    for i in (0, 2, 3, 5):
        h = inner.layers[i](h, mask, mlp=inner.mlp_of(i))
    expected = inner.embed_tokens.as_linear(inner.norm(h))
    assert np.allclose(np.array(pruned(TOKENS)), np.array(expected), atol=1e-5)
    assert n_params(original) - n_params(pruned) == 2 * (18432 + 12288 + 128)
    cut = (n_params(original) - n_params(pruned)) / n_params(original)
    assert (
        savings_line(config, {1: 0, 4: 3}, 0, "layer-prune")
        == f"2 of 6 layers removed (attention and MLP): all params -{cut:.1%}"
    )
    for bad in ([], [6], list(range(6))):
        with pytest.raises(SharpError, match="non-empty proper subset of 0..5"):
            prune_layers(original, config, bad)


def test_every_kind_of_map_round_trips_through_save_and_load(tmp_path):
    original, config = tiny_model()
    maps = {
        "next": parse_share("next", 6, "1:6"),
        "next2": parse_share("next:2", 6, "0:6"),
        "json": parse_share('{"3": null, "5": 4}', 6),
        "auto": parse_share("auto", 6, similarity=analysis(ADJACENT), cut=0.25, rank=4),
    }
    assert maps == {
        "next": {2: 1, 4: 3},
        "next2": {1: 0, 2: 0, 4: 3, 5: 3},
        "json": {3: None, 5: 4},
        "auto": {1: 0, 3: 2},
    }
    for name, share in maps.items():
        model, model_config = share_model(original, config, share, 4)
        sharp_mlx.save(tmp_path / name, model, model_config)
        loaded, loaded_config = sharp_mlx.io.checkpoint.load_model(tmp_path / name)
        assert loaded.args.sharp_args.share == share, name
        assert SharpArgs.from_dict(loaded_config["sharp"]) == SharpArgs(share=share, rank=4)
        assert mx.array_equal(model(TOKENS), loaded(TOKENS)), name
    pruned, pruned_config = prune_layers(original, config, [2])
    sharp_mlx.save(tmp_path / "pruned", pruned, pruned_config)
    loaded, loaded_config = sharp_mlx.io.checkpoint.load_model(tmp_path / "pruned")
    assert loaded_config["pruned_layers"] == [2] and mx.array_equal(pruned(TOKENS), loaded(TOKENS))


# -- counts read from folders and LoRA budgets ------------------------------------------------


@pytest.mark.parametrize("share, rank", [(None, 0), ({3: 2, 5: 4}, 4), ({2: None, 4: None}, 0)])
def test_stored_params_is_the_saved_arrays_sizes(tmp_path, share, rank):
    from tiny_folder import write_tiny_model

    from sharp_mlx.models.sharemap import stored_params

    folder = write_tiny_model(tmp_path / "m", share=share, rank=rank)
    saved = sum(a.size for f in folder.glob("model*.safetensors") for a in mx.load(str(f)).values())
    assert stored_params(folder) == saved == n_params(tiny_model(share=share, rank=rank)[0])
    assert stored_params(tmp_path) == 0  # no weights in the folder itself


@pytest.mark.parametrize(
    "share, overrides",
    [({}, {}), ({3: None, 5: None}, {}), ({4: None}, {"head_dim": 8, "num_key_value_heads": 1})],
)
def test_lora_rank_for_matches_mlx_lm_trainable_count(share, overrides):
    """Per rank, exactly what linear_to_lora_layers makes trainable on the last N blocks (as SFT calls it)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from sharp_mlx.models.sharemap import lora_rank_for

    for blocks in (1, 3, 6):
        counts = {}
        for rank in (1, 2, 5):
            model, config = tiny_model(share=share, **overrides)
            model.freeze()
            linear_to_lora_layers(model, blocks, {"rank": rank, "scale": 20.0, "dropout": 0.0})
            counts[rank] = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
            assert lora_rank_for(config, counts[rank], blocks) == rank, (blocks, rank)
        per_rank = counts[1]
        assert counts[5] == 5 * per_rank and counts[2] == 2 * per_rank
        assert lora_rank_for(config, 7 * per_rank + per_rank // 3, blocks) == 7  # the closest rank
        assert lora_rank_for(config, 7 * per_rank - per_rank // 3, blocks) == 7
        assert lora_rank_for(config, 1, blocks) == 1  # at least rank 1


def test_least_damage_targets_are_non_adjacent_and_cheapest():
    """The chosen targets never include a target's reference, and no other such set costs less."""
    import itertools

    from sharp_mlx.models.sharemap import least_damage_targets

    rng = np.random.default_rng(0)
    damage = {t: float(d) for t, d in zip(range(1, 12), rng.random(11))}
    chosen = least_damage_targets(damage, 4)
    assert len(chosen) == 4 and all(b - a > 1 for a, b in zip(chosen, chosen[1:]))
    best = min(
        sum(damage[t] for t in c)
        for c in itertools.combinations(sorted(damage), 4)
        if all(b - a > 1 for a, b in zip(c, c[1:]))
    )
    assert abs(sum(damage[t] for t in chosen) - best) < 1e-12
    assert least_damage_targets({1: 1.0, 2: 0.0, 3: 1.0}, 2) == [1, 3]  # the cheap middle one is not enough
    with pytest.raises(SharpError, match="fewer"):
        least_damage_targets({1: 0.0, 2: 0.0, 3: 0.0}, 3)
