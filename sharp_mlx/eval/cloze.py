"""Next-sentence multiple choice: build items from held-out text and score models on them.

The command is ``python -m sharp_mlx.cloze`` (``sharp_mlx/cloze.py``)."""

import math
import re
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from tqdm import tqdm

from ..data.batches import DataError, load_records
from ..errors import SharpError
from ..reports import markdown_table as table
from .perplexity import over_models

MIN_WORDS, MAX_WORDS = 4, 40
# End of a sentence: . ! ? (and closing quotes/brackets) before whitespace, or a newline.
BOUNDARY = re.compile(r"[.!?]+[\"'\u2019\u201d)\]]*(?=\s)|\n")
# A "." that ends one of these does not end a sentence.
ABBREVIATION = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Gen|Col|Gov|Sen|Rep|vs|etc|e\.g|i\.e|U\.S|No|[A-Z])\.$")

Results = Dict[str, Dict[str, Dict[str, float]]]


def record_text(record: dict, fmt: str) -> str:
    """A record of a sharp_mlx.data.batches file as plain text."""
    if fmt == "text":
        return record["text"]
    if fmt == "completions":
        return record["prompt"] + "\n\n" + record["completion"]
    return "\n\n".join(m["content"] for m in record["messages"])


def sentence_spans(text: str) -> List[Tuple[int, int]]:
    """(start, end) of each non-empty sentence of ``text``, stripped (the rule in the docstring)."""
    spans, start = [], 0
    for m in BOUNDARY.finditer(text):
        if m.group().startswith(".") and ABBREVIATION.search(text, max(0, m.start() - 10), m.start() + 1):
            continue
        end = m.start() if m.group() == "\n" else m.end()
        spans.append((start, end))
        start = m.end()
    spans.append((start, len(text)))
    stripped = []
    for s, e in spans:
        piece = text[s:e]
        if piece.strip():
            s += len(piece) - len(piece.lstrip())
            e -= len(piece) - len(piece.rstrip())
            stripped.append((s, e))
    return stripped


def usable(sentence: str) -> bool:
    return MIN_WORDS <= len(sentence.split()) <= MAX_WORDS


def build_items(path, tokenizer, n_items: int, choices: int = 4, context_tokens: int = 64, seed: int = 0) -> List[dict]:
    """``n_items`` items of one file. Each: "context" (ids), "choices" (ids of each choice),
    "answer" (index of the true one), and for inspection "context_text", "choice_texts" (the
    scored strings) and "source" ("file:record:character"). Raises DataError if the file is
    missing or has too few usable sentences."""
    if n_items < 1 or choices < 2 or context_tokens < 1:
        raise SharpError(
            f"need --items >= 1, --choices >= 2 and --context-tokens >= 1, got {n_items}, {choices} and "
            f"{context_tokens}"
        )
    fmt, records = load_records(path)
    texts = [record_text(r, fmt) for r in records]
    candidates, pool = [], {}  # (record, start) of possible true sentences; usable text -> words
    for r, text in enumerate(texts):
        word_starts = [m.start() for m in re.finditer(r"\S+", text)]
        for s, e in sentence_spans(text):
            if usable(text[s:e]):
                pool.setdefault(text[s:e], len(text[s:e].split()))
                if np.searchsorted(word_starts, s) >= context_tokens:  # words before s in the record
                    candidates.append((r, s, e))
    if len(candidates) < n_items or len(pool) < choices:
        raise DataError(
            f"{path}: {len(candidates)} sentences of {MIN_WORDS}-{MAX_WORDS} words have {context_tokens} words of "
            "context before them "
            f"and {len(pool)} distinct ones exist, too few for {n_items} items of {choices} choices: pass fewer "
            "--items, --choices or "
            "--context-tokens, or a longer file"
        )
    rng = np.random.default_rng(seed)
    pool_texts, pool_words = list(pool), np.array(list(pool.values()))
    items = []
    for i in rng.choice(len(candidates), n_items, replace=False):
        r, s, e = candidates[i]
        text, true = texts[r], texts[r][s:e]
        before = text[:s].rstrip(" \t\r\f\v")  # keeps a newline before the sentence, drops a space
        lead = "" if before.endswith("\n") else " "
        window = before[[m.start() for m in re.finditer(r"\S+", before)][-context_tokens] :]
        context = list(tokenizer.encode(window, add_special_tokens=False))[-context_tokens:]
        order = rng.permutation(len(pool_texts))
        order = order[np.argsort(np.abs(pool_words[order] - pool[true]), kind="stable")]
        # A sentence the context holds would be found by copying, not by understanding.
        sentences = [pool_texts[j] for j in order if pool_texts[j] != true and pool_texts[j] not in window][
            : choices - 1
        ]
        if len(sentences) < choices - 1:
            raise DataError(
                f"{path}: too few distinct sentences for {choices} choices: pass fewer --choices or a longer file"
            )
        answer = int(rng.integers(choices))
        sentences.insert(answer, true)
        choice_texts = [lead + t for t in sentences]
        items.append(
            {
                "context": context,
                "choices": [list(tokenizer.encode(t, add_special_tokens=False)) for t in choice_texts],
                "answer": answer,
                "context_text": tokenizer.decode(context),
                "choice_texts": choice_texts,
                "source": f"{path}:{r}:{s}",
            }
        )
    return items


