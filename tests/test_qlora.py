"""experiments/qlora.py: the float twin of a 4-bit base computes what the 4-bit base computes, and
factors trained on the twin go back into the 4-bit base unchanged."""

import mlx.core as mx
from conftest import load_script
from mlx.utils import tree_flatten, tree_map
from tiny_folder import write_4bit_base

from sharp_mlx.io.checkpoint import load_model, read_config, save
from sharp_mlx.recovery.teacher import load_teacher


def test_the_float_twin_computes_the_4bit_base_and_the_factors_go_back(tmp_path):
    qlora = load_script("qlora")
    orig, base, _ = write_4bit_base(tmp_path)
    twin, twin_teacher = qlora.float_twins(base, orig, tmp_path / "work")
    assert not any(k in read_config(twin) for k in qlora.QUANT_KEYS)
    model, _ = load_model(twin)
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    student, _ = load_model(base)
    teacher, _ = load_teacher(orig, student)
    tokens = mx.array([[1, 5, 9, 17, 33, 2, 7, 11]])
    for quantized, float_twin in ((student, model), (teacher, load_model(twin_teacher)[0])):
        a, b = quantized(tokens), float_twin(tokens)
        assert mx.abs(a - b).max().item() < 1e-2 * mx.abs(a).max().item()  # the embedding's float16 rows aside

    for layer in model.model.layers:  # as if SFT had trained every recovery
        if "recovery" in layer:
            layer.recovery.update(tree_map(lambda v: v + 0.5, layer.recovery.parameters()))
    save(tmp_path / "trained", model, read_config(twin), twin, force=True)
    qlora.put_back(base, tmp_path / "trained", tmp_path / "out")
    after = mx.load(str(tmp_path / "out" / "model.safetensors"))
    before = mx.load(str(base / "model.safetensors"))
    assert after["model.layers.0.mlp.gate_proj.weight"].dtype == mx.uint32  # still the 4-bit codes
    assert mx.array_equal(after["model.layers.0.mlp.gate_proj.weight"], before["model.layers.0.mlp.gate_proj.weight"])
    got = {k: v for k, v in after.items() if ".recovery." in k}
    assert got and all(mx.array_equal(v, before[k] + 0.5).item() for k, v in got.items())
