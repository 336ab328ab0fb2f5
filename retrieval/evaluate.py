"""Retrieval metrics on embeddings: recall@k and ranks in both directions. numpy only.

Definitions follow CLIP_benchmark, with several captions per image:
- text->image R@k: the fraction of captions whose own image is in their top k;
- image->text R@k: the fraction of images with at least one of their captions in their top k.
Ranks are 1-based. Ties are broken by position, as a stable sort by descending score would: a candidate
that scores exactly the same as the positive counts as above it only if it comes earlier in the list.
Similarities are computed a chunk of queries at a time, so no n_text x n_image matrix is ever held.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

Embeddings = npt.NDArray[np.float32]
DEFAULT_KS = (1, 5, 10)


def positive_ranks(queries: Embeddings, candidates: Embeddings, positive: npt.NDArray[np.int64], chunk: int = 1024) -> np.ndarray:
    """1-based rank of candidate positive[i] among all candidates for query i, ties broken by index."""
    ranks = np.empty(len(queries), dtype=np.int64)
    idx = np.arange(len(candidates))
    for s in range(0, len(queries), chunk):
        sims = queries[s : s + chunk] @ candidates.T  # (c, Nc)
        pos = positive[s : s + chunk]
        pos_score = sims[np.arange(len(pos)), pos][:, None]  # (c, 1)
        above = (sims > pos_score) | ((sims == pos_score) & (idx[None, :] < pos[:, None]))  # (c, Nc)
        ranks[s : s + chunk] = above.sum(1) + 1
    return ranks


def best_positive_ranks(
    queries: Embeddings, candidates: Embeddings, candidate_owner: npt.NDArray[np.int64], chunk: int = 1024
) -> np.ndarray:
    """For query i, the best 1-based rank among the candidates c with candidate_owner[c] == i.

    This is image->text: queries are images, candidates are captions, candidate_owner maps a caption
    to its image. An image without captions gets rank len(candidates) + 1 (never retrieved).
    """
    ranks = np.full(len(queries), len(candidates) + 1, dtype=np.int64)
    for s in range(0, len(queries), chunk):
        sims = queries[s : s + chunk] @ candidates.T  # (c, Nc)
        order = np.argsort(-sims, axis=1, kind="stable")  # (c, Nc)
        is_pos = candidate_owner[order] == np.arange(s, s + len(sims))[:, None]  # (c, Nc)
        has = is_pos.any(1)
        ranks[s : s + chunk][has] = is_pos.argmax(1)[has] + 1
    return ranks


def summarise(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    out: dict[str, float] = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(np.mean(ranks))
    return out


def retrieval_report(
    image_emb: Embeddings, text_emb: Embeddings, text_image: npt.NDArray[np.int64], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, Any]:
    """The eval JSON: text_image[t] is the row in image_emb of caption t's image."""
    text_image = np.asarray(text_image, dtype=np.int64)
    return {
        "n_images": int(len(image_emb)),
        "n_texts": int(len(text_emb)),
        "text_to_image": summarise(positive_ranks(text_emb, image_emb, text_image), ks),
        "image_to_text": summarise(best_positive_ranks(image_emb, text_emb, text_image), ks),
    }
