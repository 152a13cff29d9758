"""Each stage's wall time and peak memory on real shapes, as a multiple of the model's bytes, extrapolated to 3B/8B.

    python experiments/scale_bench.py --before /tmp/sharp-before --out experiments/results/scale

Models: SmolLM2-135M (real weights, from the embedded GGUF, float32) and a random-weight folder
of Llama-3.2-1B's shape (sharp_mlx.models.shapes: 16 layers, hidden 2048, MLP 8192, GQA 32/8, rope
llama3, bf16 in two shards with an index). Each stage is a fresh process of the command a user
types, timed and measured by ``/usr/bin/time -f %M`` (peak resident set, KiB): convert, SLW
(2 targets, ``--tokens`` calibration tokens, 2 Adam steps), SFT (``--sft-steps`` steps of one
256-token window, distillation), quantize (4-bit), fuse. On this CPU MLX's bf16 matmul is very
slow, so the 1B shape's heavy stages (SLW, SFT, quantize, fuse) run on its float32 import; the
bf16 import is measured by convert only. ``--before DIR`` runs convert and SFT a second time
with the package as it was (a ``git archive`` of the commit before, its ``sharp_mlx`` folder
first on PYTHONPATH): those are the stages changed here.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sharp_mlx.models.shapes import parameter_count, shape_config, write_hf_folder  # noqa: E402
from sharp_mlx.reports import markdown_table, save_figure  # noqa: E402

GB = 1e9
DATA = ROOT / "data" / "brown"
# The bounds: peak / model bytes (convert, quantize, fuse: of the larger of input and output).
BOUNDS = {
    "convert": "1.3x",
    "slw": "1.3x + 1 GB",
    "sft": "1.3x + 1 GB",
    "sft-4bit-base": "1.3x + 1 GB",
    "quantize": "1.3x",
    "fuse": "1.3x",
}
# Published Apple figures (apple.com newsroom / spec pages): GPU fp32 TFLOPS and memory bandwidth GB/s.
M_SERIES = {"M2 Pro": (6.8, 200), "M2 Max": (13.6, 400), "M3 Max (40-core)": (16.4, 400)}
MACS_GB = (16, 32, 64)
USABLE = 0.75  # of a Mac's memory a GPU process gets by default (macOS wired limit ~2/3-3/4)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


# ``python -m MODULE ARGS`` with the package imported from another folder: the editable install's finder
# (ahead of PYTHONPATH in sys.meta_path) is taken out first.
BEFORE_RUNNER = (
    "import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in repr(f)]; "
    "sys.path.insert(0, sys.argv.pop(1)); module = sys.argv.pop(1); sys.argv[0] = module; "
    "import sharp_mlx; assert sharp_mlx.__file__.startswith(sys.path[0]), sharp_mlx.__file__; "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)
REUSE: dict = {}  # (model, stage, code, note) -> a row measured by an earlier invocation (--reuse)


def measure(cmd: list, before: str = "") -> dict:
    """Run ``cmd`` (``python -m MODULE ...``) under /usr/bin/time; wall seconds and peak resident GB."""
    if before:
        cmd = [cmd[0], "-c", BEFORE_RUNNER, before, *cmd[2:]]
    tic = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "PEAK_KIB %M", *map(str, cmd)], capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr[-3000:]}")
    peak = int(next(line.split()[1] for line in r.stderr.splitlines() if line.startswith("PEAK_KIB")))
    return {"wall_s": round(wall, 1), "peak_gb": round(peak * 1024 / GB, 3), "log": r.stdout[-400:]}


def stages(name: str, source: Path, work: Path, args, before: str = "") -> list:
    """convert (source's dtype and float32), then SLW, SFT, quantize, fuse on the float32 import."""
    py = [sys.executable, "-m"]
    data = [str(DATA / "train.jsonl")]
    d = {k: work / f"{name}-{k}{'-before' if before else ''}" for k in ("own", "f32", "slw", "sft", "q4", "fused")}
    rows = []

    def row(stage, res, model_bytes, bound_bytes, tokens=None, note=""):
        res = {k: res[k] for k in ("wall_s", "peak_gb")} | ({"reused": True} if res.get("reused") else {})
        r = {"model": name, "stage": stage, "code": "before" if before else "after", **res}
        r.update(model_gb=round(model_bytes / GB, 3), bound_of_gb=round(bound_bytes / GB, 3), note=note)
        r["x_model"] = round(res["peak_gb"] * GB / bound_bytes, 2)
        if tokens:
            r.update(tokens=tokens, ms_per_token=round(1000 * res["wall_s"] / tokens, 2))
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "log"}), flush=True)

    src_bytes = folder_bytes(source) if source.is_dir() else source.stat().st_size
    if source.is_dir():  # the default: the source's own dtype (before: float32)
        res = measure([*py, "sharp_mlx.convert", "--source", source, "--out", d["own"], "--force"], before)
        out_bytes = folder_bytes(d["own"])
        kept = "float32" if out_bytes > 1.5 * src_bytes else "bf16 kept"
        row("convert", res, out_bytes, max(src_bytes, out_bytes), note=f"default: {kept}")
    if not before:
        cmd = [*py, "sharp_mlx.convert", "--source", source, "--out", d["f32"], "--dtype", "float32", "--force"]
        key = (name, "convert", "--dtype float32")
        res = REUSE[key] if key in REUSE and (d["f32"] / "config.json").exists() else measure(cmd)
        row("convert", res, folder_bytes(d["f32"]), max(src_bytes, folder_bytes(d["f32"])), note="--dtype float32")
    model = folder_bytes(work / f"{name}-f32")
    if not before:
        slw = ["--share", "next", "--layers", args.layers, "--rank", "64", "--tokens", str(args.tokens)]
        cmd = [*py, "sharp_mlx.train", "--stage", "slw", "--model", d["f32"], "--out", d["slw"], *slw]
        if (name, "slw", "2 targets, float32") in REUSE:  # the measured row; the folder made without fitting
            subprocess.run([*map(str, cmd), "--no-slw", "--data", *data, "--force"], check=True, capture_output=True)
            res = REUSE[(name, "slw", "2 targets, float32")]
        else:
            res = measure([*cmd, "--slw-steps", "2", "--data", *data, "--force"])
        row("slw", res, model, model, args.tokens * 2, "2 targets, float32")
    slw_dir = work / f"{name}-slw"
    sft = ["--sft-steps", str(args.sft_steps), "--batch-size", "1", "--seq-len", "256", "--valid-every", "1000"]
    sft += [
        "--valid-windows",
        "1",
        "--data",
        *data,
        "--valid",
        str(DATA / "valid.jsonl"),
        "--max-train-tokens",
        "20000",
    ]
    teacher = work / f"{name}-f32"
    cmd = [*py, "sharp_mlx.train", "--stage", "sft", "--model", slw_dir, "--teacher", teacher, "--out", d["sft"]]
    res = measure([*cmd, *sft, "--run-dir", work / f"run-{name}{'-before' if before else ''}", "--force"], before)
    row("sft", res, model, model, args.sft_steps * 256, "distillation, float32")
    if not before:
        res = measure([*py, "sharp_mlx.quantize", "--model", d["sft"], "--out", d["q4"], "--force"])
        row("quantize", res, model, max(model, folder_bytes(d["q4"])), note="4-bit")
        res = measure([*py, "sharp_mlx.fuse", "--model", d["sft"], "--out", d["fused"], "--force"])
        row("fuse", res, model, max(model, folder_bytes(d["fused"])), note="float16 out")
    return rows


