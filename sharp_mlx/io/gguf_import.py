"""Read a llama.cpp GGUF file: a Hugging Face style config, float weights and a tokenizer.

Weights are dequantized with the ``gguf`` package (no torch) and renamed to Hugging Face
names; llama.cpp stores q_proj/k_proj rows permuted for its rope layout, which is undone here.
"""

from pathlib import Path
from typing import Dict

import numpy as np
from tqdm import tqdm

from ..errors import SharpError

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def open_gguf(path: Path):
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise SharpError(f"{path} is not a readable GGUF file ({e}): check the file or download it again")
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise SharpError(
            f"{path} holds a {arch!r} model; sharp_mlx imports Llama-family GGUFs (general.architecture = 'llama'): "
            "pass a Llama GGUF"
        )
    return reader


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_config(reader) -> dict:
    """The Hugging Face LlamaConfig equivalent of the GGUF metadata."""
    n_heads = field(reader, "llama.attention.head_count")
    hidden = field(reader, "llama.embedding_length")
    names = {t.name for t in reader.tensors}
    vocab = field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    rope_theta = float(field(reader, "llama.rope.freq_base", 10000.0))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": field(reader, "llama.feed_forward_length"),
        "num_hidden_layers": field(reader, "llama.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": field(reader, "llama.attention.head_count_kv", n_heads),
        "head_dim": field(reader, "llama.rope.dimension_count", hidden // n_heads),
        "rms_norm_eps": float(field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": field(reader, "llama.context_length"),
        "vocab_size": vocab,
        # Top level, where mlx-lm reads it; rope_parameters for transformers 5.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "attention_bias": False,
        "mlp_bias": False,
    }


def hf_name(gguf_name: str) -> str:
    stem, suffix = gguf_name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        if part not in LAYER_NAMES:
            raise SharpError(f"unexpected GGUF tensor {gguf_name!r}: this Llama variant is not supported")
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{suffix}"
    if stem not in GLOBAL_NAMES:
        raise SharpError(f"unexpected GGUF tensor {gguf_name!r}: this Llama variant is not supported")
    return f"{GLOBAL_NAMES[stem]}.{suffix}"


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (pairs interleaved per head) back to Hugging Face's."""
    out, rest = w.shape[0], w.shape[1:]
    # (n_heads, 2, head_dim/2, ...) in HF order was stored as (n_heads, head_dim/2, 2, ...)
    return w.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(out, *rest)


def float_weights(reader, config: dict) -> Dict[str, np.ndarray]:
    """Every tensor dequantized to float32 under its Hugging Face name."""
    from gguf.quants import dequantize

    heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}
    weights = {}
    for t in tqdm(reader.tensors, desc="dequantize", unit="tensor", leave=False):
        name = hf_name(t.name)
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        for proj, n in heads.items():
            if f".{proj}." in name:
                w = unpermute_rows(w, n)
        weights[name] = w
    return weights


def save_tokenizer(path: Path, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json (with the chat template) from the GGUF metadata, no torch."""
    from . import gguf_tokenizer

    gguf_tokenizer.save(open_gguf(path), out)
