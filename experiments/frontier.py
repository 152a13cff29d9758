"""Bytes on disk against perplexity: what quantization alone gives the original, and where other rows land.

    python experiments/frontier.py --out OUT                    # every point -> OUT.{md,json,png}
    python experiments/frontier.py --points gptq-w3g64-e4 mlx-q4g64
    python experiments/frontier.py --row sharp-4bit=models/smollm2-135m-instruct-sharp-4bit

Every point is the original model (the embedded SmolLM2-135M-Instruct, imported float32) stored
with fewer bits, as an ordinary MLX model folder under ``runs/frontier/<name>`` that ``mlx_lm.load``
opens. Bytes are those of the weight files (``quantize.folder_bytes``, as ``sharp_mlx.bench``
counts them); perplexity is ``evaluate.evaluate`` on the first ``--windows`` windows of 256 tokens
of each domain's test split, quantized weights run by their float values (the same function to
float16 precision), as a ratio to the float original per domain, summarised by the geometric mean
and the worst domain.
The families (``--list`` prints every point):

- ``gguf-*``: ``python -m sharp_mlx.quantize`` with its defaults: the GGUF's own Q4_1 codes (4-bit,
  group 32) and Q8_0 embedding (``e8``); ``-e5`` / ``-e4``: the embedding re-quantized to 5 / 4
  bits (group 64) by GPTQ on the train splits (``--embedding-bits N --calibration``).
- ``mlx-*``: ``mlx_lm.convert`` quantization (rounding to nearest, float32 scales, embedding included).
- ``gptq-*``: GPTQ of every Linear layer (``gptq.sequential_gptq``: block by block, each block's
  inputs taken from the model with the earlier blocks already quantized), calibrated on
  ``--calibration-windows`` windows of 256 tokens of each train split, with the float embedding
  as the blocks' input; the embedding then takes the codes of the ``gguf-*-eN`` folder named by
  the point's ``eN`` (the same calibration text).
- ``mixed-*``: the same with bits per layer: 4-bit attention (or the GGUF's codes) and 3-bit
  MLPs, or MLP bits in {2, 3, 4} chosen by sensitivity (the loss increase on calibration text when
  each block's MLP alone is 2-bit) within the bytes of uniform 3-bit MLPs.

``--row LABEL=DIR`` adds any other model folder (kind ``sharp`` when a target borrows an MLP,
else ``control``; ``LABEL@control=DIR`` sets it). Each point's folder and result are cached
(``runs/frontier/<name>/`` and ``<name>.json``), so an interrupted run resumes; ``--force``
rebuilds the points asked for. ``--keep REPORT.json`` takes every point and row of an earlier
report made with the same evaluation settings as it was measured there (the report names the
command that measured it), so new rows join a frontier without rebuilding it.
"""

import argparse
import contextlib
import hashlib
import io
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from sharp_mlx.data import corpora
from sharp_mlx.data.batches import load_tokens
from sharp_mlx.errors import ArgumentParser, SharpError, cli
from sharp_mlx.io.checkpoint import atomic_dir, copy_tokenizer
from sharp_mlx.quant.codes import apply_codes, code_params, folder_bytes, quantization_config
from sharp_mlx.quant.gptq import BLOCK_LINEARS, Codes, mlp_sensitivity, sequential_gptq
from sharp_mlx.reports import geomean, markdown_table, save_figure, write_atomic

ORIGINAL = Path("models/smollm2-135m-instruct")
SEQ_LEN = 256
PLOT_CAP = 20.0  # ratios above this are drawn at it, so the points that matter keep the plot's height
REFERENCE = "mlx-q4g64"  # bytes are also given as a ratio to mlx-lm's plain 4-bit
EMBEDDINGS = {
    "e8": "gguf-q4g32-e8",
    "e5": "gguf-q4g32-e5",
    "e4": "gguf-q4g32-e4",
}  # embedding choice -> the folder whose codes it takes
ROW_KINDS = ("sharp", "control")


def q(bits: int, group_size: int) -> dict:
    return {"bits": bits, "group_size": group_size}


@dataclass(frozen=True)
class Point:
    name: str
    family: str  # gguf | mlx | gptq | mixed
    options: dict = field(hash=False)
    note: str = ""


def _gptq(name: str, attention, mlp, embedding: str, note: str) -> Point:
    family = "gptq" if attention == mlp else "mixed"
    return Point(name, family, {"attention": attention, "mlp": mlp, "embedding": embedding}, note)


