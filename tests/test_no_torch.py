"""The user path needs no torch: the main job and the README's CLIs run where ``import torch`` fails.

torch is installed for the reference tests, so each command runs in a subprocess whose first act
is ``sys.modules["torch"] = None``: any import of torch anywhere below it raises ImportError,
whatever the venv holds. The main job runs end to end (embedded GGUF import, SLW, SFT,
evaluation, 4-bit quantization with a GPTQ embedding, generation) at the smoke preset's budgets,
into a temporary models/ and runs/.
"""

import json
import subprocess
import sys

import pytest
from conftest import FIXTURES, run_tree

from sharp_mlx.data.corpora import DOMAINS

pytestmark = pytest.mark.real

BLOCK = (
    "import sys; sys.modules['torch'] = None; import runpy; sys.argv = sys.argv[1:]; "
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)


def no_torch(cwd, module, *argv, timeout=900):
    """Run ``python -m module argv`` in ``cwd`` with torch made unimportable; return stdout."""
    cmd = [sys.executable, "-c", BLOCK, module, *map(str, argv)]
    p = run_tree(cmd, timeout=timeout, cwd=cwd)
    assert p.returncode == 0, (
        f"python -m {module} {' '.join(cmd[4:])} failed without torch:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    )
    return p.stdout


def small_corpora(root):
    """data/<domain>/{train,valid,test}.jsonl cut from the prose fixture (chat as messages)."""
    text = (FIXTURES / "prose.txt").read_text()
    chunks = [text[i : i + 1500] for i in range(0, len(text), 1500)]
    for d in DOMAINS:
        for split in ("train", "valid", "test"):
            f = root / d / f"{split}.jsonl"
            f.parent.mkdir(parents=True, exist_ok=True)
            if d == "chat":
                rows = [
                    {"messages": [{"role": "user", "content": c[:200]}, {"role": "assistant", "content": c[200:]}]}
                    for c in chunks
                ]
            else:
                rows = [{"text": c} for c in chunks]
            f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_blocking_works(tmp_path):
    p = subprocess.run([sys.executable, "-c", BLOCK, "torch"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode != 0 and "ImportError" in p.stderr


def test_main_job_and_clis_without_torch(tmp_path):
    data = small_corpora(tmp_path / "data")
    # the advisor is tested on its own (tests/test_advise.py): here it would add minutes on the real model
    out = no_torch(
        tmp_path, "sharp_mlx.pipeline", "--preset", "smoke", "--data", data, "--name", "smoke", "--no-advise"
    )
    assert "pipeline done" in out
    models = tmp_path / "models"
    for name in ("smollm2-135m-instruct", "smoke-slw", "smoke", "smoke-4bit"):
        assert (models / name / "config.json").exists() and (models / name / "tokenizer.json").exists(), name
    q4 = json.loads((models / "smoke-4bit" / "config.json").read_text())
    assert q4["quantization"]["bits"] == 4 and q4["sharp"]["share"]
    tests = [data / d / "test.jsonl" for d in DOMAINS[:2]]
    # The other CLIs of the README's command table, on the smoke outputs.
    ppl = json.loads(
        no_torch(
            tmp_path,
            "sharp_mlx.evaluate",
            "--model",
            models / "smoke-4bit",
            "--data",
            *tests,
            "--seq-len",
            32,
            "--eval-windows",
            1,
            "--json",
        )
    )
    assert all(r["ppl"] > 1 for r in ppl.values())
    no_torch(
        tmp_path,
        "sharp_mlx.cloze",
        "--model",
        models / "smoke",
        "--data",
        tests[0],
        "--items",
        1,
        "--choices",
        2,
        "--context-tokens",
        16,
        "--json",
    )
    no_torch(tmp_path, "sharp_mlx.fuse", "--model", models / "smoke-4bit", "--out", models / "smoke-fused")
    no_torch(
        tmp_path,
        "sharp_mlx.analyze",
        "--data",
        tests[0],
        "--tokens",
        64,
        "--seq-len",
        32,
        "--rank",
        4,
        "--out",
        tmp_path / "runs" / "analyze",
    )
    answer = json.loads(
        no_torch(tmp_path, "sharp_mlx.generate", "--model", models / "smoke-fused", "--max-tokens", 2, "--json")
    )
    assert answer["generation_tokens"] >= 1
