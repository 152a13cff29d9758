"""Our MLX SmolLM2 against transformers' LlamaForCausalLM reading the same GGUF on its own."""

import math

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch==2.13.0 could not be installed here")
pytest.importorskip("accelerate", reason="transformers needs accelerate to read a GGUF")

from sharp_mlx.convert import embedded_gguf  # noqa: E402
from sharp_mlx.data.batches import windows  # noqa: E402
from sharp_mlx.eval.perplexity import perplexity  # noqa: E402

SEQ_LEN = 512


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def prose_tokens(real_model, prose):
    _, tokenizer = real_model
    return tokenizer.encode(prose)


def test_logits_match_transformers(real_model, hf_model, prose_tokens):
    model, _ = real_model
    ids = prose_tokens[:200]
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits.numpy()
    ours = np.array(model(mx.array([ids])))
    assert np.abs(ref - ours).max() < 1e-3


def test_perplexity_matches_transformers(real_model, hf_model, prose_tokens):
    model, _ = real_model
    ours = perplexity(model, prose_tokens, seq_len=SEQ_LEN)
    wins, scored = windows(prose_tokens, SEQ_LEN)
    batch = torch.tensor(np.array(wins), dtype=torch.long)
    with torch.no_grad():
        logits = hf_model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
    ref = math.exp(loss.item() / scored)
    assert ours["tokens"] == scored >= 2 * SEQ_LEN
    assert abs(ours["ppl"] / ref - 1) < 0.01, (ours["ppl"], ref)
    assert 5 < ref < 200  # a trained model on English prose, not noise
