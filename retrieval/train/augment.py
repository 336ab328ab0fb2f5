"""Training-time image augmentation of whole batches, in torch.

Random resized crop, horizontal flip and colour jitter are one affine resample of the banked uint8
images per batch: no per-image Python and no loader processes, which on 2 cores cost as much as the
model itself. The eval path stays images.Transform.preprocess, one image at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from retrieval.models.config import Augment


def crop_thetas(n: int, min_area: float, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """(n, 2, 3) affine matrices, in grid_sample's [-1, 1] coordinates, that each pick a random crop of
    area share in [min_area, 1] and aspect ratio in [3/4, 4/3], mirrored or not."""
    area = torch.empty(n).uniform_(min_area, 1, generator=generator)
    aspect = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator).exp()
    w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # crop sides, shares of the image's
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)  # crop centres keep the crop inside the image
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * mirror, cx, h, cy
    return theta


def jitter_colours(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Scale brightness, then contrast about each image's mean, then saturation about its grey; x in [0, 1]."""

    def factor() -> torch.Tensor:
        return 1 + (torch.rand(x.shape[0], 1, 1, 1, generator=generator) * 2 - 1) * strength  # (B, 1, 1, 1)

    x = x * factor()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = (x - mean) * factor() + mean
    grey = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    return ((x - grey) * factor() + grey).clamp(0, 1)


def augment_batch(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    aug: Augment | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) banked images -> float32 (B, 3, size, size) model input, normalised; augmented as
    `aug` says, or only resized when it is None."""
    x = images.float() / 255
    if aug is None:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    else:
        grid = F.affine_grid(
            crop_thetas(len(x), aug.min_area, aug.flip, generator), [len(x), 3, size, size], align_corners=False
        )
        x = F.grid_sample(
            x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )  # (B, 3, size, size)
        if aug.jitter:
            x = jitter_colours(x, aug.jitter, generator)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
