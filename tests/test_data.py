"""Offline tests of sharp_mlx.data.corpora parsing and sharp_mlx.data.batches loading, masking, packing."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharp_mlx.data import corpora
from sharp_mlx.data.batches import DataError, batches, load_records, load_tokens, tokenize_record, windows

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "models" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tokenizer():
    if not (TOKENIZER / "tokenizer.json").exists():
        pytest.skip(f"no tokenizer at {TOKENIZER}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def write(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- fetch parsing


def test_strip_gutenberg_keeps_only_the_body():
    text = (
        "The Project Gutenberg EBook of Hamlet\r\nRelease Date: 1998\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
        "HAMLET\r\n\r\nTo be, or not to be.\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nLicence text.\r\n"
    )
    assert corpora.strip_gutenberg(text) == "HAMLET\n\nTo be, or not to be."
    assert corpora.strip_gutenberg("\nNo markers here.\n") == "No markers here."


def test_brown_to_text_strips_tags_and_fixes_spacing():
    tagged = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, (/( yes/rb )/) "
        "./.\n\tIt/pps was/bedz cut/vbn ;/. ;/.\n\n\n\tWhy/wrb ?/. ?/.\n"
    )
    assert corpora.brown_to_text(tagged) == ('The jury said "no evidence", (yes). It was cut;\n\nWhy?')


def test_recover_json_array_drops_only_the_truncated_tail():
    records = [{"id": f"a_{i}", "v": "x, ]} {"} for i in range(3)]
    text = json.dumps(records, indent=2)
    assert corpora.recover_json_array(text) == records
    cut = text[: text.rindex('"x, ]} {"')]  # inside the last record
    assert corpora.recover_json_array(cut) == records[:2]


def test_sharegpt_messages_maps_roles_and_trims():
    turns = [
        {"from": "gpt", "value": "leading"},
        {"from": "system", "value": "sys"},
        {"from": "human", "value": "q1"},
        {"from": "human", "value": " q2 "},
        {"from": "bing", "value": "other"},
        {"from": "gpt", "value": ""},
        {"from": "gpt", "value": "a"},
        {"from": "human", "value": "unanswered"},
    ]
    assert corpora.sharegpt_messages(turns) == [
        {"role": "user", "content": "q1\n\nq2"},
        {"role": "assistant", "content": "a"},
    ]
    assert corpora.sharegpt_messages([{"from": "human", "value": "q"}]) == []


def test_chunk_text_groups_paragraphs_and_splits_long_ones_at_sentences():
    paragraphs = [f"Paragraph {i}. " + "word " * 60 for i in range(40)]  # ~320 chars each
    chunks = corpora.chunk_text("\n\n".join(p.strip() for p in paragraphs))
    assert all(corpora.TARGET_CHARS <= len(c) <= corpora.LIMIT_CHARS for c in chunks)
    assert all(c.startswith("Paragraph") for c in chunks)  # whole paragraphs only
    speech = " ".join(f"Sentence number {i} is here." for i in range(1000))  # one line, 28k
    chunks = corpora.chunk_text(speech)
    assert len(chunks) > 5 and all(c.endswith("here.") and "\n" not in c for c in chunks)
    assert " ".join(chunks) == speech


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet="ab .!?\n\t", max_size=3000), max_size=8))
def test_chunk_text_keeps_every_character_within_limit(parts):
    text = "\n\n".join(parts)
    chunks = corpora.chunk_text(text)
    assert all(0 < len(c) <= corpora.LIMIT_CHARS for c in chunks)
    assert "".join("".join(chunks).split()) == "".join(text.split())


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(st.text(min_size=1, max_size=8), st.integers(1, 50_000), max_size=60),
    st.randoms(use_true_random=False),
)
def test_assign_splits_is_order_free_disjoint_and_filled(sizes, rng):
    splits = corpora.assign_splits(sizes, max_train_chars=100_000)
    shuffled = list(sizes.items())
    rng.shuffle(shuffled)
    assert corpora.assign_splits(dict(shuffled), max_train_chars=100_000) == splits
    names = [n for s in corpora.SPLITS for n in splits[s]]
    assert len(names) == len(set(names)) and set(names) <= set(sizes)
    quota = {"test": corpora.TEST_CHARS, "valid": corpora.VALID_CHARS, "train": 100_000}
    for before, split in (("test", "valid"), ("valid", "train")):
        if splits[split]:  # a later split only starts once the earlier one is full
            assert sum(sizes[n] for n in splits[before]) >= quota[before]
    if len(names) < len(sizes):
        assert sum(sizes[n] for n in splits["train"]) >= quota["train"]


# ---------------------------------------------------------------------------- loading


def test_load_records_detects_each_format(tmp_path):
    cases = {
        "text": {"text": "hi"},
        "completions": {"prompt": "p", "completion": "c"},
        "chat": {"messages": [{"role": "user", "content": "u"}]},
    }
    for fmt, record in cases.items():
        path = write(tmp_path / f"{fmt}.jsonl", [json.dumps(record), "", json.dumps(record)])
        assert load_records(path) == (fmt, [record, record])
    (tmp_path / "book.txt").write_text("line one\n\nline two\n")
    assert load_records(tmp_path / "book.txt") == ("text", [{"text": "line one\n\nline two\n"}])


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "is empty"),
        (["", "  "], "is empty"),
        (['{"text": "a"}', '{"text": "b"}', '{"text": oops}'], ":3: malformed JSON"),
        (['{"input": "a"}'], ":1: unknown record format with keys ['input']; expected {\"text\"}"),
        (['{"text": "a"}', '{"prompt": "p", "completion": "c"}'], ":2: expected string field"),
        (['["text"]'], ":1: expected a JSON object, got list"),
        (['{"messages": [{"role": "user"}]}'], ':1: expected "messages" to be a non-empty list'),
    ],
)
def test_load_records_errors_name_the_problem(tmp_path, lines, message):
    path = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_records(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_load_records_missing_file_and_bad_encoding(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8 text"):
        load_records(tmp_path / "latin1.txt")
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------- tokenizing


def test_text_records_end_with_eos_and_train_everything(tokenizer):
    tokens, mask = tokenize_record(tokenizer, {"text": "To be, or not to be."}, "text")
    assert tokens[-1] == tokenizer.eos_token_id and mask == [1] * len(tokens)
    assert tokenizer.decode(tokens[:-1]) == "To be, or not to be."


def test_chat_mask_covers_only_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Eleven, then thirteen."},
    ]
    tokens, mask = tokenize_record(tokenizer, {"messages": messages}, "chat")
    tokens, mask = np.array(tokens), np.array(mask)
    trained = tokenizer.decode(tokens[mask == 1])
    assert trained == "Seven.<|im_end|>\nEleven, then thirteen.<|im_end|>\n"
    untrained = tokenizer.decode(tokens[mask == 0])
    assert "Name a prime." in untrained and "Seven" not in untrained
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokens.tolist() == tokenizer.encode(whole, add_special_tokens=False)


class CharTokenizer:
    """One token per character, and a template "<role>content</>" (no model files needed)."""

    chat_template, eos_token_id = "<role>content</>", 0

    def __init__(self, count_prefix=False):
        self.count_prefix = count_prefix  # prefix the message count: not prefix-stable

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def apply_chat_template(self, messages, tokenize, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        return f"{len(messages)}|{text}" if self.count_prefix else text


def test_chat_mask_with_a_char_tokenizer():
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "tool", "content": "T"},
        {"role": "assistant", "content": "A2"},
    ]
    tokens, mask = tokenize_record(CharTokenizer(), {"messages": messages}, "chat")
    text = "".join(chr(t) for t in tokens)
    assert text == "<user>Q1</><assistant>A1</><tool>T</><assistant>A2</>"
    assert "".join(chr(t) for t, m in zip(tokens, mask) if m) == "A1</>A2</>"
    with pytest.raises(DataError, match="cannot locate assistant turn 1"):
        tokenize_record(CharTokenizer(count_prefix=True), {"messages": messages}, "chat")


def test_chat_starting_with_assistant_is_an_error():
    messages = [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Hey"}]
    with pytest.raises(DataError, match="starts with an assistant turn"):
        tokenize_record(CharTokenizer(), {"messages": messages}, "chat")


def test_completion_mask_covers_only_the_completion(tokenizer, tmp_path):
    path = write(tmp_path / "c.jsonl", [json.dumps({"prompt": "2+2?", "completion": "4"})] * 2)
    tokens, mask = load_tokens(path, tokenizer)
    assert tokens.dtype == np.int32 and tokens.shape == mask.shape
    assert tokenizer.decode(tokens[mask == 1]) == "4<|im_end|>\n" * 2


# ---------------------------------------------------------------------------- packing


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 300), st.integers(1, 40))
def test_windows_score_each_target_once(n, length):
    tokens = np.arange(n, dtype=np.int32)
    rows, scored = windows(tokens, length)
    rows = np.array(rows)
    assert scored == max(n - 1, 0) // length * length == rows.shape[0] * length
    if scored:
        assert rows.shape[1] == length + 1
        assert np.array_equal(rows[:, 1:].reshape(-1), tokens[1 : scored + 1])
        assert np.array_equal(rows[:, 0], tokens[0:scored:length])


def test_batches_are_seeded_resumable_and_shifted():
    tokens = np.arange(1000, dtype=np.int32)
    mask = (tokens % 3 == 0).astype(np.int32)

    def take(k, seed=7, start=0):  # k batches as one numpy array (k, 3, B, L)
        gen = batches(tokens, mask, 4, 16, seed=seed, start=start)
        return np.array([[np.array(a) for a in next(gen)] for _ in range(k)])

    first = take(40)  # 62 windows of 16+1: 15 batches an epoch, so 40 spans three epochs
    assert np.array_equal(first, take(40))
    assert np.array_equal(first[17:], take(23, start=17))
    assert not np.array_equal(first[0], take(1, seed=8)[0])
    for inputs, targets, weight in first:
        assert inputs.shape == targets.shape == weight.shape == (4, 16)
        assert np.array_equal(targets, inputs + 1)  # tokens are their own positions
        assert np.array_equal(weight, (targets % 3 == 0))
    epoch = np.concatenate([x[0][:, 0] for x in first[:15]])
    assert len(set(epoch.tolist())) == 60  # an epoch visits distinct windows


def test_batches_need_a_full_batch():
    with pytest.raises(DataError, match="fewer than a batch of 4"):
        next(batches(np.arange(40), np.ones(40), 4, 16))


def test_load_tokens_stops_at_max_tokens(tmp_path):
    from tiny_folder import write_char_tokenizer, write_text_data

    write_char_tokenizer(tmp_path)
    path = write_text_data(tmp_path / "t.jsonl", records=30)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    full, full_mask = load_tokens(path, tok)
    head, head_mask = load_tokens(path, tok, max_tokens=100)
    assert len(head) == 100 and (head == full[:100]).all() and (head_mask == full_mask[:100]).all()
