"""The fusion rules of R(q, D) evaluated on a model's embeddings: text->item ranks under each rule, the sweep of
the weight w, and items that lost their caption. numpy only.

Item i is its image image_emb[i] with one caption caption_emb[i]; query t's item is query_item[t]. An item is
scored as the index scores it (rules.fuse): weighted w cos(q, x1) + (1 - w) cos(q, x2), mean (w = 1/2), max or
min of the two cosines. An item without a caption is stored, as the index stores it, with its image in place of
its caption (its fused vector repeats the part it has), so under every rule it is scored on its image alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval.arrays import Embeddings
from retrieval.choices import FUSIONS
from retrieval.evaluation.metrics import DEFAULT_KS, Scorer, positive_ranks
from retrieval.rules import fuse


def fused_scores(
    queries: Embeddings, image_emb: np.ndarray, caption_emb: np.ndarray, fusion: str, weight: float
) -> np.ndarray:
    """(c, N) sim(q, x1, x2) of queries (c, d) with items (image_emb[i], caption_emb[i]) under a rule. The weighted
    rules are linear in the embeddings: one product with the fused vectors, as the index's one FAISS call, in
    half the work of two."""
    if fusion in ("max", "min"):
        return fuse(queries @ image_emb.T, queries @ caption_emb.T, fusion, weight)  # (c, N)
    return queries @ fuse(image_emb, caption_emb, fusion, weight).T  # (c, N)


def item_scorer(image_emb: Embeddings, caption_emb: Embeddings, fusion: str, weight: float) -> Scorer:
    """The Scorer of items held in memory under a rule (for positive_ranks and the θ report): one block."""
    return lambda queries: [(0, fused_scores(queries, image_emb, caption_emb, fusion, weight))]


def rule_ranks(
    image_emb: Embeddings,
    caption_emb: Embeddings,
    query_emb: Embeddings,
    query_item: npt.NDArray[np.int64],
    weight: float,
) -> dict[str, np.ndarray]:
    """Per fusion rule (weighted at `weight`): the 1-based rank of each query's item, ties broken by position."""
    return {
        fusion: positive_ranks(query_emb, item_scorer(image_emb, caption_emb, fusion, weight), np.asarray(query_item))
        for fusion in FUSIONS
    }


def fusion_sweep(
    image_emb: Embeddings,
    caption_emb: Embeddings,
    query_emb: Embeddings,
    query_item: npt.NDArray[np.int64],
    weights: Sequence[float],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, Any]:
    """Text->item recall and mAP as the weight w of the weighted rule varies; the best w is the one with the best
    sum of R@k (chosen on these queries, so its figures flatter it a little)."""
    curves: dict[str, list[float]] = {f"R@{k}": [] for k in ks}
    curves["mAP"] = []
    for w in weights:
        ranks = positive_ranks(query_emb, item_scorer(image_emb, caption_emb, "weighted", w), np.asarray(query_item))
        for k in ks:
            curves[f"R@{k}"].append(float(np.mean(ranks <= k)))
        curves["mAP"].append(float(np.mean(1.0 / ranks)))
    rsum = np.sum([curves[f"R@{k}"] for k in ks], axis=0)
    best = int(np.argmax(rsum))
    return {
        "weights": [float(w) for w in weights],
        **curves,
        "best_weight": float(weights[best]),
        "best": {key: values[best] for key, values in curves.items()},
    }


def removed_captions(n_items: int, fraction: float, seed: int) -> npt.NDArray[np.int64]:
    """The rows of a random `fraction` of n_items items, ascending: the same rows for the same n_items and seed."""
    return np.sort(np.random.default_rng(seed).permutation(n_items)[: round(fraction * n_items)]).astype(np.int64)


def without_captions(image_emb: Embeddings, caption_emb: Embeddings, rows: npt.NDArray[np.int64]) -> Embeddings:
    """caption_emb with the captions of `rows` removed: their images in their place, as the index stores an item
    without a caption, so that every rule scores those items on their image alone."""
    out = caption_emb.copy()
    out[rows] = image_emb[rows]
    return out
