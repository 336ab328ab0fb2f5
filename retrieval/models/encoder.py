"""The Encoder interface: what the engine asks of any model (ours, a Hugging Face checkpoint), and the array
aliases it speaks in.

Every model class subclasses Encoder; nothing here knows a particular tower, so model definitions
(dual_encoder.py, hf.py) import this module and never each other's classes for the interface.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeAlias

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from retrieval.arrays import Embeddings
from retrieval.data.images import Transform
from retrieval.errors import RetrievalError

ImageLike: TypeAlias = Image.Image | str | Path


class Encoder(nn.Module):
    """What the engine asks of any model: encode_image / encode_text, and for training forward and
    inverse_temperature.

    A subclass supplies image_features and text_features (normalised (B, D), differentiable), text_outputs
    (what a locked text side computes before text_features takes over, so it can be cached), tokenize,
    inverse_temperature, text_parameters, and the attributes transform (images.Transform), embed_dim, text_width.
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

    def inverse_temperature(self) -> torch.Tensor:
        """exp(logit_scale) = 1 / temperature: what the cosine similarities are multiplied by before a softmax
        or sigmoid (the losses' `logit_scale` argument). A scalar tensor, differentiable."""
        raise NotImplementedError

    def text_parameters(self) -> Iterator[nn.Parameter]:
        raise NotImplementedError

    @property
    def text_locked(self) -> bool:
        """True when nothing before text_outputs' end trains, so its outputs can be computed once and cached."""
        return not any(p.requires_grad for p in self.text_parameters())

    def forward(self, pixels: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.image_features(pixels), self.text_features(text), self.inverse_temperature()

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
    def encode_image(
        self, images: Sequence[ImageLike] | np.ndarray, batch_size: int = 128, precision: str = "fp32"
    ) -> Embeddings:
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


def use_bf16(requested: bool) -> bool:
    """bf16 autocast only where oneDNN has bf16 kernels (AVX-512 and up). On an AVX2 CPU they are emulated:
    a ResNet step measured 8x slower than fp32 there, so training falls back to fp32."""
    return requested and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _as_image(x: ImageLike, transform: Transform) -> Image.Image:
    return x if isinstance(x, Image.Image) else transform.load_image(x)


def _concat(parts: list[np.ndarray], dim: int) -> Embeddings:
    return np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)
