"""Model folders of the tiny test Llama with a character tokenizer, for running the CLIs fast."""

import json
import string
from pathlib import Path

from conftest import tiny_model

CHARS = string.ascii_letters + string.digits + " .,;:'!?-\n"  # 73 symbols, fits the vocab of 101


def write_char_tokenizer(folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json: one token per character, id 0 unknown, id 1 EOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 256,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def write_tiny_model(folder: Path, share=None, rank: int = 0, seed: int = 0) -> Path:
    """The tiny random Llama (conftest.TINY), shared by ``share`` at ``rank``, as a model folder."""
    from sharp_mlx import save

    model, config = tiny_model(share=share, rank=rank, seed=seed)
    save(folder, model, {**config, "eos_token_id": 1})
    write_char_tokenizer(Path(folder))
    return Path(folder)


def write_text_data(path: Path, records: int = 40, seed: int = 0) -> Path:
    """A .jsonl file of {"text": ...} records of random words (about 60 characters each)."""
    import random

    rng = random.Random(seed)
    words = ["the", "model", "shares", "layers", "with", "low", "rank", "recovery", "and", "a", "small", "cost"]
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(12)) + "."}) for _ in range(records)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_gguf(path: Path, arch: str) -> None:
    """A minimal GGUF of architecture ``arch``: one block, a zero token embedding."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_4bit_base(tmp_path: Path) -> tuple:
    """(original, 4-bit base, data): the tiny model, SLW with targets 3 and 4 borrowing, then 4-bit
    with float32 recovery factors (a base for SFT as mlx-lm's QLoRA)."""
    from sharp_mlx import quantize, train

    orig = write_tiny_model(tmp_path / "orig", seed=3)
    data = str(write_text_data(tmp_path / "train.jsonl"))
    slw = ["--stage", "slw", "--model", str(orig), "--out", str(tmp_path / "slw"), "--share", "next", "--layers", "3:5"]
    assert (
        train.main([*slw, "--rank", "8", "--tokens", "256", "--slw-steps", "2", "--data", data, "--seq-len", "32"]) == 0
    )
    base = tmp_path / "q"
    quantize.quantize_model_folder(tmp_path / "slw", base, from_gguf="none", group_size=32, recovery_dtype="float32")
    return orig, base, data
