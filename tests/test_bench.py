"""The benchmark: fresh processes per repetition, both loaders, a report that compares them."""

import json

import pytest
from tiny_folder import write_text_data, write_tiny_model

from sharp_mlx import bench
from sharp_mlx.errors import SharpError
from sharp_mlx.quant.codes import quantize_model_folder


def test_bench_reports_every_row_against_mlx_lm(tmp_path):
    float_dir = write_tiny_model(tmp_path / "tiny", share={3: 2, 4: 2}, rank=32)
    plain = write_tiny_model(tmp_path / "plain")
    q = quantize_model_folder(plain, tmp_path / "plain-8bit", bits=8, group_size=32, from_gguf="none")["out"]
    data = write_text_data(tmp_path / "test.jsonl")
    out = tmp_path / "report" / "bench"
    argv = [
        "--row",
        f"{bench.REFERENCE}@mlx_lm={q}",
        "--row",
        f"same folder={q}",
        "--row",
        f"shared={float_dir}",
        "--reps",
        "1",
        "--max-tokens",
        "3",
        "--seq-len",
        "16",
        "--eval-windows",
        "2",
        "--data",
        str(data),
        "--out",
        str(out),
    ]
    assert bench.main(argv) in (None, 0)
    report = json.loads(out.with_suffix(".json").read_text())
    rows = report["rows"]
    assert list(rows) == [bench.REFERENCE, "same folder", "shared"]
    for r in rows.values():
        assert 0 < r["load_s"]["min"] <= r["load_s"]["median"] <= r["load_s"]["max"] < r["load_spawn_s"]["max"]
        assert r["decode_tps"]["median"] > 0 and r["bytes"] > 0 and r["peak_memory_gb"]["median"] > 0
        assert len(r["tokens"]) == len(bench.PROMPTS)  # every built-in prompt by default
    # mlx-lm and sharp_mlx load the same folder to the same greedy tokens, and the same perplexity.
    assert rows["same folder"]["tokens"] == rows[bench.REFERENCE]["tokens"]
    assert report["perplexity"]["same folder"] == report["perplexity"][bench.REFERENCE]
    assert rows["shared"]["bytes"] > rows[bench.REFERENCE]["bytes"]  # float32 vs 8-bit
    md = out.with_suffix(".md").read_text()
    assert "greedy tokens identical: True" in md and md.count("\n| ") >= 2 * 3
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize("spec", ["noequals", "=x", "name="])
def test_bad_row_is_a_one_line_error(spec):
    with pytest.raises(SharpError, match="NAME=FOLDER"):
        bench.parse_row(spec)


def test_rows_need_the_mlx_lm_reference(tmp_path, capsys):
    plain = write_tiny_model(tmp_path / "plain")
    assert bench.main(["--row", f"mine={plain}", "--out", str(tmp_path / "b")]) == 2
    assert "mlx_lm" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_cold_runs_read_the_weights_from_disk(tmp_path):
    """--cold drops the weight files from the page cache before each run, and the report says so."""
    plain = write_tiny_model(tmp_path / "plain")
    q = quantize_model_folder(plain, tmp_path / "plain-8bit", bits=8, group_size=32, from_gguf="none")["out"]
    out = tmp_path / "bench"
    argv = [
        "--row",
        f"{bench.REFERENCE}@mlx_lm={q}",
        "--reps",
        "1",
        "--prompts",
        "1",
        "--max-tokens",
        "2",
        "--eval-windows",
        "0",
        "--cold",
        "--out",
        str(out),
    ]
    assert bench.main(argv) in (None, 0)
    assert json.loads(out.with_suffix(".json").read_text())["config"]["cold"] is True
    assert "cold: the weight files were dropped" in out.with_suffix(".md").read_text()


def test_reference_adds_the_original_and_mlx_lms_4bit_of_it(tmp_path):
    plain = write_tiny_model(tmp_path / "plain")
    out = tmp_path / "bench"
    argv = [
        "--reference",
        str(plain),
        "--row",
        f"mine={plain}",
        "--reps",
        "1",
        "--prompts",
        "1",
        "--max-tokens",
        "2",
        "--eval-windows",
        "0",
        "--out",
        str(out),
    ]
    assert bench.main(argv) in (None, 0)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert list(rows) == ["original", bench.REFERENCE, "mine"]
    assert rows[bench.REFERENCE]["path"] == f"{plain}-mlx-4bit" and rows[bench.REFERENCE]["loader"] == "mlx_lm"
    assert rows[bench.REFERENCE]["bytes"] < rows["original"]["bytes"]
