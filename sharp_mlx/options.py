"""Command-line options generated from the recipe, and the options every command shares.

A recipe flag's parser default is ``argparse.SUPPRESS``: a flag the user leaves out never reaches the
namespace, so the recipe (``--preset``) fills it, and ``--help`` shows the preset's value. Numeric
values are checked against the field's range by ``argparse`` itself, before any work.
"""

import argparse
import math
import typing
from pathlib import Path
from typing import Iterable, Optional

from .errors import SharpError, bits_or_none
from .recipes import FIELDS, PRESETS, Recipe, check, flag, preset


def _base_type(name: str):
    kind = typing.get_type_hints(Recipe)[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def _checked(name: str, convert):
    """argparse type: ``convert`` then the field's range check, as an argparse error (one line)."""

    def parse(text: str):
        try:
            value = convert(text)
        except (TypeError, ValueError):
            what = {"int": "an integer", "float": "a number"}.get(convert.__name__, "a valid value")
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        try:
            check(name, value)
        except SharpError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag(name)} "))
        return value

    parse.__name__ = convert.__name__
    return parse


def _optional(convert):
    def parse(text: str):
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = convert.__name__
    return parse


def add_recipe_flags(parser, names: Iterable[str], base: str) -> None:
    """A flag per recipe field in ``names``; its help states its value in preset ``base``."""
    hints = typing.get_type_hints(Recipe)
    for name in names:
        f, kind = FIELDS[name], _base_type(name)
        value = getattr(PRESETS[base], name)
        shown = "none" if value is None else value
        help_ = f"{f.metadata['help']} (preset {base}: {shown})"
        if kind is bool:
            parser.add_argument(
                flag(name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_
            )
            continue
        if name.endswith("_bits"):
            convert = bits_or_none
        elif type(None) in typing.get_args(hints[name]):
            convert = _optional(kind)  # "none" sets None
        else:
            convert = kind
        parser.add_argument(flag(name), type=_checked(name, convert), default=argparse.SUPPRESS, help=help_)


def recipe_from(args: argparse.Namespace, base: str, names: Iterable[str]) -> Recipe:
    """Preset ``base`` with every recipe flag in ``names`` that ``args`` holds (the flags given).

    A share map given without a layer range takes the preset's range (the paper's where the preset has
    none) if its kind takes one, and none otherwise; a range given with a map that names its own layers
    is left for the share map to refuse."""
    given = {n: getattr(args, n) for n in names if n in vars(args)}
    if "share" in given and "layers" not in given:
        from .models.sharemap import share_kind

        takes = share_kind(given["share"]).takes_layers
        given["layers"] = (PRESETS[base].layers or PRESETS["paper"].layers) if takes else None
    return preset(base, **given)


def given(args: argparse.Namespace, names: Iterable[str]) -> set:
    return {n for n in names if n in vars(args)}


# --- options several commands share, each defined once
def add_model(parser, required: bool = True, nargs: Optional[str] = None, help: str = "model folder") -> None:
    parser.add_argument("--model", type=Path, required=required, nargs=nargs, help=help)


def add_out(parser, required: bool = True, help: str = "output folder") -> None:
    parser.add_argument("--out", type=Path, required=required, help=help)


def add_data(parser, help: str = "text files: .txt, or .jsonl in mlx_lm.lora formats", required: bool = False) -> None:
    parser.add_argument("--data", type=Path, nargs="+", required=required, help=help)


def add_force(parser, what: str = "--out") -> None:
    parser.add_argument("--force", action="store_true", help=f"replace {what} if it exists")


def add_eval_windows(parser, default: Optional[int] = None) -> None:
    """Test windows per file, the one name for it in every command."""
    shown = "all" if default is None else default
    parser.add_argument(
        "--eval-windows",
        type=at_least(1),
        default=default,
        help=f"score at most this many test windows per file (default: {shown})",
    )


def at_least(lo, kind=int):
    """argparse type: a ``kind`` number >= lo (finite for floats)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if (isinstance(value, float) and not math.isfinite(value)) or value < lo:
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be >= {lo}")
        return value

    parse.__name__ = kind.__name__
    return parse


def between(lo, hi, kind=float, lo_open: bool = False):
    """argparse type: a finite ``kind`` number in [lo, hi] (``lo_open``: lo itself excluded)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if not math.isfinite(value) or not lo <= value <= hi or (lo_open and value == lo):
            low = f"> {lo}" if lo_open else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {low} and <= {hi}")
        return value

    parse.__name__ = kind.__name__
    return parse
