"""Every row of docs/ERRORS.md: the bad input, run through its command in-process, answers with
exactly the catalogued one-line message on stderr, exit status 2, and no file written or changed."""

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
from conftest import ROOT
from tiny_folder import write_gguf, write_text_data, write_tiny_model

from sharp_mlx import advise, convert, evaluate, fuse, generate, pipeline, quantize, train, verify

MAINS = {
    "train": train.main,
    "convert": convert.main,
    "evaluate": evaluate.main,
    "generate": generate.main,
    "quantize": quantize.main,
    "fuse": fuse.main,
    "verify": verify.main,
    "advise": advise.main,
    "pipeline": pipeline.main,
}
CATALOGUE = ROOT / "docs" / "ERRORS.md"
FAULTS_HEADING = "## Faults during a run"  # the table after it is tests/test_faults.py's
LONG_PROMPT = "a" * 300  # the tiny model's context is 256 tokens, one a character
SLW = [
    "--stage",
    "slw",
    "--model",
    "orig",
    "--out",
    "out",
    "--data",
    "train.jsonl",
    "--seq-len",
    "32",
    "--tokens",
    "256",
    "--layers",
    "1:6",
]
SFT = [
    "--stage",
    "sft",
    "--model",
    "shared",
    "--out",
    "out",
    "--run-dir",
    "run",
    "--loss",
    "ce",
    "--seq-len",
    "32",
    "--batch-size",
    "2",
    "--valid-windows",
    "2",
]
DATA = ["--data", "train.jsonl", "--valid", "train.jsonl"]
ADVISE = ["--model", "orig", "--data", "train.jsonl", "--seq-len", "64", "--out", "report"]


class Case(NamedTuple):
    id: str
    module: str
    args: list
    shown: Optional[str] = None  # the command as the catalogue shows it, where args are unwieldy
    xfail: Optional[str] = None  # why the command does not answer as catalogued yet
    subprocess: bool = False  # run as `python -m`, where stderr holds everything (library logs too)

    def command(self) -> str:
        return self.shown or f"python -m sharp_mlx.{self.module} {shlex.join(self.args)}"


