"""The dual encoder: an image tower (our ResNet, or a pretrained EfficientNet-Lite) and a text tower (our
Transformer, or MiniLM) projected into one space by linear or MLP heads.

`encode_image` / `encode_text` are the model's whole public face: float32, L2-normalised (n, d) numpy
arrays, computed in eval mode without gradients. The model knows nothing of indexes or the CLI.
A model directory holds config.json, model.safetensors and tokenizer.json; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import HeadConfig, ImageTowerConfig, ModelConfig, TextTowerConfig, model_config_to_dict
from .efficientnet import PretrainedImageTower, pretrained_transform
from .errors import RetrievalError
from .images import Transform
from .modeldir import ARCHITECTURE, FORMAT_VERSION, TEXT_TOWER_FILE, ModelRef, hf_name, read_model_config
from .tokenizer import PAD, Tokenizer

Embeddings = npt.NDArray[np.float32]
ImageLike = Image.Image | str | Path


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection (He et al. 2016), downsampling by `stride`."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Identity()
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


def build_image_tower(cfg: ImageTowerConfig) -> nn.Module:
    """Our ResNet, or a pretrained tower (its weights load afterwards: from its package to train, else from
    the model directory)."""
    return ImageTower(cfg) if cfg.kind == "resnet" else PretrainedImageTower(cfg)


def image_transform(cfg: ImageTowerConfig) -> Transform:
    return Transform(cfg.image_size) if cfg.kind == "resnet" else pretrained_transform(cfg)


def build_image_head(cfg: HeadConfig, tower: nn.Module, embed_dim: int) -> nn.Module:
    """tower output (B, C) -> (B, embed_dim), not yet normalised."""
    if cfg.image == "mlp":
        return nn.Sequential(nn.Dropout(cfg.input_dropout), nn.Linear(tower.out_dim, cfg.hidden), nn.GELU(),
                             nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, embed_dim))
    if cfg.image == "conse":
        from .zeroshot import ConseHead

        return ConseHead(tower, embed_dim, cfg.top, cfg.temperature)
    return nn.Linear(tower.out_dim, embed_dim, bias=False)


class TextTower(nn.Module):
    """Token + learned position embeddings, a pre-norm Transformer encoder, mean over real tokens."""

    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=PAD)
        self.position_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=cfg.dropout, activation="gelu", batch_first=True, norm_first=True
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


class Encoder(nn.Module):
    """What the engine asks of any model: encode_image / encode_text, and for training forward and temperature.

    A subclass supplies image_features and text_features (normalised (B, D), differentiable), text_outputs
    (what a locked text side computes before text_features takes over, so it can be cached), tokenize,
    temperature, text_parameters, and the attributes transform (images.Transform), embed_dim, text_width.
    """

    transform: Transform
    embed_dim: int
    text_width: int  # width of text_outputs' rows

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def text_features(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) run the whole text side; float rows (B, W) are text_outputs already (a cache)."""
        raise NotImplementedError

    def text_outputs(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def temperature(self) -> torch.Tensor:
        raise NotImplementedError

    def text_parameters(self) -> Iterator[nn.Parameter]:
        raise NotImplementedError

    @property
    def text_locked(self) -> bool:
        """True when nothing before text_outputs' end trains, so its outputs can be computed once and cached."""
        return not any(p.requires_grad for p in self.text_parameters())

    def forward(self, pixels: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.image_features(pixels), self.text_features(text), self.temperature()

    PRECISIONS = ("auto", "fp32", "bf16")

    def image_precision(self, requested: str = "auto", recorded: str = "") -> str:
        """What encode_image runs in for `requested`: "fp32", or "bf16" (autocast). "auto" is bf16 only for our
        pretrained EfficientNet tower on a CPU with bf16 kernels: 2-3x fp32 there, and on Flickr8k the zero-shot
        model's vectors kept cosine 0.993-1 to fp32 (mean 0.9993) and R@1/5/10 within half a point. Our small
        from-scratch towers are fast and stay exact in fp32, HF towers were not measured, and on an AVX2 CPU bf16
        is emulated and slower (use_bf16).

        recorded: what an index's images were encoded in. "auto" keeps it where this CPU runs it natively, so one
        index holds one precision and a copy of an indexed image scores 1.0 against it (0.9997 across the two)."""
        if requested not in self.PRECISIONS:
            raise RetrievalError(f"unknown precision {requested!r}; choose one of {', '.join(self.PRECISIONS)}")
        if requested != "auto":
            return requested
        if recorded == "fp32" or (recorded == "bf16" and use_bf16(True)):
            return recorded
        return "bf16" if getattr(self, "image_cacheable", False) and use_bf16(True) else "fp32"

    @torch.no_grad()
    def encode_image(self, images: Sequence[ImageLike] | np.ndarray, batch_size: int = 128,
                     precision: str = "fp32") -> Embeddings:
        """Images (PIL, paths, or an already preprocessed (n, 3, S, S) array) -> (n, D) float32, unit norm.
        fp32 by default, so evaluation and image queries give the same numbers on every CPU; indexing, where
        throughput counts, asks for "auto" (image_precision)."""
        bf16 = self.image_precision(precision) == "bf16"
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            if not isinstance(chunk, np.ndarray):
                chunk = np.stack([self.transform.preprocess(_as_image(x, self.transform)) for x in chunk])
            # (B, 3, S, S) stored as NHWC: oneDNN's fast convolution layout, the same maths
            pixels = torch.from_numpy(chunk).contiguous(memory_format=torch.channels_last)
            out.append(self._run(self.image_features, pixels, bf16))
        return _concat(out, self.embed_dim)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 512) -> Embeddings:
        """Texts -> (n, D) float32, unit norm. An empty text embeds as [BOS][EOS]; callers reject it earlier."""
        return self.project_text_outputs(self.text_tower_outputs(texts, batch_size))

    @torch.no_grad()
    def text_tower_outputs(self, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
        """(n, W) float32 text_outputs. Texts run shortest first, so that a tokenizer padding to the longest
        text of a batch pads little."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.zeros(len(texts), self.text_width)
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            tokens = torch.from_numpy(self.tokenize([texts[i] for i in rows]))
            out[rows] = torch.from_numpy(self._run(self.text_outputs, tokens))
        return out

    @torch.no_grad()
    def project_text_outputs(self, outputs: torch.Tensor) -> Embeddings:
        """(n, W) text_outputs -> (n, D) float32, unit norm: the rest of encode_text."""
        return self._run(self.text_features, outputs) if len(outputs) else _concat([], self.embed_dim)

    def _run(self, features, batch: torch.Tensor, bf16: bool = False) -> np.ndarray:
        was_training = self.training
        self.eval()
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return features(batch).float().numpy()
        finally:
            self.train(was_training)


class DualEncoder(Encoder):
    """Our image tower with our own text tower, or with a pretrained one (pretrained.py) passed in as text_tower."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, text_tower: nn.Module | None = None):
        super().__init__()
        if config.text.vocab_size != len(tokenizer):
            raise RetrievalError(f"config vocab_size {config.text.vocab_size} != tokenizer size {len(tokenizer)}")
        self.config, self.tokenizer = config, tokenizer
        self.transform, self.embed_dim = image_transform(config.image), config.embed_dim
        self.image_tower = build_image_tower(config.image)
        self.text_tower = text_tower if text_tower is not None else TextTower(config.text)
        self.text_width = self.text_tower.out_dim
        self.image_proj = build_image_head(config.head, self.image_tower, config.embed_dim)
        if config.head.text == "identity" and self.text_width != config.embed_dim:
            raise RetrievalError(f"an identity text head needs embed_dim {self.text_width}, not {config.embed_dim}")
        self.text_proj = (nn.Identity() if config.head.text == "identity"
                          else nn.Linear(self.text_tower.out_dim, config.embed_dim, bias=False))
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
        return self.image_tower.locked_outputs(pixels) if self.image_cacheable else pixels

    def image_features_from_locked(self, x: torch.Tensor) -> torch.Tensor:
        """The rest of image_features: the trainable part of the tower, the head, normalisation."""
        pooled = self.image_tower.from_locked(x) if self.image_cacheable else self.image_tower(x)  # (B, C)
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

    def temperature(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100 as in CLIP so training cannot make the softmax one-hot."""
        return self.logit_scale.exp().clamp(max=100.0)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer.encode(texts, self.config.text.context_length)

    def save(self, path: str | Path) -> Path:
        return save_model(self, path)


def use_bf16(requested: bool) -> bool:
    """bf16 autocast only where oneDNN has bf16 kernels (AVX-512 and up). On an AVX2 CPU they are emulated:
    a ResNet step measured 8x slower than fp32 there, so training falls back to fp32."""
    return requested and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _as_image(x: ImageLike, transform: Transform) -> Image.Image:
    return x if isinstance(x, Image.Image) else transform.load_image(x)


def _concat(parts: list[np.ndarray], dim: int) -> Embeddings:
    return np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)


def save_model(model: DualEncoder, path: str | Path) -> Path:
    """Write the model directory; each file goes to a temporary name first, then is renamed into place."""
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
        (path / TEXT_TOWER_FILE).write_text(json.dumps(model.text_tower.hf_config, indent=2))
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, path / "model.safetensors.tmp")
    os.replace(path / "model.safetensors.tmp", path / "model.safetensors")
    (path / "config.json.tmp").write_text(json.dumps(config, indent=2))
    os.replace(path / "config.json.tmp", path / "config.json")
    return path


def load_model(ref: ModelRef) -> Encoder:
    """Load a model directory written by save_model, or an `hf:` checkpoint (pretrained.py), in eval mode."""
    if hf_name(ref) is not None:
        from .pretrained import load_hf

        return load_hf(ref)
    path = Path(ref)
    config = read_model_config(path)
    if config.text.kind == "own":
        model = DualEncoder(config, Tokenizer.load(path / "tokenizer.json"))
    else:
        from .pretrained import saved_text_tower

        tower, tokenizer = saved_text_tower(path, config.text)
        model = DualEncoder(config, tokenizer, tower)
    try:
        state = load_file(path / "model.safetensors")
        model.load_state_dict(state)
    except (OSError, RuntimeError, SafetensorError) as e:
        raise RetrievalError(f"cannot load weights from {path}/model.safetensors ({str(e).splitlines()[0]}); retrain") from e
    return model.eval()
