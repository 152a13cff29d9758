"""One timed repetition of ``sharp_mlx.bench``, run as a script in a fresh process:

    python sharp_mlx/bench_worker.py SPAWNED LOADER FOLDER MAX_TOKENS PROMPTS_JSON

It imports only what its loader needs (mlx-lm's or sharp_mlx's ``load_model``), so the
spawn-to-materialised time of an mlx-lm row is what mlx-lm alone costs, and prints one line
``BENCH {json}``: load times, and per prompt time to first token, prompt and decode tokens/s,
peak memory and the greedy tokens.
"""

import json
import sys
import time
from pathlib import Path


def main(spawned: float, loader: str, path: str, max_tokens: int, prompts: list) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if loader == "mlx_lm":
        from mlx_lm.utils import load_model
    else:
        from sharp_mlx.io.checkpoint import load_model
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tic = time.perf_counter()
    model = load_model(Path(path))[0]
    mx.eval(model.parameters())
    in_process = time.perf_counter() - tic
    from_spawn = time.time() - spawned
    tic = time.perf_counter()
    tokenizer = load_tokenizer(Path(path))
    tokenizer_s = time.perf_counter() - tic
    runs = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
        else:
            ids = tokenizer.encode(prompt)
        mx.reset_peak_memory()
        tic, ttft, tokens, last = time.perf_counter(), None, [], None
        for r in stream_generate(
            model, tokenizer, mx.array(ids), max_tokens=max_tokens, sampler=make_sampler(temp=0.0)
        ):
            ttft = ttft if ttft is not None else time.perf_counter() - tic
            tokens.append(r.token)
            last = r
        runs.append(
            {
                "ttft_s": ttft,
                "prompt_tokens": last.prompt_tokens,
                "prompt_tps": last.prompt_tps,
                "generation_tokens": last.generation_tokens,
                "decode_tps": last.generation_tps,
                "peak_memory_gb": mx.get_peak_memory() / 1e9,
                "tokens": tokens,
            }
        )
    return {
        "load_spawn_s": from_spawn,
        "load_s": in_process,
        "tokenizer_s": tokenizer_s,
        "runs": runs,
        "model_bytes": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
    }


if __name__ == "__main__":
    del sys.path[0]  # this script's folder is the package itself, not a place to import from
    result = main(float(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5]))
    print("BENCH " + json.dumps(result))
