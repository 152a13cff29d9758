"""The main job: import -> share -> SLW -> SFT -> evaluate -> 4-bit -> generate, on the embedded model.

    python -m sharp_mlx.pipeline                 # the default setting, ~20 minutes on 2 CPU cores (no other jobs)
    python -m sharp_mlx.pipeline --sft-steps 2000 --tokens 131072   # a bigger run
    python -m sharp_mlx.pipeline --share next:2 --layers 2:29 --name smollm2-135m-instruct-sharp50   # the ~50% setting
    python -m sharp_mlx.pipeline --model ~/hf/Llama-3.2-1B   # your model: next over 0.37:0.97 of its depth

``--model`` takes a model folder (an imported one or a Hugging Face one, used in place), a hub id or
a GGUF (imported into models/ once, keeping its dtype); outputs are named after it. On any model
but the default the share map is derived from its depth (``sharp_mlx.user_model``).

Every step leaves its output folder and is skipped when that folder exists, so an interrupted
run continues where it stopped (``--force`` redoes everything). Each step calls the function
behind the command a user would type (``train.run_stage`` for ``python -m sharp_mlx.train``,
``quantize.quantize_model_folder``, ``evaluate.evaluate``, ``generate.answer``) with its config.
"""

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Callable

from . import analyze, corpora, evaluate, generate, quantize, train, user_model
from .convert import ensure_default_model
from .errors import ArgumentParser, SharpError, bits_or_none, cli
from .recipes import PRESETS, Recipe, preset, sft_fields, slw_fields
from .sft import SFTConfig
from .user_model import DEPTH

ANALYSIS = Path("runs") / "analyze" / "analysis.json"


def ensure_data(data: Path) -> None:
    if all(f.exists() for f in corpora.files("test", data)):
        return
    print("fetching the five text domains (package registries only) ...", flush=True)
    try:
        print(corpora.format_table(corpora.fetch(out=data)))
    except corpora.FetchError as e:
        raise SharpError(f"building the corpora failed: {e}")


def step(name: str, out: Path, run: Callable[[bool], object], force: bool, what: str = "") -> None:
    """Run ``run(force)`` unless its output folder exists (and ``force`` is not set)."""
    if out.exists() and not force:
        print(f"[{name}] {out} exists, skipping (--force redoes it)", flush=True)
        return
    print(f"[{name}] {what or out}", flush=True)
    run(out.exists())


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sharp_mlx.pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="the recipe whose budgets the flags below override (default: %(default)s)",
    )
    d = PRESETS["default"]
    # Every recipe flag defaults to the preset's value: only the flags given reach the namespace.
    for name, kind in (
        ("share", str),
        ("layers", str),
        ("cut", float),
        ("rank", int),
        ("recovery", str),
        ("scales_init", str),
        ("slw_order", str),
        ("slw_objective", str),
        ("tokens", int),
        ("slw_steps", int),
        ("sft_steps", int),
        ("eval_windows", int),
        ("recovery_bits", bits_or_none),
        ("embedding_bits", bits_or_none),
        ("max_tokens", int),
    ):
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=argparse.SUPPRESS,
            help=f"{Recipe.help(name)} (default preset: {getattr(d, name)})",
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
    return p


@cli("sharp_mlx.pipeline")
def main(argv=None):
    args = build_parser().parse_args(argv)
    own = {"preset", "name", "data", "force", "model", "depth"}
    r = preset(args.preset, **{k: v for k, v in vars(args).items() if k not in own})
    tic = time.perf_counter()
    if args.model is None:
        if args.depth is not None:
            raise SharpError("--depth derives the share map of a --model: pass --model, or --layers for this one")
        original = ensure_default_model()
        args.name = args.name or "smollm2-135m-instruct-sharp"
    else:
        original = user_model.model_folder(args.model)
        r = user_model.recipe_for(r, original, set(vars(args)), args.depth)
        args.name = args.name or f"{user_model.model_name(args.model)}-sharp"
        print(f"[model] {user_model.describe(original, r)}, rank {r.rank}", flush=True)
    ensure_data(args.data)
    if r.share == "auto" and not ANALYSIS.exists():  # auto picks targets from the layer analysis
        step("analyze", ANALYSIS, lambda force: analyze.main(["--out", str(ANALYSIS.parent)]), False)
    # next / next:K take the recipe's range; auto searches train's unless told; a JSON map names its layers.
    fields = {**slw_fields(r), **({"layers": r.layers} if "layers" in vars(args) or args.model else {})}
    slw_out = Path("models") / f"{args.name}-slw"
    final = Path("models") / args.name
    slw = train.SLWRun(model=original, out=slw_out, data=corpora.files("train", args.data), **fields)
    step(
        "slw",
        slw_out,
        lambda force: train.run_stage(slw, force),
        args.force,
        f"{slw.share} {slw.layers or ''} rank {slw.rank} -> {slw_out}",
    )
    run_dir = Path("runs") / args.name
    if args.force:
        shutil.rmtree(run_dir, ignore_errors=True)
    config = SFTConfig(**sft_fields(r))
    sft = train.SFTRun(
        model=slw_out,
        out=final,
        sft=config,
        teacher=original,
        data=corpora.files("train", args.data),
        valid=corpora.files("valid", args.data),
        max_train_tokens=r.max_train_tokens,
        run_dir=run_dir,
        resume=(run_dir / "checkpoint.json").exists(),
    )  # an interrupted SFT continues
    step(
        "sft",
        final,
        lambda force: train.run_stage(sft, force),
        args.force,
        f"{config.steps} steps of {config.batch_size} x {config.seq_len} tokens -> {final}",
    )
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
    options = quantize.QuantizeOptions(
        recovery_bits=r.recovery_bits,
        embedding_bits=r.embedding_bits,
        calibration_windows=r.calibration_windows,
        calibration=corpora.files("train", args.data) if r.embedding_bits else None,
    )
    step(
        "quantize",
        q4,
        lambda force: print(quantize.summary(quantize.quantize_model_folder(final, q4, options, force=force))),
        args.force,
        f"{options} -> {q4}",
    )
    for model in (original, final, q4):
        print(f"\n[generate] {model}", flush=True)
        _, timing = generate.answer(model, max_tokens=r.max_tokens, echo=lambda text: print(text, end="", flush=True))
        print(f"\n{timing.line()}", flush=True)
    print(f"\npipeline done in {(time.perf_counter() - tic) / 60:.1f} min; recovered model: {final}, 4-bit: {q4}")


if __name__ == "__main__":
    raise SystemExit(main())
