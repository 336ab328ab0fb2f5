"""Model selection: held-out recall after each epoch, and the rule that decides which epoch's model is kept."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from retrieval.evaluation.metrics import retrieval_report
from retrieval.models.dual_encoder import DualEncoder
from retrieval.models.encoder import Encoder
from retrieval.train.bank import ImageBank
from retrieval.train.features import ImageCache, TextCache

MAX_EVAL_IMAGES = 1000  # held-out recall after each epoch on at most this many images, to keep epochs cheap


def evaluate_bank(
    model: Encoder,
    bank: ImageBank,
    batch_size: int,
    text_cache: TextCache | None = None,
    image_cache: ImageCache | None = None,
) -> dict[str, Any]:
    """Held-out recall on banked images (centre crop) and all their captions."""
    texts = [c for p in bank.pairs for c in p.captions]
    text_image = np.array([i for i, p in enumerate(bank.pairs) for _ in p.captions])
    text_emb = model.project_text_outputs(text_cache(texts)) if text_cache else model.encode_text(texts, batch_size)
    if image_cache is not None:
        assert isinstance(model, DualEncoder), "only our image towers are cached"
        image_emb = model.project_image_outputs(image_cache.centre())
    else:
        pixels = np.stack([model.transform.preprocess(Image.fromarray(a)) for a in bank.images])
        image_emb = model.encode_image(pixels, batch_size)
    return retrieval_report(image_emb, text_emb, text_image)


def selection_score(report: dict[str, Any]) -> float:
    """The sum of R@1/5/10 in both directions ('rsum'), the usual model-selection figure."""
    return sum(v for d in ("text_to_image", "image_to_text") for k, v in report[d].items() if k.startswith("R@"))


def is_best(score: float, best: float) -> bool:
    """Whether an epoch scoring `score` replaces the kept model, the best so far scoring `best`: only a higher
    score does. On a tie the earlier epoch stays: the later one has no better held-out evidence, and keeping the
    first saves a write. The epoch's log line says `best` by this same rule, so it is true exactly when the
    epoch's model was saved."""
    return score > best
