"""Real faults (issue 25), each answered with one line and exit status 2, nothing half-written left:
a learning rate that makes the weights NaN, a second writer on one folder, a stray weights file,
flipped bytes, a full or read-only disk, leftovers of killed runs, a rerun with other settings."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import ROOT
from tiny_folder import write_text_data, write_tiny_model

from sharp_mlx import convert, evaluate, fuse, generate, quantize, train, verify
from sharp_mlx.errors import SharpError
from sharp_mlx.eval import perplexity as perplexity_lib
from sharp_mlx.io import checkpoint
from sharp_mlx.io.integrity import first_nonfinite
from sharp_mlx.io.locking import lock_path
from sharp_mlx.jobs import main_job
from sharp_mlx.recipes import preset
from sharp_mlx.recovery import stages

SFT = ["--stage", "sft", "--loss", "ce", "--seq-len", "32", "--batch-size", "2", "--valid-windows", "2"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("faults")
    write_tiny_model(w / "orig")
    write_tiny_model(w / "shared", share={3: 2, 5: 4}, rank=4)
    write_text_data(w / "train.jsonl")
    return w


def error_line(err: str, prog: str) -> str:
    """The one error line of a failed command (a progress bar may precede it on stderr)."""
    lines = [line for line in err.splitlines() if "error:" in line or "Traceback" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sharp_mlx.{prog}: error: "), err
    return lines[0]


def sft_args(w: Path, out: str, run: str, *extra: str) -> list:
    paths = ["--model", str(w / "shared"), "--out", str(w / out), "--run-dir", str(w / run)]
    data = ["--data", str(w / "train.jsonl"), "--valid", str(w / "train.jsonl")]
    return SFT + paths + data + list(extra)


def leftovers(folder: Path) -> list:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".lock")]


# 1. finite or refused


@pytest.fixture
def unchecked_learning_rate(monkeypatch):
    """The command refuses a learning rate outside (0, 1] before any work (tested below); these tests let
    one through, as a library caller of train_sft could, to check the stage's own guard against divergence."""
    from sharp_mlx import options, recipes

    real = recipes.check
    skip = lambda name, value: None if name == "learning_rate" else real(name, value)  # noqa: E731
    monkeypatch.setattr(recipes, "check", skip)
    monkeypatch.setattr(options, "check", skip)


@pytest.mark.parametrize("lr", ["1e30", "nan"])
def test_the_command_refuses_a_learning_rate_out_of_range_before_any_work(world, lr, capsys):
    assert train.main(sft_args(world, f"refused-{lr}", f"run-refused-{lr}", "--learning-rate", lr)) == 2
    line = error_line(capsys.readouterr().err, "train")
    assert "--learning-rate" in line and not (world / f"run-refused-{lr}").exists()


@pytest.mark.parametrize("lr", ["1e30", "nan"])
def test_sft_with_a_diverging_learning_rate_stops_and_writes_no_model(world, lr, capsys, unchecked_learning_rate):
    status = train.main(sft_args(world, f"nan-{lr}", f"run-nan-{lr}", "--sft-steps", "1", "--learning-rate", lr))
    line = error_line(capsys.readouterr().err, "train")
    assert status == 2
    assert "not finite" in line or "is nan" in line, line
    assert "keeps no checkpoint yet" in line
    assert not (world / f"nan-{lr}").exists()
    assert leftovers(world) == []


