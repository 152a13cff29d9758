"""Will sharing pay on this model? A verdict in minutes, before hours of training.

    python -m sharp_mlx.advise --model models/smollm2-135m-instruct --out runs/advise/advise
    python -m sharp_mlx.advise --model DIR --data a.jsonl b.jsonl --budget-mb 70 --rank 64 --out PREFIX

For every candidate target t (borrowing layer t-1's MLP) on calibration text:

- damage: the next-token loss increase per token when t borrows t-1's MLP as it is (direct
  sharing, end to end);
- borrow gain: the target's MLP output is fitted at rank r twice, in function space with
  SLW's closed-form stages (``slw.fit_layer`` with no Adam step): once over the borrowed MLP, once
  with nothing borrowed (the control, the same stored size). gain = 1 - err_borrow / err_control,
  clipped to [0, 1]: the fraction of the control's residual error that the borrowed MLP removes;
- q4 error: the relative output error that rounding the target's own MLP to 4 bits adds.

The plan takes the fewest targets that reach ``--cut`` (or fit ``--budget-mb`` at 4 bits), by least
damage (the KL of direct sharing from the original, which unlike the loss increase is never
negative) and no two adjacent (``sharemap.least_damage_targets``). Quantization-only alternatives are
measured on the same text. The rule (``RULE``): a target pays when the borrowed fit beats the
control by more than what 4-bit rounding of that MLP costs, err_control - err_borrow > q4, that is
gain > q4 / err_control; sharing pays when at least half of the plan's targets do.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from .data import corpora
from .errors import ArgumentParser, SharpError, cli
from .io.checkpoint import load, load_model, parameter_bytes, read_config
from .models import sharemap
from .options import at_least, between
from .quant.codes import dequantized, gguf_codes, quantize, resolve_gguf
from .recipes import BITS, PAPER
from .recovery.capture import calibration_text, capture_mlp_inputs
from .recovery.slw import SLWConfig, fit_layer, holdout_rows, mlp_apply, rel_error, weights_of
from .reports import markdown_table, save_figure, write_atomic

RULE = (
    "a target pays when its borrowed fit beats the control by more than 4-bit rounding of its MLP costs "
    "(err_control - err_borrow > q4_error, i.e. borrow_gain > q4_error / err_control); sharing pays when at least "
    "half of the plan's targets pay"
)


def window_loss(model, h: mx.array, windows: mx.array, start: int, hook=None, teacher=None):
    """Mean next-token loss over windows (B, L+1) from the hidden states ``h`` entering block
    ``start``; with ``teacher`` log-probabilities (B, L, V), also the mean KL(teacher || model)."""
    logits = model.head(model.model.run(h, start, hook=hook)).astype(mx.float32)
    loss = nn.losses.cross_entropy(logits, windows[:, 1:], reduction="mean").item()
    if teacher is None:
        return loss, logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    logq = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    kl = (mx.exp(teacher) * (teacher - logq)).sum(-1).mean().item()
    return loss, kl


def direct_damage(model, windows: mx.array, candidates: Sequence[int], batch: int = 4) -> Dict[str, object]:
    """{"base": loss, "damage": {t: loss increase per token}, "kl": {t: KL from the original per
    token}} when t runs t-1's MLP as it is: the original's states entering each block are kept, so
    each candidate runs only the blocks from t on."""
    inner = model.model
    batches = [windows[i : i + batch] for i in range(0, len(windows), batch)]
    states, teacher, losses = [], [], []  # per batch: hidden states entering every block; log-probs; loss
    for b in batches:
        h, per = inner.embed_tokens(b[:, :-1]), []
        for i in range(len(inner.layers)):
            per.append(h)
            h = inner.run(h, i, i + 1)
        mx.eval(per)
        states.append(per)
        loss, logp = window_loss(model, per[0], b, 0)
        mx.eval(logp)
        losses.append(loss)
        teacher.append(logp)
    base = float(np.mean(losses))
    damage, kl = {}, {}
    for t in tqdm(candidates, desc="damage", unit="layer", leave=False):
        borrowed = inner.mlp_of(t - 1)

        def hook(i, block, h, mask, cache, mlp, t=t):
            return block(h, mask, cache=cache, mlp=borrowed if i == t else mlp)

        got = [window_loss(model, s[t], b, t, hook, lp) for s, b, lp in zip(states, batches, teacher)]
        damage[t] = float(np.mean([g[0] for g in got])) - base
        kl[t] = float(np.mean([g[1] for g in got]))
    return {"base": base, "damage": damage, "kl": kl}


def q4_error(w: Dict[str, np.ndarray], x: np.ndarray, group_size: int = 64, bits: int = 4) -> float:
    """Relative output error of the MLP of weights ``w`` on rows x when its weights are rounded to ``bits``."""
    dense = {p: mx.array(v) for p, v in w.items()}
    rounded = {}
    for p, v in dense.items():
        gs = group_size if v.shape[1] % group_size == 0 else 32
        rounded[p] = mx.dequantize(*mx.quantize(v, group_size=gs, bits=bits), group_size=gs, bits=bits)
    xm = mx.array(x.astype(np.float32))
    return rel_error(mlp_apply(rounded, xm), mlp_apply(dense, xm))


def borrow_gains(model, inputs: Dict[int, np.ndarray], candidates: Sequence[int], rank: int) -> Dict[int, dict]:
    """Per candidate: the held-out relative errors of borrowing as it is, of the borrowed fit and of
    the control at ``rank`` (closed-form fits, no Adam), the 4-bit error and the borrow gain."""
    # The borrowed fit starts from the borrowed MLP (zero factors, down solved in closed form): a weight-space
    # start of W_t - W_r is what throws a borrowable function away; the control has only weight space to start from.
    cfg, borrowed = SLWConfig(steps=0), SLWConfig(steps=0, init="zero")
    layers = model.model.layers
    out = {}
    for t in tqdm(candidates, desc="borrow gain", unit="layer", leave=False):
        x = inputs[t]
        borrow = fit_layer(layers[t - 1].mlp, layers[t].mlp, x, rank, borrowed)["errors"]
        control = fit_layer(None, layers[t].mlp, x, rank, cfg)["errors"]["final"]
        q4 = q4_error(weights_of(layers[t].mlp), x[holdout_rows(len(x), cfg)[1]])
        gain = min(max(1 - borrow["final"] / max(control, 1e-12), 0.0), 1.0)
        out[t] = {
            "err_as_is": borrow["none"],
            "err_borrow": borrow["final"],
            "err_control": control,
            "q4_error": q4,
            "borrow_gain": gain,
            "threshold": min(q4 / max(control, 1e-12), 1.0),
        }
        out[t]["pays"] = control - borrow["final"] > q4
    return out


def plan_size(model, config: dict, candidates: Sequence[int], rank: int, cut=None, budget_mb=None) -> dict:
    """How many targets the cut or byte budget asks for, and the bytes at 4 bits of k targets."""
    one = sharemap.savings(config, {candidates[0]: candidates[0] - 1}, rank, "scaled")["mlp_cut"]
    base = four_bit_bytes(model, config, {}, rank)
    per_target = four_bit_bytes(model, config, {candidates[0]: candidates[0] - 1}, rank) - base
    most = (len(candidates) + 1) // 2
    if one <= 0:
        raise SharpError(
            f"at rank {rank} a target's recovery stores as much as the MLP it replaces: pass a smaller --rank"
        )

    def nbytes(k):
        return base + k * per_target

    if budget_mb is not None:
        k = next((k for k in range(1, most + 1) if nbytes(k) <= budget_mb * 1e6), None)
        if k is None:
            raise SharpError(
                f"a budget of {budget_mb} MB is smaller than any plan: the most sharing here ({most} targets at rank "
                f"{rank}) stores {nbytes(most) / 1e6:.1f} MB at 4 bits; ask for more MB, or a smaller --rank"
            )
    else:
        k = math.ceil(cut / one - 1e-9)
        if k > most:
            raise SharpError(
                f"a cut of {cut} needs {k} targets at rank {rank}, but {len(candidates) + 1} layers allow at most "
                f"{most} non-adjacent ones ({most * one:.1%}): ask for a smaller --cut or --rank"
            )
    return {"k": k, "bytes": nbytes(k), "mlp_cut": k * one, "base_4bit_bytes": base}


def four_bit_bytes(model, config: dict, share: Dict[int, int], rank: int) -> int:
    """Stored bytes of ``model`` shared by ``share`` (scaled recovery at ``rank``; none: the model as
    it is) at 4 bits, group size 64, recovery factors at 8 bits as the main job's 4-bit checkpoint
    (float16 where the rank is no multiple of 32)."""
    shared, cfg = sharemap.share_model(model, config, share, rank, "scaled")  # a copy: quantize works in place
    q, _ = quantize(shared, cfg, 4, 64, recovery_bits=8 if share and rank % 32 == 0 else None)
    return parameter_bytes(q)


def quantization_alternatives(
    folder: Path, windows: mx.array, gptq_bits: Sequence[int], from_gguf: str = "auto"
) -> List[dict]:
    """Quantization alone, measured on ``windows``: mlx-lm 4- and 3-bit (group 64), the GGUF's own
    codes where the model came from one (the rest at 4 bits), GPTQ at ``gptq_bits`` (embedding
    rounded at the same bits). Each: name, stored bytes, mean next-token loss."""
    from .quant.gptq import sequential_gptq

    specs = [("mlx-4bit", 4, None), ("mlx-3bit", 3, None)]
    gguf = resolve_gguf(from_gguf)
    specs += [("gguf-codes", 4, "gguf")] if gguf is not None else []
    specs += [(f"gptq-{b}bit", b, "gptq") for b in gptq_bits]
    out = []
    for name, bits, how in tqdm(specs, desc="quantization", unit="model", leave=False):
        model, config = load_model(folder)
        codes = {}
        if how == "gguf":
            codes, _ = gguf_codes(gguf, model, config)
            if not codes:
                continue
        if how == "gptq":
            params = {
                p: {"bits": bits, "group_size": 64}
                for p, m in model.named_modules()
                if isinstance(m, nn.Linear) and m.weight.shape[-1] % 64 == 0
            }
            codes = sequential_gptq(model, windows[:, :-1], params, progress=False)
            model, config = load_model(folder)
        q, _ = quantize(model, config, bits, 64, codes=codes)
        nbytes = parameter_bytes(q)
        f = dequantized(q)
        loss = float(np.mean([window_loss(f, f.model.embed_tokens(b[:, :-1]), b, 0)[0] for b in _batches(windows)]))
        out.append({"name": name, "bytes": nbytes, "loss": loss})
    return out


def _batches(windows: mx.array, n: int = 4):
    return [windows[i : i + n] for i in range(0, len(windows), n)]


def advise(
    folder: Path,
    data: Sequence[Path],
    cut: Optional[float] = 0.25,
    budget_mb: Optional[float] = None,
    rank: int = 64,
    tokens: int = 2048,
    damage_windows: int = 1,
    seq_len: int = 256,
    gptq_bits: Sequence[int] = (4,),
    from_gguf: str = "auto",
) -> dict:
    """The advisor's report (see the module's doc): per-layer measures, the plan, the
    quantization alternatives, the verdict and the next command."""
    if budget_mb is None and (cut is None or not 0 < cut < 1):
        raise SharpError(f"--cut {cut} is outside (0, 1): pass the fraction of stored MLP parameters to remove")
    tic, cpu = time.perf_counter(), time.process_time()
    model, tokenizer = load(folder)
    config = read_config(folder)
    n = model.args.num_hidden_layers
    candidates = list(range(1, n))
    if len(candidates) < 2 and budget_mb is None:
        raise SharpError(f"{folder} has {n} layer(s): sharing needs a reference and a target, at least 2 layers")
    size = plan_size(model, config, candidates, rank, cut, budget_mb)  # a plan that cannot be made fails first
    windows = calibration_text(list(data), tokenizer, max(tokens, damage_windows * (seq_len + 1)), seq_len + 1)
    phases = {"load": time.perf_counter() - tic}
    dmg = direct_damage(model, windows[:damage_windows], candidates)
    phases["damage"] = time.perf_counter() - tic - sum(phases.values())
    inputs = capture_mlp_inputs(model, windows[:, :-1], candidates)["mlp_inputs"]
    gains = borrow_gains(model, inputs, candidates, rank)
    phases["borrow_gain"] = time.perf_counter() - tic - sum(phases.values())
    # KL from the original, not the loss increase, ranks them: it is never negative, so a swap that lowers the
    # loss by chance on a weak model (or on few tokens) cannot win
    chosen = sharemap.least_damage_targets(dmg["kl"], size["k"])
    quant = quantization_alternatives(Path(folder), windows[:damage_windows], gptq_bits, from_gguf)
    phases["quantization"] = time.perf_counter() - tic - sum(phases.values())
    for qa in quant:
        qa["loss_increase"] = qa["loss"] - dmg["base"]
    paying = sum(gains[t]["pays"] for t in chosen)
    verdict = "pays" if paying * 2 >= len(chosen) and chosen else "does not pay"
    share = {str(t): t - 1 for t in chosen}
    if verdict == "pays":
        nxt = (
            f"python -m sharp_mlx.train --stage slw --model {folder} --out {folder}-sharp-slw --share "
            f"'{json.dumps(share)}' --rank {rank} --recovery scaled --scales-init lsq --slw-order sequential "
            "--slw-objective block"
        )
    else:
        # the quantize command's kinds (GPTQ of every layer is the frontier's), within 20% of the plan's bytes
        fits = [q for q in quant if q["name"].startswith("mlx") and q["bytes"] <= 1.2 * size["bytes"]] or quant
        best = min(fits, key=lambda q: q["loss"])
        bits = 3 if "3bit" in best["name"] else 4
        nxt = f"python -m sharp_mlx.quantize --model {folder} --out {folder}-{bits}bit --bits {bits}"
        nxt += " --from-gguf none" if best["name"].startswith(("mlx", "gptq")) else ""
    return {
        "verdict": verdict,
        "rule": RULE,
        "targets": share,
        "layers": [
            {"target": t, "reference": t - 1, "damage": dmg["damage"][t], "kl": dmg["kl"][t], **gains[t]}
            for t in candidates
        ],
        "quantization": quant,
        "plan": {"targets": chosen, "rank": rank, "bytes_4bit": size["bytes"], "mlp_cut": size["mlp_cut"]},
        "targets_paying": paying,
        "base_loss": dmg["base"],
        "original_4bit_bytes": size["base_4bit_bytes"],
        "settings": {"tokens": int(windows[:, :-1].size), "damage_tokens": int(windows[:damage_windows].size)},
        "next_command": nxt,
        "seconds": round(time.perf_counter() - tic, 1),
        "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
        "cpu_seconds": round(time.process_time() - cpu, 1),
    }


LAYER_HEADER = (
    "target", "ref", "damage (direct)", "KL (direct)", "err as is", "err borrow", "err control", "borrow gain",
    "q4 error", "gain needed", "pays", "planned",
)  # fmt: skip


def markdown(rep: dict, command: str) -> str:
    """The report as a table and the verdict."""
    plan = rep["plan"]
    lines = [
        "# Will sharing pay on this model?",
        "",
        f"`{command}` ({rep['seconds'] / 60:.1f} min wall, {rep['cpu_seconds'] / 60:.1f} min of CPU time). "
        f"Calibration: {rep['settings']['tokens']:,} tokens for the fits, "
        f"{rep['settings']['damage_tokens']:,} for the losses (original: {rep['base_loss']:.4f} per token).",
        "",
        f"**Verdict: {rep['verdict']}** ({rep['targets_paying']} of {len(plan['targets'])} planned targets pay).",
        "",
        f"Rule: {rep['rule']}.",
        "",
        "Why this threshold: each target's gain needed is measured, not picked. A fit that beats the control by less "
        "than the relative output error 4-bit rounding adds to that same MLP (q4 error) is lost in the error every "
        "4-bit checkpoint carries anyway, so the bytes it saves are as well spent by quantization alone; beyond it, "
        "the borrowed MLP explains something that neither a rank-r stand-in nor 4-bit codes do.",
        "",
        f"Plan: targets {plan['targets']} (each borrows the layer before), rank {plan['rank']}, stored MLP "
        f"-{plan['mlp_cut']:.1%}; {plan['bytes_4bit'] / 1e6:.1f} MB at 4 bits (the original at 4 bits: "
        f"{rep['original_4bit_bytes'] / 1e6:.1f} MB).",
        "",
        f"Next: `{rep['next_command']}`",
        "",
    ]
    fits = ("err_as_is", "err_borrow", "err_control", "borrow_gain", "q4_error", "threshold")
    rows = [
        [r["target"], r["reference"], f"{r['damage']:+.3f}", f"{r['kl']:.3f}", *(f"{r[k]:.3f}" for k in fits),
         "yes" if r["pays"] else "", "yes" if r["target"] in plan["targets"] else ""]
        for r in rep["layers"]
    ]  # fmt: skip
    quant = [
        [q["name"], f"{q['bytes'] / 1e6:.1f}", f"{q['loss']:.4f}", f"{q['loss_increase']:+.4f}"]
        for q in rep["quantization"]
    ]
    lines += [
        markdown_table(LAYER_HEADER, rows),
        "",
        "Quantization alone, on the same text:",
        "",
        markdown_table(["model", "MB", "loss", "loss increase"], quant),
    ]
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> None:
    """Damage (KL and loss increase) and borrow gain per layer (the planned targets in colour, the gain
    needed as ticks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, chosen = rep["layers"], set(rep["plan"]["targets"])
    t = [r["target"] for r in rows]
    colours = ["tab:green" if x in chosen else "tab:grey" for x in t]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    a.bar(t, [r["kl"] for r in rows], color=colours, label="KL from the original (ranks the targets)")
    a.plot(t, [r["damage"] for r in rows], "kd", ms=5, label="loss increase")
    a.axhline(0, color="k", lw=0.5)
    a.set_ylabel("damage, direct sharing")
    a.legend(loc="upper left", fontsize=8)
    a.set_title(f"verdict: {rep['verdict']} (green: planned targets)")
    b.bar(t, [r["borrow_gain"] for r in rows], color=colours)
    b.plot(t, [r["threshold"] for r in rows], "k_", ms=10, label="gain needed (q4 error / control error)")
    b.set_ylim(0, 1.05)
    b.set_ylabel("borrow gain")
    b.set_xlabel("target layer t (borrows t-1)")
    b.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def write_report(rep: dict, prefix: Path, command: str) -> None:
    """PREFIX.json, PREFIX.md and PREFIX.png, each written to a temporary file and renamed."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(f"{prefix}.json"), json.dumps({"command": command, **rep}, indent=1))
    write_atomic(Path(f"{prefix}.md"), markdown(rep, command))
    plot(rep, Path(f"{prefix}.png"))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m sharp_mlx.advise", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, required=True, help="float model folder (the original)")
    p.add_argument("--data", type=Path, nargs="+", help="calibration text files (default: the corpora's train splits)")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--cut",
        type=between(0, 1, lo_open=True),
        default=0.25,
        help="stored-MLP fraction to remove (default: %(default)s)",
    )
    size.add_argument(
        "--budget-mb", type=at_least(1e-6, float), help="stored bytes at 4 bits, in MB (10^6 bytes), instead of --cut"
    )
    p.add_argument(
        "--rank", type=at_least(1), default=PAPER.rank, help="recovery rank per target (default: %(default)s)"
    )
    p.add_argument(
        "--tokens", type=at_least(1), default=2048, help="calibration tokens for the fits (default: %(default)s)"
    )
    p.add_argument(
        "--damage-windows",
        type=at_least(1),
        default=1,
        help="windows the losses are measured on (default: %(default)s)",
    )
    p.add_argument(
        "--seq-len", type=at_least(2), default=PAPER.seq_len, help="tokens per window (default: %(default)s)"
    )
    p.add_argument(
        "--gptq-bits",
        type=int,
        choices=BITS,
        nargs="*",
        default=[4],
        help="GPTQ alternatives' bits, none to skip (default: 4)",
    )
    p.add_argument("--from-gguf", default="auto", help="the GGUF the model came from: a path, auto or none")
    p.add_argument("--out", type=Path, required=True, help="report prefix: writes PREFIX.json, .md and .png")
    return p


@cli("sharp_mlx.advise")
def main(argv=None):
    args = build_parser().parse_args(argv)
    data = args.data or corpora.files("train")
    missing = [f for f in data if not Path(f).is_file()]
    if missing:
        raise SharpError(
            f"data file {missing[0]} does not exist: pass text files (python -m sharp_mlx.corpora makes them)"
        )
    rep = advise(
        args.model,
        data,
        None if args.budget_mb is not None else args.cut,
        args.budget_mb,
        args.rank,
        args.tokens,
        args.damage_windows,
        args.seq_len,
        args.gptq_bits,
        args.from_gguf,
    )
    command = "python -m sharp_mlx.advise " + " ".join(map(str, argv if argv is not None else sys.argv[1:]))
    write_report(rep, args.out, command)
    print(markdown(rep, command))


if __name__ == "__main__":
    raise SystemExit(main())