SENSITIVITY = {"sensitivity": {"bits": [2, 3, 4], "group_size": 64, "probe_bits": 2, "budget_bits": 3}}
POINTS = [
    Point(
        "gguf-q4g32-e8",
        "gguf",
        {"embedding_bits": None},
        "the GGUF's own codes: Q4_1 linears (4-bit, group 32), Q8_0 embedding (8-bit, group 32)",
    ),
    Point(
        "gguf-q4g32-e5",
        "gguf",
        {"embedding_bits": 5},
        "GGUF linear codes; embedding 5-bit, group 64, by GPTQ on the train splits",
    ),
    Point(
        "gguf-q4g32-e4",
        "gguf",
        {"embedding_bits": 4},
        "GGUF linear codes; embedding 4-bit, group 64, by GPTQ on the train splits",
    ),
    Point("mlx-q4g64", "mlx", q(4, 64), "mlx_lm.convert -q (4-bit, group 64), embedding included"),
    Point("mlx-q4g32", "mlx", q(4, 32), "mlx_lm.convert -q --q-group-size 32"),
    Point("mlx-q3g64", "mlx", q(3, 64), "mlx_lm.convert -q --q-bits 3"),
    _gptq("gptq-w4g64-e5", q(4, 64), q(4, 64), "e5", "GPTQ 4-bit group 64 linears; 5-bit GPTQ embedding"),
    _gptq("gptq-w4g64-e4", q(4, 64), q(4, 64), "e4", "GPTQ 4-bit group 64 linears; 4-bit GPTQ embedding"),
    _gptq("gptq-w3g32-e4", q(3, 32), q(3, 32), "e4", "GPTQ 3-bit group 32 linears; 4-bit GPTQ embedding"),
    _gptq("gptq-w3g64-e5", q(3, 64), q(3, 64), "e5", "GPTQ 3-bit group 64 linears; 5-bit GPTQ embedding"),
    _gptq("gptq-w3g64-e4", q(3, 64), q(3, 64), "e4", "GPTQ 3-bit group 64 linears; 4-bit GPTQ embedding"),
    _gptq(
        "mixed-agguf-m3-e4",
        "gguf",
        q(3, 64),
        "e4",
        "attention keeps the GGUF's 4-bit codes; GPTQ 3-bit group 64 MLPs; 4-bit GPTQ embedding",
    ),
    _gptq(
        "mixed-a4m3-e4",
        q(4, 64),
        q(3, 64),
        "e4",
        "GPTQ 4-bit group 64 attention, 3-bit group 64 MLPs; 4-bit GPTQ embedding",
    ),
    _gptq(
        "mixed-a4-msens-e4",
        q(4, 64),
        SENSITIVITY,
        "e4",
        "GPTQ 4-bit attention; MLP bits 2/3/4 (group 64) by sensitivity within the bytes of 3-bit MLPs; 4-bit GPTQ "
        "embedding",
    ),
    _gptq("gptq-w2g64-e4", q(2, 64), q(2, 64), "e4", "GPTQ 2-bit group 64 linears; 4-bit GPTQ embedding"),
]
BY_NAME = {p.name: p for p in POINTS}


# ---------------------------------------------------------------------------------------- pure parts


def pareto(points: Sequence[Tuple[float, float]]) -> List[bool]:
    """For each (bytes, value): True when no other point has no more bytes and no higher value,
    one of them strictly lower (lower is better in both)."""
    return [not any(b2 <= b and v2 <= v and (b2 < b or v2 < v) for b2, v2 in points) for b, v in points]


def code_bytes(shape: Tuple[int, int], bits: int, group_size: int) -> int:
    """Bytes of one (out, in) weight as affine codes with float16 scales and biases."""
    rows, cols = shape
    return rows * cols * bits // 8 + rows * (cols // group_size) * 2 * 2


def allocate_bits(
    sensitivity: Sequence[float], choices: Sequence[int], cost: Callable[[int], int], budget: float, probe_bits: int
) -> List[int]:
    """Bits per block, from ``choices``, that minimise the predicted loss increase
    sum_i s_i 4^(probe_bits - b_i) (each bit quarters a rounding error's energy; s_i measured at
    ``probe_bits``, negative read as 0) with sum_i cost(b_i) <= ``budget``: every block starts at
    the fewest bits and the upgrade with the largest gain per byte is taken while it fits."""
    choices = sorted(choices)
    bits = [choices[0]] * len(sensitivity)
    spent = sum(cost(b) for b in bits)
    if spent > budget:
        raise SharpError(
            f"a byte budget of {budget:,.0f} is below the {spent:,} bytes of {choices[0]}-bit MLPs everywhere"
        )

    def predicted(s: float, b: int) -> float:
        return max(s, 0.0) * 4.0 ** (probe_bits - b)

    while True:
        best = None
        for i, (s, b) in enumerate(zip(sensitivity, bits)):
            if b == choices[-1]:
                continue
            nb = choices[choices.index(b) + 1]
            extra = cost(nb) - cost(b)
            gain = (predicted(s, b) - predicted(s, nb)) / max(extra, 1)
            if spent + extra <= budget and (best is None or gain > best[0]):
                best = (gain, i, nb, extra)
        if best is None:
            return bits
        _, i, bits[i], extra = best
        spent += extra


