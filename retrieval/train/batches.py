"""What each training step sees: the epoch's batches of images, their captions, and the seeded random streams.

Every draw is a function of (seed, stream, epoch) alone, so a resumed run sees what the uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from retrieval.data.pairs import Pair

STREAMS = ("batch order", "draws", "cached views")  # a run's random streams, each seeded apart (stream_seed)


def stream_seed(seed: int, stream: str, epoch: int = 0) -> int:
    """The torch seed of one random stream of a run (STREAMS) in one epoch: a function of (seed, stream, epoch)
    alone, so a resumed run draws what the uninterrupted one would have, and hashed by numpy's SeedSequence, so
    no two (stream, epoch) share a seed. (An arithmetic rule such as seed*1000 + epoch (+1) made one epoch's
    augmentation draws the next epoch's batch order.)"""
    entropy = [seed, STREAMS.index(stream), epoch]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def epoch_batches(n_images: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Image rows for each step of an epoch: a random order seeded by (seed, epoch), so a resumed run sees
    the same batches; the last partial batch is dropped."""
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(stream_seed(seed, "batch order", epoch)))
    return [order[s : s + batch_size] for s in range(0, n_images - batch_size + 1, batch_size)]


def batch_captions(
    pairs: Sequence[Pair], rows: torch.Tensor, all_captions: bool, generator: torch.Generator
) -> tuple[list[str], torch.Tensor]:
    """(captions, owner) for a step: every caption of each image in `rows`, or one drawn at random;
    owner[c] is the batch position of caption c's image."""
    texts, owner = [], []
    for position, row in enumerate(rows.tolist()):
        captions = pairs[row].captions
        if not all_captions:
            captions = (captions[int(torch.randint(len(captions), (1,), generator=generator))],)
        texts += captions
        owner += [position] * len(captions)
    return texts, torch.tensor(owner)
