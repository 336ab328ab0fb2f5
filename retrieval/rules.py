"""The fusion rules of R(q, D) as scores: how an item's image and caption cosines make its one score.

weighted: w cos(q, x1) + (1 - w) cos(q, x2), mean: w = 1/2, max: either part matches, min: both parts match.
numpy only, so the index's search (index/fusion.py) and the evaluation of a model score items the same way.
"""

from __future__ import annotations

import numpy as np


def fuse(image: np.ndarray, text: np.ndarray, fusion: str, weight: float) -> np.ndarray:
    """Item scores from image scores cos(q, x1) and caption scores cos(q, x2) of the same shape, under a rule."""
    if fusion == "max":
        return np.maximum(image, text)
    if fusion == "min":
        return np.minimum(image, text)
    w = 0.5 if fusion == "mean" else weight
    return w * image + (1.0 - w) * text


def score_rule(fusion: str, weight: float) -> tuple[str, float | None]:
    """What a (rule, weight) pair scores by, so equal scorings compare equal: mean is weighted at 1/2, and max and
    min take no weight. Within 1e-9, a weight read back from JSON is the weight stored."""
    if fusion in ("max", "min"):
        return fusion, None
    return "weighted", round(0.5 if fusion == "mean" else weight, 9)