def summarise(ppl: Dict[str, float], base: Dict[str, float]) -> dict:
    ratio = {d: ppl[d] / base[d] for d in base}
    worst = max(ratio, key=ratio.get)
    return {
        "ratio": ratio,
        "geo_mean_ratio": geomean(ratio.values()),
        "worst_ratio": ratio[worst],
        "worst_domain": worst,
    }


def with_codes(model: nn.Module, config: dict, codes: Codes) -> Tuple[nn.Module, dict]:
    """``model`` with every module in ``codes`` quantized to exactly those codes (bits and group
    size read from their shapes), in place, and its config with mlx-lm's "quantization" section."""
    params = {
        p: code_params(codes[p][0], codes[p][1], m.weight.shape[-1]) for p, m in model.named_modules() if p in codes
    }
    if set(codes) - set(params):
        raise SharpError(f"codes for modules the model does not have: {sorted(set(codes) - set(params))[:3]}")
    apply_codes(model, params, codes)
    mx.eval(model.parameters())
    return model, {**config, "quantization": quantization_config(params)}


def save_folder(out: Path, model: nn.Module, config: dict, tokenizer_from: Path) -> None:
    from mlx_lm.utils import save_config, save_model

    with atomic_dir(out, force=True) as tmp:
        save_model(tmp, model)
        save_config(dict(config), tmp / "config.json")
        copy_tokenizer(tokenizer_from, tmp)


def mlx_lm_logit_gap(folder: Path, model: nn.Module, tokens: mx.array) -> float:
    """Largest |logit difference| between ``mlx_lm.load(folder)`` and ``model`` on ``tokens`` (1, L)."""
    from mlx_lm import load

    loaded = load(str(folder))[0]
    return mx.abs(loaded(tokens).astype(mx.float32) - model(tokens).astype(mx.float32)).max().item()


