"""Recover a shared model: Single Layer Warmup (SLW), then supervised fine-tuning (SFT).

    python -m sharp_mlx.train --stage slw --model models/smollm2-135m-instruct --out models/sharp-slw
    python -m sharp_mlx.train --stage sft --model models/sharp-slw \\
        --teacher models/smollm2-135m-instruct --out models/sharp
    python -m sharp_mlx.train --stage slw --preset default ...   # the main job's SLW stage

``--stage slw`` starts from the original model: it builds the shared model from the share map,
captures each target's real MLP inputs on calibration text and fits the recovery factors.
``--stage sft`` fine-tunes a shared model's recovery factors end to end.
Every setting comes from a recipe (``sharp_mlx.recipes``): ``--preset paper`` unless another is
named, i.e. SHARP as the paper describes it (every other layer of 11:29 borrows the one before,
plain recovery at rank 64, fitted independently); each flag given overrides one setting.
``--baseline`` builds the comparison models at the same targets instead of SHARP:
direct (borrow, no recovery), mlp-prune (no MLP at the targets), layer-prune (no target
layers at all), lowrank (the control: recovery factors with no borrowed weights).
"""

import argparse
from pathlib import Path

from . import options
from .errors import ArgumentParser, SharpError, cli
from .recipes import PRESETS, SFT_FIELDS, SLW_FIELDS
from .recovery.stages import SFTRun, SLWRun, run_stage

BASE = "paper"  # the preset a bare `train` runs


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sharp_mlx.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--stage", choices=("slw", "sft"), required=True, help="slw: build + warm up; sft: fine-tune")
    options.add_model(p, help="input model folder (the original for slw, a shared model for sft)")
    options.add_out(p, help="output model folder")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=BASE,
        help="the recipe whose settings the flags below override (default: %(default)s)",
    )
    options.add_force(p)
    options.add_data(p, help="training / calibration files (default: data/*/train.jsonl)")
    options.add_recipe_flags(p, ("seq_len", "seed"), BASE)
    g = p.add_argument_group("share map and single layer warmup (--stage slw)")
    options.add_recipe_flags(g, [n for n in SLW_FIELDS if n not in ("seq_len", "seed")], BASE)
    g.add_argument("--analysis", type=Path, help="analysis.json of sharp_mlx.analyze, for --share auto")
    g.add_argument("--no-slw", action="store_true", help="fresh factors only (the SFT-only baseline)")
    g.add_argument("--cache-dir", type=Path, help="where captured inputs go (default: in memory)")
    g = p.add_argument_group("supervised fine-tuning (--stage sft)")
    g.add_argument("--teacher", type=Path, help="the original model, for distillation")
    g.add_argument("--valid", type=Path, nargs="+", help="validation files (default: data/*/valid.jsonl)")
    g.add_argument("--run-dir", type=Path, help="checkpoints, loss curve (default: runs/<out name>)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --run-dir")
    options.add_recipe_flags(g, [n for n in SFT_FIELDS if n not in ("seq_len", "seed")], BASE)
    return p


def run_from_args(args: argparse.Namespace):
    """The SLWRun or SFTRun of parsed ``python -m sharp_mlx.train`` flags."""
    if args.stage == "slw":
        recipe = options.recipe_from(args, args.preset, SLW_FIELDS)
        return SLWRun(args.model, args.out, recipe, args.data, args.analysis, args.no_slw, args.cache_dir)
    stray = options.given(args, set(SLW_FIELDS) - set(SFT_FIELDS))
    if stray:
        name = sorted(stray)[0]
        raise SharpError(
            f"--{name.replace('_', '-')} applies to --stage slw, which builds the shared model; SFT trains whatever "
            f"recovery parameters its model has: drop --{name.replace('_', '-')}"
        )
    recipe = options.recipe_from(args, args.preset, SFT_FIELDS)
    return SFTRun(args.model, args.out, recipe, args.teacher, args.data, args.valid, args.run_dir, args.resume)


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@cli("sharp_mlx.train")
def main(argv=None):
    args = parse_args(argv)
    run_stage(run_from_args(args), args.force)


if __name__ == "__main__":
    raise SystemExit(main())
