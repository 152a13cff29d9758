"""experiments/answers.py: the loop detector on strings, bad input as one-line errors, and the whole
path on a tiny random model folder (seconds; the real run is experiments/results/answers.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script
from tiny_folder import write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "answers.py"


@pytest.fixture(scope="module")
def answers():
    return load_script("answers")


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        "Red, blue and green.",
        "I'm doing well, thank you! How can I help you today?",
        "7 + 5 = 12. So the answer is 12.",
        "Yes. Yes. Yes.",  # short sentences may repeat
        "1. Red\n2. Blue\n3. Green",
    ],
)
def test_a_plain_answer_does_not_loop(answers, text):
    assert answers.loop_reason(text) is None


@pytest.mark.parametrize(
    "text, reason",
    [
        ("The sea is blue and the sea is blue and the sea is blue and", '"the sea is blue" 3 times'),
        ("I am fine. How are you? I Am Fine!", 'sentence "i am fine" twice'),
        ("1. Red is warm.\n2. Blue is cold.\n3. Red is warm.\n", 'sentence "red is warm" twice'),  # renumbered
        ("a a a a a a", '"a a a a" 3 times'),  # overlapping occurrences count
        ("1. Red is warm. 2. Red is warm.", 'sentence "red is warm" twice'),  # numbered inline
    ],
)
def test_a_repeat_is_flagged_with_its_reason(answers, text, reason):
    assert answers.loop_reason(text) == reason


def test_the_loop_rule_needs_its_count(answers):
    twice = "one two three four, then one two three four"
    assert answers.loop_reason(twice) is None and answers.loop_reason(twice, times=2) is not None


def run(*args):
    p = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr


def test_help_runs():
    code, out, _ = run("--help")
    assert code == 0 and "--model" in out and "--out" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "models/no-such-model", "--out", "x"], "does not exist"),
        (["--model", "a=tests", "a=tests", "--out", "x"], "given twice"),
        (["--model", "=tests", "--out", "x"], "expected NAME=FOLDER"),
        (["--model", "tests", "--out", "x", "--max-tokens", "0"], "at least 1"),
        (["--out", "x"], "required"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    code, out, err = run(*args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_answers_of_two_folders_side_by_side(answers, tmp_path, capsys):
    a = write_tiny_model(tmp_path / "a", seed=0)
    b = write_tiny_model(tmp_path / "b", seed=1)
    prefix = tmp_path / "out" / "answers"
    assert answers.main(["--model", f"one={a}", str(b), "--out", str(prefix), "--max-tokens", "6"]) == 0
    record = json.loads(prefix.with_suffix(".json").read_text())
    assert list(record["models"]) == ["one", "b"] and record["command"].startswith(
        "python experiments/answers.py --model"
    )
    for m in record["models"].values():
        assert len(m["answers"]) == len(answers.PROMPTS) == 10
        assert all(0 < x["tokens"] <= 6 and x["stopped"] == (x["tokens"] < 6) for x in m["answers"])
        assert m["loops"] == sum(x["loop"] is not None for x in m["answers"])
    md = prefix.with_suffix(".md").read_text()
    assert record["command"] in md and "| prompt | one | b |" in md
    assert sum(line.startswith("| What is") for line in md.splitlines()) == 4
    # greedy: the same folder answers the same way twice
    again = tmp_path / "again"
    answers.main(["--model", f"one={a}", "--out", str(again), "--max-tokens", "6"])
    first = [x["text"] for x in record["models"]["one"]["answers"]]
    assert [x["text"] for x in json.loads(again.with_suffix(".json").read_text())["models"]["one"]["answers"]] == first
