"""One source of defaults: every command's parser against the recipe, and every numeric flag's range."""

import argparse
import importlib
import math

import pytest

from sharp_mlx.__main__ import COMMANDS
from sharp_mlx.recipes import FIELDS, PAPER, PRESETS, Recipe
from sharp_mlx.recovery.sft import SFTConfig
from sharp_mlx.recovery.slw import SLWConfig
from sharp_mlx.recovery.stages import sft_config, slw_config

# Flags named like a recipe field that mean something else in that command, and why.
OWN_DEFAULTS = {
    ("analyze", "tokens"): "calibration tokens of the layer analysis, which needs fewer than SLW",
    ("bench", "max_tokens"): "new tokens per benchmark prompt, kept short so that repetitions are cheap",
    ("quantize", "recovery_bits"): "the quantize command keeps the recovery float unless asked (the recipe asks 8)",
    ("quantize", "embedding_bits"): "the quantize command keeps the GGUF's codes unless asked (the recipe asks 5)",
    ("advise", "cut"): "the advisor plans a cut of a quarter of the stored MLP unless told (the recipes name targets)",
    ("advise", "tokens"): "the advisor's cheap fits take a few thousand tokens, not SLW's",
}


def parsers():
    for name in COMMANDS:
        module = importlib.import_module(f"sharp_mlx.{name}")
        yield name, module.build_parser()


def actions(parser):
    for a in parser._actions:
        if a.option_strings and a.dest != "help":
            yield a


def test_every_command_is_listed_and_builds_its_parser():
    names = [name for name, _ in parsers()]
    assert {"train", "pipeline", "convert", "quantize", "evaluate", "generate"} <= set(names)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_flag_named_after_a_recipe_field_takes_the_recipes_default(name):
    parser = importlib.import_module(f"sharp_mlx.{name}").build_parser()
    for a in actions(parser):
        if a.dest not in FIELDS or (name, a.dest) in OWN_DEFAULTS:
            continue
        if a.default is argparse.SUPPRESS:  # generated from the recipe: the preset fills it
            assert "(preset " in a.help, (name, a.dest)
            continue
        assert a.default == getattr(PAPER, a.dest), f"{name} --{a.dest}: {a.default} != recipe {getattr(PAPER, a.dest)}"


@pytest.mark.parametrize("name, base", [("train", "paper"), ("pipeline", "default")])
def test_a_bare_command_runs_its_preset_exactly(name, base):
    from sharp_mlx import options

    module = importlib.import_module(f"sharp_mlx.{name}")
    argv = ["--stage", "slw", "--model", "m", "--out", "o"] if name == "train" else []
    args = module.build_parser().parse_args(argv)
    assert options.recipe_from(args, args.preset, FIELDS) == PRESETS[base]


def test_the_library_configs_take_the_recipes_defaults():
    assert slw_config(PAPER) == SLWConfig()
    assert sft_config(PAPER) == SFTConfig()


def test_every_preset_is_in_range():
    for p in PRESETS.values():
        assert isinstance(p, Recipe)  # __post_init__ checked every field


BAD = ("nan", "inf", "-1e9", "ten")  # out of every numeric flag's range: not finite, far below it, not a number


def accepts(a, text) -> bool:
    try:
        value = a.type(text)
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return False
    return a.choices is None or value in a.choices


def numeric(a) -> bool:
    return a.type is not None and getattr(a.type, "__name__", "") in ("int", "float", "bits_or_none")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_numeric_flag_refuses_out_of_range_values_before_any_work(name, capsys):
    module = importlib.import_module(f"sharp_mlx.{name}")
    checked = 0
    for a in actions(module.build_parser()):
        if not numeric(a):
            continue
        flag = a.option_strings[0]
        assert a.type not in (int, float) or a.choices is not None, f"{name} {flag} takes any number: give it a range"
        for value in BAD:
            assert not accepts(a, value), f"{name} {flag} accepts {value}"
        # the command itself: one line naming the flag, exit 2, before anything else is read
        assert module.main([flag, "nan"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err, err
        checked += 1
    assert checked > 0 or name in ("convert", "heldout", "fuse", "verify")


def test_ranges_are_what_the_recipe_says():
    from sharp_mlx import train

    args = train.build_parser()
    with pytest.raises(Exception):
        args.parse_args(["--stage", "slw", "--model", "m", "--out", "o", "--slw-steps", "-1"])
    for field, bad in [("cut", 1.5), ("learning_rate", math.nan), ("rank", 0), ("tokens", 0), ("seq_len", 0)]:
        with pytest.raises(Exception, match=field.replace("_", "-")):
            Recipe(**{field: bad})
