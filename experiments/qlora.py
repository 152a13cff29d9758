"""SFT on a 4-bit base (as mlx-lm's QLoRA) against SFT on the float base, at one budget, on SmolLM2-135M.

    ./scripts/run.sh                       # the main job: its SLW folder, float SFT and 4-bit checkpoint
    python experiments/qlora.py --out experiments/results/qlora

Float base (the main job's path): the main job's SLW folder -> SFT (the default recipe) -> 4-bit
(the main job's quantize settings: GGUF codes, 5-bit embedding, 8-bit recovery codes). At the
recipe's budget this is the main job's own 4-bit checkpoint, taken as it is.
4-bit base: the same SLW folder -> 4-bit with the same settings but float32 recovery factors ->
SFT with the same recipe and budget (the frozen weights and the teacher 4-bit, the factors
trained in float) -> its output, already 4-bit.

MLX's CPU quantized matmul is ~25x slower than float for many-token batches, so on this machine
the 4-bit path's full budget trains on its *float twin*: the same 4-bit base and 4-bit teacher
with every code replaced by its float value, in float32 (the linear layers then agree with the
quantized matmul to ~1e-6; MLX's quantized embedding returns its rows rounded to float16, the
twin's are not rounded). The trained factors are then put back into the 4-bit base, which
is the folder evaluated. The user's command on the 4-bit base itself runs ``--probe-steps`` steps,
and so does the twin, from the same seed: their losses step by step show the two are the same
computation, and the probe gives the 4-bit path's own time per step and peak memory.
All models are evaluated on the five domains' test windows with the main job's settings, 4-bit ones
by their float values (as the frontier and the bench do). A step whose folder and record
(``WORK/steps/NAME.json``) exist, made by the same command, is kept: an interrupted run resumes. Each SFT
and quantize is a fresh process of the user's command under ``/usr/bin/time`` (wall time, peak
resident memory).
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from scale_bench import folder_bytes, measure  # noqa: E402

from sharp_mlx import evaluate  # noqa: E402
from sharp_mlx.data import corpora  # noqa: E402
from sharp_mlx.io.checkpoint import load_model, read_config, save  # noqa: E402
from sharp_mlx.quant.codes import dequantized  # noqa: E402
from sharp_mlx.recipes import preset  # noqa: E402
from sharp_mlx.recovery.teacher import load_teacher  # noqa: E402
from sharp_mlx.reports import geomean_ratio, markdown_table, write_atomic  # noqa: E402

NAME = "smollm2-135m-instruct"
QUANT_KEYS = ("quantization", "quantization_config", "sharp_quantize")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=Path, default=ROOT / "models", help="the main job's model folders")
    p.add_argument("--data", type=Path, default=ROOT / "data", help="the five domains (python -m sharp_mlx.corpora)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "qlora", help="both paths' folders")
    p.add_argument("--sft-steps", type=int, help="SFT steps of both runs (default: the recipe's)")
    p.add_argument("--probe-steps", type=int, default=2, help="steps of SFT on the 4-bit base itself (default: 2)")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "qlora", help="report path stem")
    return p


def float_twins(base: Path, teacher: Path, work: Path) -> tuple:
    """The 4-bit base and its 4-bit teacher (as SFT builds it) with every code replaced by its float value."""
    student, config = load_model(base)
    t, _ = load_teacher(teacher, student)
    out = (work / f"{base.name}-float-twin", work / "teacher-4bit-float-twin")
    for model, cfg, folder, tok in ((t, read_config(teacher), out[1], teacher), (student, config, out[0], base)):
        save(
            folder,
            dequantized(model, mx.float32),
            {k: v for k, v in cfg.items() if k not in QUANT_KEYS},
            tok,
            force=True,
        )
    return out


def put_back(base: Path, trained: Path, out: Path) -> None:
    """The 4-bit base with the recovery factors of ``trained`` (its float twin after SFT)."""
    model, config = load_model(base)
    src, _ = load_model(trained)
    for layer, other in zip(model.model.layers, src.model.layers):
        if "recovery" in layer:
            layer.recovery.update(other.recovery.parameters())
    save(out, model, config, base, force=True)


def run_paths(args, r) -> dict:
    """Both paths; {path: {folder, steps: {name: wall, peak, command, [history]}}}."""
    py = [sys.executable, "-m"]
    slw, work, teacher = args.models / f"{NAME}-sharp-slw", args.work, args.models / NAME
    train, valid = corpora.files("train", args.data), corpora.files("valid", args.data)
    steps = args.sft_steps or r.sft_steps

    def quantize(src, out, *extra):  # the main job's 4-bit settings
        cmd = [*py, "sharp_mlx.quantize", "--model", src, "--out", out, "--embedding-bits", r.embedding_bits]
        return cmd + ["--calibration", *train, "--calibration-windows", r.calibration_windows, *extra, "--force"]

    def sft(src, out, n, teacher=teacher):
        cmd = [*py, "sharp_mlx.train", "--stage", "sft", "--preset", "default", "--model", src, "--out", out]
        cmd += ["--teacher", teacher, "--run-dir", work / f"run-{out.name}", "--force"]
        return cmd + ["--data", *train, "--valid", *valid, "--sft-steps", n]

    def run(path, name, cmd):  # a step whose folder and record exist, made by the same command, is kept (resume)
        out = Path(cmd[cmd.index("--out") + 1])
        record = work / "steps" / f"{out.name}.json"
        kept = json.loads(record.read_text()) if record.exists() else None
        if kept and kept["command"] == _show(cmd) and (out / "config.json").exists():
            res[path]["steps"][name] = kept
            return
        m = measure(cmd)
        rec = {"wall_s": m["wall_s"], "peak_gb": m["peak_gb"], "command": _show(cmd)}
        if (out / "training.json").exists():
            summary = json.loads((out / "training.json").read_text())[-1]["summary"]
            rec.update({k: summary[k] for k in ("train_history", "valid_history", "steady_tokens_per_s")})
        res[path]["steps"][name] = rec
        write_atomic(record, json.dumps(rec, indent=1))

    main_job = args.models / f"{NAME}-sharp-4bit"
    if steps == r.sft_steps and (main_job / "config.json").exists():
        res = {"float base": {"folder": str(main_job), "steps": {}}}
        res["float base"]["reused"] = "the main job's 4-bit checkpoint (./scripts/run.sh): the same recipe and budget"
    else:
        res = {"float base": {"folder": str(work / "sft-float-4bit"), "steps": {}}}
        run("float base", "sft", sft(slw, work / "sft-float", steps))
        q = quantize(work / "sft-float", work / "sft-float-4bit", "--recovery-bits", r.recovery_bits)
        run("float base", "quantize", q)

    path, base = "4-bit base", work / "slw-4bit-base"
    res[path] = {"folder": str(work / "sft-on-4bit"), "steps": {}}
    run(path, "quantize", quantize(slw, base, "--recovery-dtype", "float32"))
    twin, twin_teacher = float_twins(base, teacher, work)
    probes = [f"sft, {args.probe_steps} steps on the 4-bit base", f"sft, {args.probe_steps} steps on its float twin"]
    run(path, probes[0], sft(base, work / "probe-4bit", args.probe_steps))
    run(path, probes[1], sft(twin, work / "probe-twin", args.probe_steps, twin_teacher))
    res[path]["probes"] = probes
    run(path, "sft on the float twin", sft(twin, work / "sft-on-4bit-twin", steps, twin_teacher))
    put_back(base, work / "sft-on-4bit-twin", work / "sft-on-4bit")
    return res


def _show(cmd) -> str:
    return "python -m " + " ".join(str(c).replace(str(ROOT) + "/", "") for c in cmd[2:])


def main(argv=None):
    args = build_parser().parse_args(argv)
    command = "python experiments/qlora.py " + " ".join(argv if argv is not None else sys.argv[1:])
    r = preset("default")
    for folder in (args.models / NAME, args.models / f"{NAME}-sharp-slw"):
        if not (folder / "config.json").exists():
            raise SystemExit(f"{folder} is missing: run ./scripts/run.sh (the main job) first")
    paths = run_paths(args, r)
    rows = {"original": args.models / NAME, **{p: Path(v["folder"]) for p, v in paths.items()}}
    tests = corpora.files("test", args.data)
    ppl = evaluate.evaluate(
        list(rows.values()), tests, seq_len=r.seq_len, max_windows=r.eval_windows, float_weights=True
    )
    per = {
        label: {Path(t).parent.name: ppl[str(folder)][str(t)]["ppl"] for t in tests} for label, folder in rows.items()
    }
    res = {"command": command, "sft_steps": args.sft_steps or r.sft_steps, "paths": paths, "ppl": per, "rows": []}
    for label, folder in rows.items():
        geo, worst = geomean_ratio(per[label], per["original"])
        res["rows"].append({"model": label, "bytes": folder_bytes(folder), "geo_ratio": geo, "worst_ratio": worst})
    write_report(res, args.out)
    print(f"wrote {args.out.with_suffix('.md')}")


def probe_table(path: dict) -> list:
    """Step-by-step training loss of the two probes (the 4-bit base and its float twin)."""
    a, b = (path["steps"][name]["train_history"] for name in path["probes"])
    return [[s, f"{x:.6f}", f"{y:.6f}", f"{abs(x - y):.2e}"] for (s, x), (_, y) in zip(a, b)]


def write_report(res: dict, out: Path) -> None:
    domains = list(res["ppl"]["original"])
    header = ["model", "MB", *domains, "geo. ratio", "worst ratio"]
    rows = [
        [r["model"], f"{r['bytes'] / 1e6:.1f}", *(f"{res['ppl'][r['model']][d]:.2f}" for d in domains)]
        + [f"{r['geo_ratio']:.3f}x", f"{r['worst_ratio']:.3f}x"]
        for r in res["rows"]
    ]
    steps = [
        [
            path,
            name + (f" ({v['note']})" if "note" in v else ""),
            *(v[k] if v[k] is not None else "-" for k in ("wall_s", "peak_gb")),
        ]
        + [f"{v['steady_tokens_per_s']:.1f}" if "steady_tokens_per_s" in v else "", f"`{v['command']}`"]
        for path, p in res["paths"].items()
        for name, v in p["steps"].items()
    ]
    reused = [f"- {path}: {p['reused']}." for path, p in res["paths"].items() if "reused" in p]
    lines = [
        "# SFT on a 4-bit base against SFT on the float base (SmolLM2-135M)\n",
        f"    {res['command']}\n",
        "\n\n".join(__doc__.split("\n\n")[2:5]),
        f"\nBoth paths: {res['sft_steps']} SFT steps of the default recipe. Test perplexity per domain "
        "(MB: the stored weights):\n",
        markdown_table(header, rows, align=[None] + ["r"] * (len(header) - 1)),
        "\nThe probes' training loss, step by step (the same seed and batches):\n",
        markdown_table(
            ["step", "4-bit base", "float twin", "difference"], probe_table(res["paths"]["4-bit base"]), align=["r"] * 4
        ),
        "\nEach step, a fresh process on this machine (Linux x86_64, 2 cores, MLX's CPU backend; "
        "tokens/s: SFT's steady rate):\n",
        markdown_table(["path", "step", "wall s", "peak GB", "tokens/s", "command"], steps),
        *(["\nTaken as they are:\n", *reused] if reused else []),
    ]
    write_atomic(out.with_suffix(".json"), json.dumps(res, indent=2, default=str))
    write_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
