"""Training images decoded once, up front, into a small in-memory bank.

A bad image is reported and skipped here, so no epoch can crash on one; the bank is a little larger than the
model input, room for the random crops of augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from retrieval.data.images import Transform, load_image
from retrieval.data.pairs import Pair
from retrieval.errors import ImageError
from retrieval.progress import progress_bar

LOAD_MARGIN = 8 / 7  # images are banked a little larger than the model input, room for random crops


@dataclass
class ImageBank:
    """Decoded training images as small RGB arrays, and the pairs whose images could not be read."""

    pairs: list[Pair]
    images: list[np.ndarray]  # (S', S', 3) uint8 each
    skipped: list[tuple[Pair, str]]


def bank_images(pairs: Sequence[Pair], transform: Transform, progress: bool = True) -> ImageBank:
    """Decode every image once (two threads: Pillow releases the GIL); unreadable ones are skipped."""
    side = round(transform.size * LOAD_MARGIN)

    def load(pair: Pair) -> np.ndarray | str:
        if pair.image is None:  # skipped like an unreadable one (callers pass image_caption_pairs)
            return f"item {pair.id} has no image"
        try:
            return np.asarray(transform.bank(load_image(pair.image, size_hint=side), side))
        except ImageError as e:
            return str(e)

    with ThreadPoolExecutor(2) as pool:
        results = list(
            progress_bar(
                pool.map(load, pairs), total=len(pairs), desc="decode images", unit="image", disable=not progress
            )
        )
    bank = ImageBank([], [], [])
    for pair, result in zip(pairs, results, strict=True):
        if isinstance(result, str):
            bank.skipped.append((pair, result))
        else:
            bank.pairs.append(pair)
            bank.images.append(result)
    return bank


def as_tensor(bank: list[np.ndarray]) -> torch.Tensor:
    """The banked images as one uint8 batch, channels first, for augmentation and the image cache."""
    return torch.from_numpy(np.stack(bank)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S', S') uint8
