"""Greedy answers of several model folders to ten everyday prompts, side by side.

    python experiments/answers.py --model original=models/smollm2-135m-instruct \\
        sharp=models/smollm2-135m-instruct-sharp-4bit --out experiments/results/answers

Perplexity says how well a model predicts text; this says what a user sees. Each prompt (three
facts, two sums, two short instructions, two chat turns, one definition) goes through the model's
chat template and is answered at temperature 0 for at most --max-tokens tokens by the package's
own generation code (``sharp_mlx.generate.prompt_tokens`` and ``stream``: what
``python -m sharp_mlx.generate`` prints), so sharp_mlx checkpoints and plain mlx-lm Llama folders
are answered alike. An answer that loops is flagged: a word 4-gram said 3 or more times, or a
sentence said twice. Writes PREFIX.md (the command, loops per model, a table prompt | model | ...)
and PREFIX.json (every answer, its token count, whether it stopped by itself, and why it loops).
"""

import argparse
import json
import re
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from sharp_mlx.errors import ArgumentParser, SharpError, cli
from sharp_mlx.generate import prompt_tokens, stream, timed_load
from sharp_mlx.io.checkpoint import read_config
from sharp_mlx.reports import markdown_table

PROMPTS: Tuple[Tuple[str, str], ...] = (  # (kind, user message)
    ("fact", "What is the capital of France?"),
    ("fact", "How many legs does a spider have?"),
    ("fact", "Who wrote Romeo and Juliet?"),
    ("arithmetic", "What is 7 + 5?"),
    ("arithmetic", "What is 12 times 3?"),
    ("instruction", "List three colours."),
    ("instruction", "Write one sentence about the sea."),
    ("chat", "Hi! How are you today?"),
    ("chat", "Thanks for your help yesterday, it worked!"),
    ("definition", "What is a noun?"),
)
NGRAM, NGRAM_TIMES, SENTENCE_WORDS = 4, 3, 3  # the loop rule: see ``loop_reason``


def _words(text: str) -> List[str]:
    return re.findall(r"\w+", text.lower())


def loop_reason(text: str, n: int = NGRAM, times: int = NGRAM_TIMES) -> Optional[str]:
    """Why an answer loops, or None: some word `n`-gram (case and punctuation ignored) occurs
    `times` or more, or a sentence or line of SENTENCE_WORDS+ words occurs twice (a list item under
    any number or bullet). Greedy decoding of a damaged model degenerates into exactly these
    repeats; a correct short answer has none."""
    words = _words(text)
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    if grams:
        gram, count = grams.most_common(1)[0]
        if count >= times:
            return f'"{" ".join(gram)}" {count} times'
    seen = set()
    for sentence in re.split(r"(?<=\D[.!?])\s+|\n+", text):  # "2. Blue" is one sentence
        key = " ".join(_words(re.sub(r"^\s*(\d+[.)]|[-*•])\s*", "", sentence)))  # a list item, renumbered
        if len(key.split()) >= SENTENCE_WORDS:
            if key in seen:
                return f'sentence "{key}" twice'
            seen.add(key)
    return None


def parse_models(specs: Sequence[str]) -> Dict[str, Path]:
    """{name: folder} from NAME=FOLDER or FOLDER (named after the folder) specs."""
    models: Dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path:
            raise SharpError(f"--model {spec!r}: expected NAME=FOLDER or FOLDER")
        if name in models:
            raise SharpError(f"--model: the name {name!r} is given twice: name each folder once, as NAME=FOLDER")
        models[name] = Path(path)
    return models


def answer_all(path: Path, prompts: Sequence[str], max_tokens: int) -> List[dict]:
    """Greedy answers of one model folder to `prompts`, loading it once."""
    model, tokenizer, _ = timed_load(path)
    out = []
    for prompt in prompts:
        pieces, timing = [], None
        for text, timing in stream(model, tokenizer, prompt_tokens(tokenizer, prompt), max_tokens, temp=0.0):
            pieces.append(text)
        text = "".join(pieces).strip()
        out.append(
            {
                "text": text,
                "tokens": timing.generation_tokens,
                "stopped": timing.generation_tokens < max_tokens,  # ended by the model, not by the cap
                "loop": loop_reason(text),
            }
        )
    del model
    mx.clear_cache()
    return out


def _cell(a: dict) -> str:
    text = a["text"].replace("|", "\\|").replace("\n", "<br>") or "(empty)"
    return ("**[loops]** " if a["loop"] else "") + text + ("" if a["stopped"] else " …")


def markdown(record: dict) -> str:
    """The report: the command, the rule, loops per model, then one row per prompt."""
    names = list(record["models"])
    loops = ", ".join(f"{n} {m['loops']}/{len(record['prompts'])}" for n, m in record["models"].items())
    lines = [
        "# Everyday prompts, side by side",
        "",
        "```",
        record["command"],
        "```",
        "",
        f"Greedy (temperature 0), through each model's chat template, at most {record['max_tokens']} new tokens; "
        "`…` marks an answer cut at that cap. **[loops]**: some word "
        f"{NGRAM}-gram occurs {NGRAM_TIMES}+ times, or a sentence of {SENTENCE_WORDS}+ words repeats.",
        "",
        "Models: " + ", ".join(f"{n} = `{m['path']}`" for n, m in record["models"].items()) + ".",
        "",
        f"Answers that loop: {loops}.",
        "",
        markdown_table(
            ["prompt", *names],
            [
                [f"{p['prompt']} ({p['kind']})", *(_cell(record["models"][n]["answers"][i]) for n in names)]
                for i, p in enumerate(record["prompts"])
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python experiments/answers.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        nargs="+",
        required=True,
        metavar="NAME=FOLDER",
        help="model folders, each named (default name: the folder's); one table column each",
    )
    p.add_argument("--out", type=Path, required=True, help="output prefix: writes PREFIX.md and PREFIX.json")
    p.add_argument("--max-tokens", type=int, default=48, help="most new tokens per answer (default: %(default)s)")
    return p


@cli("experiments/answers.py")
def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.max_tokens <= 0:
        raise SharpError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    models = parse_models(args.model)
    for path in models.values():
        read_config(path)  # every folder checked before the first one is loaded
    record = {
        "command": "python experiments/answers.py " + shlex.join(argv),
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "loop_rule": {"ngram": NGRAM, "times": NGRAM_TIMES, "sentence_words": SENTENCE_WORDS},
        "prompts": [{"kind": k, "prompt": p} for k, p in PROMPTS],
        "models": {},
    }
    for name, path in models.items():
        print(f"{name}: {path}", file=sys.stderr)
        answers = answer_all(path, [p for _, p in PROMPTS], args.max_tokens)
        record["models"][name] = {
            "path": str(path),
            "loops": sum(a["loop"] is not None for a in answers),
            "answers": answers,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md, js = Path(f"{args.out}.md"), Path(f"{args.out}.json")
    md.write_text(markdown(record), encoding="utf-8")
    js.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(markdown(record))
    print(f"wrote {md} and {js}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
