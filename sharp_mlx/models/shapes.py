"""Random-weight Hugging Face folders of named real Llama-family shapes (paths, dtypes, shards, memory; never quality).

    from sharp_mlx.models.shapes import shape_config, write_hf_folder
    write_hf_folder("models/rand-1b", shape_config("llama-3.2-1b"), shards=2)           # 1.24B params, bf16
    write_hf_folder("models/rand-8b-2", shape_config("llama-3.1-8b", layers=2))          # the 8B's blocks, cut to 2
    write_hf_folder("/tmp/t", shape_config("mistral-7b", tiny=True, layers=3))           # the tests' size

A folder holds config.json, safetensors under Hugging Face names (sharded with
``model.safetensors.index.json`` when ``shards`` > 1) and a character tokenizer padded to the
config's vocabulary, so every command and ``mlx_lm.load`` can open it. ``tiny`` keeps a shape's
kind (model type, GQA ratio, explicit head_dim, rope scaling, tied or untied head, dtype) at
hidden size 64, so bf16 runs in seconds on a CPU.
"""

import json
import string
from pathlib import Path
from typing import Dict, Optional, Union

import mlx.core as mx

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
# Published configs (Hugging Face config.json of each model), the fields a Llama block reads.
SHAPES: Dict[str, dict] = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        rope_theta=500000.0,
        rope_scaling={**LLAMA3_ROPE, "factor": 32.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    ),
    "llama-3.2-3b": dict(
        hidden_size=3072,
        num_hidden_layers=28,
        intermediate_size=8192,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        rope_theta=500000.0,
        rope_scaling={**LLAMA3_ROPE, "factor": 32.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        rope_theta=500000.0,
        rope_scaling={**LLAMA3_ROPE, "factor": 8.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ),
    "llama-2-7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        torch_dtype="float16",
    ),
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ),
    "mistral-7b": dict(
        model_type="mistral",
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=32768,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        sliding_window=None,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ),
}
TINY_HIDDEN, TINY_MLP, TINY_HEADS, TINY_VOCAB = 64, 128, 4, 101
CHARS = string.ascii_letters + string.digits + " .,;:'!?-\n"  # ids 2.. (0 unknown, 1 end of sequence)


def shape_config(name: str, layers: Optional[int] = None, tiny: bool = False, **overrides) -> dict:
    """The config.json of shape ``name`` (``layers``: cut to its first N blocks; ``tiny``: hidden 64)."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}: use one of {', '.join(SHAPES)}")
    c = {"model_type": "llama", "rms_norm_eps": 1e-5, "hidden_act": "silu", **SHAPES[name]}
    if tiny:
        groups = c["num_attention_heads"] // c["num_key_value_heads"]  # keeps MHA (1) or GQA (> 1)
        heads = max(TINY_HEADS, groups)
        c.update(
            hidden_size=TINY_HIDDEN,
            intermediate_size=TINY_MLP,
            num_attention_heads=heads,
            num_key_value_heads=heads // groups,
            vocab_size=TINY_VOCAB,
            max_position_embeddings=256,
            num_hidden_layers=4,
        )
        if "head_dim" in c:  # explicit head_dim, and not hidden / heads, as Llama 3 writes it
            c["head_dim"] = 2 * TINY_HIDDEN // heads
        if c.get("rope_scaling"):
            c["rope_scaling"] = {**c["rope_scaling"], "original_max_position_embeddings": 64}
    if layers is not None:
        c["num_hidden_layers"] = layers
    c.update(
        eos_token_id=1,
        bos_token_id=None,
        architectures=["MistralForCausalLM" if c["model_type"] == "mistral" else "LlamaForCausalLM"],
    )
    return {**c, **overrides}


def parameter_count(config: dict) -> int:
    """Parameters of a Llama of this config (embedding and head counted once when tied)."""
    h, m, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    attn = h * hd * (2 * config["num_attention_heads"] + 2 * config["num_key_value_heads"])
    block = attn + 3 * h * m + 2 * h
    head = 0 if config.get("tie_word_embeddings", True) else v * h
    return config["num_hidden_layers"] * block + v * h + head + h


def random_weights(config: dict, seed: int = 0):
    """Yield (Hugging Face name, array) of a random Llama of ``config`` in its torch_dtype, block by block."""
    dtype = getattr(mx, config.get("torch_dtype", "float32"))
    h, m = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd

    def normal(shape, k):  # each tensor its own key: the same weights whatever was made before
        return (0.02 * mx.random.normal(shape, key=mx.random.key(seed * 1_000_003 + k))).astype(dtype)

    yield "model.embed_tokens.weight", normal((config["vocab_size"], h), 0)
    shapes = {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (m, h),
        "mlp.up_proj": (m, h),
        "mlp.down_proj": (h, m),
    }
    for i in range(config["num_hidden_layers"]):
        for j, (name, s) in enumerate(shapes.items()):
            yield f"model.layers.{i}.{name}.weight", normal(s, 1 + i * len(shapes) + j)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"model.layers.{i}.{norm}.weight", mx.ones((h,), dtype=dtype)
    yield "model.norm.weight", mx.ones((h,), dtype=dtype)
    if not config.get("tie_word_embeddings", True):
        yield "lm_head.weight", normal((config["vocab_size"], h), 10**6)


def write_char_tokenizer(folder: Path, vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json: one token per character, padded with unused tokens to ``vocab_size``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    vocab.update({f"<x{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 4096}))


def write_hf_folder(out: Union[str, Path], config: dict, shards: int = 1, seed: int = 0) -> Path:
    """A Hugging Face model folder of random weights; ``shards`` > 1 splits the blocks over that many files
    and writes ``model.safetensors.index.json``. Each shard is made and written before the next (bounded memory)."""
    from ..io.checkpoint import atomic_dir

    out = Path(out)
    n = config["num_hidden_layers"]
    with atomic_dir(out, force=True) as tmp:
        names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)] if shards > 1 else None
        weight_map, part, index, total = {}, {}, 0, 0

        def flush():
            nonlocal part, index, total
            name = names[index] if names else "model.safetensors"
            mx.eval(part)
            mx.save_safetensors(str(tmp / name), part, metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
            total += sum(v.nbytes for v in part.values())
            part, index = {}, index + 1

        for name, w in random_weights(config, seed):
            part[name] = w
            layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
            if names and layer is not None and index < shards - 1 and name.endswith("post_attention_layernorm.weight"):
                if (layer + 1) * shards >= (index + 1) * n:  # this shard's share of the blocks is done
                    flush()
        flush()
        if names:
            index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_char_tokenizer(tmp, config["vocab_size"])
    return out


def cut_folder(src: Union[str, Path], out: Union[str, Path], layers: int) -> Path:
    """A model folder of ``src``'s first ``layers`` blocks (embedding, final norm and head kept): a real-weight
    model of another depth, e.g. SmolLM2-135M cut to 16 of its 30 layers."""
    from ..io.checkpoint import atomic_dir, copy_tokenizer

    src = Path(src)
    config = json.loads((src / "config.json").read_text())
    if not 1 <= layers <= config["num_hidden_layers"]:
        raise ValueError(f"layers {layers} outside 1..{config['num_hidden_layers']}")
    weights = {}
    for f in sorted(src.glob("model*.safetensors")):
        for k, v in mx.load(str(f)).items():
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers:
                weights[k] = v
    with atomic_dir(out, force=True) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=2))
        copy_tokenizer(src, tmp)
    return Path(out)
