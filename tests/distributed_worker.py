"""One process of the distributed test: SLW, then SFT of the result, on the tiny model.

    mlx.launch --backend ring -n 2 --python PYTHON tests/distributed_worker.py OUT_DIR BATCH_SIZE

(or ``main`` called in-process for the 1-process result). Rank 0 writes OUT_DIR/{slw,sft}.npz
(the recovery factors after each stage) and OUT_DIR/result.json (reports, histories, seconds).
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_model  # noqa: E402

from sharp_mlx.models import sharemap  # noqa: E402
from sharp_mlx.recovery import distributed  # noqa: E402
from sharp_mlx.recovery.sft import SFTConfig, train_sft  # noqa: E402
from sharp_mlx.recovery.slw import SLWConfig, run_slw  # noqa: E402

SHARE = {1: 0, 3: 2, 5: 4}


def factors(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters()) if ".recovery." in k}


def main(out: Path, batch_size: int) -> None:
    group = distributed.group()
    main_rank = distributed.is_main(group)
    original, config = tiny_model()
    model, _ = sharemap.share_model(original, config, SHARE, rank=4)

    tic = time.perf_counter()
    rows = {t: np.random.default_rng(t).normal(size=(600, 64)).astype(np.float16) for t in SHARE}
    mine = distributed.shard(sorted(SHARE), group)
    report = run_slw(
        model,
        original,
        {t: rows[t] for t in mine},
        SLWConfig(steps=30, batch_rows=128),
        log=lambda s: None,
        group=group,
    )
    result = {"slw_report": {str(t): e for t, e in report.items()}, "slw_s": time.perf_counter() - tic}
    if main_rank:
        np.savez(out / "slw.npz", **factors(model))

    tic = time.perf_counter()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 101, 16 * 32 + 1).astype(np.int32)  # 16 windows of 32+1
    valid = rng.integers(0, 101, 4 * 32 + 1).astype(np.int32)
    cfg = SFTConfig(
        steps=6,
        batch_size=batch_size,
        seq_len=32,
        loss="kd",
        learning_rate=1e-2,
        warmup_steps=1,
        eval_every=3,
        eval_windows=2,
        save_every=3,
    )
    mask = (rng.random(len(train)) < np.repeat(rng.random(len(train) // 32 + 1), 32)[: len(train)]).astype(
        np.int32
    )  # uneven per window
    summary = train_sft(model, train, mask, valid, cfg, out / "run", teacher=original, log=lambda s: None, group=group)
    result.update(sft_history=summary["train_history"], processes=summary["processes"], sft_s=time.perf_counter() - tic)
    if main_rank:
        np.savez(out / "sft.npz", **factors(model))
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
