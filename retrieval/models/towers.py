"""Our from-scratch towers: a small ResNet for images and a pre-norm Transformer for text.

They are sized by config.ImageTowerConfig / TextTowerConfig (kind "resnet" / "own") and trained here from random
initialisation; dual_encoder.py puts them (or the pretrained towers of efficientnet.py and minilm.py) under
heads. The numpy text tower (text_numpy.py) mirrors TextTower for torch-free queries.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from retrieval.models.config import ImageTowerConfig, TextTowerConfig
from retrieval.models.tokenizer import PAD


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
    """A ResNet (He et al. 2016) of BasicBlocks, average-pooled: pixels (B, 3, S, S) -> (B, C)."""

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
