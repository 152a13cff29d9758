"""Datasets for training and evaluation: load, tokenize with a loss mask, pack.

Files follow mlx_lm.lora's formats, one per .jsonl file, set by its first record:
    {"text": ...}                          plain text, every token trained
    {"prompt": ..., "completion": ...}     only the completion is trained
    {"messages": [{"role", "content"}...]} only assistant turns are trained
A .txt file is one text record. Records become one token stream (each ends with EOS) with a
0/1 loss mask; `windows` cuts it for perplexity and `batches` for training.
"""

import itertools
import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..errors import SharpError

FORMATS = {"text": ("text",), "completions": ("prompt", "completion"), "chat": ("messages",)}


class DataError(SharpError, ValueError):
    """A dataset file is missing, empty or malformed; the message is one line."""


def detect_format(record: dict) -> str:
    """The format name of `record` ("text", "completions" or "chat")."""
    for name, keys in FORMATS.items():
        if all(key in record for key in keys):
            return name
    expected = " or ".join("{" + ", ".join(f'"{k}"' for k in keys) + "}" for keys in FORMATS.values())
    raise DataError(f"unknown record format with keys {sorted(record)}; expected {expected}")


def _check(record: dict, fmt: str) -> str:
    """Why `record` is not a valid record of `fmt`, or "" if it is."""
    if fmt == "chat":
        messages = record.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            return 'expected "messages" to be a non-empty list of {"role", "content"} strings'
        return ""
    missing = [k for k in FORMATS[fmt] if not isinstance(record.get(k), str)]
    return f"expected string field(s) {missing} of the {fmt} format" if missing else ""


