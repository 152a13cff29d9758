"""A Hugging Face tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) from a GGUF's metadata.

Built with ``gguf`` and ``tokenizers`` alone, so importing a GGUF never needs torch (transformers'
own GGUF reader imports it). It builds what transformers' reader builds, token for token:

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE from the file's vocabulary and merges, split
  by the regex its ``tokenizer.ggml.pre`` names (GPT-2's own when it names none we know);
- ``"llama"``: SentencePiece-style BPE with byte fallback, merges from the file or derived from
  the vocabulary's scores;

control tokens become special added tokens and user-defined ones plain added tokens.
"""

import json
from pathlib import Path
from typing import Dict, List

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from ..errors import SharpError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
SPACE = "\u2581"  # SentencePiece's word marker

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regex its merges were learned on (the Llama-family ones)
PRE_SPLITS = {
    name: LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral")
}
SPECIAL_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def byte_alphabet() -> Dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def metadata(reader) -> dict:
    """The ``tokenizer.*`` fields of a GGUF, without the ``tokenizer.`` / ``ggml.`` prefixes."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            out[key.removeprefix("tokenizer.").removeprefix("ggml.")] = f.contents()
    if "tokens" not in out:
        raise SharpError(
            "this GGUF has no tokenizer (no tokenizer.ggml.tokens): import a GGUF that carries one, or a Hugging Face "
            "folder"
        )
    return out


def byte_level_bpe(meta: dict) -> Tokenizer:
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(meta["tokens"])
    }
    merges = [tuple(m.split(" ")) for m in meta.get("merges") or []]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = PRE_SPLITS.get(meta.get("pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def derived_merges(tokens: List[str], scores: List[float]) -> List[tuple]:
    """Merges implied by a vocabulary that lists none: every split of a token into two tokens,
    best-scored merged token first (as transformers' ``generate_merges`` orders them)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        pieces = [
            (token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab
        ]
        merges.extend(sorted(pieces, key=lambda p: (vocab[p[0]], vocab[p[1]])))
    merges.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def sentencepiece_bpe(meta: dict) -> Tokenizer:
    tokens = meta["tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("merges"):
        merges = [tuple(m.split(" ")) for m in meta["merges"]]
    else:
        merges = derived_merges(tokens, meta.get("scores") or [0.0] * len(tokens))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    return tok


BUILDERS = {"gpt2": byte_level_bpe, "llama": sentencepiece_bpe}


def build(meta: dict) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` the metadata describes, with its added tokens."""
    kind = meta.get("model")
    if kind not in BUILDERS:
        raise SharpError(
            f"GGUF tokenizer type {kind!r} is not supported (supported: {', '.join(BUILDERS)}): import the model from "
            "a Hugging Face folder instead"
        )
    tok = BUILDERS[kind](meta)
    types = meta.get("token_type") or []
    alphabet = set(byte_alphabet().values()) if kind == "gpt2" else None
    # A control token spelled outside a byte-level alphabet is a llama.cpp mislabel: left out.
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(meta["tokens"], types)
        if ty == CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    tok.add_special_tokens(control)
    vocab = tok.get_vocab()
    tok.add_tokens(
        [
            AddedToken(t, normalized=False, special=False)
            for t, ty in zip(meta["tokens"], types)
            if ty == USER_DEFINED and t in vocab
        ]
    )
    return tok


def tokenizer_config(meta: dict, tok: Tokenizer) -> dict:
    add_bos = bool(meta.get("add_bos_token", meta.get("model") == "llama"))
    add_eos = bool(meta.get("add_eos_token", False))
    cfg = {name: meta["tokens"][meta[key]] if meta.get(key) is not None else None for name, key in SPECIAL_IDS.items()}
    cfg.update(
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        tokenizer_class="PreTrainedTokenizerFast",
    )
    if meta.get("chat_template"):
        cfg["chat_template"] = meta["chat_template"]
    return cfg


def post_processor(cfg: dict, tok: Tokenizer) -> processors.TemplateProcessing:
    """BOS / EOS around each sequence as the config asks (what transformers sets on load)."""
    ends = [cfg[n] for n in ("bos_token", "eos_token") if cfg[f"add_{n}"] and cfg[n] is not None]
    bos, eos = ([cfg[n]] if cfg[n] in ends else [] for n in ("bos_token", "eos_token"))

    def around(seq: str, type_id: int) -> list:
        return [f"{t}:{type_id}" for t in bos] + [f"${seq}:{type_id}"] + [f"{t}:{type_id}" for t in eos]

    return processors.TemplateProcessing(
        single=around("A", 0),
        pair=around("A", 0) + around("B", 1),
        special_tokens=[(t, tok.token_to_id(t)) for t in ends],
    )


def from_reader(reader) -> tuple:
    """``(tokenizers.Tokenizer, tokenizer_config dict)`` of an open ``GGUFReader``."""
    meta = metadata(reader)
    tok = build(meta)
    cfg = tokenizer_config(meta, tok)
    tok.post_processor = post_processor(cfg, tok)
    return tok, cfg


def save(reader, out: Path) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` (and ``chat_template.jinja``) into ``out``."""
    tok, cfg = from_reader(reader)
    out = Path(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if cfg.get("chat_template"):
        (out / "chat_template.jinja").write_text(cfg["chat_template"])
