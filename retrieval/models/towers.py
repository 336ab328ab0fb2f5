"""The dual encoder: an image tower (our ResNet, or a pretrained EfficientNet-Lite) and a text tower (our
Transformer, or MiniLM) projected into one space by linear or MLP heads.

`encode_image` / `encode_text` are the model's whole public face: float32, L2-normalised (n, d) numpy
arrays, computed in eval mode without gradients. The model knows nothing of indexes or the CLI.
A model directory holds config.json, model.safetensors and tokenizer.json; nothing is unpickled.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from retrieval.atomic import atomic_write, atomic_write_json
from retrieval.data.images import Transform
from retrieval.errors import RetrievalError
from retrieval.models.config import HeadConfig, ImageTowerConfig, ModelConfig, TextTowerConfig, model_config_to_dict
from retrieval.models.efficientnet import PretrainedImageTower, pretrained_transform
from retrieval.models.encoder import Embeddings, Encoder
from retrieval.models.encoder import use_bf16 as use_bf16  # re-exported: callers ask this module which precision trains
from retrieval.models.modeldir import (
    ARCHITECTURE,
    FORMAT_VERSION,
    TEXT_TOWER_FILE,
    ModelRef,
    hf_name,
    read_model_config,
)
from retrieval.models.pretrained import BertTextTower, load_hf, saved_text_tower
from retrieval.models.tokenizer import PAD, TextTokenizer, Tokenizer


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection (He et al. 2016), downsampling by `stride`."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip: nn.Identity | nn.Sequential = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


class ImageTower(nn.Module):
    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        w0 = cfg.widths[0]
        self.stem = nn.Sequential(  # /4 as in ResNet: the first stage runs at 1/16 of the input pixels
            nn.Conv2d(3, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        blocks, c_in = [], w0
        for stage, width in enumerate(cfg.widths):
            for b in range(cfg.blocks_per_stage):
                blocks.append(BasicBlock(c_in, width, 2 if stage > 0 and b == 0 else 1))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = c_in

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(pixels))  # (B, C, H', W')
        return h.mean(dim=(2, 3))  # (B, C)


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


class TextTower(nn.Module):
    """Token + learned position embeddings, a pre-norm Transformer encoder, mean over real tokens."""

    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=PAD)
        self.position_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            cfg.width,
            cfg.heads,
            4 * cfg.width,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.out_dim = cfg.width

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == PAD  # (B, L)
        h = self.token_embedding(tokens) + self.position_embedding[: tokens.shape[1]]  # (B, L, W)
        h = self.ln_final(self.encoder(h, src_key_padding_mask=pad))  # (B, L, W)
        keep = (~pad).unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return (h * keep).sum(1) / keep.sum(1).clamp(min=1)  # (B, W)


class DualEncoder(Encoder):
    """Our image tower with our own text tower, or with a pretrained one (pretrained.py) passed in as text_tower."""

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
    config = {
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "model": model_config_to_dict(model.config),
        "tokenizer": "tokenizer.json",
    }
    model.tokenizer.save(path / "tokenizer.json")
    if model.config.text.kind != "own":  # the pretrained tower's architecture; its weights go with ours below
        assert isinstance(model.text_tower, BertTextTower), "a pretrained text kind has a pretrained tower"
        atomic_write_json(path / TEXT_TOWER_FILE, model.text_tower.hf_config)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / "model.safetensors", lambda tmp: save_file(weights, tmp))
    atomic_write_json(path / "config.json", config)
    return path


def load_model(ref: ModelRef) -> Encoder:
    """Load a model directory written by save_model, or an `hf:` checkpoint (pretrained.py), in eval mode."""
    if hf_name(ref) is not None:
        return load_hf(ref)
    path = Path(ref)
    config = read_model_config(path)
    if config.text.kind == "own":
        model = DualEncoder(config, Tokenizer.load(path / "tokenizer.json"))
    else:
        tower, tokenizer = saved_text_tower(path, config.text)
        model = DualEncoder(config, tokenizer, tower)
    try:
        state = load_file(path / "model.safetensors")
        model.load_state_dict(state)
    except (OSError, RuntimeError, SafetensorError) as e:
        raise RetrievalError(
            f"cannot load weights from {path}/model.safetensors ({str(e).splitlines()[0]}); retrain"
        ) from e
    return model.eval()
