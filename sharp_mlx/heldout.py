"""Build data/heldout/<kind>/test.jsonl: kinds of text for evaluation only.

Three kinds, ``HELDOUT`` (ham email, fortune cookies, a 19th-century novel), each from a pinned
package (see data/README.md), none like one of the five training domains of ``sharp_mlx.data.corpora``.
Each gets a test file and nothing else, and neither ``corpora.DOMAINS`` nor ``corpora.files(split)``
names them, so no training, calibration or selection default reads them; ``heldout_files()`` is
the one way to ask for them. Archives share <out>/.cache with the domains' and are read in place;
documents are chosen as a domain's test split is, so the output is the same bytes on every run.

    python -m sharp_mlx.heldout                       # all kinds into data/heldout/
    python -m sharp_mlx.heldout email fortunes        # a subset

``python -m sharp_mlx.corpora --heldout [KIND ...]`` does the same.
"""

import argparse
import sys

from sharp_mlx.data.corpora import (
    FetchError,
    format_table,
)

from .data.heldout import HELDOUT, fetch_heldout
from .errors import ArgumentParser, SharpError, cli


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m sharp_mlx.heldout", description=__doc__.split("\n\n")[0])
    # no `choices`: argparse rejects an empty list against them, and an empty list means all
    p.add_argument("kinds", nargs="*", metavar="KIND", help=f"kinds to build: {', '.join(HELDOUT)} (default: all)")
    p.add_argument("--out", default="data", help="output folder; downloads are cached in <out>/.cache (default: data)")
    p.add_argument("--force", action="store_true", help="rebuild kinds that already exist")
    return p


@cli("sharp_mlx.heldout")
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bad := [k for k in args.kinds if k not in HELDOUT]:
        parser.error(f"unknown kind {bad[0]!r}; choose from {', '.join(HELDOUT)}")
    try:
        stats = fetch_heldout(args.kinds or HELDOUT, args.out, args.force)
    except FetchError as e:
        raise SharpError(str(e))
    print(format_table(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
