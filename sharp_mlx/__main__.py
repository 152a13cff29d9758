"""``python -m sharp_mlx <command> [flags]`` and the ``sharp-mlx`` command: one entry for every command.

sharp-mlx pipeline                 # the main job
sharp-mlx train --stage slw ...    # the same as python -m sharp_mlx.train --stage slw ...
"""

import importlib
import sys

COMMANDS = {  # name -> what it does (each is also `python -m sharp_mlx.NAME`)
    "advise": "will sharing pay on this model? damage and borrow gain per layer, a plan, a verdict",
    "pipeline": "the main job: import, share, SLW, SFT, evaluate, 4-bit, generate",
    "convert": "import a Llama from a GGUF file, a Hugging Face folder or a hub id",
    "corpora": "fetch the five text domains into data/",
    "heldout": "fetch three evaluation-only kinds of text into data/heldout/",
    "analyze": "how well an earlier layer's MLP stands in for a later one",
    "train": "--stage slw (share + warm up) or --stage sft (fine-tune the recovery)",
    "evaluate": "perplexity of one or more models on text files",
    "cloze": "next-sentence multiple-choice accuracy",
    "quantize": "a 4- or 8-bit checkpoint, shared weights stored once",
    "fuse": "a plain dense Llama with the recovery merged in",
    "generate": "generate text, timing load, prompt and decode",
    "bench": "load, decode and perplexity against mlx-lm's 4-bit",
    "verify": "check a model folder: weights files, checksums, finite weights",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items())
    return f"usage: sharp-mlx COMMAND [flags]   (sharp-mlx COMMAND --help for its flags)\n\ncommands:\n{rows}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sharp-mlx: error: unknown command {name!r}: use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(f"sharp_mlx.{name}").main(rest) or 0


if __name__ == "__main__":
    raise SystemExit(main())
