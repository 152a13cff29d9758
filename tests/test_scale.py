"""A user's own Llama-family model: each config variant, in its own dtype, through every stage at tiny size."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from tiny_folder import write_text_data

from sharp_mlx import convert, fuse, generate, quantize, train
from sharp_mlx.io import user_model
from sharp_mlx.models.shapes import SHAPES, shape_config, write_hf_folder
from sharp_mlx.recovery.teacher import load_teacher


def dtypes(folder) -> dict:
    """{tensor name: dtype name} of every safetensors file of a folder."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: str(v.dtype).split(".")[-1] for k, v in mx.load(str(f)).items()})
    return out


def run_stages(tmp_path, shape: str, layers: int = 3) -> dict:
    """convert -> SLW -> SFT -> 4-bit -> fuse of a tiny random folder of ``shape`` (2 shards); the folders."""
    hf = write_hf_folder(tmp_path / "hf", shape_config(shape, tiny=True, layers=layers), shards=2)
    data = str(write_text_data(tmp_path / "train.jsonl"))
    d = {k: tmp_path / k for k in ("orig", "slw", "sft", "q4", "fused")}
    assert convert.main(["--source", str(hf), "--out", str(d["orig"])]) == 0
    common = ["--data", data, "--seq-len", "32", "--force"]
    slw = ["--stage", "slw", "--model", str(d["orig"]), "--out", str(d["slw"]), "--share", "next", "--layers", "1:3"]
    assert train.main([*slw, "--rank", "8", "--tokens", "256", "--slw-steps", "2", *common]) == 0
    sft = ["--stage", "sft", "--model", str(d["slw"]), "--teacher", str(d["orig"]), "--out", str(d["sft"])]
    flags = ["--valid", data, "--sft-steps", "2", "--batch-size", "1", "--valid-every", "1", "--valid-windows", "1"]
    assert train.main([*sft, *flags, "--run-dir", str(tmp_path / "run"), *common]) == 0
    quantize.quantize_model_folder(d["sft"], d["q4"], from_gguf="none")
    assert fuse.main(["--model", str(d["sft"]), "--out", str(d["fused"])]) == 0
    return d


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_variant_runs_every_stage_and_mlx_lm_loads_it(tmp_path, shape):
    from mlx_lm import load as mlx_lm_load

    d = run_stages(tmp_path, shape)
    want = SHAPES[shape]["torch_dtype"]
    config = json.loads((d["sft"] / "config.json").read_text())
    assert config["model_type"] == SHAPES[shape].get("model_type", "llama")
    assert config.get("rope_scaling") == shape_config(shape, tiny=True).get("rope_scaling")
    assert config["sharp"]["share"] == {"2": 1}
    text, _ = generate.answer(d["q4"], prompt="the model", max_tokens=4, chat=False)
    assert isinstance(text, str)
    for k in ("sft", "q4", "fused"):
        model, _ = mlx_lm_load(str(d[k]), trust_remote_code=True)
        assert model(mx.array([[2, 3, 4]])).shape[-1] == 101
    assert set(dtypes(d["fused"]).values()) == {want}  # fused: the model's own dtype, not float16


