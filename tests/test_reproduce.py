"""experiments/reproduce.py: its variant table makes the same models as before from the original's
layer count, the LoRA budget it matches is the one SFT trains, and its report is written whole
from a results record (the real run takes half an hour; these take seconds)."""

import json
import math
import random
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import load_script, tiny_model
from tiny_folder import write_text_data, write_tiny_model


@pytest.fixture(scope="module")
def reproduce():
    return load_script("reproduce")


def test_lora_rank_matches_what_sft_trains(tmp_path, capsys):
    """The matched-budget LoRA rank: per rank, exactly the count SFT reports (MLP-pruned blocks have attention only)."""
    from sharp_mlx import train
    from sharp_mlx.models.sharemap import lora_rank_for

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
                    "--sft-steps",
                    "1",
                    "--batch-size",
                    "1",
                    "--seq-len",
                    "16",
                    "--valid-every",
                    "1",
                    "--valid-windows",
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
        assert lora_rank_for(config, count, 5) == rank
    assert lora_rank_for(config, per_rank * 7 + per_rank // 3, 5) == 7


def reported(full: bool) -> dict:
    """The variants the report shows, by table, in its order (as the run before the table made them)."""
    return {
        "main": [
            *("original", "direct", "mlp-prune", "layer-prune", "sharp-slw", "sharp-sftonly", "sharp"),
            *("control-slw", "control", "mlp-prune-ft", "layer-prune-ft"),
        ],
        "aggressive": ["direct65", "mlp-prune65", "sharp65-slw", "sharp65", "control65-slw", "control65"],
        "cross": ["sharp-chat", "sharp-chat-only"] if full else ["sharp-chat"],
        "position": ["pos-early", "pos-middle", "pos-late"],
        "grouping": ["next-late", "next2-late", "next3-late"],
        "rank": [
            *(["rank16", "control-rank16", "rank32", "control-rank32"] if full else ["rank16", "control-rank16"]),
            *("rank128", "control-rank128", "rank64", "control-rank64"),
        ],
        "data": ["data-quarter", "data-4x", "data-1x"],
        "param": ["scales-slw", "scales", "plain-slw", "plain"] if full else ["scales-slw", "plain-slw"],
        "smaller": ["smaller", "smaller-ft"],
        "deploy": ["original-4bit", "mlx-4bit", "sharp-4bit", "sharp-4bit-emb6", "sharp65-4bit"],
    }


def fake_results(reproduce, quick: bool) -> dict:
    """A results record shaped as main() makes it, with made-up numbers, for every variant the
    table reports at the budget of ``quick`` (of the 30-layer original)."""
    rng = random.Random(0)
    b = reproduce.QUICK if quick else reproduce.FULL
    groups = {}
    for x in reproduce.variants(b, 30):
        if x.group:
            groups.setdefault(x.group, []).append(x.name)
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
        "command": "python experiments/reproduce.py" + " --quick" * quick,
        "tag": "repro-quick",
        "quick": quick,
        "date": "2026-01-01",
        "machine": "test",
        "budget": asdict(b),
        "model": {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536},
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


def test_settings_of_a_30_layer_stack_are_the_literal_ones(reproduce):
    """Derived from num_hidden_layers, the 30-layer original gets the spans the reports name."""
    assert reproduce.inner(30) == "1:29"
    assert reproduce.default(30) == ["--share", "next", "--layers", "1:29", "--rank", "64"]
    assert reproduce.aggressive(30) == ["--share", "next:3", "--layers", "1:29", "--rank", "32"]
    spans = {k: [reproduce.span(k, w, 30) for w in ("early", "middle", "late")] for k in (3, 5)}
    assert spans == {3: ["1:7", "12:18", "23:29"], 5: ["1:11", "10:20", "19:29"]}
    assert reproduce.span_targets("19:29") == [20, 22, 24, 26, 28]
    labels = {x.name: x.label for x in reproduce.variants(reproduce.QUICK, 30)}
    assert labels["next-late"] == "next: every other layer of 24..28 borrows the one before"
    assert labels["pos-middle"] == "middle: targets 13, 15, 17"
    full = {x.name: x for x in reproduce.variants(reproduce.FULL, 30)}
    assert full["scales-slw"].flags == ("--share", "next", "--layers", "1:29", "--rank", 63, "--recovery", "scaled")
    assert full["next3-late"].flags == ("--share", "next:3", "--layers", "19:29", "--rank", 64)


@pytest.mark.parametrize("n", [6, 12, 30, 32])
def test_spans_hold_k_targets_inside_any_stack(reproduce, n):
    from sharp_mlx.models.sharemap import parse_share

    for k in (1, 2, (n - 2) // 2):
        for where in ("early", "middle", "late"):
            layers = reproduce.span(k, where, n)
            targets = reproduce.span_targets(layers)
            assert len(targets) == k and min(targets) >= 2 and max(targets) <= n - 2, (k, where, layers)
            assert sorted(parse_share("next", n, layers)) == targets
    assert sorted(parse_share("next", n, reproduce.inner(n))) == list(range(2, n - 1, 2))


@pytest.mark.parametrize("quick", [True, False])
def test_table_names_are_unique_and_sources_come_first(reproduce, quick):
    b = reproduce.QUICK if quick else reproduce.FULL
    table = reproduce.variants(b, 30)
    names = [x.name for x in table]
    assert len(names) == len(set(names))
    groups = {}
    for x in table:
        if x.group:
            groups.setdefault(x.group, []).append(x.name)
    assert groups == reported(full=not quick)
    assert [n for n in names if n not in sum(groups.values(), [])] == ["sharp-noslw"] + ["sharp-slw-chat"] * (not quick)
    needs = {
        reproduce.matched_lora: {"original", "sharp-slw"},
        reproduce.same_size: {"original", "layer-prune", "sharp", "sharp-slw"},
    }
    for i, x in enumerate(table):
        assert x.stage in ("given", "slw", "sft", "quantize", "mlx-4bit"), x
        assert (
            (x.stage == "slw" and x.source is None)
            or (x.stage == "sft" and x.source)
            or x.stage in ("given", "quantize", "mlx-4bit")
        ), x
        before = set(names[:i])
        assert x.source is None or x.source in before, x
        if x.rule:
            assert needs[x.rule] <= before, x
            assert x.rule is not reproduce.matched_lora or x.source, x
        else:
            assert "{" not in x.label, x
        assert x.group is not None or x.name in {y.source for y in table[i + 1 :]}, f"{x.name} is made for nothing"
    shown = {x.name for x in table if x.group}
    assert set(b.cloze or []) <= shown and set(reproduce.BENCH_ROWS) | {"mlx-4bit", "sharp-slw"} <= shown


def test_build_variants_runs_the_table_in_order(reproduce, tmp_path, monkeypatch):
    """One step per made variant, in table order; a given variant is its source's folder; a hidden
    step is not reported; the rules' flags go first and their facts into the label."""
    from sharp_mlx import save
    from sharp_mlx.models.sharemap import lora_rank_for, prune_layers, savings

    calls = []

    class Recorded(reproduce.Steps):
        def _run(self, name, main, argv):
            calls.append((name, main.__module__, [str(a) for a in argv]))
            return folders.get(name, self.models / name)

    # The folders the rules read: a 6-layer original, its shared, pruned and MLP-pruned models.
    share = {2: 1, 4: 3}
    folders = {
        "sharp-slw": write_tiny_model(tmp_path / "sharp-slw", share=share, rank=4),
        "sharp": write_tiny_model(tmp_path / "sharp", share=share, rank=4),
        "mlp-prune": write_tiny_model(tmp_path / "mlp-prune", share={2: None, 4: None}),
    }
    original = write_tiny_model(tmp_path / "orig")
    pruned, pruned_config = prune_layers(*tiny_model(), [2, 4])
    save(tmp_path / "layer-prune", pruned, pruned_config)
    folders["layer-prune"] = folders["smaller"] = tmp_path / "layer-prune"
    monkeypatch.setattr(reproduce.bench, "mlx_4bit", lambda p: Path(f"{p}-mlx-4bit"))
    steps = Recorded(reproduce.QUICK, tmp_path / "models", tmp_path, original, lambda line: None)
    table = reproduce.variants(reproduce.QUICK, 30)
    v = reproduce.build_variants(steps, table)

    assert list(v) == [x.name for x in table if x.group]
    assert [c[0] for c in calls] == [x.name for x in table if x.stage in ("slw", "sft", "quantize")]
    for x in table:
        if x.stage == "given":
            assert v[x.name]["path"] == (v[x.source]["path"] if x.source else str(original)), x.name
    assert v["rank64"]["path"] == v["pos-late"]["path"] and v["plain-slw"]["path"] == v["pos-late"]["path"]
    assert v["mlx-4bit"]["path"] == f"{original}-mlx-4bit" and "sharp-noslw" not in v
    argv = {name: a for name, _, a in calls}
    assert argv["sharp-sftonly"][argv["sharp-sftonly"].index("--model") + 1] == str(tmp_path / "models" / "sharp-noslw")
    # The matched LoRA: the rank whose count is SHARP's recovery budget, on every block from its first target on.
    budget = savings(json.loads((original / "config.json").read_text()), share, 64)["recovery_params"]
    mp_config = json.loads((folders["mlp-prune"] / "config.json").read_text())
    r = lora_rank_for(mp_config, budget, 6 - 2)
    assert argv["mlp-prune-ft"][-4:] == ["--lora-rank", str(r), "--lora-layers", "4"]
    assert v["mlp-prune-ft"]["label"] == f"MLP pruning + LoRA r{r} (matched budget)"
    assert argv["layer-prune-ft"][-1] == "2"  # the pruned model's 4 layers, from layer 2 on
    # The smaller model: SHARP saves 2 MLPs less 2 rank-4 recoveries, 1.07 of the 30,848 parameters a
    # pruned layer takes, so one layer goes: the top one but the last.
    assert argv["smaller"][-4:] == ["--share", '{"4": 3}', "--baseline", "layer-prune"]
    assert v["smaller"]["label"] == "1 layers removed, no fine-tuning"
    assert v["smaller-ft"]["label"].startswith("2 layers removed + LoRA r")  # its folder here: layer-prune's


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