def extrapolate(rows: list, one_b: dict, floor: float) -> dict:
    """Peaks of full 3B and 8B (bf16 on a Mac) from the 1B shape's measured multiples; times by stated arithmetic."""
    # the latest measurement of each stage: "now" rows (--add) over "after" rows
    after = {r["stage"]: r for r in rows if r["model"] == "llama-3.2-1b" and r["code"] in ("after", "now")}
    out = {}
    n1 = parameter_count(one_b)
    for shape in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"):
        c = shape_config(shape)
        n = parameter_count(c)
        bf16 = 2 * n
        peaks = {}
        for stage, r in after.items():  # the measured multiple (net of the process floor) of a bf16 model, plus it
            mult = r["x_model_net"]
            if stage == "convert":  # the bf16 import keeps bf16 (the float32 one is this CPU's need only)
                mult = min(x["x_model_net"] for x in rows if x["stage"] == "convert" and x["code"] != "before")
            peaks[stage] = round(mult * bf16 / GB + floor, 1)
        fits = {f"{m} GB": [s for s, p in peaks.items() if p <= USABLE * m] for m in MACS_GB}
        mlp = c["hidden_size"] * c["intermediate_size"]
        mlp1 = one_b["hidden_size"] * one_b["intermediate_size"]
        slw = after.get("slw")
        sft = after.get("sft")
        targets = c["num_hidden_layers"] * 9 // 30  # the default's share of targets, 9 of 30
        # CPU: SLW per target at 16,384 tokens scales with tokens x one MLP's size; SFT per token with parameters.
        slw_h = slw and slw["wall_s"] / 2 * (16384 / slw["tokens"] * 2) * mlp / mlp1 * targets / 3600
        sft_h = sft and sft["wall_s"] / sft["tokens"] * n / n1 * 1e6 / 3600
        gpu = {}
        for name, (tflops, bw) in M_SERIES.items():
            # SFT: 8 N FLOPs a token (student forward 2N + backward 4N, teacher forward 2N), at 50% of peak;
            # SLW: capture = a forward of 16,384 tokens (2N each) per target, its weights read once (N x 2 bytes).
            sft_gpu = 8 * n * 1e6 / (0.5 * tflops * 1e12) / 3600
            slw_gpu = targets * (2 * n * 16384 / (0.5 * tflops * 1e12) + 2 * n / (bw * 1e9)) / 60
            gpu[name] = {"sft_1m_tokens_h": round(sft_gpu, 2), "slw_capture_min": round(slw_gpu, 2)}
        out[shape] = {
            "params": n,
            "bf16_gb": round(bf16 / GB, 2),
            "peak_gb": peaks,
            "fits": fits,
            "cpu_slw_h": slw_h and round(slw_h, 2),
            "cpu_sft_1m_tokens_h": sft_h and round(sft_h, 1),
            "gpu": gpu,
        }
    return out


