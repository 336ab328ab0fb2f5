"""Outputs of locked towers, computed once before training, so that the epochs train only what is not locked.

- TextCache: a locked text tower's output for every distinct caption.
- ImageCache: a pretrained image tower's locked part for every training image, on its centre crop and on
  views-1 augmented ones (crop, flip, colour). Each step draws one view per image, so the epochs still see
  augmentation while costing no more than the heads (and any unlocked blocks).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from retrieval.models.config import Augment
from retrieval.models.dual_encoder import DualEncoder
from retrieval.models.encoder import Encoder
from retrieval.progress import progress_bar
from retrieval.train.augment import augment_batch


class TextCache:
    """A locked text tower's output for every caption, computed once before training: each step then runs
    only the text projection, so training spends its time on images."""

    def __init__(self, model: Encoder, captions: Iterable[str], progress: bool = True, chunk: int = 4096):
        unique = sorted(set(captions), key=lambda c: (len(c), c))  # by length: batches pad little
        self.row = {c: i for i, c in enumerate(unique)}
        parts = [
            model.text_tower_outputs(unique[s : s + chunk])
            for s in progress_bar(
                range(0, len(unique), chunk), desc=f"encode {len(unique)} captions", unit="chunk", disable=not progress
            )
        ]
        self.outputs = torch.cat(parts) if parts else torch.zeros(0, model.text_width)  # (N, W)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.outputs[[self.row[t] for t in texts]]  # (n, W)


class ImageCache:
    """model.image_locked_outputs for `views` versions of every banked image: view 0 is the banked square
    resized to the input side (what held-out recall is measured on), the others are augmented as `augmentation`
    says. Pooled features are kept in float32; spatial activations (when the last blocks train) in bfloat16,
    which halves their memory."""

    def __init__(
        self,
        model: DualEncoder,
        images: torch.Tensor,
        views: int,
        augmentation: Augment | None,
        seed: int,
        bf16: bool,
        progress: bool = True,
        batch_size: int = 64,
    ):
        generator = torch.Generator().manual_seed(seed)
        t, n = model.transform, len(images)
        self.outputs: torch.Tensor | None = None  # (V, N, ...) once the first batch says the shape
        bar = progress_bar(
            total=views * n, desc=f"image tower on {n} images x {views} views", unit="img", disable=not progress
        )
        for v in range(views):
            for s in range(0, n, batch_size):
                pixels = augment_batch(
                    images[s : s + batch_size], t.size, t.mean, t.std, augmentation if v else None, generator
                )  # (B, 3, S, S)
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = model.image_locked_outputs(pixels.contiguous(memory_format=torch.channels_last))
                if self.outputs is None:
                    dtype = torch.float32 if out.ndim == 2 else torch.bfloat16
                    self.outputs = torch.empty((views, n, *out.shape[1:]), dtype=dtype)
                self.outputs[v, s : s + len(out)] = out.to(self.outputs.dtype)
                bar.update(len(out))
        bar.close()

    def centre(self) -> torch.Tensor:
        """The eval view of every image: (N, ...)."""
        assert self.outputs is not None
        return self.outputs[0].float()

    def sample(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One view drawn at random for each image in rows: (B, ...)."""
        assert self.outputs is not None
        views = torch.randint(len(self.outputs), (len(rows),), generator=generator)  # (B,)
        return self.outputs[views, rows].float()
