"""Contrastive losses as pure functions of the two embedding batches and the temperature.

Row i of image_emb and row i of text_emb are a positive pair; every other pairing in the batch is a
negative. Both inputs are L2-normalised (B, D) tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al. 2021): mean of image->text and text->image cross-entropy."""
    logits_per_image = logit_scale * image_emb @ text_emb.T  # (B, B)
    logits_per_text = logits_per_image.T  # (B, B)
    labels = torch.arange(image_emb.shape[0], device=image_emb.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """Sigmoid loss (Zhai et al. 2023): each pair is its own binary problem, so small batches don't starve it.

    Normalised as in big_vision: summed over the B x B pairs, divided by B.
    """
    logits = logit_scale * image_emb @ text_emb.T + logit_bias  # (B, B)
    signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1  # +1 diagonal, -1 elsewhere
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]

