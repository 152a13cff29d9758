"""User-facing errors: one line that names the problem and the fix, exit status 2."""

import argparse
import functools
import sys
from typing import Callable, Optional, Sequence


class SharpError(Exception):
    """A mistake in what the user asked for (bad path, flag, file); never an internal bug."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes (unknown flag, bad value, missing argument) are one-line SharpErrors
    under ``cli`` instead of a usage block; --help is unchanged."""

    def error(self, message: str):
        raise SharpError(f"{message} (see {self.prog} --help)")


def bits_or_none(text: str) -> Optional[int]:
    """argparse type of a bit width that may be "none" (keep what the source has)."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bits or 'none'")


def cli(prog: str) -> Callable:
    """Wrap a CLI ``main(argv)`` so a SharpError prints one line and returns 2, not a traceback."""

    def wrap(main: Callable[[Optional[Sequence[str]]], Optional[int]]):
        @functools.wraps(main)
        def run(argv: Optional[Sequence[str]] = None) -> int:
            try:
                return main(argv) or 0
            except SharpError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130

        return run

    return wrap
