"""Model directory format versions: a directory in an earlier layout opens as it is, never rewritten, so its
fingerprint (which every index built with it holds) stays; a newer version is refused with what to do."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.errors import RetrievalError
from retrieval.models.config import PRESETS, HeadConfig
from retrieval.models.dual_encoder import DualEncoder, save_model
from retrieval.models.load import load_model
from retrieval.models.modeldir import FORMAT_VERSION, fingerprint, read_model_config
from retrieval.models.text_numpy import load_numpy_text_encoder
from retrieval.models.tokenizer import Tokenizer

TEXTS = ["a small red circle", "a large blue square left of a green star", ""]
# config.json's model section before the pretrained towers and heads came (commit 8c258a1, format 1 all along):
# no tower kinds or trainable parts, no head section
PREVIOUS_IMAGE_KEYS = ("image_size", "widths", "blocks_per_stage")
PREVIOUS_TEXT_KEYS = ("context_length", "width", "layers", "heads", "dropout", "vocab_size")


@pytest.fixture
def saved(tmp_path: Path) -> tuple[DualEncoder, Path]:
    """A tiny model with weights off their initial values (so loading must really load), saved."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(TEXTS, min_count=1)
    cfg = PRESETS["tiny"].model
    model = DualEncoder(replace(cfg, text=replace(cfg.text, vocab_size=len(tokenizer))), tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval(), save_model(model, tmp_path / "m")


def previous_layout(path: Path) -> None:
    """Rewrite config.json as retrieval wrote it before the pretrained towers (same weights and tokenizer)."""
    d = json.loads((path / "config.json").read_text())
    m = d["model"]
    assert m["image"]["kind"] == "resnet" and m["text"]["kind"] == "own" and m["head"] == vars(HeadConfig())
    d["model"] = {
        "image": {k: m["image"][k] for k in PREVIOUS_IMAGE_KEYS},
        "text": {k: m["text"][k] for k in PREVIOUS_TEXT_KEYS},
        "embed_dim": m["embed_dim"],
        "logit_scale_init": m["logit_scale_init"],
        "logit_bias_init": m["logit_bias_init"],
    }
    (path / "config.json").write_text(json.dumps(d, indent=2))


def test_a_directory_in_the_previous_layout_opens_unchanged(saved: tuple[DualEncoder, Path]) -> None:
    model, path = saved
    previous_layout(path)
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    before = fingerprint(path)

    assert read_model_config(path) == model.config  # the parts it lacks are the ones it was trained with
    loaded = load_model(path)
    np.testing.assert_array_equal(loaded.encode_text(TEXTS), model.encode_text(TEXTS))
    pixels = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(loaded.encode_image(pixels), model.encode_image(pixels))
    np.testing.assert_allclose(load_numpy_text_encoder(path).encode_text(TEXTS), model.encode_text(TEXTS), atol=1e-5)

    assert {p.name: p.read_bytes() for p in path.iterdir()} == files, "reading must not rewrite the directory"
    assert fingerprint(path) == before, "an index built with this model must keep matching it"


def test_a_newer_format_version_says_to_upgrade_retrieval(saved: tuple[DualEncoder, Path]) -> None:
    _, path = saved
    d, newer = json.loads((path / "config.json").read_text()), FORMAT_VERSION + 1
    (path / "config.json").write_text(json.dumps({**d, "format_version": newer}))
    expected = rf"model format {newer}, newer than this retrieval reads \({FORMAT_VERSION}\): upgrade retrieval$"
    for open_it in (load_model, fingerprint, load_numpy_text_encoder):
        with pytest.raises(RetrievalError, match=expected) as e:
            open_it(path)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("version", [None, "1", 0])
def test_a_missing_or_malformed_format_version_is_refused(saved: tuple[DualEncoder, Path], version: object) -> None:
    _, path = saved
    d = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**d, "format_version": version}))
    with pytest.raises(RetrievalError, match=r"config.json has no valid format_version .*; retrain the model"):
        load_model(path)
