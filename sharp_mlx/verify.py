"""Check a model folder: the weights files it says it has, their recorded checksums, finite weights.

    python -m sharp_mlx.verify --model models/smollm2-135m-instruct-sharp

Loads do not verify checksums (it costs about as much as the load itself on SmolLM2,
experiments/results/integrity_cost.md); SLW and SFT verify their input at the start, and this command
verifies any folder. A folder written before checksums were recorded is checked for the rest.
"""

import argparse
from pathlib import Path

from .errors import ArgumentParser, cli
from .io.checkpoint import load_model, verify


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sharp_mlx.verify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, required=True, help="model folder to check")
    p.add_argument("--no-load", action="store_true", help="check files and checksums only, not that weights are finite")
    return p


@cli("sharp_mlx.verify")
def main(argv=None):
    args = build_parser().parse_args(argv)
    checked = verify(args.model)
    if not args.no_load:
        load_model(args.model)  # refuses non-finite weights, naming the tensor
    sums = f"{checked} weights file(s) match their checksums" if checked else "no checksums recorded"
    print(f"{args.model}: {sums}" + ("" if args.no_load else "; every weight is finite"))


if __name__ == "__main__":
    raise SystemExit(main())
