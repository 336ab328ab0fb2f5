"""The dual encoder: encode contract, checkpoint round trips, clear errors on bad model directories."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.errors import RetrievalError
from retrieval.models.config import PRESETS, model_config_from_dict, model_config_to_dict
from retrieval.models.dual_encoder import DualEncoder, save_model
from retrieval.models.load import load_model
from retrieval.models.modeldir import fingerprint
from retrieval.models.tokenizer import Tokenizer

TEXTS = ["a small red circle", "a large blue square left of a small green star", "", "x " * 500]


@pytest.fixture
def model() -> DualEncoder:
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(["a small red circle", "a large blue square left of a green star"], min_count=1)
    cfg = PRESETS["tiny"].model
    return DualEncoder(replace(cfg, text=replace(cfg.text, vocab_size=len(tokenizer))), tokenizer)


def images(n: int, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size + i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_round_trip(name: str) -> None:
    cfg = PRESETS[name].model
    assert model_config_from_dict(json.loads(json.dumps(model_config_to_dict(cfg)))) == cfg


def test_config_with_unknown_field_is_refused() -> None:
    d = model_config_to_dict(PRESETS["tiny"].model)
    with pytest.raises(RetrievalError, match="does not match"):
        model_config_from_dict({**d, "new_field": 1})


def test_encode_contract(model: DualEncoder) -> None:
    model.train()
    txt, img = model.encode_text(TEXTS), model.encode_image(images(3))
    assert txt.shape == (4, 64) and img.shape == (3, 64)
    assert txt.dtype == np.float32 and img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    assert model.training, "encoding must restore the caller's train/eval mode"
    assert model.encode_text([]).shape == (0, 64)


def test_encode_is_batch_independent(model: DualEncoder) -> None:
    """Eval mode: BatchNorm uses running stats, so an item's embedding must not depend on its batch."""
    imgs = images(5)
    np.testing.assert_allclose(model.encode_image(imgs, batch_size=2), model.encode_image(imgs), atol=1e-5)
    np.testing.assert_allclose(model.encode_text(TEXTS, batch_size=1), model.encode_text(TEXTS), atol=1e-5)


def test_encode_image_accepts_paths_pil_and_arrays(model: DualEncoder, tmp_path: Path) -> None:
    img = images(1)[0]
    img.save(tmp_path / "a.png")
    from retrieval.data.images import preprocess

    pixels = preprocess(img, model.config.image.image_size)[None]
    a, b, c = model.encode_image([tmp_path / "a.png"]), model.encode_image([img]), model.encode_image(pixels)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(b, c, atol=1e-6)


def test_checkpoint_round_trip_gives_identical_embeddings(model: DualEncoder, tmp_path: Path) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the initial weights, so loading must really load
        model.logit_scale.fill_(2.5)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    np.testing.assert_array_equal(loaded.encode_text(TEXTS), model.encode_text(TEXTS))
    np.testing.assert_array_equal(loaded.encode_image(images(2)), model.encode_image(images(2)))
    assert loaded.logit_scale.item() == 2.5
    assert fingerprint(save_model(loaded, tmp_path / "again")) == fingerprint(tmp_path / "m")


def test_fingerprint_changes_with_weights(model: DualEncoder, tmp_path: Path) -> None:
    before = fingerprint(save_model(model, tmp_path / "a"))
    with torch.no_grad():
        model.text_proj.weight[0, 0] += 1e-3
    assert fingerprint(save_model(model, tmp_path / "b")) != before


def test_inverse_temperature_is_clamped_at_100(model: DualEncoder) -> None:
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.inverse_temperature().item() == 100.0


def test_load_errors_say_what_to_do(model: DualEncoder, tmp_path: Path) -> None:
    with pytest.raises(RetrievalError, match=r"not a model directory.*retrieval train"):
        load_model(tmp_path / "nothing")
    path = save_model(model, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())

    (path / "config.json").write_text(json.dumps({**config, "architecture": "something-else"}))
    with pytest.raises(RetrievalError, match="something-else"):
        load_model(path)

    (path / "config.json").write_text(json.dumps(config))
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RetrievalError, match="cannot load weights"):
        load_model(path)
