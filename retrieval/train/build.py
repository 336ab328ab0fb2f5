"""The model a training run starts from: our dual encoder, new or as saved for --resume, or an hf: checkpoint."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from retrieval.data.pairs import Pair
from retrieval.errors import RetrievalError
from retrieval.models.config import ModelConfig, TrainConfig, loss_init, model_config_from_dict
from retrieval.models.dual_encoder import DualEncoder
from retrieval.models.efficientnet import PretrainedImageTower
from retrieval.models.encoder import Encoder
from retrieval.models.tokenizer import Tokenizer


def build_model(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_pairs: Sequence[Pair],
    state: dict[str, Any] | None,
    init: str | None,
    freeze: str | None,
) -> Encoder:
    """Our dual encoder, new or as it was saved for --resume; or the hf: checkpoint `init`, `freeze` side locked."""
    if init is not None:
        from retrieval.models.hf import load_hf

        hf_model = load_hf(init)
        if freeze:
            hf_model.freeze(freeze)
        model: Encoder = hf_model
    else:
        if state is not None and not state["model_config"]:
            raise RetrievalError("this run fine-tunes a Hugging Face checkpoint: resume it with the same --init hf:...")
        model_cfg = (
            model_config_from_dict(json.loads(state["model_config"])) if state else loss_init(model_cfg, train_cfg.loss)
        )
        tokenizer, text_tower, model_cfg = text_side(model_cfg, train_pairs, state)
        ours = DualEncoder(model_cfg, tokenizer, text_tower)
        if state is None and isinstance(ours.image_tower, PretrainedImageTower):  # image_cacheable: it starts
            ours.image_tower.load_packaged()  # from its package's weights
        model = ours
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError:  # missing or mis-sized weights: the run was started with another --init (or none)
            raise RetrievalError(
                "the interrupted run was started with another model: resume with the same --init "
                "(or none), or start again without --resume"
            ) from None
    return model


def text_side(
    cfg: ModelConfig, train_pairs: Sequence[Pair], state: dict[str, Any] | None
) -> tuple[Any, Any, ModelConfig]:
    """(tokenizer, text tower, config): our tokenizer trained on the captions (or resumed) with our own tower
    (None: DualEncoder builds it), or a pretrained tower with its own tokenizer and its sizes in the config."""
    if cfg.text.kind != "own":
        from retrieval.models.minilm import load_pretrained_text_tower

        tower, tokenizer, text = load_pretrained_text_tower(cfg.text)
        return tokenizer, tower, dataclasses.replace(cfg, text=text)
    if state is not None:
        return Tokenizer(state["vocab"]), None, cfg
    trained = Tokenizer.train(c for p in train_pairs for c in p.captions)
    return trained, None, dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=len(trained)))
