"""The train CLI's wiring: every SFT setting has a flag, and mistakes are one-line errors."""

from conftest import tiny_model

from sharp_mlx import save, train


def tiny_slw(tmp_path, *extra: str) -> list:
    """``train --stage slw`` flags for a tiny seeded model and a little text, plus ``extra``."""
    from tiny_folder import write_text_data, write_tiny_model

    orig = write_tiny_model(tmp_path / "orig", seed=3)
    data = write_text_data(tmp_path / "train.jsonl")
    flags = ["--stage", "slw", "--model", orig, "--data", data, "--seq-len", 32, "--tokens", 256, *extra]
    return list(map(str, flags))


def test_slw_refuses_an_already_shared_model(tmp_path, capsys):
    model, config = tiny_model(share={3: 2}, rank=2)
    save(tmp_path / "shared", model, config)
    assert train.main(["--stage", "slw", "--model", str(tmp_path / "shared"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already a shared model" in err[0]
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_without_force(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    assert train.main(["--stage", "sft", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")]) == 2
    assert "--force" in capsys.readouterr().err


def test_rank_allocation_keeps_the_total_and_follows_the_damage():
    from sharp_mlx.models.sharemap import allocate_ranks

    ranks = allocate_ranks({12: 0.05, 20: 0.15, 28: 0.6}, 3 * 64)
    assert sum(ranks.values()) == 3 * 64 and all(k % 16 == 0 and k >= 16 for k in ranks.values())
    assert ranks[12] < ranks[20] < ranks[28]
    assert allocate_ranks({1: 0.0, 2: 0.0}, 64) == {1: 32, 2: 32}  # no damage anywhere: uniform


def test_slw_by_sensitivity_and_auto_with_any_reference(tmp_path, capsys):
    import json

    from sharp_mlx import load
    from sharp_mlx.models.llama import SharpArgs

    common = tiny_slw(tmp_path, "--slw-steps", "2")
    orig = tmp_path / "orig"
    assert (
        train.main(
            common
            + [
                "--share",
                "next",
                "--layers",
                "1:6",
                "--rank",
                "24",
                "--rank-allocation",
                "sensitivity",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "loss increase without each target's MLP" in out and "ranks by target" in out
    sharp = SharpArgs.from_dict(json.loads((tmp_path / "s" / "config.json").read_text())["sharp"])
    assert sorted(sharp.share) == [2, 4] and sorted(sharp.rank_of(t) for t in sharp.share) == [16, 32]
    load(tmp_path / "s")  # the per-target ranks load back
    # References anywhere earlier: the analysis says layer 0 predicts 2 and 3 best.
    pairs = [
        {"reference": r, "target": t, "rel_error": e}
        for (r, t), e in {(0, 1): 0.9, (1, 2): 0.9, (2, 3): 0.9, (0, 2): 0.1, (0, 3): 0.2}.items()
    ]
    cfg = json.loads((orig / "config.json").read_text())
    (tmp_path / "a.json").write_text(json.dumps({"config": cfg, "pairs": pairs}))
    auto = common + [
        "--share",
        "auto",
        "--layers",
        "0:6",
        "--cut",
        "0.3",
        "--rank",
        "2",
        "--analysis",
        str(tmp_path / "a.json"),
    ]
    assert train.main(auto + ["--references", "any", "--out", str(tmp_path / "any")]) == 0
    assert json.loads((tmp_path / "any" / "config.json").read_text())["sharp"]["share"] == {"2": 0, "3": 0}
    assert train.main(auto + ["--out", str(tmp_path / "adj")]) == 0
    assert all(
        t - r == 1
        for t, r in (
            (int(t), r) for t, r in json.loads((tmp_path / "adj" / "config.json").read_text())["sharp"]["share"].items()
        )
    )


def test_slw_with_scales_records_them_and_refuses_targets_without_a_reference(tmp_path, capsys):
    import json

    from sharp_mlx import load

    common = tiny_slw(tmp_path, "--slw-steps", "2", "--rank", "4", "--recovery", "scaled")
    assert train.main(common + ["--share", '{"3": 2, "5": 4}', "--out", str(tmp_path / "s")]) == 0
    assert "2 of 6 MLPs shared with scaling vectors" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "config.json").read_text())["sharp"] == {
        "share": {"3": 2, "5": 4},
        "rank": 4,
        "recovery": "scaled",
    }
    record = json.loads((tmp_path / "s" / "training.json").read_text())[-1]
    assert record["recovery"] == "scaled" and set(record["layers"]) == {"3", "5"}
    assert "gate_in" in load(tmp_path / "s")[0].model.layers[5].recovery
    for extra, needle in (
        (["--share", '{"3": 2, "5": null}'], "target 5 borrows none"),
        (["--share", '{"3": 2}', "--baseline", "lowrank"], "--baseline lowrank borrows no weights"),
    ):
        assert train.main(common + extra + ["--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--recovery scaled" in err[0] and needle in err[0], err
    assert not (tmp_path / "bad").exists()
    assert (
        train.main(
            ["--stage", "sft", "--model", str(tmp_path / "s"), "--out", str(tmp_path / "bad"), "--recovery", "scaled"]
        )
        == 2
    )
    assert "--recovery applies to --stage slw" in capsys.readouterr().err


def test_fresh_factors_are_the_same_every_run(tmp_path):
    """--no-slw keeps the drawn factors (the SFT-only start): seeded, so a run repeats exactly; another seed differs."""
    import mlx.core as mx
    from tiny_folder import write_tiny_model

    orig = write_tiny_model(tmp_path / "orig", seed=3)
    common = ["--stage", "slw", "--model", str(orig), "--share", "next", "--layers", "1:6", "--rank", "4", "--no-slw"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        mx.random.seed(100 + len(name) * ord(name))  # whatever state the process is in
        assert train.main(common + ["--seed", str(seed), "--out", str(tmp_path / name)]) == 0
    a, b, c = (mx.load(str(tmp_path / n / "model.safetensors")) for n in "abc")
    key = "model.layers.2.recovery.gate_a"
    assert mx.array_equal(a[key], b[key]) and not mx.array_equal(a[key], c[key])


def test_scales_init_needs_scaled_recovery(tmp_path, capsys):
    argv = tiny_slw(tmp_path, "--rank", "4")
    assert train.main(argv + ["--share", '{"3": 2}', "--scales-init", "lsq", "--out", str(tmp_path / "bad")]) == 2
    assert "add --recovery scaled" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert (
        train.main(
            argv
            + [
                "--share",
                '{"3": 2}',
                "--scales-init",
                "lsq",
                "--recovery",
                "scaled",
                "--slw-steps",
                "2",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    from sharp_mlx.io.checkpoint import load

    assert "gate_in" in load(tmp_path / "s")[0].model.layers[3].recovery


def test_preset_gives_the_main_jobs_stages_and_flags_given_override_it():
    from sharp_mlx.recipes import PRESETS

    r = PRESETS["default"]
    slw = train.run_from_args(train.parse_args(["--stage", "slw", "--model", "m", "--out", "o", "--preset", "default"]))
    assert slw.recipe == r
    own = train.run_from_args(
        train.parse_args(["--stage", "slw", "--model", "m", "--out", "o", "--preset", "default", "--rank", "32"])
    )
    assert own.recipe.rank == 32 and own.recipe.scales_init == r.scales_init
    plain = train.run_from_args(train.parse_args(["--stage", "slw", "--model", "m", "--out", "o"])).recipe
    assert (plain.recovery, plain.slw_order, plain.share, plain.layers) == ("plain", "independent", "next", "11:29")
    assert plain == PRESETS["paper"]
    sft = train.run_from_args(
        train.parse_args(
            ["--stage", "sft", "--model", "m", "--out", "o", "--preset", "default", "--valid-windows", "2"]
        )
    )
    assert sft.recipe.sft_steps == r.sft_steps and sft.recipe.valid_windows == 2
    assert sft.recipe.max_train_tokens == r.max_train_tokens
