"""Generate text from a model folder and time every stage of it.

    python -m sharp_mlx.generate --prompt "What is the capital of France?"
    python -m sharp_mlx.generate --model models/smollm2-135m-instruct-sharp --temp 0.7 --json

Tokens come from mlx-lm's ``stream_generate`` (its KV cache, sampler and ``generate_step``);
this module adds the load and first-token timings and the achieved memory bandwidth.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple, Union

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from .errors import ArgumentParser, SharpError, cli
from .io.checkpoint import load, parameter_bytes
from .options import at_least, between
from .recipes import PAPER

DEFAULT_PROMPT = "What is the capital of France?"


@dataclass
class Timing:
    """One generation's numbers; decode_tps uses mlx-lm's definition so the two compare."""

    load_s: float
    ttft_s: float
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    decode_tps: float
    peak_memory_gb: float
    model_bytes: int

    @property
    def gb_per_s(self) -> float:
        """Achieved bandwidth: every weight is read once per decoded token."""
        return self.model_bytes * self.decode_tps / 1e9

    def line(self) -> str:
        return (
            f"load {self.load_s:.2f} s | first token {self.ttft_s:.2f} s | "
            f"prompt {self.prompt_tokens} tok at {self.prompt_tps:.1f} tok/s | "
            f"decode {self.generation_tokens} tok at {self.decode_tps:.1f} tok/s | "
            f"peak memory {self.peak_memory_gb:.2f} GB | model {self.model_bytes / 1e6:.0f} MB | "
            f"{self.gb_per_s:.2f} GB/s"
        )


def timed_load(path: Union[str, Path]):
    """(model, tokenizer, seconds): weights materialised in memory, not lazily mapped."""
    tic = time.perf_counter()
    model, tokenizer = load(path, lazy=False)
    return model, tokenizer, time.perf_counter() - tic


def prompt_tokens(tokenizer, prompt: str, chat: bool = True, system: Optional[str] = None) -> List[int]:
    """Token ids of the prompt, wrapped in the chat template when the model has one."""
    if chat and tokenizer.chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return tokenizer.encode(prompt)


def check_utf8(name: str, text: Optional[str]) -> None:
    """Text from the command line is UTF-8 (bytes that are not arrive as lone surrogates)."""
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError as e:
        raise SharpError(
            f"{name} is not UTF-8 text (a byte 0x{ord(text[e.start]) & 0xFF:02x} at character {e.start}): pass the "
            "prompt as UTF-8"
        )


def check_request(model, tokens: List[int], max_tokens: int) -> None:
    if max_tokens <= 0:
        raise SharpError(f"--max-tokens must be at least 1, got {max_tokens}")
    if not tokens:
        raise SharpError("the prompt is empty: pass some text with --prompt")
    context = model.args.max_position_embeddings
    if context and len(tokens) + max_tokens > context:
        raise SharpError(
            f"prompt ({len(tokens)} tokens) plus --max-tokens {max_tokens} exceeds the model's context of {context}: "
            "shorten the prompt or lower --max-tokens"
        )


def stream(
    model,
    tokenizer,
    tokens: List[int],
    max_tokens: int,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    load_s: float = 0.0,
) -> Iterator[Tuple[str, Optional[Timing]]]:
    """Yield (text segment, None) as tokens arrive, then ("", Timing) once at the end."""
    check_request(model, tokens, max_tokens)
    mx.random.seed(seed)
    sampler = make_sampler(temp=temp, top_p=top_p if 0 < top_p < 1 else 0.0)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    ttft, last = None, None
    for r in stream_generate(model, tokenizer, mx.array(tokens), max_tokens=max_tokens, sampler=sampler):
        if ttft is None:
            ttft = time.perf_counter() - tic
        last = r
        yield r.text, None
    yield (
        "",
        Timing(
            load_s=load_s,
            ttft_s=ttft,
            prompt_tokens=last.prompt_tokens,
            prompt_tps=last.prompt_tps,
            generation_tokens=last.generation_tokens,
            decode_tps=last.generation_tps,
            peak_memory_gb=last.peak_memory,
            model_bytes=parameter_bytes(model),
        ),
    )


def build_parser() -> argparse.ArgumentParser:
    from .convert import DEFAULT_MODEL

    p = ArgumentParser(
        prog="python -m sharp_mlx.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, help=f"model folder (default: {DEFAULT_MODEL}, imported on first use)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message (default: %(default)r)")
    p.add_argument("--system", help="a system message for chat models")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument(
        "--max-tokens",
        type=at_least(1),
        default=PAPER.max_tokens,
        help="most tokens to generate (default: %(default)s)",
    )
    p.add_argument(
        "--temp", type=between(0, 100), default=0.0, help="sampling temperature; 0 is greedy (default: %(default)s)"
    )
    p.add_argument(
        "--top-p",
        type=between(0, 1, lo_open=True),
        default=1.0,
        help="nucleus sampling mass; 1 disables it (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=at_least(0), default=PAPER.seed, help="random seed for sampling (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return p


def answer(
    model_dir: Path,
    prompt: str = DEFAULT_PROMPT,
    max_tokens: int = 128,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = True,
    system: Optional[str] = None,
    echo: Optional[Callable[[str], None]] = None,
) -> Tuple[str, "Timing"]:
    """Load ``model_dir`` and answer ``prompt``; returns the text and its timing (``echo``: called
    with each piece of text as it is generated)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # a long prompt is our own one-line error, not a tokenizer warning
    for name, text in (("--prompt", prompt), ("--system", system)):
        check_utf8(name, text)
    model, tokenizer, load_s = timed_load(model_dir)
    tokens = prompt_tokens(tokenizer, prompt, chat=chat, system=system)
    pieces, timing = [], None
    for text, timing in stream(model, tokenizer, tokens, max_tokens, temp, top_p, seed, load_s):
        pieces.append(text)
        if echo is not None:
            echo(text)
    return "".join(pieces), timing


@cli("sharp_mlx.generate")
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.model is None:
        from .convert import ensure_default_model

        args.model = ensure_default_model()
    echo = None if args.json else lambda text: print(text, end="", flush=True)
    text, timing = answer(
        args.model,
        args.prompt,
        args.max_tokens,
        args.temp,
        args.top_p,
        args.seed,
        not args.no_chat_template,
        args.system,
        echo,
    )
    if args.json:
        print(json.dumps({"text": text, **asdict(timing), "gb_per_s": timing.gb_per_s}))
    else:
        print(f"\n\n{timing.line()}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
