"""The next-sentence check: items built from the text alone, scores equal to a one-sequence-at-a-
time computation, and on the real model better than chance."""

import json
import random
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from tiny_folder import write_tiny_model

import sharp_mlx
from sharp_mlx import cloze as cloze_cmd
from sharp_mlx.data.batches import DataError
from sharp_mlx.eval import cloze

# Five short texts on unrelated topics: a model that follows the context tells the true next
# sentence from ones of the other texts; one that does not is right a quarter of the time.
TOPICS = [
    "To bake a simple loaf of bread, you need flour, water, salt and yeast. First, dissolve the yeast in a cup of "
    "warm water. "
    "Then mix the flour and the salt in a large bowl. Pour the water into the flour and stir until a rough dough "
    "forms. "
    "Knead the dough on a floured table for about ten minutes. It should become smooth and elastic under your hands. "
    "Put the dough back in the bowl and cover it with a damp cloth. Let it rise in a warm place until it doubles in "
    "size. "
    "Shape the dough into a loaf and place it on a baking tray. Bake it in a hot oven for forty minutes until the "
    "crust is brown. "
    "Let the bread cool on a rack before you cut the first slice.",
    "The solar system has eight planets that orbit the sun. Mercury is the smallest planet and the closest to the sun. "
    "Venus is covered by thick clouds of sulfuric acid. Earth is the only planet known to support life. "
    "Mars is a cold desert world with a thin atmosphere of carbon dioxide. Jupiter is the largest planet, a giant "
    "ball of gas. "
    "Its famous red spot is a storm larger than the whole Earth. Saturn is known for its bright rings of ice and rock. "
    "Uranus rotates on its side, perhaps because of an ancient collision. Neptune is the farthest planet and has the "
    "strongest winds. "
    "Beyond Neptune lies the Kuiper belt, home to Pluto and many icy bodies.",
    "The home team started the match with great energy in front of a full stadium. In the tenth minute their striker "
    "shot from the edge of the box. "
    "The goalkeeper dived to his left and pushed the ball around the post. From the corner kick the captain headed "
    "the ball into the net. "
    "The visitors slowly took control of the midfield after the first goal. Just before half time they equalised with "
    "a low shot. "
    "In the second half both teams created several chances but missed them. With five minutes left the referee "
    "awarded a penalty. "
    "The young winger stepped up and calmly scored his first goal of the season. The fans sang loudly until the final "
    "whistle. "
    "After the game the coach praised the spirit of his players.",
    "To start a new Python project, first create a virtual environment. Run python -m venv .venv in the project "
    "folder. "
    "Then activate the environment with the activate script in its bin folder. Your shell prompt now shows the name "
    "of the environment. "
    "Install the packages you need with pip install followed by their names. Write the installed versions to a "
    "requirements file with pip freeze. "
    "Commit the requirements file so that others can install the same versions. When you are done working, type "
    "deactivate to leave the environment. "
    "Never commit the virtual environment folder itself to the repository. Add it to the gitignore file instead.",
    "An old fisherman lived alone in a small hut by the sea. Every morning before sunrise he pushed his wooden boat "
    "into the water. "
    "He rowed far beyond the rocks where the big fish were hiding. One day he felt a heavy pull on his line. "
    "He held the line with both hands for many hours. The fish dragged the little boat further and further out to sea. "
    "At last, as the sun went down, the great fish rose to the surface. It was longer than the boat and shone like "
    "silver. "
    "The old man tied the fish to the side of his boat and turned toward home. But on the way back the sharks came "
    "and ate it piece by piece. "
    "When he reached the shore only the skeleton was left.",
]
WORDS = "the a model layer shares its weights with low rank factors and small cost while we train every block of text".split()


def write_topics(path):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TOPICS))
    return path


