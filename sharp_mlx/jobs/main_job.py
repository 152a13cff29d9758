"""The main job as a library function: import -> share -> SLW -> SFT -> evaluate -> 4-bit -> generate.

``run_main_job(MainJob(...))`` is what ``python -m sharp_mlx.pipeline`` runs. Every step leaves its
output folder and is skipped when that folder exists and records the same settings, so an
interrupted run continues where it stopped (``force`` redoes everything). Each step calls the
function behind the command a user would type (``recovery.stages.run_stage`` behind ``train``,
``quant.codes.quantize_model_folder``, ``eval.perplexity.evaluate``, ``generate.answer``).
"""

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .. import advise, analyze, generate
from .. import quantize as quantize_cmd
from ..convert import ensure_default_model
from ..data import corpora
from ..errors import SharpError
from ..eval import perplexity as evaluate
from ..io import user_model
from ..quant import codes as quantize
from ..recipes import PRESETS, Recipe
from ..recovery.stages import ANALYSIS, SFTRun, SLWRun, recorded_settings, run_stage, settings_of

DEFAULT_NAME = "smollm2-135m-instruct-sharp"


@dataclass
class MainJob:
    """What the main job runs: a recipe on a model, with its outputs named ``name``."""

    recipe: Recipe = PRESETS["default"]
    model: Optional[str] = None  # a folder, hub id or GGUF (None: the embedded SmolLM2-135M-Instruct)
    depth: Optional[str] = None  # with model: next over this span of fractions of depth (None: user_model.DEPTH)
    name: Optional[str] = None  # output name under models/ (None: from the model)
    data: Path = Path("data")  # the corpora folder
    force: bool = False  # redo every step
    advise: bool = True  # run the advisor first
    given: set = field(default_factory=set)  # the recipe fields the user set (a model's own map yields to them)


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


def resolve_model(job: MainJob):
    """(the original's folder, the recipe for it, the output name)."""
    r = job.recipe
    if job.model is None:
        if job.depth is not None:
            raise SharpError("--depth derives the share map of a --model: pass --model, or --layers for this one")
        return ensure_default_model(), r, job.name or DEFAULT_NAME
    original = user_model.model_folder(job.model)
    r = user_model.recipe_for(r, original, job.given, job.depth)
    print(f"[model] {user_model.describe(original, r)}, rank {r.rank}", flush=True)
    return original, r, job.name or f"{user_model.model_name(job.model)}-sharp"


def train_stages(job: MainJob, original: Path, r: Recipe, name: str) -> tuple:
    """SLW then SFT; (the SLW folder, the recovered folder, the run folder)."""
    if r.share == "auto" and not ANALYSIS.exists():  # auto picks targets from the layer analysis
        step("analyze", ANALYSIS, lambda force: analyze.main(["--out", str(ANALYSIS.parent)]), False)
    slw_out, final = Path("models") / f"{name}-slw", Path("models") / name
    slw = SLWRun(original, slw_out, r, data=corpora.files("train", job.data), analysis=ANALYSIS)
    what = f"{r.share} rank {r.rank} -> {slw_out}"
    step("slw", slw_out, lambda force: run_stage(slw, force), job.force, what, settings_of(slw))
    run_dir = Path("runs") / name
    if job.force:
        shutil.rmtree(run_dir, ignore_errors=True)
    sft = SFTRun(slw_out, final, r, teacher=original, data=corpora.files("train", job.data),
                 valid=corpora.files("valid", job.data), run_dir=run_dir,
                 resume=(run_dir / "checkpoint.json").exists())  # fmt: skip  # an interrupted SFT continues
    what = f"{r.sft_steps} steps of {r.batch_size} x {r.seq_len} tokens -> {final}"
    step("sft", final, lambda force: run_stage(sft, force), job.force, what, settings_of(sft))
    return slw_out, final, run_dir


def perplexity_table(job: MainJob, r: Recipe, original: Path, slw_out: Path, final: Path, run_dir: Path) -> dict:
    """Test perplexity of the original, the SLW model and the recovered one; printed, saved and plotted."""
    tests = corpora.files("test", job.data)
    report = run_dir / "perplexity.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    results = evaluate.evaluate([original, slw_out, final], tests, seq_len=r.seq_len, max_windows=r.eval_windows)
    report.write_text(json.dumps(results, indent=2))
    evaluate.plot(results, report.with_suffix(".png"))
    print(evaluate.markdown_table(results, r.seq_len))
    base = results[str(original)]
    ratios = {Path(t).parent.name: results[str(final)][t]["ppl"] / base[t]["ppl"] for t in base}
    print("recovered / original perplexity: " + ", ".join(f"{d} {x:.2f}x" for d, x in ratios.items()))
    return results


def four_bit(job: MainJob, r: Recipe, final: Path, name: str) -> Path:
    q4 = Path("models") / f"{name}-4bit"
    q_options = quantize.QuantizeOptions(
        recovery_bits=r.recovery_bits,
        embedding_bits=r.embedding_bits,
        calibration_windows=r.calibration_windows,
        calibration=corpora.files("train", job.data) if r.embedding_bits else None,
    )
    run = lambda force: print(quantize_cmd.summary(quantize.quantize_model_folder(final, q4, q_options, force=force)))  # noqa: E731
    step("quantize", q4, run, job.force, f"{q_options} -> {q4}", q_options.record())
    return q4


def run_main_job(job: MainJob) -> dict:
    """The whole main job; {original, slw, recovered, 4bit} folders."""
    tic = time.perf_counter()
    original, r, name = resolve_model(job)
    ensure_data(job.data)
    if job.advise:
        advise_first(original, job.data, name)
    slw_out, final, run_dir = train_stages(job, original, r, name)
    perplexity_table(job, r, original, slw_out, final, run_dir)
    q4 = four_bit(job, r, final, name)
    for model in (original, final, q4):
        print(f"\n[generate] {model}", flush=True)
        _, timing = generate.answer(model, max_tokens=r.max_tokens, echo=lambda text: print(text, end="", flush=True))
        print(f"\n{timing.line()}", flush=True)
    print(f"\npipeline done in {(time.perf_counter() - tic) / 60:.1f} min; recovered model: {final}, 4-bit: {q4}")
    return {"original": original, "slw": slw_out, "recovered": final, "4bit": q4}
