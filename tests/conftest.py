import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_MODEL = ROOT / "models" / "smollm2-135m-instruct"
FIXTURES = Path(__file__).parent / "fixtures"

TINY = dict(
    model_type="llama",
    hidden_size=64,
    num_hidden_layers=6,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=101,
    rope_theta=10000.0,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def run_tree(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a session of its own: on a timeout
    the whole process tree is killed (a launcher's workers too), so a hang leaves nothing running
    to slow the rest of the suite."""
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    ) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            pytest.fail(f"{' '.join(map(str, cmd))} ran past {timeout} s and was killed:\n{err[-3000:]}")
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # anything the command left behind
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def load_script(name: str):
    """``experiments/NAME.py`` as a module (registered under NAME, so its dataclasses resolve)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_model(share=None, rank=0, seed=0, scales=False, **overrides):
    """A small random Llama (our model class). Recovery factors draw random numbers too, so
    layers after the first target differ between share maps: copy weights to compare models.
    ``scales``: targets also get scaling vectors (ones, drawing nothing)."""
    from sharp_mlx.models.llama import Model, ModelArgs

    mx.random.seed(seed)
    config = {
        **TINY,
        **overrides,
        "sharp": {"share": share or {}, "rank": rank, **({"recovery": "scaled"} if scales else {})},
    }
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model, config


def direct_sharing_reference(weights, config, share):
    """Direct sharing built by hand on mlx-lm's own llama: each target gets a copy of its
    reference's MLP weights (``weights``: the unshared model's, as a dict)."""
    from mlx_lm.models import llama

    direct = dict(weights)
    for t, r in share.items():
        for p in ("gate_proj", "up_proj", "down_proj"):
            direct[f"model.layers.{t}.mlp.{p}.weight"] = weights[f"model.layers.{r}.mlp.{p}.weight"]
    ref = llama.Model(llama.ModelArgs.from_dict(config))
    ref.load_weights(list(direct.items()))
    return ref


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, imported once into models/ (about 30 s)."""
    if not (REAL_MODEL / "config.json").exists():
        from sharp_mlx.convert import import_model

        import_model(out=REAL_MODEL)
    return REAL_MODEL


@pytest.fixture(scope="session")
def real_model(real_model_dir):
    import sharp_mlx

    return sharp_mlx.load(real_model_dir)


@pytest.fixture(scope="session")
def prose() -> str:
    """About 8k characters of public-domain prose: the start of Lincoln's 1862 State of the Union."""
    return (FIXTURES / "prose.txt").read_text()


def random_mlp(seed):
    """A Llama MLP of the tiny config with random weights."""
    from mlx_lm.models import llama

    mx.random.seed(seed)
    m = llama.MLP(llama.ModelArgs.from_dict(TINY))
    mx.eval(m.parameters())
    return m


def correlated_inputs(n=2048, dim=TINY["hidden_size"], seed=0):
    """Correlated inputs (a random low-dimensional-ish covariance), as real activations are."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) * (0.9 ** np.arange(dim))[:, None]
    return (rng.normal(size=(n, dim)) @ mix).astype(np.float32)
