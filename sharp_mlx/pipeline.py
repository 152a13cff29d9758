"""The main job: import -> share -> SLW -> SFT -> evaluate -> 4-bit -> generate, on the embedded model.

    python -m sharp_mlx.pipeline                 # the default setting, ~20 minutes on 2 CPU cores (no other jobs)
    python -m sharp_mlx.pipeline --sft-steps 2000 --tokens 131072   # a bigger run
    python -m sharp_mlx.pipeline --share next:2 --layers 2:29 --name smollm2-135m-instruct-sharp50   # the ~50% setting
    python -m sharp_mlx.pipeline --model ~/hf/Llama-3.2-1B   # your model: next over 0.37:0.97 of its depth

``--model`` takes a model folder (an imported one or a Hugging Face one, used in place), a hub id or
a GGUF (imported into models/ once, keeping its dtype); outputs are named after it. On any model
but the default the share map is derived from its depth (``sharp_mlx.io.user_model``).

Every step leaves its output folder and is skipped when that folder exists, so an interrupted
run continues where it stopped (``--force`` redoes everything). The job itself is
``sharp_mlx.jobs.main_job.run_main_job``; this command parses its flags into a ``MainJob``.
"""

import argparse
from dataclasses import fields as dataclass_fields
from pathlib import Path

from . import options
from .errors import ArgumentParser, cli
from .io.user_model import DEPTH
from .jobs.main_job import MainJob, run_main_job
from .recipes import PRESETS, Recipe

RECIPE_FIELDS = tuple(f.name for f in dataclass_fields(Recipe))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sharp_mlx.pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="the recipe whose settings the flags below override (default: %(default)s)",
    )
    p.add_argument(
        "--model",
        help="a model folder, Hugging Face folder, hub id or .gguf (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--depth",
        default=None,
        help=f"--model: next over this span of fractions of depth, unless --share/--layers (default: {DEPTH})",
    )
    p.add_argument(
        "--name",
        help="output model name under models/ (default: smollm2-135m-instruct-sharp, or <model name>-sharp)",
    )
    p.add_argument("--data", type=Path, default=Path("data"), help="corpora folder (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="redo every step")
    p.add_argument("--no-advise", action="store_true", help="skip the advisor's verdict on the model first")
    options.add_recipe_flags(p.add_argument_group("recipe (each flag overrides one setting of --preset)"),
                             RECIPE_FIELDS, "default")  # fmt: skip
    return p


@cli("sharp_mlx.pipeline")
def main(argv=None):
    args = build_parser().parse_args(argv)
    recipe = options.recipe_from(args, args.preset, RECIPE_FIELDS)
    given = options.given(args, RECIPE_FIELDS)
    run_main_job(MainJob(recipe, args.model, args.depth, args.name, args.data, args.force, not args.no_advise, given))


if __name__ == "__main__":
    raise SystemExit(main())
