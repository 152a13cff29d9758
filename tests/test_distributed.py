"""SLW and SFT over mx.distributed: 2 processes on 127.0.0.1 (ring backend) against 1."""

import json
import os
import shutil
import sys

import distributed_worker
import mlx.core as mx
import numpy as np
import pytest
from conftest import ROOT, run_tree

from sharp_mlx.recovery import distributed

LAUNCH = shutil.which("mlx.launch", path=os.path.dirname(sys.executable))


def test_shard_covers_every_item_once():
    class Group:
        def __init__(self, rank, size):
            self.r, self.s = rank, size

        def rank(self):
            return self.r

        def size(self):
            return self.s

    for size in (1, 2, 3, 7):
        parts = [distributed.shard(range(5), Group(r, size)) for r in range(size)]
        assert sorted(sum(parts, [])) == list(range(5))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_one_process_group_changes_nothing():
    g = distributed.group()
    assert (g.rank(), g.size()) == (0, 1)
    assert distributed.gather_json({"a": 1}, g) == [{"a": 1}]
    x = mx.array([1.0, 2.0])
    assert distributed.all_sum(x, g) is x
    assert distributed.gather_owned({"a": x}, False, g)["a"] is x


@pytest.mark.skipif(LAUNCH is None, reason="mlx.launch is not installed next to this python")
def test_two_ring_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    # Two processes of batch 2 together take the same global batches as one process of batch 4.
    cmd = [
        LAUNCH,
        "--backend",
        "ring",
        "--hosts",
        "127.0.0.1,127.0.0.1",
        "--python",
        sys.executable,
        str(ROOT / "tests" / "distributed_worker.py"),
        str(two),
        "2",
    ]
    p = run_tree(cmd, timeout=240, cwd=ROOT)
    if p.returncode != 0 and "ring" in p.stderr.lower() and not (two / "result.json").exists():
        pytest.skip(f"the ring backend could not start here: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr[-2000:]
    distributed_worker.main(one, 4)

    a, b = (json.loads((d / "result.json").read_text()) for d in (one, two))
    assert (a["processes"], b["processes"]) == (1, 2)
    assert a["slw_report"].keys() == b["slw_report"].keys() == {"1", "3", "5"}
    for t in a["slw_report"]:
        for stage, err in a["slw_report"][t].items():
            assert b["slw_report"][t][stage] == pytest.approx(err, rel=1e-4), (t, stage)
    for stage, atol in (("slw", 1e-5), ("sft", 1e-4)):
        x, y = (np.load(d / f"{stage}.npz") for d in (one, two))
        assert sorted(x.files) == sorted(y.files) and len(x.files) == 3 * 6
        for k in x.files:
            assert np.abs(x[k] - y[k]).max() <= atol * max(1.0, np.abs(x[k]).max()), (stage, k)
    losses = [[loss for _, loss in r["sft_history"]] for r in (a, b)]
    assert len(losses[0]) == 6 and losses[0][-1] < losses[0][0]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    # Rank 0 alone wrote the checkpoints.
    assert json.loads((two / "run" / "checkpoint.json").read_text())["processes"] == 2