def test_sft_diverging_after_a_checkpoint_names_the_step_it_keeps(world, capsys, unchecked_learning_rate):
    assert train.main(sft_args(world, "ok", "run-keep", "--sft-steps", "1", "--valid-every", "1")) == 0
    capsys.readouterr()
    args = sft_args(world, "ok2", "run-keep", "--sft-steps", "3", "--valid-every", "1", "--learning-rate", "1e30")
    assert train.main(args + ["--resume"]) == 2
    line = error_line(capsys.readouterr().err, "train")
    assert "keeps the checkpoint of step 1" in line, line
    state = json.loads((world / "run-keep" / "checkpoint.json").read_text())
    assert state["step"] == 1
    adapters = mx.load(str(world / "run-keep" / state["adapters"]))
    assert first_nonfinite(adapters.items()) is None
    history = json.loads((world / "ok" / "training.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert history[-1]["stage"] == "sft"


def nan_model(world: Path) -> Path:
    bad = world / "nanmodel"
    if not bad.exists():
        shutil.copytree(world / "orig", bad)
        weights = mx.load(str(bad / "model.safetensors"))
        weights["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
        mx.save_safetensors(str(bad / "model.safetensors"), weights, metadata={"format": "mlx"})
    return bad


@pytest.mark.parametrize(
    "module,args",
    [
        (generate, ["--model", "{bad}", "--max-tokens", "2"]),
        (evaluate, ["--model", "{bad}", "--data", "{w}/train.jsonl", "--seq-len", "16"]),
        (quantize, ["--model", "{bad}", "--out", "{w}/q-nan", "--from-gguf", "none"]),
        (fuse, ["--model", "{bad}", "--out", "{w}/f-nan"]),
        (
            train,
            ["--stage", "slw", "--model", "{bad}", "--out", "{w}/s-nan", "--data", "{w}/train.jsonl"]
            + ["--seq-len", "16", "--tokens", "64", "--layers", "1:6"],
        ),
    ],
    ids=["generate", "evaluate", "quantize", "fuse", "slw"],
)
def test_every_command_refuses_a_model_with_nan_naming_the_tensor(world, module, args, capsys):
    bad = nan_model(world)
    args = [a.format(bad=bad, w=world) for a in args]
    (bad / "checksums.json").unlink(missing_ok=True)  # the NaN was written on purpose: only the finite check stands
    assert module.main(args) == 2
    line = error_line(capsys.readouterr().err, module.__name__.split(".")[-1])
    # fuse reads lazily (tensor by tensor) and refuses the fused tensor; the others refuse the loaded one
    assert "model.layers.2.mlp.up_proj.weight" in line and ("is not finite" in line or "non-finite" in line), line
    assert not any((world / n).exists() for n in ("q-nan", "f-nan", "s-nan"))


def test_writing_a_non_finite_model_is_refused_before_the_rename(world, tmp_path):
    from conftest import tiny_model

    model, config = tiny_model()
    model.model.norm.weight = mx.full(model.model.norm.weight.shape, float("inf"))
    with pytest.raises(SharpError, match="weight model.norm.weight is not finite"):
        checkpoint.save(tmp_path / "inf", model, config)
    assert list(tmp_path.iterdir()) == []


def test_a_perplexity_that_overflows_is_refused_not_printed(world, capsys, monkeypatch):
    monkeypatch.setattr(perplexity_lib, "window_losses", lambda model, batch: mx.full((batch.shape[0],), float("inf")))
    status = evaluate.main(["--model", str(world / "orig"), "--data", str(world / "train.jsonl"), "--seq-len", "16"])
    line = error_line(capsys.readouterr().err, "evaluate")
    assert status == 2 and "not a finite number" in line
    assert "nan" not in capsys.readouterr().out.lower()


# 2. one writer per folder

HOLDER = """
import sys, time
from sharp_mlx.io.locking import folder_lock
with folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_writer_is_refused_at_once_naming_the_holder(world, capsys):
    out = world / "q-locked"
    holder = hold_lock(out)
    try:
        tic = time.perf_counter()
        status = quantize.main(["--model", str(world / "orig"), "--out", str(out), "--from-gguf", "none"])
        line = error_line(capsys.readouterr().err, "quantize")
        assert status == 2
        assert f"is being written by process {holder.pid}" in line, line
        assert time.perf_counter() - tic < 5  # before any work
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_two_concurrent_sft_runs_on_one_run_folder(world):
    """Two real `python -m sharp_mlx.train` processes started together: exactly one trains."""
    cmds = [
        [sys.executable, "-m", "sharp_mlx.train"] + sft_args(world, f"twin{i}", "run-twin", "--sft-steps", "2")
        for i in range(2)
    ]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for c in cmds]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    statuses = sorted(s for s, _ in results)
    assert statuses == [0, 2], results
    err = next(e for s, e in results if s == 2)
    assert "is being written by process" in error_line(err, "train")


def test_a_stale_lock_of_a_killed_writer_is_taken_over(world, capsys):
    out = world / "q-stale"
    holder = hold_lock(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert lock_path(out).exists()
    assert quantize.main(["--model", str(world / "orig"), "--out", str(out), "--from-gguf", "none"]) == 0
    err = capsys.readouterr().err
    assert f"took over the lock left by process {holder.pid}, which is no longer running" in err
    assert (out / "config.json").exists() and not lock_path(out).exists()


# 3. load exactly what the folder says


@pytest.fixture
def copy_of_orig(world, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(world / "orig", folder)
    return folder


def test_a_stray_weights_file_is_refused_by_name(copy_of_orig, capsys):
    shutil.copy(copy_of_orig / "model.safetensors", copy_of_orig / "model-backup.safetensors")
    assert generate.main(["--model", str(copy_of_orig), "--max-tokens", "2"]) == 2
    line = error_line(capsys.readouterr().err, "generate")
    assert "model-backup.safetensors is not among the weights files" in line, line


def test_a_stray_file_beside_a_folder_without_index(copy_of_orig):
    (copy_of_orig / "model.safetensors.index.json").unlink()
    shutil.copy(copy_of_orig / "model.safetensors", copy_of_orig / "model.old.safetensors")
    with pytest.raises(SharpError, match="model.old.safetensors is not part of the weights"):
        checkpoint.load_model(copy_of_orig)


def test_shards_must_be_complete_and_disjoint(copy_of_orig):
    (copy_of_orig / "model.safetensors.index.json").unlink()
    weights = mx.load(str(copy_of_orig / "model.safetensors"))
    (copy_of_orig / "model.safetensors").unlink()
    names = sorted(weights)
    half = len(names) // 2
    mx.save_safetensors(str(copy_of_orig / "model-00001-of-00003.safetensors"), {k: weights[k] for k in names[:half]})
    mx.save_safetensors(str(copy_of_orig / "model-00002-of-00003.safetensors"), {k: weights[k] for k in names[half:]})
    with pytest.raises(SharpError, match="model-00003-of-00003.safetensors is missing from the set of 3"):
        checkpoint.load_model(copy_of_orig)
    mx.save_safetensors(str(copy_of_orig / "model-00003-of-00003.safetensors"), {names[0]: weights[names[0]]})
    with pytest.raises(SharpError, match=f"tensor {names[0]} is in both"):
        checkpoint.load_model(copy_of_orig)
    (copy_of_orig / "model-00003-of-00003.safetensors").unlink()
    for k, name in enumerate(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]):
        (copy_of_orig / f"model-0000{k + 1}-of-00003.safetensors").rename(copy_of_orig / name)
    checkpoint.load_model(copy_of_orig)  # a complete set loads


def test_an_index_naming_a_missing_file_is_refused(copy_of_orig):
    index = json.loads((copy_of_orig / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "model-00002-of-00002.safetensors"
    (copy_of_orig / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SharpError, match="model-00002-of-00002.safetensors is missing: .* lists it"):
        checkpoint.load_model(copy_of_orig)


# 4. integrity


def test_flipped_bytes_are_found_by_verify_and_by_a_long_stage(copy_of_orig, world, capsys):
    assert verify.main(["--model", str(copy_of_orig)]) == 0
    assert "1 weights file(s) match their checksums" in capsys.readouterr().out
    data = bytearray((copy_of_orig / "model.safetensors").read_bytes())
    data[-100:-96] = bytes(b ^ 0xFF for b in data[-100:-96])  # inside the last tensor's data
    (copy_of_orig / "model.safetensors").write_bytes(bytes(data))
    assert verify.main(["--model", str(copy_of_orig)]) == 2
    line = error_line(capsys.readouterr().err, "verify")
    assert "model.safetensors is corrupted" in line, line
    slw = ["--stage", "slw", "--model", str(copy_of_orig), "--out", str(world / "s-flip"), "--layers", "1:6"]
    assert train.main(slw + ["--data", str(world / "train.jsonl"), "--seq-len", "16", "--tokens", "64"]) == 2
    assert "model.safetensors is corrupted" in error_line(capsys.readouterr().err, "train")


# 5. checks before the work, a disk that fills, leftovers


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs where mounting is allowed (root); otherwise None."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_no_room_is_refused_before_the_work_with_the_numbers(world, small_disk, capsys, monkeypatch):
    if small_disk is None:  # no tmpfs: a disk that reports 100 kB free
        small_disk = world
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 10**5, 10**5))
    out = small_disk / "imported"
    assert convert.main(["--source", str(world / "orig"), "--out", str(out)]) == 2
    line = error_line(capsys.readouterr().err, "convert")
    assert "not enough room for" in line and "MB needed" in line and "MB free" in line, line
    assert not out.exists() and leftovers(small_disk) == []


def test_a_disk_that_fills_during_the_write_leaves_nothing(world, small_disk, capsys, monkeypatch):
    """The room check passes (it is told the output is small); the write then meets a full disk."""
    monkeypatch.setattr(stages, "folder_weight_bytes", lambda folder: 1)
    if small_disk is None:  # no tmpfs: the safetensors write fails as MLX fails on a full disk
        small_disk = world

        def full(*a, **k):
            raise RuntimeError("[write] Unable to write 640644 bytes to file.")

        monkeypatch.setattr(checkpoint, "save_model", full)
    out = small_disk / "slw"
    args = ["--stage", "slw", "--model", str(world / "orig"), "--out", str(out), "--data", str(world / "train.jsonl")]
    assert train.main(args + ["--seq-len", "16", "--tokens", "64", "--layers", "1:6", "--rank", "2"]) == 2
    line = error_line(capsys.readouterr().err, "train")
    assert line.startswith(f"sharp_mlx.train: error: writing {out} failed (") and "nothing was written" in line, line
    assert not out.exists() and leftovers(small_disk) == []


def test_a_read_only_disk_is_refused_before_the_work(world, small_disk, capsys):
    if small_disk is None:
        pytest.skip("needs a tmpfs mount (root)")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    out = small_disk / "q"
    assert quantize.main(["--model", str(world / "orig"), "--out", str(out), "--from-gguf", "none"]) == 2
    assert "is not writable" in error_line(capsys.readouterr().err, "quantize")


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_killed_runs_are_cleaned_and_a_hidden_model_restored(world, tmp_path, capsys):
    pid = dead_pid()
    shutil.copytree(world / "orig", tmp_path / f".q.old-{pid}")  # killed between the two renames of a --force
    (tmp_path / f".q.tmp-{pid}").mkdir()  # killed mid-write
    (tmp_path / f".q.tmp-{pid}" / "model.safetensors").write_bytes(b"half")
    args = ["--model", str(world / "orig"), "--out", str(tmp_path / "q"), "--from-gguf", "none"]
    assert quantize.main(args) == 2  # the restored model is there now: not overwritten without --force
    err = capsys.readouterr().err
    assert f"restored {tmp_path / 'q'} from .q.old-{pid}" in err
    assert f"removed .q.tmp-{pid}, an unfinished write of process {pid}" in err
    assert "already exists" in error_line(err, "quantize")
    assert (tmp_path / "q" / "config.json").exists() and leftovers(tmp_path) == []


# 6. settings recorded with each output


def test_pipeline_step_refuses_an_output_made_with_other_settings(world, capsys):
    def slw(rank: int) -> stages.SLWRun:
        recipe = preset("paper", share="next", layers="1:6", rank=rank, tokens=64, seq_len=16, slw_steps=2)
        return stages.SLWRun(world / "orig", world / "slw-settings", recipe, data=[world / "train.jsonl"])

    first = slw(8)
    main_job.step(
        "slw", first.out, lambda force: stages.run_stage(first, force), False, settings=stages.settings_of(first)
    )
    again = slw(4)
    with pytest.raises(SharpError, match=r"was made with recipe.rank=8, this run asks for recipe.rank=4: pass --force"):
        main_job.step("slw", again.out, lambda f: stages.run_stage(again, f), False, settings=stages.settings_of(again))
    main_job.step("slw", again.out, lambda f: stages.run_stage(again, f), True, settings=stages.settings_of(again))
    history = json.loads((again.out / "training.json").read_text())
    assert history[-1]["settings"]["recipe"]["rank"] == 4
    main_job.step("slw", again.out, lambda f: pytest.fail("reran"), False, settings=stages.settings_of(again))
    assert "exists, skipping" in capsys.readouterr().out


def test_the_catalogue_of_faults_names_a_test_for_each_row():
    text = (ROOT / "docs" / "ERRORS.md").read_text().split("## Faults during a run")[1]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) >= 14
    for row in rows:
        tests = [t.strip(" `") for t in row.rstrip(" |").rsplit("|", 1)[1].split(",")]
        for name in tests:
            assert callable(globals().get(name)), f"{row.split('|')[1]} names {name}, which is not a test here"


def test_a_full_disk_under_the_sft_run_folder_stops_with_one_line(world, small_disk, capsys):
    if small_disk is None:
        pytest.skip("needs a tmpfs mount (root)")
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 20_000))  # about 20 kB left
    run = small_disk / "run"
    status = train.main(sft_args(world, "sft-full", "unused", "--sft-steps", "2", "--valid-every", "1")[: -0 or None])
    capsys.readouterr()
    assert status == 0  # the unused run folder is on the big disk: the model itself is fine
    args = sft_args(world, "sft-full2", "unused", "--sft-steps", "2", "--valid-every", "1")
    args[args.index("--run-dir") + 1] = str(run)
    assert train.main(args) == 2
    line = error_line(capsys.readouterr().err, "train")
    assert line.startswith(f"sharp_mlx.train: error: writing {run}/") and "nothing was written" in line, line
    assert [p.name for p in run.iterdir() if p.name.startswith(".tmp-")] == []
    assert not (world / "sft-full2").exists()
