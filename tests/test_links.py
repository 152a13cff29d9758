"""Every relative link and image in the README and docs points at a file that exists.

Checks ``[text](path)`` and ``![alt](path)`` in README.md, data/README.md, models/README.md and
docs/**/*.md (targets relative to the file that links them; web, mailto and pure #anchor links
are skipped, and any #anchor is stripped), and the backticked ``docs/...md`` / ``docs/...png``
paths in README.md (relative to the repository root, ``{a,b}`` expanded).
"""

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
DOCS_PATH = re.compile(r"docs/[\w./{},-]+")
SKIP = ("http://", "https://", "mailto:")


def markdown_files(root: Path):
    names = [root / "README.md", root / "data" / "README.md", root / "models" / "README.md"]
    experiments = [p for p in sorted((root / "experiments").rglob("*.md")) if "results" not in p.parts]
    return [p for p in names if p.exists()] + sorted((root / "docs").rglob("*.md")) + experiments


def prose_lines(path: Path):
    """(line number, text) of every line outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def expand_braces(text: str):
    m = re.search(r"\{([^{}]*)\}", text)
    if not m:
        return [text]
    head, tail = text[: m.start()], text[m.end() :]
    return [x for alt in m.group(1).split(",") for x in expand_braces(head + alt + tail)]


def broken_links(path: Path, root: Path):
    """'file:line: target' for every relative link or image in ``path`` whose target is missing."""
    bad = []
    for n, line in prose_lines(path):
        for m in LINK.finditer(CODE_SPAN.sub("", line)):
            target = m.group(1).strip("<>")
            if target.startswith(SKIP) or target.startswith("#"):
                continue
            target = unquote(target.split("#", 1)[0])
            if not (path.parent / target).exists():
                bad.append(f"{path.relative_to(root)}:{n}: {m.group(0)}")
    return bad


def broken_code_paths(path: Path, root: Path):
    """'file:line: path' for every backticked docs/...md or docs/...png path that does not exist."""
    bad = []
    for n, line in prose_lines(path):
        for span in CODE_SPAN.finditer(line):
            for token in DOCS_PATH.findall(span.group(2)):
                for p in expand_braces(token.rstrip(".,;:")):
                    if p.endswith((".md", ".png")) and not (root / p).exists():
                        bad.append(f"{path.relative_to(root)}:{n}: `{p}`")
    return bad


def test_every_markdown_link_resolves():
    files = markdown_files(ROOT)
    assert len(files) >= 4, files
    bad = [b for f in files for b in broken_links(f, ROOT)]
    assert not bad, f"{len(bad)} broken link(s):\n" + "\n".join(bad)


def test_backticked_docs_paths_in_readme_exist():
    bad = broken_code_paths(ROOT / "README.md", ROOT)
    assert not bad, f"{len(bad)} missing path(s) named in README.md:\n" + "\n".join(bad)


def test_the_checks_can_fail(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# there\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/there.md#top) [web](https://example.com) [anchor](#x) `[not a link](nope.md)`\n"
        "![missing](docs/gone.png) and [gone](docs/gone.md)\n"
        "```\n[in a fence](nowhere.md)\n```\n"
        "see `docs/there.md` and `docs/gone.{md,png}`\n"
    )
    assert broken_links(tmp_path / "README.md", tmp_path) == [
        "README.md:2: ![missing](docs/gone.png)",
        "README.md:2: [gone](docs/gone.md)",
    ]
    assert broken_code_paths(tmp_path / "README.md", tmp_path) == [
        "README.md:6: `docs/gone.md`",
        "README.md:6: `docs/gone.png`",
    ]
