"""The numpy text tower computes the same function as the torch one, on every kind of text a user types."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from retrieval.text_numpy import NumpyTextEncoder, erf, gelu

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TEXTS = {
    "normal": ["a small red circle", "a large blue square left of a small green star, and a yellow cross"],
    "empty": [""],
    "long": ["a small red circle above a large blue square " * 40],  # far over the context length
    "punctuation": ["?!", "... ,,, ;;; !!!", "-"],
    "unknown words": ["zyzzyva quokka flibbertigibbet", "UPPER Case RED CiRcLe 123 456"],
}


@pytest.fixture(scope="module")
def encoders(tiny_model: Path):
    from retrieval.model import load_model

    return NumpyTextEncoder.load(tiny_model), load_model(tiny_model)


@pytest.mark.parametrize("kind", list(TEXTS))
def test_numpy_text_tower_equals_torch(encoders, kind: str) -> None:
    numpy_encoder, model = encoders
    got, want = numpy_encoder.encode_text(TEXTS[kind]), model.encode_text(TEXTS[kind])
    assert got.dtype == np.float32 and got.shape == want.shape == (len(TEXTS[kind]), model.config.embed_dim)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_mixed_batch_equals_one_at_a_time(encoders) -> None:
    """Padding differs with the batch: each text's embedding must not."""
    numpy_encoder, model = encoders
    texts = [t for ts in TEXTS.values() for t in ts]
    batch = numpy_encoder.encode_text(texts)
    single = np.concatenate([numpy_encoder.encode_text([t]) for t in texts])
    np.testing.assert_allclose(batch, single, atol=1e-6, rtol=0)
    np.testing.assert_allclose(batch, model.encode_text(texts), atol=1e-5, rtol=0)


def test_the_texts_exercise_distinct_inputs(encoders) -> None:
    """Guard the cases above: the long text is cut, and the unknown words really are [UNK] to the model."""
    numpy_encoder, _ = encoders
    tokens = numpy_encoder.tokenizer.encode(TEXTS["long"] + TEXTS["unknown words"][:1], numpy_encoder.context_length)
    assert (tokens[0] != 0).all(), "the long text should fill the whole context"
    assert (tokens[1][1:4] == 1).all(), "made-up words should map to [UNK]"


def test_erf_matches_math_erf() -> None:
    x = np.linspace(-6, 6, 4801)
    want = np.array([math.erf(v) for v in x])
    assert np.abs(erf(x) - want).max() < 2e-7
    assert erf(np.array([0.0]))[0] == 0.0
    np.testing.assert_array_equal(erf(-x), -erf(x))


def test_gelu_is_exact_not_tanh() -> None:
    """torch's activation='gelu' is the erf form; the tanh approximation differs by up to ~5e-4."""
    x = np.linspace(-5, 5, 1001)
    want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    assert np.abs(gelu(x) - want).max() < 1e-6