def write_report(res: dict, out: Path, command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    lines = [f"# Scale: each stage's peak memory and time on real shapes\n\n    {command}\n", __doc__.split("\n\n")[1]]
    lines += [
        f"\nEvery process holds {res['process_floor_gb']} GB before it works (Python, MLX, mlx-lm imported): "
        "'net' takes it off."
    ]
    added = [r for r in res["rows"] if r["code"] == "now"]
    if added:
        lines += [
            "\nRows of code 'now' were remeasured by hand after later changes, each by its command (the "
            "extrapolation below takes them over the 'after' rows of the same stage):\n"
        ]
        lines += [f"- {r['model']} {r['stage']}: `{r['command']}`" for r in added]
    if any(r.get("reused") for r in res["rows"]):
        lines += [
            "\nRows marked * were measured by an earlier invocation of the same script (--reuse), "
            "the others by the command above."
        ]
    header = ["model", "stage", "code", "note", "wall s", "ms/token", "peak GB", "of GB", "peak / that", "net", "bound"]
    rows = [
        [
            r["model"],
            r["stage"],
            r["code"],
            f"{r['note']}{' *' if r.get('reused') else ''}",
            r["wall_s"],
            r.get("ms_per_token", ""),
            r["peak_gb"],
            r["bound_of_gb"],
            f"{r['x_model']}x",
            f"{r['x_model_net']}x",
            BOUNDS[r["stage"]],
        ]
        for r in res["rows"]
    ]
    lines += ["\n" + markdown_table(header, rows, align=[None] * 4 + ["r"] * 6 + [None])]
    lines += ["\n## Extrapolated to full models in bf16 (a Mac)\n"]
    header = ["model", "params", "bf16 GB", "peak GB by stage", "stages that fit 16 / 32 / 64 GB (75% usable)"]
    rows = [
        [
            shape,
            f"{e['params'] / 1e9:.2f}B",
            e["bf16_gb"],
            ", ".join(f"{s} {p}" for s, p in e["peak_gb"].items()),
            " / ".join(",".join(v) or "none" for v in e["fits"].values()),
        ]
        for shape, e in res["extrapolated"].items()
    ]
    lines += [markdown_table(header, rows, align=[None, "r", "r", None, None])]
    header = [
        "model",
        "CPU here: SLW, 9/30 of layers, 16,384 tokens (h)",
        "CPU here: 1M SFT tokens (h)",
        *(f"{g}: 1M SFT tokens (h) / SLW captures (min)" for g in M_SERIES),
    ]
    rows = [
        [
            shape,
            e["cpu_slw_h"],
            e["cpu_sft_1m_tokens_h"],
            *(f"{v['sft_1m_tokens_h']} / {v['slw_capture_min']}" for v in e["gpu"].values()),
        ]
        for shape, e in res["extrapolated"].items()
    ]
    lines += ["\n" + markdown_table(header, rows, align=[None] + ["r"] * (len(header) - 1))]
    lines.append("\n" + res["arithmetic"])
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(res, out.with_suffix(".png"))


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if r["model"] == "llama-3.2-1b"]
    labels = [f"{r['stage']}\n{r['code']}\n{r['note'][:14]}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(
        range(len(rows)),
        [r["x_model"] for r in rows],
        color=[{"before": "C1", "after": "C0", "now": "C2"}[r["code"]] for r in rows],
    )
    ax.axhline(1.3, color="k", ls="--", lw=1, label="1.3x bound")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("peak RSS / model bytes")
    ax.set_title(
        "Llama-3.2-1B shape (random weights): each stage's peak memory, before (orange), after (blue), now (green)"
    )
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