def read_codes(folder: Path, paths: Sequence[str]) -> Codes:
    weights = {}
    for f in sorted(folder.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    return {p: (weights[f"{p}.weight"], weights[f"{p}.scales"], weights[f"{p}.biases"]) for p in paths}


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------- building and measuring


@dataclass
class Frontier:
    """One measurement session: where folders go, the evaluation, and the calibration text."""

    runs: Path = Path("runs/frontier")
    windows: int = 8
    calibration_windows: int = 8
    sensitivity_windows: int = 2
    force: bool = False
    original: Path = ORIGINAL
    _calibration: Optional[mx.array] = None
    _made: set = field(default_factory=set)  # what this session (re)made, so --force rebuilds each thing once

    def reusable(self, what: str) -> bool:
        return not self.force or what in self._made

    # -- inputs
    def float_model(self):
        from sharp_mlx.io.checkpoint import load_model

        return load_model(self.original)

    def calibration(self) -> mx.array:
        """The first ``calibration_windows`` windows of 256 tokens of each train split (N, 256),
        the text ``gptq.output_hessian`` fits the embedding on."""
        if self._calibration is None:
            from mlx_lm.utils import load_tokenizer

            tokenizer, rows = load_tokenizer(self.original), []
            for f in corpora.files("train"):
                tokens = load_tokens(f, tokenizer, max_tokens=self.calibration_windows * SEQ_LEN)[0]
                if len(tokens) < self.calibration_windows * SEQ_LEN:
                    raise SharpError(
                        f"{f} has fewer than {self.calibration_windows} windows of {SEQ_LEN} tokens: lower "
                        "--calibration-windows"
                    )
                rows += [tokens[k * SEQ_LEN : (k + 1) * SEQ_LEN] for k in range(self.calibration_windows)]
            self._calibration = mx.array(np.stack(rows))
        return self._calibration

    def eval_key(self) -> dict:
        return {"windows": self.windows, "seq_len": SEQ_LEN, "data": [str(f) for f in corpora.files("test")]}

    def perplexity(self, folder: Path) -> Dict[str, float]:
        from sharp_mlx.eval.perplexity import evaluate

        files = corpora.files("test")
        r = evaluate([folder], files, seq_len=SEQ_LEN, batch_size=4, max_windows=self.windows, float_weights=True)[
            str(folder)
        ]
        return {f.parent.name: r[str(f)]["ppl"] for f in files}

    def original_ppl(self) -> dict:
        path = self.runs / "original.json"
        cached = _read_json(path)
        if cached and cached.get("eval") == self.eval_key():
            return cached
        tic = time.perf_counter()
        result = {
            "name": "original",
            "kind": "original",
            "path": str(self.original),
            "bytes": folder_bytes(self.original),
            "eval": self.eval_key(),
            "ppl": self.perplexity(self.original),
        }
        result["eval_s"] = round(time.perf_counter() - tic, 1)
        write_atomic(path, json.dumps(result, indent=1))
        return result

    # -- points
    def build_options(self, point: Point) -> dict:
        o = {"family": point.family, **point.options}
        if point.family in ("gptq", "mixed"):
            o["calibration_windows"] = self.calibration_windows
            if "sensitivity" in point.options["mlp"]:
                o["sensitivity_windows"] = self.sensitivity_windows
        if point.family == "gguf" and point.options["embedding_bits"]:
            o["calibration_windows"] = 8  # quantize's default, the text every eN embedding is fitted on
        return o

    def ensure_built(self, point: Point) -> dict:
        """The point's folder, built unless it exists with the same options; returns what the build recorded."""
        folder, record = self.runs / point.name, self.runs / f"{point.name}.build.json"
        options = self.build_options(point)
        built = _read_json(record)
        if folder.is_dir() and built and built["options"] == options and self.reusable(point.name):
            return built
        tic = time.perf_counter()
        info = {"gguf": self.build_gguf, "mlx": self.build_mlx}.get(point.family, self.build_gptq)(point, folder)
        built = {"options": options, "build_s": round(time.perf_counter() - tic, 1), **info}
        write_atomic(record, json.dumps(built, indent=1))
        self._made.add(point.name)
        return built

    def build_gguf(self, point: Point, folder: Path) -> dict:
        from sharp_mlx.quant.codes import quantize_model_folder

        bits = point.options["embedding_bits"]
        calibration = corpora.files("train") if bits else None
        quantize_model_folder(self.original, folder, force=True, embedding_bits=bits, calibration=calibration)
        extra = f" --embedding-bits {bits} --calibration data/*/train.jsonl" if bits else ""
        return {"command": f"python -m sharp_mlx.quantize --model {self.original} --out {folder}{extra}"}

    def build_mlx(self, point: Point, folder: Path) -> dict:
        from mlx_lm.convert import convert

        b, g = point.options["bits"], point.options["group_size"]
        with atomic_dir(folder, force=True) as tmp, contextlib.redirect_stdout(io.StringIO()):
            tmp.rmdir()  # mlx_lm.convert refuses an existing folder
            convert(hf_path=str(self.original), mlx_path=str(tmp), quantize=True, q_bits=b, q_group_size=g)
        return {
            "command": f"mlx_lm.convert --hf-path {self.original} --mlx-path {folder} -q --q-bits {b} "
            f"--q-group-size {g}"
        }

    def linear_params(self, point: Point, model) -> Tuple[Dict[str, dict], List[str], Optional[dict]]:
        """(GPTQ params by module path, paths that keep the GGUF's codes, the sensitivity allocation or None)."""
        n = len(model.model.layers)
        attention, mlp = point.options["attention"], point.options["mlp"]
        params, gguf, allocation = {}, [], None
        if "sensitivity" in mlp:
            allocation = self.sensitivity_bits(mlp["sensitivity"], model)
            per_block = [q(b, mlp["sensitivity"]["group_size"]) for b in allocation["bits"]]
        else:
            per_block = [mlp] * n
        for i in range(n):
            for name in BLOCK_LINEARS:
                path = f"model.layers.{i}.{name}"
                spec = attention if name.startswith("self_attn.") else per_block[i]
                if spec == "gguf":
                    gguf.append(path)
                else:
                    params[path] = dict(spec)
        return params, gguf, allocation

    def sensitivity_bits(self, spec: dict, model) -> dict:
        key = {**spec, "calibration_windows": self.calibration_windows, "sensitivity_windows": self.sensitivity_windows}
        path = self.runs / "_cache" / f"sensitivity-{_key(key)}.json"
        cached = _read_json(path)
        if cached and cached["key"] == key and self.reusable(path.name):
            return cached
        calib = self.calibration()
        probe = mx.concatenate(
            [
                calib[k * self.calibration_windows : k * self.calibration_windows + self.sensitivity_windows]
                for k in range(len(corpora.DOMAINS))
            ]
        )
        s = mlp_sensitivity(model, probe, spec["probe_bits"], spec["group_size"], hessian_windows=calib)
        mlp = model.model.layers[0].mlp
        shapes = [mlp[f"{p}_proj"].weight.shape for p in ("gate", "up", "down")]

        def cost(b: int) -> int:
            return sum(code_bytes(sh, b, spec["group_size"]) for sh in shapes)

        budget = len(s) * cost(spec["budget_bits"])
        bits = allocate_bits(s, spec["bits"], cost, budget, spec["probe_bits"])
        result = {
            "key": key,
            "sensitivity": s,
            "bits": bits,
            "budget_bytes": budget,
            "mlp_bytes": sum(cost(b) for b in bits),
        }
        write_atomic(path, json.dumps(result, indent=1))
        self._made.add(path.name)
        return result

    def linear_codes(self, model, params: Dict[str, dict]) -> Codes:
        """``gptq.sequential_gptq`` codes for ``params``, cached by what determines them."""
        key = {"params": params, "calibration_windows": self.calibration_windows, "original": str(self.original)}
        path = self.runs / "_cache" / f"linears-{_key(key)}.safetensors"
        if path.exists() and self.reusable(path.name):
            flat = mx.load(str(path))
            return {p: (flat[f"{p}.weight"], flat[f"{p}.scales"], flat[f"{p}.biases"]) for p in params}
        codes = sequential_gptq(model, self.calibration(), params)
        flat = {f"{p}.{k}": v for p, c in codes.items() for k, v in zip(("weight", "scales", "biases"), c)}

        def save(tmp: Path) -> None:  # through a file object: a path without .safetensors would get one appended
            with open(tmp, "wb") as f:
                mx.save_safetensors(f, flat)

        write_atomic(path, save)
        self._made.add(path.name)
        return codes

    def build_gptq(self, point: Point, folder: Path) -> dict:
        model, config = self.float_model()
        params, gguf_paths, allocation = self.linear_params(point, model)
        codes = self.linear_codes(model, params)
        source = BY_NAME[EMBEDDINGS[point.options["embedding"]]]
        self.ensure_built(source)
        codes.update(read_codes(self.runs / source.name, ["model.embed_tokens"]))
        if gguf_paths:
            self.ensure_built(BY_NAME["gguf-q4g32-e8"])
            codes.update(read_codes(self.runs / "gguf-q4g32-e8", gguf_paths))
        model, config = with_codes(model, config, codes)
        save_folder(folder, model, config, self.original)
        gap = mlx_lm_logit_gap(folder, model, self.calibration()[:1, :32])
        if not gap <= 1e-4:
            raise RuntimeError(f"mlx_lm.load({folder}) differs from the model that was saved: logits differ by {gap}")
        info = {
            "command": f"python experiments/frontier.py --points {point.name}",
            "embedding_from": source.name,
            "mlx_lm_logit_gap": gap,
        }
        if allocation:
            info["mlp_bits"] = allocation["bits"]
            info["sensitivity"] = allocation["sensitivity"]
        return info

    def point_result(self, point: Point) -> dict:
        path = self.runs / f"{point.name}.json"
        built = self.ensure_built(point)
        cached = _read_json(path)
        if cached and cached.get("build") == built and cached.get("eval") == self.eval_key():
            return cached
        folder = self.runs / point.name
        tic = time.perf_counter()
        result = {
            "name": point.name,
            "kind": "quantization",
            "family": point.family,
            "note": point.note,
            "path": str(folder),
            "bytes": folder_bytes(folder),
            "ppl": self.perplexity(folder),
            "options": built["options"],
            "build": built,
            "eval": self.eval_key(),
        }
        result["eval_s"] = round(time.perf_counter() - tic, 1)
        write_atomic(path, json.dumps(result, indent=1))
        return result

    def row_result(self, label: str, kind: str, folder: Path) -> dict:
        path = self.runs / "rows" / f"{label}.json"
        key = {
            "path": str(folder.resolve()),
            "bytes": folder_bytes(folder),
            "config": _key((folder / "config.json").read_text()),
        }
        cached = _read_json(path)
        if (
            cached
            and cached.get("key") == key
            and cached.get("eval") == self.eval_key()
            and cached.get("kind") == kind
            and self.reusable(f"row {label}")
        ):
            return cached
        tic = time.perf_counter()
        result = {
            "name": label,
            "kind": kind,
            "path": str(folder),
            "bytes": key["bytes"],
            "ppl": self.perplexity(folder),
            "key": key,
            "eval": self.eval_key(),
        }
        result["eval_s"] = round(time.perf_counter() - tic, 1)
        write_atomic(path, json.dumps(result, indent=1))
        self._made.add(f"row {label}")
        return result


# ---------------------------------------------------------------------------------------- report


def report(
    original: dict, results: List[dict], command: str, wall_s: float, eval_key: dict, cpu_s: float = 0.0
) -> dict:
    """Every result with its ratios to the original and whether it is on the frontier of
    bytes against geometric-mean ratio (all points, and quantization points only); sorted by bytes."""
    points = [{**r, **summarise(r["ppl"], original["ppl"])} for r in results]
    points.sort(key=lambda r: (r["bytes"], r["geo_mean_ratio"]))
    on_all = pareto([(r["bytes"], r["geo_mean_ratio"]) for r in points])
    quant = [r for r in points if r["kind"] == "quantization"]
    on_quant = dict(zip((r["name"] for r in quant), pareto([(r["bytes"], r["geo_mean_ratio"]) for r in quant])))
    for r, f in zip(points, on_all):
        r["frontier"], r["frontier_quantization"] = f, on_quant.get(r["name"], False)
    compute = sum(r.get("eval_s", 0) + r.get("build", {}).get("build_s", 0) for r in points) + original.get("eval_s", 0)
    return {
        "command": command,
        "wall_s": round(wall_s, 1),
        "cpu_s": round(cpu_s, 1),
        "compute_s": round(compute, 1),
        "eval": eval_key,
        "original": original,
        "points": points,
    }


def markdown(rep: dict) -> str:
    o, points = rep["original"], rep["points"]
    domains = list(o["ppl"])
    ref = next((r["bytes"] for r in points if r["name"] == REFERENCE), None)
    e = rep["eval"]
    lines = [
        "# Bytes on disk against perplexity: the original model with fewer bits",
        "",
        f"Made by `{rep['command']}`. Building and measuring every point listed took {rep['compute_s'] / 60:.1f} min "
        "of wall time in all (each step's own time as it was run, cached steps included; this machine, 2 cores shared "
        f"with other jobs); this invocation {rep['wall_s'] / 60:.1f} min ({rep.get('cpu_s', 0) / 60:.1f} min of CPU "
        "time), the rest read from `runs/frontier/` or, where a point names the command that measured it, kept from "
        "an earlier report (`--keep`).",
        "",
        f"Perplexity: the first {e['windows']} windows of {e['seq_len']} tokens of each domain's test split, "
        "quantized weights run by their "
        f"float values; ratios to the float original ({o['bytes'] / 1e6:.1f} MB: "
        + ", ".join(f"{d} {o['ppl'][d]:.2f}" for d in domains)
        + "). Bytes: the weight files. "
        f'"x {REFERENCE}": bytes as a ratio to mlx-lm\'s plain 4-bit. **frontier**: no other row has no more bytes '
        "and a lower "
        "geometric mean (`q`: on the frontier of the quantization points alone).",
        "",
    ]
    header = ["point", "kind", "MB", f"x {REFERENCE}", "geo. mean x original", "worst x original", *domains, "frontier"]
    rows = []
    for r in points:
        mark = "**yes**" if r["frontier"] else ("q" if r["frontier_quantization"] else "")
        x_ref = f"{r['bytes'] / ref:.2f}" if ref else "-"
        rows.append(
            [
                r["name"],
                r["kind"],
                f"{r['bytes'] / 1e6:.1f}",
                x_ref,
                f"{r['geo_mean_ratio']:.3f}",
                f"{r['worst_ratio']:.3f} ({r['worst_domain']})",
                *(f"{r['ratio'][d]:.3f}" for d in domains),
                mark,
            ]
        )
    lines += [markdown_table(header, rows), "", "Points:"]
    for r in points:
        how = r.get("build", {}).get("command") or r["path"]
        extra = ""
        if r.get("build", {}).get("mlp_bits"):
            extra = "; MLP bits per block " + "".join(map(str, r["build"]["mlp_bits"]))
        by = f" Measured by `{r['measured_by']}`." if r.get("measured_by") else ""
        lines.append(f"- `{r['name']}` ({r['kind']}): {r.get('note') or r['path']}{extra}. `{how}`{by}")
    return "\n".join(lines) + "\n"


def place_labels(ax, fig, labels, step: float = 8.0, tries: int = 10) -> None:
    """Annotate each (text, x, y) next to its point: to the right, else to the left, moved up or down in
    steps of ``step`` points until its text is inside the axes and overlaps no point and no label placed
    before it; a moved label gets a line to its point. Call it once the axes are laid out."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig.canvas.draw()
    renderer, frame = fig.canvas.get_renderer(), ax.get_window_extent()
    taken = [Bbox.from_bounds(px - 5, py - 5, 10, 10) for px, py in ax.transData.transform([t[1:] for t in labels])]
    offsets = [(side, dy) for k in range(tries + 1) for dy in sorted({k * step, -k * step}) for side in (1, -1)]

    def annotate(text, xy, side, dy):
        line = dict(arrowstyle="-", lw=0.5, color="0.4", shrinkA=0, shrinkB=3) if dy else None
        note = ax.annotate(text, xy, textcoords="offset points", xytext=(6 * side, dy - 3), fontsize=7,
                           ha="left" if side > 0 else "right", arrowprops=line)  # fmt: skip
        note.update_positions(renderer)
        return note, Text.get_window_extent(note, renderer)  # the text's box, without the line

    def free(box):
        inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        return inside and not any(box.overlaps(b) for b in taken)

    for text, x, y in sorted(labels, key=lambda t: t[1:]):
        for side, dy in offsets:
            note, box = annotate(text, (x, y), side, dy)
            if free(box):
                break
            note.remove()
        else:  # nowhere free: beside the point, overlapping
            note, box = annotate(text, (x, y), 1, 0)
        taken.append(box)


def plot(rep: dict, path: Path, cap: float = PLOT_CAP) -> None:
    """Bytes (MB) against the geometric-mean ratio, log y; ratios above ``cap`` are drawn at it (^)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    points = rep["points"]

    def xy(rs):
        return [r["bytes"] / 1e6 for r in rs], [min(r["geo_mean_ratio"], cap) for r in rs]

    fig, ax = plt.subplots(figsize=(10, 6))
    styles = {"quantization": ("o", "tab:blue"), "sharp": ("*", "tab:red"), "control": ("s", "tab:green")}
    capped = []
    for kind, (marker, color) in styles.items():
        for off in (False, True):
            rs = [r for r in points if r["kind"] == kind and (r["geo_mean_ratio"] > cap) == off]
            if rs:
                label = kind if kind == "quantization" else f"--row ({kind})"
                if off:
                    label, capped = (None if capped else f"above {cap:g}x, drawn at {cap:g}x"), capped + rs
                size = 70 if marker == "*" else 36
                ax.scatter(*xy(rs), marker="^" if off else marker, color=color, s=size, label=label, zorder=3)
    for key, style, label in (
        ("frontier", "-", "Pareto frontier"),
        ("frontier_quantization", "--", "frontier of quantization alone"),
    ):
        front = [r for r in points if r[key]]
        if front and (key == "frontier" or any(r["kind"] != "quantization" for r in points)):
            ax.step(*xy(front), where="post", color="k", ls=style, lw=1, label=label, zorder=2)
    ticks = [t for t in (1, 1.1, 1.25, 1.5, 2, 3, 5, 10, 20, 50, 100) if t <= cap]
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("bytes on disk (MB, weight files)")
    ax.set_ylabel("perplexity x float original (geometric mean over 5 domains, log)")
    ax.set_title(
        f"SmolLM2-135M: bytes against perplexity ({rep['eval']['windows']} test windows of {rep['eval']['seq_len']} "
        "tokens per domain)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    labels = []
    for r in points:
        (x,), (y,) = xy([r])
        labels.append((r["name"] + (f" ({r['geo_mean_ratio']:,.0f}x)" if r["geo_mean_ratio"] > cap else ""), x, y))
    place_labels(ax, fig, labels)
    save_figure(fig, path, dpi=130)


# ---------------------------------------------------------------------------------------- CLI


def parse_row(spec: str) -> Tuple[str, Optional[str], Path]:
    """LABEL=DIR or LABEL@KIND=DIR -> (label, kind or None, folder)."""
    label, sep, folder = spec.partition("=")
    label, _, kind = label.partition("@")
    if not sep or not label or not folder:
        raise SharpError(f"--row {spec!r}: write LABEL=FOLDER, or LABEL@{'|'.join(ROW_KINDS)}=FOLDER")
    if not re.fullmatch(r"[\w.+-]+", label):
        raise SharpError(
            f"--row {spec!r}: a label is letters, digits and . _ + - only (it names a file under runs/frontier/rows)"
        )
    if kind and kind not in ROW_KINDS:
        raise SharpError(f"--row {spec!r}: kind {kind!r} is not one of {', '.join(ROW_KINDS)}")
    if not (Path(folder) / "config.json").is_file():
        raise SharpError(f"--row {spec!r}: {folder} is not a model folder (no config.json)")
    return label, kind or None, Path(folder)


def row_kind(folder: Path) -> str:
    """``sharp`` when some target of the folder's share map borrows an MLP, else ``control``."""
    share = (_read_json(folder / "config.json") or {}).get("sharp", {}).get("share", {})
    return "sharp" if any(r is not None for r in share.values()) else "control"


def kept_report(path: Path, eval_key: dict) -> dict:
    """An earlier report to keep points from; it must have measured them as this run would."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SharpError(f"--keep {path}: cannot read it as a frontier report ({e}): give the OUT.json of a run")
    if earlier.get("eval") != eval_key:
        raise SharpError(
            f"--keep {path} was measured with {earlier.get('eval')}, this run with {eval_key}: use the same "
            "--windows, or drop --keep"
        )
    return earlier


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="experiments/frontier.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--points",
        nargs="+",
        default=["all"],
        metavar="NAME",
        help="points to build and measure, or 'all' (default: all; --list names them)",
    )
    p.add_argument(
        "--row",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="another model folder to place on the plot (LABEL@sharp=DIR or LABEL@control=DIR sets its kind)",
    )
    p.add_argument(
        "--windows",
        type=int,
        default=8,
        help="test windows of 256 tokens per domain for perplexity (default: %(default)s)",
    )
    p.add_argument(
        "--calibration-windows",
        type=int,
        default=8,
        help="train windows of 256 tokens per domain for GPTQ (default: %(default)s)",
    )
    p.add_argument(
        "--sensitivity-windows",
        type=int,
        default=2,
        help="of those, windows per domain on which the MLP sensitivity loss is measured (default: %(default)s)",
    )
    p.add_argument(
        "--runs",
        type=Path,
        default=Path("runs/frontier"),
        help="where the point folders and cached results go (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/frontier/frontier"),
        help="writes OUT.json, OUT.md and OUT.png (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="rebuild and re-measure the points asked for, even if cached")
    p.add_argument(
        "--keep",
        type=Path,
        metavar="REPORT.json",
        help="take the points and rows of this earlier report as measured there (same evaluation settings); "
        "rows given with --row are measured again",
    )
    p.add_argument(
        "--compare",
        type=Path,
        metavar="REPORT.json",
        help="an earlier report (its OUT.json) to compare this run's points with: bytes, perplexities, frontier",
    )
    p.add_argument("--list", action="store_true", help="print the points and exit")
    return p


def compare(rep: dict, earlier: dict) -> dict:
    """Each point or row in both reports: bytes, geometric mean and frontier then and now, and the
    largest relative difference of a domain's perplexity; the points of only one of them by name."""
    then = {r["name"]: r for r in earlier["points"]}
    rows = []
    for r in rep["points"]:
        e = then.get(r["name"])
        if e is None:
            continue
        diff = max(abs(r["ppl"][d] / e["ppl"][d] - 1) for d in r["ppl"])
        pair = {k: [e[k], r[k]] for k in ("bytes", "geo_mean_ratio", "frontier")}
        rows.append({"name": r["name"], **pair, "max_rel_ppl_diff": diff})
    now = {r["name"] for r in rep["points"]}
    return {"command": earlier["command"], "rows": rows, "only_then": sorted(set(then) - now),
            "only_now": sorted(now - set(then))}  # fmt: skip


def compare_markdown(c: dict, path: Path) -> str:
    rows = [
        [r["name"], *(f"{b:,}" for b in r["bytes"]), *(f"{g:.3f}" for g in r["geo_mean_ratio"])]
        + [" / ".join("yes" if f else "no" for f in r["frontier"]), f"{r['max_rel_ppl_diff']:.1e}"]
        for r in c["rows"]
    ]
    same = sum(r["bytes"][0] == r["bytes"][1] for r in c["rows"])
    lines = [
        f"\n## Against {path} (made by `{c['command']}`)\n",
        f"{same} of {len(c['rows'])} points and rows in both have the same bytes; the largest relative difference of "
        f"a domain's perplexity is {max((r['max_rel_ppl_diff'] for r in c['rows']), default=0):.1e}.\n",
        markdown_table(
            ["point", "bytes then", "bytes now", "geo. mean then", "now", "frontier then / now", "largest ppl diff"],
            rows,
        ),
    ]
    if c["only_then"] or c["only_now"]:
        lines.append(f"\nOnly in the earlier report: {', '.join(c['only_then']) or 'none'}; only in this run: "
                     f"{', '.join(c['only_now']) or 'none'}.")  # fmt: skip
    return "\n".join(lines) + "\n"


@cli("experiments/frontier.py")
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.list:
        for point in POINTS:
            print(f"{point.name:20s} {point.note}")
        return
    names = [p.name for p in POINTS] if "all" in args.points else args.points
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SharpError(f"--points {unknown[0]}: no such point; use 'all' or some of {', '.join(BY_NAME)}")
    rows = [parse_row(spec) for spec in args.row]
    labels = [label for label, _, _ in rows]
    clash = [name for name in labels if name in BY_NAME or name == "original" or labels.count(name) > 1]
    if clash:
        raise SharpError(f"--row label {clash[0]!r} is used twice or names a point: choose another label")
    if (
        min(args.windows, args.calibration_windows, args.sensitivity_windows) < 1
        or args.sensitivity_windows > args.calibration_windows
    ):
        raise SharpError(
            "--windows, --calibration-windows and --sensitivity-windows must be at least 1, and --sensitivity-windows "
            "at most --calibration-windows"
        )
    missing = [str(f) for f in corpora.files("train") + corpora.files("test") if not f.is_file()]
    if missing:
        raise SharpError(f"{missing[0]} is missing: run `{corpora.FETCH}` first")
    from sharp_mlx.convert import ensure_default_model

    tic, cpu = time.time(), time.process_time()
    run = Frontier(
        runs=args.runs,
        windows=args.windows,
        calibration_windows=args.calibration_windows,
        sensitivity_windows=args.sensitivity_windows,
        force=args.force,
        original=ensure_default_model(),
    )
    kept, original = {}, None
    if args.keep:
        earlier = kept_report(args.keep, run.eval_key())
        original = earlier["original"]
        kept = {r["name"]: {**r, "measured_by": r.get("measured_by", earlier["command"])} for r in earlier["points"]}
    original = original or run.original_ppl()
    results = []
    for name in tqdm(names, desc="frontier", unit="point"):
        results.append(kept[name] if name in kept and not args.force else run.point_result(BY_NAME[name]))
    results += [r for n, r in kept.items() if n not in BY_NAME and n not in labels]  # earlier rows
    for label, kind, folder in rows:
        results.append(run.row_result(label, kind or row_kind(folder), folder))
    command = "python experiments/frontier.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    rep = report(original, results, command, time.time() - tic, run.eval_key(), time.process_time() - cpu)
    out, text = args.out, markdown(rep)
    if args.compare:
        rep["compared"] = compare(rep, json.loads(args.compare.read_text()))
        text += compare_markdown(rep["compared"], args.compare)
    write_atomic(out.with_name(out.name + ".json"), json.dumps(rep, indent=1))
    write_atomic(out.with_name(out.name + ".md"), text)
    plot(rep, out.with_name(out.name + ".png"))
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
