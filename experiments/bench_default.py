"""The project's own benchmark rows: every SHARP setting of the embedded model that exists under
models/, as the main job makes its 4-bit checkpoint, against mlx-lm's 4-bit original.

    python experiments/bench_default.py --reps 3 --prompts 1 --max-tokens 32 --eval-windows 8 --cold --out experiments/results/bench-cold

Rows: the float original, mlx-lm's 4-bit conversion of it (run by mlx-lm: the reference) and the
same folder loaded by sharp_mlx, the original with its GGUF codes, and for each float SHARP model
found (the main job's, the ~50% and ~65% settings) its float folder, its 4-bit checkpoint as the
main job makes it, the one that keeps every GGUF code (``-4bit-lossless``) and the smallest
within 2% of float (``-4bit-small``: 6-bit recovery codes in groups of 32). 4-bit folders that
are missing or were made with other options are (re)built.
"""

import argparse
import json
import sys
from pathlib import Path

from sharp_mlx import bench
from sharp_mlx.convert import ensure_default_model
from sharp_mlx.data import corpora
from sharp_mlx.errors import ArgumentParser, SharpError, bits_or_none, cli
from sharp_mlx.quant.codes import DEFAULT_EMBEDDING_BITS, DEFAULT_RECOVERY_BITS, options_record, quantize_model_folder

SETTINGS = (("sharp", "default setting"), ("sharp50", "~50% setting"), ("sharp65", "~65% setting"))


def rows(recovery_bits, embedding_bits, rebuild: bool = False) -> list:
    original = ensure_default_model()
    calibration = [f for f in corpora.files("train") if f.exists()]

    def built(src: Path, out: Path, **kw) -> Path:
        kw = {"recovery_bits": recovery_bits, **kw}
        if kw.get("embedding_bits"):
            if not calibration:
                raise SharpError(
                    "the 4-bit rows fit their embedding on data/*/train.jsonl, which is missing: run `python -m "
                    "sharp_mlx.data.corpora`, or pass --embedding-bits none"
                )
            kw["calibration"] = calibration
        stale = out.exists() and json.loads((out / "config.json").read_text()).get("sharp_quantize") != options_record(
            **kw
        )
        if rebuild or stale or not out.exists():
            quantize_model_folder(src, out, force=True, **kw)
        return out

    mine = f"embedding {embedding_bits}-bit by GPTQ" if embedding_bits else "every GGUF code kept"
    out = bench.reference_rows(original)
    out += [
        bench.Row("original-4bit mlx-lm, via sharp_mlx", out[1].path, note="the same folder, loaded by sharp_mlx"),
        bench.Row(
            "original-4bit",
            built(original, Path(f"{original}-4bit"), embedding_bits=embedding_bits),
            note=f"GGUF codes, {mine}",
        ),
    ]
    for name, note in SETTINGS:
        src = Path(f"models/smollm2-135m-instruct-{name}")
        if not src.exists():
            print(
                f"skipping {name}: {src} is missing (python -m sharp_mlx.pipeline --name {src.name} ...)",
                file=sys.stderr,
            )
            continue
        out.append(bench.Row(f"{name} float", src, note=note + ", float32"))
        out.append(
            bench.Row(
                f"{name}-4bit",
                built(src, Path(f"{src}-4bit"), embedding_bits=embedding_bits),
                note=f"{note}, as the main job makes it: GGUF codes, {mine}",
            )
        )
        out.append(
            bench.Row(
                f"{name}-4bit-lossless",
                built(src, Path(f"{src}-4bit-lossless"), embedding_bits=None),
                note=note + ", every GGUF code kept (8-bit embedding)",
            )
        )
        if embedding_bits and recovery_bits:
            out.append(
                bench.Row(
                    f"{name}-4bit-small",
                    built(
                        src,
                        Path(f"{src}-4bit-small"),
                        embedding_bits=embedding_bits,
                        recovery_bits=6,
                        recovery_group_size=32,
                    ),
                    note=f"{note}, GGUF codes, {mine}, 6-bit recovery in groups of 32",
                )
            )
    return out


@cli("bench_default")
def main(argv=None):
    p = ArgumentParser(
        prog="python experiments/bench_default.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_timing_flags(p)
    p.add_argument(
        "--recovery-bits",
        type=int,
        default=DEFAULT_RECOVERY_BITS,
        help="recovery codes of the SHARP 4-bit rows (default: %(default)s, as the main job)",
    )
    p.add_argument(
        "--embedding-bits",
        type=bits_or_none,
        default=DEFAULT_EMBEDDING_BITS,
        help="embedding bits of the 4-bit rows, fitted by GPTQ (default: %(default)s, as the main job; none keeps the GGUF codes)",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the 4-bit folders even if they exist")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("experiments/results/bench"),
        help="writes OUT.md, OUT.json, OUT.png (default: %(default)s)",
    )
    args = p.parse_args(argv)
    cfg = bench.config_from(args)
    command = "python experiments/bench_default.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(bench.run(rows(args.recovery_bits, args.embedding_bits, args.rebuild), cfg, args.out, command))


if __name__ == "__main__":
    raise SystemExit(main())