CASES = [
    # model folders
    Case("model-missing", "evaluate", ["--model", "nope", "--data", "train.jsonl"]),
    Case("model-is-a-file", "generate", ["--model", "train.jsonl"]),
    Case("not-a-model", "generate", ["--model", "noconfig"]),
    Case("config-not-json", "generate", ["--model", "badjson"]),
    Case("unsupported-model-type", "generate", ["--model", "gpt2cfg"]),
    Case("config-without-weights", "generate", ["--model", "noweights"]),
    Case("truncated-safetensors", "generate", ["--model", "truncated"]),
    Case("corrupt-safetensors", "generate", ["--model", "corrupt"]),
    Case("config-disagrees-with-weights", "generate", ["--model", "mismatch"]),
    Case("folder-asks-to-run-code", "generate", ["--model", "remote"]),
    # importing
    Case("import-asks-to-run-code", "convert", ["--source", "remote", "--out", "imported"]),
    Case("gguf-unsupported-architecture", "convert", ["--source", "gpt2.gguf", "--out", "imported"]),
    Case("import-unsupported-model-type", "convert", ["--source", "gpt2cfg", "--out", "imported"]),
    Case("import-unsupported-rope", "convert", ["--source", "yarncfg", "--out", "imported"]),
    Case("source-missing", "convert", ["--source", "nothing.gguf", "--out", "imported"]),
    Case("pipeline-depth-without-model", "pipeline", ["--depth", "0.5:1"]),
    Case("pipeline-bad-depth", "pipeline", ["--model", "orig", "--depth", "1:0.5"]),
    Case("source-not-gguf", "convert", ["--source", "weights.bin", "--out", "imported"]),
    Case("import-output-exists", "convert", ["--source", "orig", "--out", "existing"]),
    # share maps and ranks (SLW)
    Case("share-target-before-reference", "train", SLW[:-2] + ["--share", '{"3": 4}']),
    Case("share-target-out-of-range", "train", SLW[:-2] + ["--share", '{"9": 8}']),
    Case("share-reference-out-of-range", "train", SLW[:-2] + ["--share", '{"3": -1}']),
    Case("share-reference-is-a-target", "train", SLW[:-2] + ["--share", '{"3": 2, "4": 3}']),
    Case("share-map-empty", "train", SLW[:-2] + ["--share", "{}"]),
    Case("share-map-not-json", "train", SLW[:-2] + ["--share", '{"3": 2']),
    Case("share-map-file-missing", "train", SLW[:-2] + ["--share", "map.json"]),
    Case("share-map-with-a-layer-range", "train", SLW + ["--share", '{"3": 2}']),
    Case("share-spec-unknown", "train", SLW + ["--share", "nxt"]),
    Case("share-group-size-zero", "train", SLW + ["--share", "next:0"]),
    Case("layer-range-empty", "train", SLW[:-1] + ["5:3"]),
    Case("layer-range-outside", "train", SLW[:-1] + ["2:40"]),
    Case("rank-zero", "train", SLW + ["--rank", "0"]),
    Case("rank-larger-than-layer", "train", SLW + ["--rank", "65"]),
    Case("slw-on-a-shared-model", "train", ["--stage", "slw", "--model", "shared", "--out", "out"]),
    Case("slw-output-exists", "train", SLW[:4] + ["--out", "existing"] + SLW[6:]),
    # data files
    Case("data-missing", "train", SFT + ["--data", "nothing.jsonl", "--valid", "train.jsonl"]),
    Case("data-empty", "train", SFT + ["--data", "empty.jsonl", "--valid", "train.jsonl"]),
    Case("data-malformed-line", "train", SFT + ["--data", "malformed.jsonl", "--valid", "train.jsonl"]),
    Case("data-unknown-format", "train", SFT + ["--data", "unknown.jsonl", "--valid", "train.jsonl"]),
    Case("data-not-utf8", "train", SFT + ["--data", "latin1.jsonl", "--valid", "train.jsonl"]),
    Case("data-shorter-than-a-batch", "train", SFT + ["--data", "short.jsonl", "--valid", "train.jsonl"]),
    Case("valid-shorter-than-a-window", "train", SFT + ["--data", "train.jsonl", "--valid", "short.jsonl"]),
    Case("eval-shorter-than-a-window", "evaluate", ["--model", "orig", "--data", "short.jsonl", "--seq-len", "64"]),
    Case(
        "calibration-shorter-than-a-window",
        "train",
        SLW[:6] + ["--data", "short.jsonl", "--seq-len", "64", "--layers", "1:6"],
    ),
    # SFT
    Case("sft-kd-without-teacher", "train", SFT[:8] + ["--loss", "kd"] + SFT[10:] + DATA),
    Case("sft-unshared-model", "train", SFT[:2] + ["--model", "orig"] + SFT[4:] + DATA),
    Case("sft-teacher-differs", "train", SFT[:8] + ["--loss", "kd", "--teacher", "other"] + SFT[10:] + DATA),
    Case("sft-bad-setting", "train", SFT + DATA + ["--sft-steps", "0"]),
    Case("flag-misspelt", "train", SFT + DATA + ["--setps", "10"]),
    Case("flag-bad-value", "train", SFT + DATA + ["--sft-steps", "ten"]),
    Case("sft-run-dir-holds-a-checkpoint", "train", SFT[:6] + ["--run-dir", "run-done"] + SFT[8:] + DATA),
    Case("sft-resume-without-checkpoint", "train", SFT + DATA + ["--resume"]),
    Case(
        "sft-resume-changed-settings",
        "train",
        SFT[:6] + ["--run-dir", "run-done"] + SFT[8:] + DATA + ["--resume", "--seed", "1"],
    ),
    # generate, quantize
    Case("max-tokens-zero", "generate", ["--model", "orig", "--max-tokens", "0"]),
    Case(
        "prompt-longer-than-context",
        "generate",
        ["--model", "orig", "--prompt", LONG_PROMPT, "--max-tokens", "4"],
        shown="python -m sharp_mlx.generate --model orig --prompt 'aaa...a (300 characters)' --max-tokens 4",
        subprocess=True,
    ),
    Case(
        "quantize-already-quantized",
        "quantize",
        ["--model", "quantized", "--out", "requantized", "--from-gguf", "none"],
    ),
    Case("quantize-output-exists", "quantize", ["--model", "orig", "--out", "existing", "--from-gguf", "none"]),
    Case(
        "quantize-calibration-without-bits",
        "quantize",
        ["--model", "orig", "--out", "q", "--from-gguf", "none", "--calibration", "train.jsonl"],
    ),
    # broken folders (issue 25)
    Case("config-is-a-list", "generate", ["--model", "listcfg"]),
    Case("config-without-layers", "generate", ["--model", "nolayers"]),
    Case("tokenizer-missing", "generate", ["--model", "notok"]),
    Case("quantize-without-tokenizer", "quantize", ["--model", "notok", "--out", "q", "--from-gguf", "none"]),
    Case("fuse-without-tokenizer", "fuse", ["--model", "notok", "--out", "fused"]),
    Case("convert-truncated-safetensors", "convert", ["--source", "truncated", "--out", "imported"]),
    Case("weights-stray-file", "generate", ["--model", "stray"]),
    Case("weights-stray-file-without-index", "generate", ["--model", "strayplain"]),
    Case("weights-shard-missing", "generate", ["--model", "shardmissing"]),
    Case("weights-in-two-files", "generate", ["--model", "twice"]),
    Case("weights-index-names-missing-file", "generate", ["--model", "indexmissing"]),
    Case("weights-not-finite", "evaluate", ["--model", "nanmodel", "--data", "train.jsonl"]),
    Case("weights-corrupted", "verify", ["--model", "flipped"]),
    Case(
        "prompt-not-utf8",
        "generate",
        ["--model", "orig", "--prompt", "caf\udce9"],
        shown="python -m sharp_mlx.generate --model orig --prompt $'caf\\xe9'",
    ),
    Case("sft-resume-checkpoint-cut-off", "train", SFT[:6] + ["--run-dir", "run-cut"] + SFT[8:] + DATA + ["--resume"]),
    Case(
        "sft-resume-adapters-missing",
        "train",
        SFT[:6] + ["--run-dir", "run-noadapters"] + SFT[8:] + DATA + ["--resume"],
    ),
    # the advisor
    Case("advise-cut-outside", "advise", ADVISE + ["--cut", "1.5"]),
    Case("advise-too-few-layers-for-the-cut", "advise", ADVISE + ["--cut", "0.5", "--rank", "8"]),
    Case("advise-budget-below-any-plan", "advise", ADVISE + ["--budget-mb", "0.01", "--rank", "8"]),
    Case(
        "advise-calibration-shorter-than-a-window",
        "advise",
        ADVISE[:3] + ["short.jsonl"] + ADVISE[4:] + ["--rank", "8"],
    ),
]


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every input the catalogue names, good and bad, in one folder (the commands run inside it)."""
    w = tmp_path_factory.mktemp("world")
    orig = write_tiny_model(w / "orig")
    write_tiny_model(w / "shared", share={3: 2, 5: 4}, rank=4)
    write_tiny_model(w / "other", seed=5)
    write_text_data(w / "train.jsonl")
    (w / "short.jsonl").write_text('{"text": "too short."}\n')
    (w / "empty.jsonl").write_text("\n")
    (w / "malformed.jsonl").write_text('{"text": "fine."}\n{"text": "fine."}\n{"text": "cut off\n')
    (w / "unknown.jsonl").write_text('{"title": "no text field"}\n')
    (w / "latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (w / "weights.bin").write_bytes(b"\0" * 64)
    write_gguf(w / "gpt2.gguf", "gpt2")
    (w / "noconfig").mkdir()
    (w / "noweights").mkdir()
    shutil.copy(orig / "config.json", w / "noweights")
    (w / "badjson").mkdir()
    (w / "badjson" / "config.json").write_text('{"model_type": "llama",')
    for name in ("gpt2cfg", "truncated", "corrupt", "mismatch", "remote", "yarncfg"):
        shutil.copytree(orig, w / name)
    edit_config(w / "gpt2cfg", model_type="gpt2")
    edit_config(w / "yarncfg", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    data = (orig / "model.safetensors").read_bytes()
    (w / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (w / "corrupt" / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{garbage.......}" + data[100:])
    edit_config(w / "mismatch", intermediate_size=128)
    edit_config(w / "remote", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomLlama"})
    (w / "remote" / "modeling_custom.py").write_text("raise SystemExit('this code must never run')\n")
    broken_folders(w, orig)
    (w / "existing").mkdir()
    (w / "existing" / "keep.txt").write_text("an earlier result\n")
    assert (
        quantize.main(
            ["--model", str(orig), "--out", str(w / "quantized"), "--from-gguf", "none", "--group-size", "32"]
        )
        == 0
    )
    done = (
        SFT[:4] + ["--out", str(w / "done"), "--run-dir", str(w / "run-done")] + SFT[8:] + DATA + ["--sft-steps", "2"]
    )
    assert (
        train.main(
            [a.replace("shared", str(w / "shared")).replace("train.jsonl", str(w / "train.jsonl")) for a in done]
        )
        == 0
    )
    for name, damage in (("run-cut", "cut"), ("run-noadapters", "adapters")):
        shutil.copytree(w / "run-done", w / name)
        state = (w / name / "checkpoint.json").read_text()
        if damage == "cut":
            (w / name / "checkpoint.json").write_text(state[: len(state) // 2])
        else:
            (w / name / json.loads(state)["adapters"]).unlink()
    return w


def broken_folders(w: Path, orig: Path) -> None:
    """Model folders broken in the ways issue 25 found: each refused in one line."""
    import mlx.core as mx

    for name in ("listcfg", "nolayers", "notok", "stray", "strayplain", "shardmissing", "twice", "indexmissing"):
        shutil.copytree(orig, w / name)
    (w / "listcfg" / "config.json").write_text("[]")
    config = json.loads((orig / "config.json").read_text())
    (w / "nolayers" / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "num_hidden_layers"})
    )
    (w / "notok" / "tokenizer.json").unlink()
    shutil.copy(orig / "model.safetensors", w / "stray" / "model-backup.safetensors")
    (w / "strayplain" / "model.safetensors.index.json").unlink()
    shutil.copy(orig / "model.safetensors", w / "strayplain" / "model.old.safetensors")
    weights = mx.load(str(orig / "model.safetensors"))
    names = sorted(weights)
    for name, parts in (("shardmissing", [names[:10], names[10:]]), ("twice", [names[:10], names[9:]])):
        (w / name / "model.safetensors").unlink()
        (w / name / "model.safetensors.index.json").unlink()
        for k, part in enumerate(parts):
            shard = w / name / f"model-0000{k + 1}-of-0000{len(parts) + (name == 'shardmissing')}.safetensors"
            mx.save_safetensors(str(shard), {n: weights[n] for n in part})
    index = json.loads((orig / "model.safetensors.index.json").read_text())
    index["weight_map"][names[0]] = "model-00002-of-00002.safetensors"
    (w / "indexmissing" / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copytree(orig, w / "nanmodel")
    weights["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    mx.save_safetensors(str(w / "nanmodel" / "model.safetensors"), weights, metadata={"format": "mlx"})
    (w / "nanmodel" / "checksums.json").unlink()
    shutil.copytree(orig, w / "flipped")
    data = bytearray((orig / "model.safetensors").read_bytes())
    data[-100:-96] = bytes(b ^ 0xFF for b in data[-100:-96])
    (w / "flipped" / "model.safetensors").write_bytes(bytes(data))


def snapshot(folder: Path) -> dict:
    """Every path under folder: a hash of its bytes, or "dir"."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if "__pycache__" not in p.parts
    }


