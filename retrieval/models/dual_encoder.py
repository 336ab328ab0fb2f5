"""The dual encoder: an image tower (our ResNet, or a pretrained EfficientNet-Lite) and a text tower (our
Transformer, or MiniLM) projected into one space by linear, MLP or ConSE heads, and its model directory.

`encode_image` / `encode_text` (encoder.Encoder) are the model's whole public face: float32, L2-normalised (n, d)
numpy arrays, computed in eval mode without gradients. The model knows nothing of indexes or the CLI.
A model directory holds config.json, model.safetensors and tokenizer.json (modeldir.py); nothing is unpickled.
save_model writes it; load.py reads it back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from retrieval.arrays import Embeddings
from retrieval.atomic import atomic_write, atomic_write_json
from retrieval.data.images import Transform
from retrieval.errors import RetrievalError
from retrieval.models.config import HeadConfig, ImageTowerConfig, ModelConfig
from retrieval.models.efficientnet import PretrainedImageTower, pretrained_transform
from retrieval.models.encoder import Encoder
from retrieval.models.minilm import BertTextTower
from retrieval.models.modeldir import TEXT_TOWER_FILE, write_model_config
from retrieval.models.tokenizer import TextTokenizer
from retrieval.models.towers import ImageTower, TextTower


def build_image_tower(cfg: ImageTowerConfig) -> ImageTower | PretrainedImageTower:
    """Our ResNet, or a pretrained tower (its weights load afterwards: from its package to train, else from
    the model directory)."""
    return ImageTower(cfg) if cfg.kind == "resnet" else PretrainedImageTower(cfg)


def image_transform(cfg: ImageTowerConfig) -> Transform:
    return Transform(cfg.image_size) if cfg.kind == "resnet" else pretrained_transform(cfg)


def build_image_head(cfg: HeadConfig, tower: ImageTower | PretrainedImageTower, embed_dim: int) -> nn.Module:
    """tower output (B, C) -> (B, embed_dim), not yet normalised."""
    if cfg.image == "mlp":
        return nn.Sequential(
            nn.Dropout(cfg.input_dropout),
            nn.Linear(tower.out_dim, cfg.hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, embed_dim),
        )
    if cfg.image == "conse":
        if not isinstance(tower, PretrainedImageTower):
            raise RetrievalError("a conse image head needs a pretrained (EfficientNet-Lite) image tower")
        return ConseHead(tower, embed_dim, cfg.top, cfg.temperature)
    return nn.Linear(tower.out_dim, embed_dim, bias=False)


class ConseHead(nn.Module):
    """ConSE (Norouzi et al. 2014; the zero-shot model, zeroshot.py): pooled image features (B, C) -> the
    weighted mean of the top classes' text embeddings (B, D).

    The classifier is the tower's own (reached through a bound method, not a submodule, so its weights are
    stored once, with the tower); the class embeddings are a buffer saved with the model."""

    class_embeddings: torch.Tensor  # (K, D), registered as a buffer

    def __init__(self, tower: PretrainedImageTower, embed_dim: int, top: int, temperature: float = 1.0):
        super().__init__()
        self.logits = tower.net.logits
        self.top, self.temperature = top, temperature
        self.register_buffer("class_embeddings", torch.zeros(tower.net.classifier.out_features, embed_dim))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        probs = (self.logits(pooled).float() / self.temperature).softmax(-1)  # (B, K)
        p, classes = probs.topk(min(self.top, probs.shape[-1]), dim=-1)  # (B, T)
        return (p.unsqueeze(-1) * self.class_embeddings[classes]).sum(1)  # (B, D)


class DualEncoder(Encoder):
    """Our image tower with our own text tower, or with a pretrained one (minilm.py) passed in as text_tower."""

    def __init__(
        self, config: ModelConfig, tokenizer: TextTokenizer, text_tower: TextTower | BertTextTower | None = None
    ):
        super().__init__()
        if config.text.vocab_size != len(tokenizer):
            raise RetrievalError(f"config vocab_size {config.text.vocab_size} != tokenizer size {len(tokenizer)}")
        self.config, self.tokenizer = config, tokenizer
        self.transform, self.embed_dim = image_transform(config.image), config.embed_dim
        self.image_tower = build_image_tower(config.image)
        self.text_tower: TextTower | BertTextTower = text_tower if text_tower is not None else TextTower(config.text)
        self.text_width = self.text_tower.out_dim
        self.image_proj = build_image_head(config.head, self.image_tower, config.embed_dim)
        if config.head.text == "identity" and self.text_width != config.embed_dim:
            raise RetrievalError(f"an identity text head needs embed_dim {self.text_width}, not {config.embed_dim}")
        self.text_proj: nn.Identity | nn.Linear = (
            nn.Identity()
            if config.head.text == "identity"
            else nn.Linear(self.text_tower.out_dim, config.embed_dim, bias=False)
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(config.logit_bias_init))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_features_from_locked(self.image_locked_outputs(pixels))  # (B, D)

    @property
    def image_cacheable(self) -> bool:
        """True when the image tower has a locked part whose outputs can be computed once and cached."""
        return isinstance(self.image_tower, PretrainedImageTower)

    def image_locked_outputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """What the image tower's locked part computes (all of it for our ResNet, which has none)."""
        tower = self.image_tower  # image_cacheable's test, which narrows its type
        return tower.locked_outputs(pixels) if isinstance(tower, PretrainedImageTower) else pixels

    def image_features_from_locked(self, x: torch.Tensor) -> torch.Tensor:
        """The rest of image_features: the trainable part of the tower, the head, normalisation."""
        tower = self.image_tower  # image_cacheable's test, which narrows its type
        pooled = tower.from_locked(x) if isinstance(tower, PretrainedImageTower) else tower(x)  # (B, C)
        return F.normalize(self.image_proj(pooled).float(), dim=-1)  # (B, D)

    @torch.no_grad()
    def project_image_outputs(self, outputs: torch.Tensor) -> Embeddings:
        """(n, ...) image_locked_outputs -> (n, D) float32, unit norm: the rest of encode_image."""
        return self._run(self.image_features_from_locked, outputs)

    def text_features(self, text: torch.Tensor) -> torch.Tensor:
        pooled = text if text.is_floating_point() else self.text_tower(text)  # (B, W)
        return F.normalize(self.text_proj(pooled).float(), dim=-1)  # (B, D)

    def text_outputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """The text tower's pooled output, before the projection (which trains even when the tower is locked)."""
        return self.text_tower(tokens)  # (B, W)

    def text_parameters(self) -> Iterator[nn.Parameter]:
        return self.text_tower.parameters()

    def inverse_temperature(self) -> torch.Tensor:
        """exp(logit_scale) = 1 / temperature, clamped at 100 as in CLIP so training cannot make the softmax one-hot."""
        return self.logit_scale.exp().clamp(max=100.0)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer.encode(texts, self.config.text.context_length)

    def save(self, path: str | Path) -> Path:
        return save_model(self, path)


def save_model(model: DualEncoder, path: str | Path) -> Path:
    """Write the model directory; each file is replaced atomically (atomic.py), config.json last."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.tokenizer.save(path / "tokenizer.json")
    if model.config.text.kind != "own":  # the pretrained tower's architecture; its weights go with ours below
        assert isinstance(model.text_tower, BertTextTower), "a pretrained text kind has a pretrained tower"
        atomic_write_json(path / TEXT_TOWER_FILE, model.text_tower.hf_config)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / "model.safetensors", lambda tmp: save_file(weights, tmp))
    write_model_config(path, model.config)
    return path