def test_a_bf16_model_stays_bf16_through_every_stage(tmp_path):
    d = run_stages(tmp_path, "llama-3.2-1b")
    assert set(dtypes(d["orig"]).values()) == {"bfloat16"}
    for k in ("slw", "sft"):  # recovery factors are stored in float32 (fitted and trained in float32)
        held = dtypes(d[k])
        assert {v for n, v in held.items() if ".recovery." not in n} == {"bfloat16"}
        assert {v for n, v in held.items() if ".recovery." in n} == {"float32"}
    q4 = dtypes(d["q4"])
    assert q4["model.layers.0.mlp.gate_proj.weight"] == "uint32"
    assert q4["model.norm.weight"] == "bfloat16"
    assert {v for n, v in q4.items() if ".recovery." in n} == {"float16"}  # the recovery dtype the 4-bit states
    assert json.loads((d["q4"] / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_dtype_flag_still_converts(tmp_path):
    hf = write_hf_folder(tmp_path / "hf", shape_config("llama-3.2-1b", tiny=True, layers=2))
    assert convert.main(["--source", str(hf), "--out", str(tmp_path / "o"), "--dtype", "float32"]) == 0
    assert set(dtypes(tmp_path / "o").values()) == {"float32"}


@pytest.mark.parametrize(
    "change, named",
    [
        ({"model_type": "qwen2"}, "model_type 'qwen2' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
        ({"attention_bias": True}, "attention_bias: true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ],
)
def test_outside_the_family_is_refused_in_one_line(tmp_path, capsys, change, named):
    hf = write_hf_folder(tmp_path / "hf", shape_config("llama-3.2-1b", tiny=True, layers=2, **change))
    assert convert.main(["--source", str(hf), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1


def test_teacher_holds_only_its_target_mlps(tmp_path):
    from sharp_mlx.io.checkpoint import load_model

    d = run_stages(tmp_path, "llama-3.1-8b")
    student, _ = load_model(d["sft"])
    teacher, held = load_teacher(d["orig"], student)
    total = sum(v.nbytes for f in d["orig"].glob("*.safetensors") for v in mx.load(str(f)).values())
    assert held["own_bytes"] == 3 * 64 * 128 * 2  # layer 2's gate, up and down in bfloat16: nothing else
    assert held["shared_bytes"] == total - held["own_bytes"]  # everything else is the student's array
    x = mx.array([[2, 3, 4, 5]])
    original, _ = load_model(d["orig"])
    assert mx.allclose(teacher(x), original(x)).item()  # the teacher still computes the original


def test_share_map_from_a_fraction_of_depth():
    assert user_model.depth_layers(user_model.DEPTH, 30) == "11:29"  # the SmolLM2 default's span
    assert user_model.depth_layers(user_model.DEPTH, 16) == "6:15"
    assert user_model.depth_layers(user_model.DEPTH, 32) == "12:31"
    assert user_model.model_name("meta-llama/Llama-3.2-1B") == "llama-3.2-1b"
    assert user_model.model_name("/x/SmolLM2.Q4_1.gguf") == "smollm2.q4_1"


def test_pipeline_refuses_depth_without_a_model(capsys):
    from sharp_mlx import pipeline

    assert pipeline.main(["--depth", "0.5:1"]) == 2
    assert "--depth" in capsys.readouterr().err


def test_an_output_over_the_shard_size_is_written_in_shards_with_an_index(tmp_path, monkeypatch):
    import mlx_lm.utils
    from conftest import tiny_model

    from sharp_mlx import save
    from sharp_mlx.io.checkpoint import load_model

    def small_shards(weights, max_file_size_gb=5):  # mlx-lm's make_shards at 64 KB instead of 5 GB
        shards, size = [{}], 0
        for k, v in weights.items():
            if shards[-1] and size + v.nbytes > 64 * 1024:
                shards, size = [*shards, {}], 0
            shards[-1][k], size = v, size + v.nbytes
        return shards

    monkeypatch.setattr(mlx_lm.utils, "make_shards", small_shards)
    model, config = tiny_model(share={3: 2, 5: 4}, rank=4)
    save(tmp_path / "m", model, config)
    files = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    again, _ = load_model(tmp_path / "m")
    x = mx.array([[2, 3, 4, 5]])
    assert mx.allclose(again(x), model(x)).item()
    quantize.quantize_model_folder(tmp_path / "m", tmp_path / "q", from_gguf="none", group_size=32)
    assert load_model(tmp_path / "q")[0](x).shape == (1, 4, 101)


def test_sft_on_a_4bit_base_trains_float_factors_against_a_4bit_teacher(tmp_path):
    from tiny_folder import write_4bit_base

    from sharp_mlx.io.checkpoint import load_model

    orig, base, data = write_4bit_base(tmp_path)
    student, _ = load_model(base)
    teacher, held = load_teacher(orig, student)
    assert isinstance(teacher.model.layers[4].mlp.gate_proj, nn.QuantizedLinear)  # its own MLP, in 4-bit
    assert teacher.model.layers[0].mlp.gate_proj.weight is student.model.layers[0].mlp.gate_proj.weight
    own_mlp = 3 * (64 * 96 // 2 + 2 * (64 * 96 // 32) * 2)  # layer 4's MLP: 4-bit codes, fp16 scales, biases
    assert held["own_bytes"] == own_mlp
    sft = ["--stage", "sft", "--model", str(base), "--teacher", str(orig), "--out", str(tmp_path / "sft")]
    flags = ["--valid", data, "--sft-steps", "2", "--batch-size", "1", "--valid-every", "1", "--valid-windows", "1"]
    assert train.main([*sft, *flags, "--data", data, "--seq-len", "32", "--run-dir", str(tmp_path / "run")]) == 0
    held = dtypes(tmp_path / "sft")
    assert held["model.layers.0.mlp.gate_proj.weight"] == "uint32"  # still the 4-bit checkpoint
    assert {v for n, v in held.items() if ".recovery." in n} == {"float32"}
    before, after = (mx.load(str(tmp_path / k / "model.safetensors")) for k in ("q", "sft"))
    assert not mx.array_equal(before["model.layers.4.recovery.gate_a"], after["model.layers.4.recovery.gate_a"]).item()


def test_the_default_model_still_imports_in_float32(real_model_dir):
    """A GGUF's dequantized weights stay float32 (exact): the default job's numbers do not move."""
    assert set(dtypes(real_model_dir).values()) == {"float32"}
    assert json.loads((real_model_dir / "config.json").read_text())["torch_dtype"] == "float32"