ARITHMETIC = (
    "Arithmetic. Peaks: the 1B shape's measured multiple of its float32 bytes, net of the process floor, times a "
    "full model's bf16 bytes (params x 2), plus the floor; convert takes the smallest measured multiple (the bf16 "
    "import). Usable memory: 75% of the Mac's. "
    "CPU times: SLW per target = the measured time per target scaled by 16,384 / measured tokens and by one MLP's "
    "size (hidden x MLP) against the 1B's, times 9/30 of the layers as targets; 1M SFT tokens = measured seconds per "
    "token x params / 1B params x 1e6. GPU: 1M SFT tokens = 8 N FLOPs a token (student forward 2N and backward 4N, "
    "teacher forward 2N) x 1e6 / (50% of the GPU's published fp32 TFLOPS); SLW captures = per target a forward of "
    "16,384 tokens (2N FLOPs each) at 50% of peak plus reading the weights once (2N bytes at the published "
    "bandwidth). The SLW fits themselves (least squares on MLP-sized matrices) are not in the GPU figure."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "scale", help="report path stem")
    p.add_argument("--work", type=Path, default=Path("/tmp/scale-bench"), help="model folders (removed after)")
    p.add_argument("--before", help="a folder holding sharp_mlx as it was, for the before rows")
    p.add_argument("--tokens", type=int, default=1024, help="SLW calibration tokens (default: %(default)s)")
    p.add_argument("--sft-steps", type=int, default=2, help="SFT steps of one 256-token window (default: %(default)s)")
    p.add_argument("--reuse", type=Path, help="rows (JSON lines) measured by an earlier run, kept (see main)")
    p.add_argument("--skip-1b", action="store_true", help="SmolLM2 only (a quick check of the script)")
    p.add_argument("--rows-from", type=Path, help="take the rows of this earlier report (JSON) instead of measuring")
    p.add_argument(
        "--add",
        type=Path,
        help="with --rows-from: rows measured by hand (JSON lines: model, stage, note, wall_s, peak_gb, model_gb, "
        "bound_of_gb, command), added as code 'now'",
    )
    return p


def rereport(args, command: str) -> None:
    """The report of ``--rows-from``'s rows plus ``--add``'s, with the extrapolation recomputed."""
    res = json.loads(args.rows_from.read_text())
    rows = [r for r in res["rows"] if r["code"] != "now"]
    for r in map(json.loads, args.add.read_text().splitlines()) if args.add else []:
        r["code"] = "now"
        r["x_model"] = round(r["peak_gb"] / r["bound_of_gb"], 2)
        r["x_model_net"] = round((r["peak_gb"] - res["process_floor_gb"]) / r["bound_of_gb"], 2)
        rows.append(r)
    first = res["command"].split("\n")[0]
    res.update(rows=rows, command=f"{first}\n\n    {command}")
    res["extrapolated"] = extrapolate(rows, shape_config("llama-3.2-1b"), res["process_floor_gb"])
    write_report(res, args.out, res["command"])
    print(f"wrote {args.out.with_suffix('.md')}")


def main(argv=None):
    import shutil

    args = build_parser().parse_args(argv)
    command = "python experiments/scale_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.rows_from:
        return rereport(args, command)
    args.work.mkdir(parents=True, exist_ok=True)
    from sharp_mlx.convert import embedded_gguf

    imports = "import sharp_mlx.train, sharp_mlx.convert, sharp_mlx.quantize, sharp_mlx.fuse, mlx_lm"
    base = measure([sys.executable, "-c", imports])["peak_gb"]  # what any stage's process holds before its work
    rows = []
    args.layers = "24:28"  # SmolLM2: targets 25 and 27
    if args.reuse:  # rows of an earlier invocation: SmolLM2's, and the 1B's float32 import and SLW
        for r in map(json.loads, args.reuse.read_text().splitlines()):
            REUSE[(r["model"], r["stage"], r["note"])] = {**r, "reused": True}
    old = [r for k, r in REUSE.items() if k[0] == "smollm2-135m"]
    rows += old or stages("smollm2-135m", embedded_gguf(), args.work, args)
    one_b = shape_config("llama-3.2-1b")
    if not args.skip_1b:
        hf = write_hf_folder(args.work / "llama-3.2-1b-hf", one_b, shards=2)
        args.layers = "11:15"  # targets 12 and 14
        rows += stages("llama-3.2-1b", hf, args.work, args)
        if args.before:
            rows += stages("llama-3.2-1b", hf, args.work, args, before=args.before)
    for r in rows:  # the same multiple with the process's own floor (Python, MLX, mlx-lm imported) taken off
        r["x_model_net"] = round((r["peak_gb"] - base) * GB / (r["bound_of_gb"] * GB), 2)
    res = {"command": command, "rows": rows, "arithmetic": ARITHMETIC, "process_floor_gb": base}
    res["extrapolated"] = extrapolate(rows, one_b, base) if not args.skip_1b else {}
    write_report(res, args.out, command)
    shutil.rmtree(args.work, ignore_errors=True)
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
