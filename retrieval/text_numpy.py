"""The text tower in plain numpy, for queries: a cold `retrieval search --text` must not import torch.

It reads the same model.safetensors as model.TextTower and computes the same function (pre-norm
Transformer encoder, mean over real tokens, projection, L2 normalisation); a test holds it equal to torch.
A few texts run on one BLAS thread: for matrices this small, a second thread costs more than it gives,
and much more when the other core is busy (one query: 1.7 ms on one thread, 15 ms on two, measured here
with the other core loaded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from threadpoolctl import ThreadpoolController

from .modeldir import read_model_config
from .tokenizer import PAD, Tokenizer


SMALL_BATCH = 16  # up to this many texts, encode on one BLAS thread


def erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf, and exact GELU needs one."""
    sign, a = np.sign(x), np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x * 0.7071067811865476))  # a Python float keeps float32 (np.sqrt(2.0) would not)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


class NumpyTextEncoder:
    def __init__(self, weights: dict[str, np.ndarray], tokenizer: Tokenizer, layers: int, heads: int, context_length: int):
        # matrices stored transposed and contiguous: `x @ W.T` on a transposed view is ~5x slower here
        self.w = {k: np.ascontiguousarray(v.T if v.ndim == 2 and k.endswith("weight") and "embedding" not in k else v,
                                          dtype=np.float32) for k, v in weights.items()}
        self.tokenizer = tokenizer
        self.layers, self.heads, self.context_length = layers, heads, context_length
        self._blas = ThreadpoolController().select(user_api="blas")

    @classmethod
    def load(cls, path: str | Path) -> NumpyTextEncoder:
        path = Path(path)
        cfg = read_model_config(path)
        weights = load_file(path / "model.safetensors")
        text = {k: v for k, v in weights.items() if k.startswith(("text_tower.", "text_proj."))}
        return cls(text, Tokenizer.load(path / "tokenizer.json"), cfg.text.layers, cfg.text.heads, cfg.text.context_length)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """(n, D) float32, unit norm: the same as DualEncoder.encode_text."""
        if len(texts) > SMALL_BATCH:
            return self._encode(texts)
        with self._blas.limit(limits=1):
            return self._encode(texts)

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer.encode(texts, self.context_length)  # (B, L)
        tokens = tokens[:, : int((tokens != PAD).sum(1).max(initial=1))]  # trailing padding changes nothing: skip it
        w, pad = self.w, tokens == PAD
        x = w["text_tower.token_embedding.weight"][tokens] + w["text_tower.position_embedding"][: tokens.shape[1]]
        for i in range(self.layers):
            p = f"text_tower.encoder.layers.{i}."
            x = x + self._attention(layer_norm(x, w[p + "norm1.weight"], w[p + "norm1.bias"]), pad, p)
            h = layer_norm(x, w[p + "norm2.weight"], w[p + "norm2.bias"])
            h = gelu(h @ w[p + "linear1.weight"] + w[p + "linear1.bias"])
            x = x + h @ w[p + "linear2.weight"] + w[p + "linear2.bias"]
        x = layer_norm(x, w["text_tower.ln_final.weight"], w["text_tower.ln_final.bias"])  # (B, L, W)
        keep = (~pad)[..., None].astype(np.float32)  # (B, L, 1)
        pooled = (x * keep).sum(1) / np.maximum(keep.sum(1), 1)  # (B, W)
        emb = pooled @ w["text_proj.weight"]  # (B, D)
        return (emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def _attention(self, x: np.ndarray, pad: np.ndarray, p: str) -> np.ndarray:
        B, L, W = x.shape
        H = self.heads
        qkv = x @ self.w[p + "self_attn.in_proj_weight"] + self.w[p + "self_attn.in_proj_bias"]  # (B, L, 3W)
        q, k, v = (t.reshape(B, L, H, W // H).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, axis=-1))  # (B, H, L, W/H)
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(W // H)  # (B, H, L, L); a Python float keeps float32
        scores = np.where(pad[:, None, None, :], -np.inf, scores)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = scores / scores.sum(-1, keepdims=True)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(B, L, W)  # (B, L, W)
        return out @ self.w[p + "self_attn.out_proj.weight"] + self.w[p + "self_attn.out_proj.bias"]