def _batch_scores(model, batch: Sequence[dict]) -> np.ndarray:
    """Mean log-probability per token of each choice of each item: (B, K). The contexts, of
    one length, fill a KV cache once; it is repeated for the K choices of each item."""
    k = len(batch[0]["choices"])
    cache = make_prompt_cache(model)
    model.model(mx.array([item["context"][:-1] for item in batch]), cache=cache)  # (B, T-1), no logits needed
    for c in cache:  # (B, heads, T-1, dim) -> (B*K, ...), row b*K + j is item b's choice j
        c.keys = mx.repeat(c.keys[..., : c.offset, :], k, axis=0)
        c.values = mx.repeat(c.values[..., : c.offset, :], k, axis=0)
    rows = [(item["context"][-1], choice) for item in batch for choice in item["choices"]]
    width = max(len(choice) for _, choice in rows)
    inputs, targets, mask = (np.zeros((len(rows), width), dtype) for dtype in (np.int32, np.int32, np.float32))
    for i, (last, choice) in enumerate(rows):  # right-padded: the input is the target shifted by one
        n = len(choice)
        inputs[i, :n], targets[i, :n], mask[i, :n] = [last] + choice[:-1], choice, 1.0
    logits = model(mx.array(inputs), cache=cache)  # (B*K, width, vocab)
    logp = -nn.losses.cross_entropy(logits.astype(mx.float32), mx.array(targets), reduction="none")
    mean = (logp * mx.array(mask)).sum(axis=1) / mx.array(mask).sum(axis=1)
    return np.array(mean).reshape(len(batch), k)


def choice_scores(model, items: Sequence[dict], batch_items: int = 1, desc: str = "cloze") -> np.ndarray:
    """(n_items, K) mean log-probability per token of every choice; ``batch_items`` items per
    forward pass (consecutive items whose contexts and choice counts match)."""
    if batch_items < 1:
        raise SharpError(f"batch_items must be at least 1, got {batch_items}")
    batches: List[List[dict]] = []
    for item in items:
        last = batches[-1] if batches else None
        if (
            last
            and len(last) < batch_items
            and len(last[0]["context"]) == len(item["context"])
            and len(last[0]["choices"]) == len(item["choices"])
        ):
            last.append(item)
        else:
            batches.append([item])
    out = [_batch_scores(model, batch) for batch in tqdm(batches, desc=desc, unit="batch", leave=False)]
    return np.concatenate(out) if out else np.zeros((0, 0))


def accuracy(correct: int, n: int) -> Dict[str, float]:
    """{"accuracy", "n", "stderr"} of ``correct`` right answers out of ``n``."""
    p = correct / n if n else 0.0
    return {"accuracy": p, "n": n, "stderr": math.sqrt(p * (1 - p) / n) if n else 0.0}


def score(model, items: Sequence[dict], batch_items: int = 1, desc: str = "cloze") -> Dict[str, float]:
    """{"accuracy", "n", "stderr"}: how often the true sentence scores highest."""
    scores = choice_scores(model, items, batch_items, desc)
    answers = np.array([item["answer"] for item in items])
    return accuracy(int((scores.argmax(axis=1) == answers).sum()) if len(items) else 0, len(items))


def pooled(per_file: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """The accuracy over all items of all files."""
    correct = sum(round(r["accuracy"] * r["n"]) for r in per_file.values())
    return accuracy(correct, sum(r["n"] for r in per_file.values()))


def evaluate(
    models: List[Path],
    files: List[Path],
    n_items: int = 10,
    choices: int = 4,
    context_tokens: int = 64,
    seed: int = 0,
    float_weights: bool = False,
    batch_items: int = 1,
) -> Results:
    """{model: {file: {"accuracy", "n", "stderr"}}}; items are built once, with the first
    model's tokenizer. ``float_weights``: see ``sharp_mlx.eval.perplexity.over_models``."""
    prepare = lambda tok: {f: build_items(f, tok, n_items, choices, context_tokens, seed) for f in files}  # noqa: E731
    return {
        str(path): {str(f): score(model, items[f], batch_items, desc=f"{f} on {path.name}") for f in files}
        for path, model, items in over_models(models, prepare, float_weights)
    }


def _labels(files: Sequence[str]) -> List[str]:
    """Column names: the files' folder names (data/<domain>/test.jsonl) when those are unique."""
    names = [Path(f).parent.name for f in files]
    return names if all(names) and len(set(names)) == len(names) else list(files)


def markdown_table(results: Results, choices: int, context_tokens: int, seed: int) -> str:
    files = list(next(iter(results.values())))

    def cell(r):
        return f"{r['accuracy']:.2f} ± {r['stderr']:.2f}"

    rows = [[model, *(cell(per_file[f]) for f in files), cell(pooled(per_file))] for model, per_file in results.items()]
    rows.append(["chance", *[f"{1 / choices:.2f}"] * (len(files) + 1)])
    n = next(iter(results.values()))[files[0]]["n"]
    return table(["model", *_labels(files), "overall"], rows) + (
        f"\n\nAccuracy at picking the true next sentence among {choices} ± standard error; {n} items per file, "
        f"{context_tokens} tokens of context, seed {seed}."
    )
