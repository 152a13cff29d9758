"""SFT on a 4-bit base (as mlx-lm's QLoRA) against SFT on the float base, at one budget, on SmolLM2-135M.

    ./scripts/run.sh                       # the main job: its SLW folder, float SFT and 4-bit checkpoint
    python experiments/qlora.py --out experiments/results/qlora

Float base (the main job's path): the main job's SLW folder -> SFT (the default recipe) -> 4-bit
(the main job's quantize settings: GGUF codes, 5-bit embedding, 8-bit recovery codes).
4-bit base: the same SLW folder -> 4-bit with the same settings but float32 recovery factors ->
SFT with the same recipe and budget (the frozen weights and the teacher 4-bit, the factors
trained in float) -> its output, already 4-bit.
Both, and the original, are evaluated on the five domains' test windows with the main job's
settings. Each SFT and quantize is a fresh process of the user's command under ``/usr/bin/time``
(wall time, peak resident memory).
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from scale_bench import folder_bytes, measure  # noqa: E402

from sharp_mlx import evaluate  # noqa: E402
from sharp_mlx.data import corpora  # noqa: E402
from sharp_mlx.recipes import preset  # noqa: E402
from sharp_mlx.reports import geomean_ratio, markdown_table, write_atomic  # noqa: E402

NAME = "smollm2-135m-instruct"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=ROOT / "models", help="the main job's model folders")
    p.add_argument("--data", type=Path, default=ROOT / "data", help="the five domains (python -m sharp_mlx.corpora)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "qlora", help="both paths' folders")
    p.add_argument("--sft-steps", type=int, help="SFT steps of both runs (default: the recipe's)")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "qlora", help="report path stem")
    return p


def run_paths(args, r) -> dict:
    """Both paths from the main job's SLW folder; {path: {folder, steps: {name: wall, peak, command}}}."""
    py = [sys.executable, "-m"]
    slw, work = args.models / f"{NAME}-sharp-slw", args.work
    train, valid = corpora.files("train", args.data), corpora.files("valid", args.data)
    steps = args.sft_steps or r.sft_steps

    def quantize(src, out, *extra):  # the main job's 4-bit settings
        cmd = [*py, "sharp_mlx.quantize", "--model", src, "--out", out, "--embedding-bits", r.embedding_bits]
        return cmd + ["--calibration", *train, "--calibration-windows", r.calibration_windows, *extra, "--force"]

    def sft(src, out):
        cmd = [*py, "sharp_mlx.train", "--stage", "sft", "--preset", "default", "--model", src, "--out", out]
        cmd += ["--teacher", args.models / NAME, "--run-dir", work / f"run-{out.name}", "--force"]
        return cmd + ["--data", *train, "--valid", *valid, "--sft-steps", steps]

    plans = {
        "float base": [
            ("sft", sft(slw, work / "sft-float")),
            ("quantize", quantize(work / "sft-float", work / "sft-float-4bit", "--recovery-bits", r.recovery_bits)),
        ],
        "4-bit base": [
            ("quantize", quantize(slw, work / "slw-4bit-base", "--recovery-dtype", "float32")),
            ("sft", sft(work / "slw-4bit-base", work / "sft-on-4bit")),
        ],
    }
    res = {}
    for path, plan in plans.items():
        res[path] = {"folder": str(plan[-1][1][plan[-1][1].index("--out") + 1]), "steps": {}}
        for name, cmd in plan:
            m = measure(cmd)
            res[path]["steps"][name] = {"wall_s": m["wall_s"], "peak_gb": m["peak_gb"], "command": _show(cmd)}
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
    ppl = evaluate.evaluate(list(rows.values()), tests, seq_len=r.seq_len, max_windows=r.eval_windows)
    per = {
        label: {Path(t).parent.name: ppl[str(folder)][str(t)]["ppl"] for t in tests} for label, folder in rows.items()
    }
    res = {"command": command, "sft_steps": args.sft_steps or r.sft_steps, "paths": paths, "ppl": per, "rows": []}
    for label, folder in rows.items():
        geo, worst = geomean_ratio(per[label], per["original"])
        res["rows"].append({"model": label, "bytes": folder_bytes(folder), "geo_ratio": geo, "worst_ratio": worst})
    write_report(res, args.out)
    print(f"wrote {args.out.with_suffix('.md')}")


def write_report(res: dict, out: Path) -> None:
    domains = list(res["ppl"]["original"])
    header = ["model", "MB", *domains, "geo. ratio", "worst ratio"]
    rows = [
        [r["model"], f"{r['bytes'] / 1e6:.1f}", *(f"{res['ppl'][r['model']][d]:.2f}" for d in domains)]
        + [f"{r['geo_ratio']:.3f}x", f"{r['worst_ratio']:.3f}x"]
        for r in res["rows"]
    ]
    steps = [
        [path, name, v["wall_s"], v["peak_gb"], f"`{v['command']}`"]
        for path, p in res["paths"].items()
        for name, v in p["steps"].items()
    ]
    lines = [
        "# SFT on a 4-bit base against SFT on the float base (SmolLM2-135M)\n",
        f"    {res['command']}\n",
        __doc__.split("\n\n")[2],
        f"\nBoth SFT runs: {res['sft_steps']} steps of the default recipe. Test perplexity per domain "
        "(MB: the stored weights):\n",
        markdown_table(header, rows, align=[None] + ["r"] * (len(header) - 1)),
        "\nEach step, a fresh process on this machine (Linux x86_64 CPU, MLX's CPU backend):\n",
        markdown_table(["path", "step", "wall s", "peak GB", "command"], steps),
    ]
    write_atomic(out.with_suffix(".json"), json.dumps(res, indent=2, default=str))
    write_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
