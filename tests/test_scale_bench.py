"""experiments/scale_bench.py --rows-from/--add: rows measured by hand replace the stage's earlier
multiple in the extrapolation, and the report lists their commands."""

import json

from conftest import ROOT, load_script


def test_added_rows_take_over_the_extrapolation(tmp_path):
    bench = load_script("scale_bench")
    earlier = json.loads((ROOT / "experiments" / "results" / "scale.json").read_text())
    earlier["rows"] = [r for r in earlier["rows"] if r["code"] != "now"]
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    row = {"model": "llama-3.2-1b", "stage": "fuse", "note": "float16 out", "wall_s": 1.0, "peak_gb": 2.5,
           "model_gb": 5.0, "bound_of_gb": 5.0, "command": "python -m sharp_mlx.fuse --model M --out F"}  # fmt: skip
    (tmp_path / "added.jsonl").write_text(json.dumps(row) + "\n")
    argv = ["--rows-from", str(tmp_path / "earlier.json"), "--add", str(tmp_path / "added.jsonl")]
    bench.main([*argv, "--out", str(tmp_path / "scale")])
    res = json.loads((tmp_path / "scale.json").read_text())
    now = [r for r in res["rows"] if r["code"] == "now"]
    floor = res["process_floor_gb"]
    assert len(now) == 1 and now[0]["x_model"] == 0.5 and now[0]["x_model_net"] == round((2.5 - floor) / 5, 2)
    want = round(now[0]["x_model_net"] * res["extrapolated"]["llama-3.1-8b"]["params"] * 2 / 1e9 + floor, 1)
    assert res["extrapolated"]["llama-3.1-8b"]["peak_gb"]["fuse"] == want
    before = bench.extrapolate(earlier["rows"], bench.shape_config("llama-3.2-1b"), floor)
    assert before["llama-3.1-8b"]["peak_gb"]["fuse"] != want
    assert "python -m sharp_mlx.fuse --model M --out F" in (tmp_path / "scale.md").read_text()
