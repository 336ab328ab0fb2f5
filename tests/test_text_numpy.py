"""The numpy text towers (our own and MiniLM) compute the same function as torch, on every kind of text a user
types, and a text query through an index then imports neither torch nor transformers."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval.models.text_numpy import BertTextEncoder, erf, gelu, load_numpy_text_encoder
from retrieval.models.tokenizer import UNK
from retrieval.models.wordpiece import WordPieceTokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TEXTS = {
    "normal": ["a small red circle", "a large blue square left of a small green star, and a yellow cross"],
    "empty": [""],
    "long": ["a small red circle above a large blue square " * 40],  # far over the context length
    "punctuation": ["?!", "... ,,, ;;; !!!", "-"],
    "unknown words": ["zyzzyva quokka flibbertigibbet", "UPPER Case RED CiRcLe 123 456"],
    "special tokens": ["a [PAD] inside [SEP] a caption"],  # MiniLM's tokenizer makes them real special ids
}


@pytest.fixture(scope="module")
def minilm_model(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with the MiniLM text tower, trained for an epoch (its text_proj is what training changes)."""
    from retrieval.cli.main import main

    out = tmp_path_factory.mktemp("minilm") / "model"
    args = [
        "train",
        "--data",
        str(synth_data),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--text-tower",
        "minilm",
        "--epochs",
        "1",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module", params=["own", "minilm"])
def encoders(request: pytest.FixtureRequest):
    from retrieval.models.load import load_model

    path = request.getfixturevalue("tiny_model" if request.param == "own" else "minilm_model")
    return load_numpy_text_encoder(path), load_model(path)


@pytest.mark.parametrize("kind", list(TEXTS))
@pytest.mark.slow
def test_numpy_text_tower_equals_torch(encoders, kind: str) -> None:
    numpy_encoder, model = encoders
    got, want = numpy_encoder.encode_text(TEXTS[kind]), model.encode_text(TEXTS[kind])
    assert got.dtype == np.float32 and got.shape == want.shape == (len(TEXTS[kind]), model.config.embed_dim)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_mixed_batch_equals_one_at_a_time(encoders) -> None:
    """Padding differs with the batch: each text's embedding must not."""
    numpy_encoder, model = encoders
    texts = [t for ts in TEXTS.values() for t in ts]
    batch = numpy_encoder.encode_text(texts)
    single = np.concatenate([numpy_encoder.encode_text([t]) for t in texts])
    np.testing.assert_allclose(batch, single, atol=1e-6, rtol=0)
    np.testing.assert_allclose(batch, model.encode_text(texts), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_the_texts_exercise_distinct_inputs(encoders) -> None:
    """Guard the cases above: the long text is cut, made-up words are [UNK] (ours) or split into word pieces
    (MiniLM), and MiniLM's special tokens typed in a caption leave a [PAD] before real tokens."""
    numpy_encoder, _ = encoders
    tokenizer, context = numpy_encoder.tokenizer, numpy_encoder.context_length
    tokens = tokenizer.encode([*TEXTS["long"], TEXTS["unknown words"][0], *TEXTS["special tokens"]], context)
    real = tokens != tokenizer.pad_id  # (3, L)
    assert tokens.shape[1] == context and real[0].all(), "the long text should fill the whole context"
    if isinstance(tokenizer, WordPieceTokenizer):
        assert real[1].sum() > 3 + 2, "made-up words should split into word pieces"
        assert not real[2][: np.flatnonzero(real[2])[-1]].all(), "a typed [PAD] should sit among real tokens"
    else:
        assert (tokens[1][1:4] == UNK).all(), "made-up words should map to [UNK]"


def test_identity_projection_gives_the_towers_own_space() -> None:
    """A model without text_proj (the zero-shot model) embeds in MiniLM's space: the mean-pooled BERT output,
    normalised. A tiny random BERT, every parameter random so that a swapped weight shows."""
    import torch
    import torch.nn.functional as F

    from retrieval.models.minilm import BertTextTower, minilm_dir

    tokenizer = WordPieceTokenizer.load(minilm_dir() / "tokenizer.json")
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=64,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
    )
    torch.manual_seed(0)
    tower = BertTextTower(config, pad_id=tokenizer.pad_id)
    with torch.no_grad():
        for p in tower.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    weights = {f"text_tower.bert.{k}": v.numpy() for k, v in tower.bert.state_dict().items()}
    numpy_encoder = BertTextEncoder(weights, tokenizer, layers=2, heads=2, context_length=16, eps=1e-12)
    texts = [t for ts in TEXTS.values() for t in ts]
    with torch.no_grad():
        want = F.normalize(tower(torch.from_numpy(tokenizer.encode(texts, 16))), dim=-1).numpy()
    got = numpy_encoder.encode_text(texts)
    assert got.shape == (len(texts), 8)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def minilm_index(minilm_model: Path, synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from retrieval.index.build import BuildOptions, build_index

    path = tmp_path_factory.mktemp("minilm-index") / "index"
    build_index(synth_data, minilm_model, path, BuildOptions(progress=False))
    return path


@pytest.mark.slow
def test_minilm_text_query_imports_neither_torch_nor_transformers(minilm_index: Path, minilm_model: Path) -> None:
    """In a fresh interpreter, as a cold `retrieval search --text` runs; its vectors are the torch model's."""
    from retrieval.models.load import load_model

    code = (
        "import sys\n"
        "import numpy as np\n"
        "from retrieval.index.handle import Index\n"
        f"np.save(sys.stdout.buffer, Index.open({str(minilm_index)!r}).embed_texts({TEXTS['normal']!r}))\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))[:5]\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr.decode()
    got = np.load(io.BytesIO(run.stdout))
    np.testing.assert_allclose(got, load_model(minilm_model).encode_text(TEXTS["normal"]), atol=1e-5, rtol=0)


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
