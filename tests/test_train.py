"""The train CLI's wiring: every SFT setting has a flag, and mistakes are one-line errors."""

from dataclasses import fields


from conftest import tiny_model
from sharp_mlx import save, train
from sharp_mlx.sft import SFTConfig


def test_every_sft_setting_has_a_flag_with_its_default():
    parser = train.build_parser()
    args = parser.parse_args(["--stage", "sft", "--model", "m", "--out", "o"])
    for f in fields(SFTConfig):
        assert hasattr(args, f.name), f.name
    args = parser.parse_args(["--stage", "sft", "--model", "m", "--out", "o", "--grad-accum", "3", "--no-frozen-prefix", "--lora-layers", "2"])
    assert (args.grad_accum, args.frozen_prefix, args.lora_layers) == (3, False, 2)


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