def load_records(path) -> tuple[str, list[dict]]:
    """Read a .jsonl (or .txt) dataset file. Returns (format name, records); raises DataError
    naming the file (and line) if it is missing, empty, not UTF-8, malformed or of mixed
    formats."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data file not found: {path}; pass an existing .jsonl or .txt file (`python -m sharp_mlx.corpora` "
            "fetches the default corpora)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8")
    if not text.strip():
        raise DataError(f"{path} is empty: pass a file with at least one record")
    if path.suffix == ".txt":
        return "text", [{"text": text}]
    fmt, records = None, []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno}); fix line {lineno}: each line of a "
                ".jsonl file is one JSON object"
            )
        if not isinstance(record, dict):
            raise DataError(
                f"{path}:{lineno}: expected a JSON object, got "
                f'{type(record).__name__}; write each record as {{"text": ...}}'
            )
        try:
            fmt = fmt or detect_format(record)
        except DataError as e:
            raise DataError(f"{path}:{lineno}: {e}")
        if problem := _check(record, fmt):
            raise DataError(f"{path}:{lineno}: {problem}")
        records.append(record)
    return fmt, records


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Tokens of a conversation under the tokenizer's chat template, and a mask that is 1 on
    assistant turns only (their content and end-of-turn tokens). Assistant turn i is the text
    from the end of messages[:i] plus the generation prompt to the end of messages[:i+1]; the
    rendered text is cut at these boundaries and each piece encoded once, so the trained
    tokens decode to exactly the assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat and prompt/completion data need a tokenizer with a chat template")
    text = _render(tokenizer, messages)
    cuts = [0]  # alternating: prompt text up to cuts[1], assistant text up to cuts[2], ...
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataError("a conversation starts with an assistant turn; start it with a system or user turn")
        start = _render(tokenizer, messages[:i], generation_prompt=True)
        end = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(start) and text.startswith(end) and cuts[-1] <= len(start)):
            raise DataError(
                f"cannot locate assistant turn {i}: the chat template does not "
                "render a conversation's start as a prefix of the whole"
            )
        cuts += [len(start), len(end)]
    cuts.append(len(text))
    tokens, mask = [], []
    for k in range(len(cuts) - 1):
        # The template already holds any BOS, so the encoder adds none.
        piece = tokenizer.encode(text[cuts[k] : cuts[k + 1]], add_special_tokens=False)
        tokens += piece
        mask += [k % 2] * len(piece)  # odd pieces are assistant turns
    return tokens, mask


def tokenize_record(tokenizer, record: dict, fmt: str) -> tuple[list[int], list[int]]:
    """(tokens, loss mask) of one record; texts end with EOS and are trained on every token."""
    if fmt == "text":
        tokens = list(tokenizer.encode(record["text"])) + [tokenizer.eos_token_id]
        return tokens, [1] * len(tokens)
    if fmt == "completions":
        record = {
            "messages": [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]},
            ]
        }
    return tokenize_chat(tokenizer, record["messages"])


def load_tokens(path, tokenizer, max_tokens: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """One dataset file as a token stream: (tokens int32, mask int32), records concatenated;
    with ``max_tokens``, its first max_tokens tokens (records past them are not tokenized)."""
    fmt, records = load_records(path)
    pairs, count = [], 0
    for r in records:
        if max_tokens is not None and count >= max_tokens:
            break
        pairs.append(tokenize_record(tokenizer, r, fmt))
        count += len(pairs[-1][0])
    return (
        np.array([t for tokens, _ in pairs for t in tokens], dtype=np.int32)[:max_tokens],
        np.array([m for _, mask in pairs for m in mask], dtype=np.int32)[:max_tokens],
    )


def _window_rows(n_tokens: int, length: int) -> np.ndarray:
    """Indices (N, length+1) of windows i*length ... i*length+length over n_tokens tokens."""
    if length < 1:
        raise DataError(f"window length must be at least 1, got {length}")
    n = max(n_tokens - 1, 0) // length
    return np.arange(n)[:, None] * length + np.arange(length + 1)  # (N, length+1)


def windows(tokens: Sequence[int], length: int) -> tuple[mx.array, int]:
    """Evaluation windows of length+1 tokens at stride `length`: window i predicts tokens
    i*length+1 ... (i+1)*length, so the scored targets tile tokens[1:] without overlap and the
    partial window at the end is dropped. Returns (windows (N, length+1), scored = N*length).
    Works on a loss mask as well (then count the scored tokens as mask[:, 1:].sum())."""
    array = np.asarray(tokens)
    rows = _window_rows(len(array), length)
    return mx.array(array[rows]), rows.shape[0] * length


def batches(
    tokens: Sequence[int],
    mask: Sequence[int],
    batch_size: int,
    length: int,
    seed: int = 0,
    start: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[mx.array, mx.array, mx.array]]:
    """Endless training batches (inputs, targets, mask), each (batch_size, length); mask is
    float32, 1 where the target token is trained. The windows are those of `windows`; epoch e
    visits them in the order permutation(seed, e), batch_size at a time, and drops its last
    partial batch. Batch k depends only on (seed, k): `start=k` resumes after k batches.

    `shard=(rank, size)`: batch k is rank's slice of the k-th global batch of
    batch_size * size windows, so the size processes together see exactly the batches of one
    process with batch_size * size. Too little data is refused here, not at the first batch."""
    tokens, mask = np.asarray(tokens, dtype=np.int32), np.asarray(mask, dtype=np.float32)
    if tokens.shape != mask.shape:
        raise DataError(f"tokens {tokens.shape} and mask {mask.shape} differ in shape")
    rank, size = shard
    if not 0 <= rank < size:
        raise DataError(f"shard {rank} of {size} does not exist")
    rows = _window_rows(len(tokens), length)
    per_epoch = len(rows) // (batch_size * size) if batch_size > 0 else 0
    if per_epoch == 0:
        per = f" ({size} processes of {batch_size})" if size > 1 else ""
        raise DataError(
            f"{len(tokens)} tokens make {len(rows)} windows of {length}+1 tokens, "
            f"fewer than a batch of {batch_size * size}{per}; use more data or a "
            "smaller batch size or sequence length"
        )
    return _batches(tokens, mask, rows, per_epoch, batch_size, seed, start, shard)


def _batches(tokens, mask, rows, per_epoch, batch_size, seed, start, shard):
    rank, size = shard
    epoch, order = None, None
    for step in itertools.count(start):
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            order = np.random.default_rng([seed, epoch]).permutation(len(rows))
        first = (step % per_epoch * size + rank) * batch_size
        picked = rows[order[first : first + batch_size]]  # (B, length+1)
        window, weight = tokens[picked], mask[picked]
        yield mx.array(window[:, :-1]), mx.array(window[:, 1:]), mx.array(weight[:, 1:])
