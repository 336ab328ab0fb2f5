"""Contrastive losses as pure functions of the two embedding batches and the temperature.

image_emb holds B images and text_emb C captions, both L2-normalised. owner[c] is the row of caption c's
image; by default caption c belongs to image c (C = B). A caption's positive is its own image and
an image's positives are all its captions in the batch; every other pairing is a negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _positives(
    image_emb: torch.Tensor, text_emb: torch.Tensor, owner: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner (C,), positive (B, C)): each caption's image row, and which (image, caption) pairs match."""
    if owner is None:
        owner = torch.arange(text_emb.shape[0], device=text_emb.device)
    return owner, owner[None, :] == torch.arange(image_emb.shape[0], device=owner.device)[:, None]


def clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, owner: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al. 2021): mean of image->text and text->image cross-entropy.

    With several captions per image, image->text is multi-positive: -log of the softmax mass on the
    image's own captions, so an image is not asked to prefer one of its captions over another.
    """
    owner, positive = _positives(image_emb, text_emb, owner)
    logits_per_image = logit_scale * image_emb @ text_emb.T  # (B, C)
    logits_per_text = logits_per_image.T  # (C, B)
    image_loss = torch.logsumexp(logits_per_image, 1) - torch.logsumexp(
        logits_per_image.masked_fill(~positive, -torch.inf), 1
    )
    return (image_loss.mean() + F.cross_entropy(logits_per_text, owner)) / 2


def siglip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    owner: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid loss (Zhai et al. 2023): each pair is its own binary problem, so small batches don't starve it.

    Normalised as in big_vision: summed over the B x C pairs, divided by B.
    """
    _, positive = _positives(image_emb, text_emb, owner)
    logits = logit_scale * image_emb @ text_emb.T + logit_bias  # (B, C)
    signs = 2 * positive.to(logits.dtype) - 1  # +1 for an image's own captions, -1 elsewhere
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]