def read_catalogue() -> dict:
    """{id: {"command", "message"}} from the table rows of docs/ERRORS.md."""
    rows = {}
    for line in CATALOGUE.read_text().split(FAULTS_HEADING)[0].splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        code = [c[3:-3] if c.startswith("`` ") else c.strip("`") for c in cells]
        rows[code[0]] = {"input": cells[1], "command": code[2], "message": code[3], "fix": cells[4]}
    return rows


def test_catalogue_lists_every_case_and_no_other():
    rows = read_catalogue()
    assert list(rows) == [c.id for c in CASES]
    assert len(rows) >= 20
    for case in CASES:
        assert rows[case.id]["command"] == case.command(), case.id
        assert rows[case.id]["input"] and rows[case.id]["fix"], case.id


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=False, reason=c.xfail)] if c.xfail else [])
        for c in CASES
    ],
)
def test_bad_input_answers_one_line_and_writes_nothing(case, world, monkeypatch, capsys):
    monkeypatch.chdir(world)
    before = snapshot(world)
    if case.subprocess:
        p = subprocess.run(
            [sys.executable, "-m", f"sharp_mlx.{case.module}", *case.args], capture_output=True, text=True, timeout=120
        )
        status, err = p.returncode, p.stderr
    else:
        status = MAINS[case.module](case.args)
        err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0] == read_catalogue()[case.id]["message"]
    assert snapshot(world) == before