def write_sentences(path, records=12, seed=0):
    """Records of random sentences (2-16 words, some too short to be used), joined by spaces or newlines."""
    rng = random.Random(seed)
    lines = []
    for _ in range(records):
        text = ""
        for _ in range(14):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 16))]
            text += " ".join(words).capitalize() + rng.choice(".?!") + rng.choice([" ", " ", "\n", "\n\n"])
        lines.append(json.dumps({"text": text.strip()}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, data file): the tiny random Llama with one token per character."""
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    model, tokenizer = sharp_mlx.load(folder)
    return model, tokenizer, write_sentences(tmp_path_factory.mktemp("data") / "test.jsonl")


def brute_force(model, item):
    """Mean log-probability per token of each choice, one unpadded sequence at a time."""
    out = []
    for choice in item["choices"]:
        seq = item["context"] + choice
        logp = nn.log_softmax(model(mx.array([seq[:-1]])).astype(mx.float32), axis=-1)[0]  # (T-1, vocab)
        targets = np.array(seq[1:])
        out.append(float(np.array(logp)[np.arange(len(targets)), targets][-len(choice) :].mean()))
    return out


def test_sentence_rule():
    text = 'Mr. Smith went home. He slept well!\nThen "Why?" she asked.  Dr. J. Watson came\n\nlater'
    assert [text[s:e] for s, e in cloze.sentence_spans(text)] == [
        "Mr. Smith went home.",
        "He slept well!",
        'Then "Why?"',
        "she asked.",
        "Dr. J. Watson came",
        "later",
    ]
    assert cloze.usable("one two three four") and not cloze.usable("one two three") and not cloze.usable("w " * 41)


def test_items_are_seeded_and_honest(tiny):
    _, tokenizer, path = tiny
    items = cloze.build_items(path, tokenizer, 12, choices=4, context_tokens=16, seed=0)
    assert items == cloze.build_items(path, tokenizer, 12, choices=4, context_tokens=16, seed=0)
    assert [i["choice_texts"] for i in items] != [
        i["choice_texts"] for i in cloze.build_items(path, tokenizer, 12, 4, 16, seed=1)
    ]
    file_text = "".join(json.loads(line)["text"] + "\n" for line in path.read_text().splitlines())
    sentences = {file_text[s:e] for s, e in cloze.sentence_spans(file_text)}
    assert len({i["source"] for i in items}) == 12
    for item in items:
        texts = item["choice_texts"]
        true = texts[item["answer"]]
        assert len(texts) == 4 and texts.count(true) == 1 and len(set(texts)) == 4
        # The true sentence follows its context in the file (the character tokenizer reads a run of
        # newlines as one unknown token).
        assert re.search(
            re.escape(item["context_text"]).replace(re.escape("<unk>"), "\n+") + re.escape(true), file_text
        )
        assert len(item["context"]) == 16
        for text, ids in zip(texts, item["choices"]):
            assert tokenizer.decode(ids) == text  # the scored tokens are the choice's text
            assert text.strip() in sentences and cloze.usable(text)  # a sentence of the same file
            assert text.strip() not in item["context_text"] or text == true
    answers = [i["answer"] for i in items]
    assert len(set(answers)) > 1  # the true one does not always stand at the same place


def test_scores_equal_one_sequence_at_a_time(tiny):
    model, tokenizer, path = tiny
    items = cloze.build_items(path, tokenizer, 5, choices=3, context_tokens=16, seed=3)
    assert any(len({len(c) for c in i["choices"]}) > 1 for i in items)  # padding is exercised
    want = np.array([brute_force(model, item) for item in items])
    for batch_items in (1, 3):
        got = cloze.choice_scores(model, items, batch_items=batch_items)
        np.testing.assert_allclose(got, want, atol=1e-4)
    result = cloze.score(model, items)
    assert result["n"] == 5 and result["accuracy"] == np.mean(want.argmax(1) == [i["answer"] for i in items])
    assert result["stderr"] == pytest.approx(np.sqrt(result["accuracy"] * (1 - result["accuracy"]) / 5))


def test_real_model_beats_chance(real_model, tmp_path):
    model, tokenizer = real_model
    items = cloze.build_items(
        write_topics(tmp_path / "topics.jsonl"), tokenizer, 8, choices=4, context_tokens=32, seed=0
    )
    assert {i["source"].split(":")[1] for i in items} != {"0"}  # the items span the texts
    result = cloze.score(model, items)
    # It gets 6 of 8 at seeds 0-3; at chance (1/4), 5 or more of 8 happens with probability 2.7%.
    assert result["accuracy"] >= 5 / 8, result


def test_too_few_sentences_and_missing_file_are_one_line_errors(tiny, tmp_path, capsys):
    _, tokenizer, path = tiny
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "One two three four five. " * 3}) + "\n")
    with pytest.raises(DataError, match="too few for 2 items.*pass fewer --items"):
        cloze.build_items(short, tokenizer, 2, context_tokens=4)
    with pytest.raises(DataError, match="not found"):
        cloze.build_items(tmp_path / "nope.jsonl", tokenizer, 2)
    folder = write_tiny_model(tmp_path / "model")
    assert cloze_cmd.main(["--model", str(folder), "--data", str(short), "--items", "2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "short.jsonl" in err


def test_cli_table_and_json(tiny, tmp_path, capsys):
    _, _, path = tiny
    folders = [str(write_tiny_model(tmp_path / f"model{seed}", seed=seed)) for seed in (0, 1)]
    args = ["--model", *folders, "--data", str(path), "--items", "3", "--context-tokens", "16"]
    assert cloze_cmd.main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == folders
    for per_file in out.values():
        assert per_file["overall"]["n"] == 3 and set(per_file[str(path)]) == {"accuracy", "n", "stderr"}
    assert cloze_cmd.main(args + ["--choices", "3"]) == 0
    table = capsys.readouterr().out
    assert "| chance | 0.33 | 0.33 |" in table and "overall" in table
