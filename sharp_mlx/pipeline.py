"""The main job: import -> share -> SLW -> SFT -> evaluate -> 4-bit -> generate, on the embedded model.

    python -m sharp_mlx.pipeline                 # the default setting, ~20 minutes on 2 CPU cores (no other jobs)
    python -m sharp_mlx.pipeline --sft-steps 2000 --tokens 131072   # a bigger run
    python -m sharp_mlx.pipeline --share next:2 --layers 2:29 --name smollm2-135m-instruct-sharp50   # the ~50% setting
    python -m sharp_mlx.pipeline --model ~/hf/Llama-3.2-1B   # your model: next over 0.37:0.97 of its depth

``--model`` takes a model folder (an imported one or a Hugging Face one, used in place), a hub id or
a GGUF (imported into models/ once, keeping its dtype); outputs are named after it. On any model
but the default the share map is derived from its depth (``sharp_mlx.io.user_model``).

Every step leaves its output folder and is skipped when that folder exists, so an interrupted
run continues where it stopped (``--force`` redoes everything). Each step calls the function
behind the command a user would type (``recovery.stages.run_stage`` behind ``python -m sharp_mlx.train``,
``quantize.quantize_model_folder``, ``evaluate.evaluate``, ``generate.answer``) with its config.
"""

import argparse
import json
import shutil
import time
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Callable, Optional

from . import advise, analyze, generate, options
from . import quantize as quantize_cmd
from .convert import ensure_default_model
from .data import corpora
from .errors import ArgumentParser, SharpError, cli
from .eval import perplexity as evaluate
from .io import user_model
from .io.user_model import DEPTH
from .quant import codes as quantize
from .recipes import PRESETS, Recipe
from .recovery.stages import ANALYSIS, SFTRun, SLWRun, recorded_settings, run_stage, settings_of

ADVICE = Path("runs") / "advise"  # the advisor's reports, one per model: runs/advise/<name>.{md,json,png}
# The advisor at cheap settings: it only says whether sharing pays here, before the hours of training.
ADVISE_ARGS = ["--tokens", "1024", "--damage-windows", "1", "--gptq-bits"]


def ensure_data(data: Path) -> None:
    if all(f.exists() for f in corpora.files("test", data)):
        return
    print("fetching the five text domains (package registries only) ...", flush=True)
    try:
        print(corpora.format_table(corpora.fetch(out=data)))
    except corpora.FetchError as e:
        raise SharpError(f"building the corpora failed: {e}")


def step(
    name: str, out: Path, run: Callable[[bool], object], force: bool, what: str = "", settings: Optional[dict] = None
) -> None:
    """Run ``run(force)`` unless its output folder exists (and ``force`` is not set). An existing
    folder made with other ``settings`` than these (as its record says) is refused, naming the field."""
    if out.exists() and not force:
        check_same_settings(name, out, settings)
        print(f"[{name}] {out} exists, skipping (--force redoes it)", flush=True)
        return
    print(f"[{name}] {what or out}", flush=True)
    run(out.exists())


def recorded(out: Path) -> Optional[dict]:
    """What the folder ``out`` records about how it was made: a training stage's settings, or quantize's options."""
    found = recorded_settings(out)
    if found is None and (out / "config.json").exists():
        try:
            found = json.loads((out / "config.json").read_text()).get("sharp_quantize")
        except (json.JSONDecodeError, AttributeError):
            found = None
    return found


def check_same_settings(name: str, out: Path, settings: Optional[dict]) -> None:
    if settings is None:
        return
    before = recorded(out)
    if before is None:
        print(f"[{name}] {out} records no settings (made before they were recorded): reusing it unchecked", flush=True)
        return
    settings = json.loads(json.dumps(settings))  # tuples as lists, paths as text: as they were recorded
    for key, (old, new) in differences(before, settings).items():
        raise SharpError(
            f"[{name}] {out} was made with {key}={old!r}, this run asks for {key}={new!r}: pass --force to redo it, or "
            "choose another --name"
        )


def differences(before: dict, now: dict, prefix: str = "") -> dict:
    """{field: (recorded, now)} for each field both record and that differs; nested dicts by dotted names."""
    found = {}
    for key, value in now.items():
        if key not in before:
            continue
        if isinstance(value, dict) and isinstance(before[key], dict):
            found.update(differences(before[key], value, f"{prefix}{key}."))
        elif before[key] != value:
            found[f"{prefix}{key}"] = (before[key], value)
    return found


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


def advise_first(model: Path, data: Path, name: str) -> None:
    """Run the advisor on ``model`` (skipped when its report exists) and print its verdict."""
    prefix = ADVICE / name
    report = prefix.with_suffix(".json")
    if not report.exists():
        print(f"[advise] will sharing pay on {model}? -> {prefix}.md", flush=True)
        args = ["--model", str(model), "--data", *map(str, corpora.files("train", data)), *ADVISE_ARGS]
        if advise.main([*args, "--out", str(prefix)]):
            raise SharpError("the advisor failed (its error is above): rerun with --no-advise to skip it")
    rep = json.loads(report.read_text())
    print(f"[advise] sharing {rep['verdict']} here ({prefix}.md); next: {rep['next_command']}", flush=True)


@cli("sharp_mlx.pipeline")
def main(argv=None):
    args = build_parser().parse_args(argv)
    r = options.recipe_from(args, args.preset, RECIPE_FIELDS)
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
    if not args.no_advise:
        advise_first(original, args.data, args.name)
    if r.share == "auto" and not ANALYSIS.exists():  # auto picks targets from the layer analysis
        step("analyze", ANALYSIS, lambda force: analyze.main(["--out", str(ANALYSIS.parent)]), False)
    slw_out = Path("models") / f"{args.name}-slw"
    final = Path("models") / args.name
    slw = SLWRun(original, slw_out, r, data=corpora.files("train", args.data), analysis=ANALYSIS)
    step("slw", slw_out, lambda force: run_stage(slw, force), args.force, f"{r.share} rank {r.rank} -> {slw_out}",
         settings_of(slw))  # fmt: skip
    run_dir = Path("runs") / args.name
    if args.force:
        shutil.rmtree(run_dir, ignore_errors=True)
    sft = SFTRun(slw_out, final, r, teacher=original, data=corpora.files("train", args.data),
                 valid=corpora.files("valid", args.data), run_dir=run_dir,
                 resume=(run_dir / "checkpoint.json").exists())  # fmt: skip  # an interrupted SFT continues
    what = f"{r.sft_steps} steps of {r.batch_size} x {r.seq_len} tokens -> {final}"
    step("sft", final, lambda force: run_stage(sft, force), args.force, what, settings_of(sft))
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
    q_options = quantize.QuantizeOptions(
        recovery_bits=r.recovery_bits,
        embedding_bits=r.embedding_bits,
        calibration_windows=r.calibration_windows,
        calibration=corpora.files("train", args.data) if r.embedding_bits else None,
    )
    step(
        "quantize",
        q4,
        lambda force: print(quantize_cmd.summary(quantize.quantize_model_folder(final, q4, q_options, force=force))),
        args.force,
        f"{q_options} -> {q4}",
        q_options.record(),
    )
    for model in (original, final, q4):
        print(f"\n[generate] {model}", flush=True)
        _, timing = generate.answer(model, max_tokens=r.max_tokens, echo=lambda text: print(text, end="", flush=True))
        print(f"\n{timing.line()}", flush=True)
    print(f"\npipeline done in {(time.perf_counter() - tic) / 60:.1f} min; recovered model: {final}, 4-bit: {q4}")


if __name__ == "__main__":
    raise SystemExit(main())
