"""Time the advisor, and write its reports on SmolLM2-135M and on a model where sharing pays.

    python experiments/advise_bench.py smollm2     # experiments/results/advise-smollm2.{md,json,png}, with the wall time
    python experiments/advise_bench.py positive    # experiments/results/advise-positive.{md,json,png}

``smollm2`` runs ``python -m sharp_mlx.advise`` with its defaults on the imported embedded model
(``python -m sharp_mlx.convert``) and the corpora's train splits (``python -m sharp_mlx.corpora``).
``positive`` builds the positive model (``positive_model``): the tests' tiny random Llama in which
layers 2 and 4 carry the MLP of the layer before them, hidden units permuted and 2% noise added,
so they compute nearly the function of the layer before while their weights look unrelated.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
POSITIVE = {2: 1, 4: 3}  # target: the layer whose MLP it carries


def positive_model(folder: Path, copies=None, noise: float = 0.02, seed: int = 0) -> Path:
    """The tests' tiny Llama (tests/tiny_folder.py) with each target's MLP replaced by its source's,
    hidden units permuted (gate and up rows, down columns) plus ``noise`` times each weight's
    standard deviation of Gaussian noise; written with the character tokenizer."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_model
    from tiny_folder import write_char_tokenizer

    from sharp_mlx import save

    model, config = tiny_model(seed=seed)
    rng = np.random.default_rng(seed)
    layers = model.model.layers
    for t, s in (copies or POSITIVE).items():
        perm = rng.permutation(config["intermediate_size"])
        for p in ("gate", "up", "down"):
            w = np.array(getattr(layers[s].mlp, f"{p}_proj").weight)
            w = w[perm] if p != "down" else w[:, perm]
            w = w + noise * w.std() * rng.normal(size=w.shape)
            getattr(layers[t].mlp, f"{p}_proj").weight = mx.array(w.astype(np.float32))
    mx.eval(model.parameters())
    save(folder, model, {**config, "eos_token_id": 1})
    write_char_tokenizer(Path(folder))
    return Path(folder)


def text_file(path: Path, records: int = 200, seed: int = 0) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_folder import write_text_data

    return write_text_data(path, records, seed)


POSITIVE_ARGS = ["--cut", "0.2", "--rank", "8", "--tokens", "2048", "--seq-len", "64", "--from-gguf", "none"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python experiments/advise_bench.py", description=__doc__)
    p.add_argument("which", choices=["smollm2", "positive"])
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = p.parse_args(argv)
    from sharp_mlx import advise

    if args.which == "smollm2":
        from sharp_mlx.convert import ensure_default_model

        folder = ensure_default_model()
        cmd = ["--model", str(folder), "--out", str(args.out / "advise-smollm2")]
    else:
        tmp = Path(tempfile.mkdtemp())
        folder = positive_model(tmp / "positive")
        data = text_file(tmp / "text.jsonl")
        cmd = ["--model", str(folder), "--data", str(data), *POSITIVE_ARGS, "--out", str(args.out / "advise-positive")]
    tic = time.perf_counter()
    status = advise.main(cmd)
    wall = time.perf_counter() - tic
    if status:
        return status
    rep = json.loads((args.out / f"advise-{args.which}.json").read_text())
    rep["bench"] = {"command": f"python experiments/advise_bench.py {args.which}", "wall_s": round(wall, 1)}
    (args.out / f"advise-{args.which}.json").write_text(json.dumps(rep, indent=1))
    md = args.out / f"advise-{args.which}.md"
    md.write_text(
        md.read_text().replace(
            "# Will sharing pay on this model?\n",
            f"# Will sharing pay on this model?\n\nMade by `python experiments/advise_bench.py {args.which}` "
            f"(wall time {wall / 60:.1f} min, {rep['cpu_seconds'] / 60:.1f} min of CPU time; {platform.system()} "
            f"{platform.machine()}, {os.cpu_count()} cores).\n",
        )
    )
    print(f"advise on {args.which}: {rep['verdict']}, targets {rep['targets']}, wall {wall:.0f} s")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
