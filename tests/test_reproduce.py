"""scripts/reproduce.py: the LoRA budget it matches is the one SFT trains, and its report is
written whole from a results record (the real run takes half an hour; these take seconds)."""

import importlib.util
import json
import math
import random
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from tiny_folder import write_text_data, write_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module
    spec.loader.exec_module(module)
    return module


def test_lora_rank_matches_what_sft_trains(reproduce, tmp_path, capsys):
    """The matched-budget LoRA rank: per rank, exactly the count SFT reports (MLP-pruned blocks have attention only)."""
    from sharp_mlx import train

    orig = write_tiny_model(tmp_path / "orig", seed=1)
    data = write_text_data(tmp_path / "train.jsonl")
    assert (
        train.main(
            [
                "--stage",
                "slw",
                "--model",
                str(orig),
                "--share",
                "next",
                "--layers",
                "1:6",
                "--baseline",
                "mlp-prune",
                "--out",
                str(tmp_path / "mp"),
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "mp" / "config.json").read_text())
    per_rank = None
    for rank in (2, 3):
        out = tmp_path / f"ft{rank}"
        assert (
            train.main(
                [
                    "--stage",
                    "sft",
                    "--model",
                    str(tmp_path / "mp"),
                    "--out",
                    str(out),
                    "--loss",
                    "ce",
                    "--lora-rank",
                    str(rank),
                    "--lora-layers",
                    "5",
                    "--steps",
                    "1",
                    "--batch-size",
                    "1",
                    "--seq-len",
                    "16",
                    "--eval-every",
                    "1",
                    "--save-every",
                    "1",
                    "--eval-windows",
                    "1",
                    "--data",
                    str(data),
                    "--valid",
                    str(data),
                    "--run-dir",
                    str(tmp_path / f"run{rank}"),
                ]
            )
            == 0
        )
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("trainable parameters"))
        count = int(line.split(":")[1].split("(")[0].replace(",", ""))
        per_rank = per_rank or count // rank
        assert count == per_rank * rank
        assert reproduce.lora_rank_for(config, count, 5) == rank
    assert reproduce.lora_rank_for(config, per_rank * 7 + per_rank // 3, 5) == 7


def fake_results(reproduce, quick: bool) -> dict:
    """A results record shaped as main() makes it, with made-up numbers, for every variant name
    build_variants can produce at the budget of ``quick``."""
    rng = random.Random(0)
    b = reproduce.QUICK if quick else reproduce.FULL
    groups = {
        "main": [
            "original",
            "direct",
            "mlp-prune",
            "layer-prune",
            "sharp-slw",
            "sharp-sftonly",
            "sharp",
            "control-slw",
            "control",
            "mlp-prune-ft",
            "layer-prune-ft",
        ],
        "aggressive": ["direct65", "mlp-prune65", "sharp65-slw", "sharp65", "control65-slw", "control65"],
        "cross": ["sharp-chat"],
        "position": ["pos-early", "pos-middle", "pos-late"],
        "grouping": ["next-late", "next2-late", "next3-late"],
        "rank": ["rank16", "control-rank16", "rank128", "control-rank128", "rank64", "control-rank64"],
        "data": ["data-quarter", "data-4x", "data-1x"],
        "param": ["scales-slw", "scales", "plain-slw", "plain"] if b.scales_full else ["scales-slw", "plain-slw"],
        "smaller": ["smaller", "smaller-ft"],
        "deploy": ["original-4bit", "mlx-4bit", "sharp-4bit", "sharp-4bit-emb6", "sharp65-4bit"],
    }
    v = {}
    for group, names in groups.items():
        for n in names:
            ppl = {d: rng.uniform(5, 100) for d in reproduce.DOMAINS}
            info = {
                "path": f"models/x/{n}",
                "group": group,
                "label": n,
                "ppl": ppl,
                "params": rng.randint(80, 135) * 10**6,
                "bytes": rng.randint(60, 540) * 10**6,
                "cloze": {},
            }
            if b.checks_cloze(n, group):
                info["cloze"] = {d: {"accuracy": rng.random(), "n": 5, "stderr": 0.2} for d in reproduce.DOMAINS}
            if n not in ("original", "mlx-4bit", "original-4bit"):
                info["mlp_cut"], info["targets"] = rng.random(), 14
            v[n] = info
    base = v["original"]["ppl"]
    for info in v.values():
        info["x_geo"] = math.exp(sum(math.log(info["ppl"][d] / base[d]) for d in reproduce.DOMAINS) / len(base))
        info["x_max"] = max(info["ppl"][d] / base[d] for d in reproduce.DOMAINS)
        if info["cloze"]:
            info["cloze_all"] = sum(c["accuracy"] for c in info["cloze"].values()) / len(info["cloze"])
    timing = {
        name: {
            "bytes": rng.randint(60, 100) * 10**6,
            "load_s": {"median": 0.2},
            "decode_tps": {"median": rng.uniform(4, 6)},
            "peak_memory_gb": {"median": 0.1},
        }
        for name in ("original-4bit mlx-lm", "original-4bit", "sharp-4bit", "sharp-4bit-emb6", "sharp65-4bit")
    }
    names = {
        "original-4bit mlx-lm": "mlx-4bit",
        **{n: n for n in ("original-4bit", "sharp-4bit", "sharp-4bit-emb6", "sharp65-4bit")},
    }
    return {
        "command": "python scripts/reproduce.py" + " --quick" * quick,
        "tag": "repro-quick",
        "quick": quick,
        "date": "2026-01-01",
        "machine": "test",
        "budget": asdict(b),
        "budget_params": 123,
        "analysis": {"table": "t r ...", "auto": {0.25: "{2: 1}"}},
        "variants": v,
        "bench": timing,
        "bench_names": names,
        "steps": {"sharp": 1.0},
        "wall_s": 60.0,
        "verdict": reproduce.verdict(v, timing, names),
    }


@pytest.mark.parametrize("quick", [True, False])
def test_report_has_every_section_and_figure(reproduce, tmp_path, quick):
    res = fake_results(reproduce, quick)
    out = tmp_path / "docs" / "RESULTS.md"
    out.parent.mkdir()
    (tmp_path / "sim.png").write_bytes(b"png")
    reproduce.plots(res["variants"], reproduce.fig_paths(out), tmp_path / "sim.png")
    reproduce.write_report(res, out)
    text = out.read_text()
    for section in (
        "Where SHARP wins",
        "1. Adjacent-layer similarity",
        "2. In-domain perplexity",
        "3. Cross-domain",
        "4. Ablations",
        "5. Against a smaller model",
        "6. Deployment",
        "7. Next-sentence",
    ):
        assert f"## {section}" in text, section
    for name, path in reproduce.fig_paths(out).items():
        assert path.stat().st_size > 0 and f"]({path.relative_to(out.parent)})" in text, name
    v = res["variants"]
    # Every variant appears in a table with its own numbers.
    for n, info in v.items():
        assert f"| {n}: " in text or f"| {n} |" in text, n
    assert f"{v['sharp']['x_geo']:.2f}" in text
    assert any(line.startswith("- SHARP against control") for line in text.splitlines())


def test_ablation_spans(reproduce):
    """The full run's spans are the ones its report names; every span holds k targets inside the stack."""
    assert [reproduce.span(5, w) for w in ("early", "middle", "late")] == ["1:11", "10:20", "19:29"]
    assert reproduce.span_targets("19:29") == [20, 22, 24, 26, 28]
    for k in (3, 5):
        for where in ("early", "middle", "late"):
            targets = reproduce.span_targets(reproduce.span(k, where))
            assert len(targets) == k and min(targets) >= 2 and max(targets) <= 28


def test_compare_names_the_largest_difference(reproduce, tmp_path, capsys):
    res = fake_results(reproduce, True)
    other = json.loads(json.dumps(res))
    other["variants"]["sharp"]["ppl"]["chat"] *= 1.1
    other["variants"]["control"]["cloze"]["chat"]["accuracy"] += 0.25
    c = reproduce.compare(res, other)
    assert c["ppl_worst"] == "sharp" and c["ppl_max_rel"] == pytest.approx(1 / 1.1 * 0.1)
    assert c["ppl_identical"] == c["variants"] - 1 and c["cloze_differ"] == ["control"]
    res["compare"] = c
    out = tmp_path / "RESULTS.md"
    reproduce.write_report(res, out)
    assert "## Reproducibility" in out.read_text() and "(sharp)" in out.read_text()
    assert reproduce.main(["--quick", "--compare", str(tmp_path / "missing.json")]) == 2  # at once, before any work
    assert "--compare" in capsys.readouterr().err


def test_resumed_run_keeps_every_step_time(reproduce, tmp_path):
    """A step's time outlives the invocation that ran it, so a run resumed later reports the whole run's time."""
    calls = []

    def step(argv):
        calls.append(argv)
        Path(argv[-1]).mkdir(parents=True)
        return 0

    first = reproduce.Steps(reproduce.QUICK, tmp_path / "models", tmp_path, tmp_path / "orig", lambda line: None)
    first._run("a", step, [])
    second = reproduce.Steps(reproduce.QUICK, tmp_path / "models", tmp_path, tmp_path / "orig", lambda line: None)
    second._run("a", step, [])  # done: skipped
    second._run("b", step, [])
    assert len(calls) == 2 and set(second.wall) == {"a", "b"} and second.earlier == {"a"}
    assert json.loads((tmp_path / "walls.json").read_text()).keys() == {"a", "b"}
    res = fake_results(reproduce, True)
    res["resumed"] = ["a"]
    reproduce.write_report(res, tmp_path / "RESULTS.md")
    assert "the run was resumed" in (tmp_path / "RESULTS.md").read_text()
