"""Property-based tests: the share-map parser and the data loaders answer every input with a
valid result or a SharpError naming the problem, never another exception."""

import json
import string
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sharp_mlx.data.batches import DataError, batches, load_records
from sharp_mlx.errors import SharpError
from sharp_mlx.models.llama import SharpArgs
from sharp_mlx.models.sharemap import parse_layers, parse_share

LAYERS = 12
maps = st.dictionaries(st.integers(-2, LAYERS + 2), st.none() | st.integers(-2, LAYERS + 2), max_size=6)


def valid(share: dict, n: int) -> bool:
    """The rules of a share map, written independently of the parser."""
    if not share:
        return False
    for t, r in share.items():
        if not 0 <= t < n:
            return False
        if r is not None and (not 0 <= r < t or r in share):
            return False
    return True


@settings(max_examples=300, deadline=None)
@given(maps)
def test_json_maps_are_accepted_exactly_when_valid(share):
    spec = json.dumps({str(t): r for t, r in share.items()})
    try:
        parsed = parse_share(spec, LAYERS)
    except SharpError as e:
        assert not valid(share, LAYERS) and "\n" not in str(e)
        return
    assert valid(share, LAYERS) and parsed == share
    SharpArgs(share=parsed, rank=1).validate(LAYERS, 8, 8)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.printable, max_size=30), st.none() | st.text(alphabet="0123456789:- ", max_size=8))
def test_any_spec_is_a_valid_map_or_a_one_line_error(spec, layers):
    assume(not Path(spec.strip()).exists())  # a spec may name a file; none of these should
    try:
        share = parse_share(spec, LAYERS, layers=layers)
    except SharpError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert valid(share, LAYERS)


@settings(max_examples=300, deadline=None)
@given(st.integers(-15, 15) | st.none(), st.integers(-15, 15) | st.none())
def test_layer_ranges_follow_python_slices(a, b):
    spec = f"{'' if a is None else a}:{'' if b is None else b}"
    expected = range(LAYERS)[slice(a, b)]
    try:
        got = parse_layers(spec, LAYERS)
    except SharpError:
        assert len(expected) < 2 or any(x is not None and abs(x) > LAYERS for x in (a, b))
        return
    assert got == expected


record = st.one_of(
    st.builds(lambda t: json.dumps({"text": t}), st.text(max_size=20)),
    st.builds(lambda p, c: json.dumps({"prompt": p, "completion": c}), st.text(max_size=10), st.text(max_size=10)),
    st.text(
        alphabet=string.printable.replace("\n", "").replace("\r", "").replace("\x0b", "").replace("\x0c", ""),
        max_size=20,
    ),
)


def first_bad_line(lines):
    """1-based number of the first line that is not a JSON object of the first record's format."""
    fmt = None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            return i
        if not isinstance(rec, dict):
            return i
        keys = "text" if "text" in rec else "completions" if {"prompt", "completion"} <= rec.keys() else None
        fmt = fmt or keys
        if keys is None or keys != fmt:
            return i
    return None if fmt else 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(record, max_size=6))
def test_jsonl_loader_names_the_first_bad_line(lines):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.jsonl"
        path.write_text("\n".join(lines))
        bad = first_bad_line("\n".join(lines).split("\n"))
        try:
            fmt, records = load_records(path)
        except DataError as e:
            assert bad is not None and "\n" not in str(e)
            if bad:
                assert str(e).startswith(f"{path}:{bad}: "), (str(e), bad)
            return
        assert bad is None and fmt in ("text", "completions") and len(records) == sum(1 for x in lines if x.strip())


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=40), st.sampled_from([".jsonl", ".txt"]))
def test_any_bytes_load_or_raise_data_error(content, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(content)
        try:
            load_records(path)
        except DataError as e:
            assert "\n" not in str(e)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 400), st.integers(1, 4), st.integers(1, 9), st.integers(1, 4), st.integers(0, 20), st.integers(0, 5)
)
def test_shards_together_are_the_global_batch(n, batch, length, size, start, seed):
    tokens = np.arange(n, dtype=np.int32)
    mask = np.ones(n, dtype=np.int32)
    try:
        whole = batches(tokens, mask, batch * size, length, seed, start)
    except DataError:
        for rank in range(size):  # too little data for one global batch: every shard says so
            try:
                batches(tokens, mask, batch, length, seed, start, shard=(rank, size))
            except DataError:
                continue
            raise AssertionError("a shard accepted what the global batch refused")
        return
    shards = [batches(tokens, mask, batch, length, seed, start, shard=(rank, size)) for rank in range(size)]
    for _ in range(3):
        expected = next(whole)
        parts = [next(s) for s in shards]
        for i in range(3):
            assert np.array_equal(np.concatenate([np.array(p[i]) for p in parts]), np.array(expected[i]))
