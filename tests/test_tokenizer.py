"""The GGUF tokenizer built without torch (sharp_mlx.io.gguf_tokenizer) tokenizes exactly as
transformers' own GGUF reader does (which needs torch: the reference)."""

import json

import pytest
from conftest import ROOT

torch = pytest.importorskip("torch", reason="transformers' GGUF reader, the reference, needs torch")

from sharp_mlx.convert import embedded_gguf  # noqa: E402
from sharp_mlx.data import corpora  # noqa: E402
from sharp_mlx.io import gguf_tokenizer  # noqa: E402
from sharp_mlx.io.gguf_import import open_gguf  # noqa: E402

pytestmark = pytest.mark.real
CHARS_PER_DOMAIN, PIECE = 4000, 500
EDGE = [
    "",
    " ",
    "  leading spaces",
    "tabs\tand\nnewlines\r\n\n",
    "digits 1234567890 3.14159 1e-9",
    "ünïcödé — “quotes” … 日本語 😀👍🏽",
    "<|im_start|>user\nraw special tokens<|im_end|>",
    "<|endoftext|>x",
    "don't we'll I'M",
    "    def f(x):\n        return x  # code",
    "a" * 300,
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = embedded_gguf()
    out = tmp_path_factory.mktemp("tok")
    gguf_tokenizer.save(open_gguf(path), out)
    ours = AutoTokenizer.from_pretrained(out)
    assert isinstance(ours, PreTrainedTokenizerFast)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), ours


@pytest.fixture(scope="module")
def samples():
    """CHARS_PER_DOMAIN characters of each domain's test split, in pieces, and chat conversations."""
    data = ROOT / "data"
    if not all(f.exists() for f in corpora.files("test", data)):
        try:
            corpora.fetch(out=data, progress=False)
        except corpora.FetchError as e:
            pytest.skip(f"the five domains could not be fetched: {e}")
    texts, chats = {}, []
    for f in corpora.files("test", data):
        records = [json.loads(line) for line in f.read_text().splitlines()]
        if "messages" in records[0]:
            chats += [r["messages"] for r in records[:8]]
            text = "\n".join(m["content"] for r in records for m in r["messages"])
        else:
            text = "\n\n".join(r["text"] for r in records)
        texts[f.parent.name] = [text[i : i + PIECE] for i in range(0, CHARS_PER_DOMAIN, PIECE)]
    return texts, chats


def test_same_ids_on_every_domain_and_chat_template(tokenizers, samples):
    ref, ours = tokenizers
    texts, chats = samples
    strings = [s for pieces in texts.values() for s in pieces] + EDGE
    templated = [ref.apply_chat_template(m, tokenize=False) for m in chats]
    templated += [
        ref.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("What is the capital of France?", "Write a haiku about rain.", "2+2=?")
    ]
    assert [ours.apply_chat_template(m, tokenize=False) for m in chats] == templated[: len(chats)]
    mismatches = [s for s in strings + templated if ref(s)["input_ids"] != ours(s)["input_ids"]]
    assert len(texts) == len(corpora.DOMAINS) and len(strings + templated) >= 60
    assert not mismatches, f"{len(mismatches)} of {len(strings + templated)} strings differ, first: {mismatches[0]!r}"
    for s in strings[:5]:
        assert ours.decode(ours(s)["input_ids"]) == ref.decode(ref(s)["input_ids"])


def test_special_tokens_and_config_match(tokenizers):
    ref, ours = tokenizers
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.all_special_tokens == ref.all_special_tokens
    assert len(ours) == len(ref) == 49152
    assert ours.chat_template == ref.chat_template


def test_unsupported_tokenizer_type_is_one_line_error():
    from sharp_mlx.errors import SharpError

    with pytest.raises(SharpError, match="not supported.*Hugging Face folder"):
        gguf_tokenizer.build({"model": "t5", "tokens": ["a"]})


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    """A Llama-2 style (SentencePiece, byte fallback, no merges in the file) vocabulary."""
    import gguf
    from transformers import AutoTokenizer

    pieces = [
        "▁",
        "e",
        "t",
        "a",
        "h",
        "▁t",
        "he",
        "▁the",
        "o",
        "n",
        "▁a",
        "in",
        "▁in",
        "r",
        "s",
        "i",
        "l",
        "d",
        "▁w",
        "or",
        "ld",
        "▁wor",
        "▁world",
        "c",
        "at",
        "▁c",
        "▁cat",
        "▁h",
        "ello",
        "▁hello",
        "x",
    ]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    for add, value in (
        (w.add_block_count, 1),
        (w.add_context_length, 64),
        (w.add_embedding_length, 8),
        (w.add_feed_forward_length, 16),
        (w.add_head_count, 2),
        (w.add_layer_norm_rms_eps, 1e-5),
    ):
        add(value)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    (tmp_path / "ours").mkdir()
    gguf_tokenizer.save(gguf.GGUFReader(tmp_path / "spm.gguf"), tmp_path / "ours")
    ours = AutoTokenizer.from_pretrained(tmp_path / "ours")
    for s in ("hello world", "the cat in the hat", " leading", "ünï 😀", "xx  yy", "Hello\n"):
        assert ours(s)["input_ids"] == ref(s)["input_ids"], s
        assert ours.decode(ours(s)["input_ids"]) == ref.decode(ref(s)["input_ids"])
