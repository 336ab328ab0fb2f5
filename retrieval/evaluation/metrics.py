"""Retrieval metrics on embeddings: recall@k and ranks in both directions. numpy only.

Definitions follow CLIP_benchmark, with several captions per image:
- text->image R@k: the fraction of captions whose own image is in their top k;
- image->text R@k: the fraction of images with at least one of their captions in their top k.
Ranks are 1-based. Ties are broken by position, as a stable sort by descending score would: a candidate
that scores exactly the same as the positive counts as above it only if it comes earlier in the list.
Similarities are computed a chunk of queries at a time, so no n_text x n_image matrix is ever held.
For a collection too large to hold, `top_k_streamed` is the exact top k over candidate blocks read one at a
time (faiss contrib/exhaustive_search.py's knn_ground_truth), and `list_ranks` scores such a list, or what
an ANN index returned, to depth k: a positive outside the list is "not found" (rank k + 1, adds 0 to AP).
mAP: each caption has one image, so text->image AP is 1/rank; an image has several captions, so
image->text AP averages the precision at each of its captions' ranks.
A score that is not one inner product (an item's max or min of its image and caption cosines, fusion.py) comes
from a `Scorer`, which the ranks and the θ report (thresholds.py) take in place of candidate embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval.arrays import Embeddings

DEFAULT_KS = (1, 5, 10)

# The scores of a chunk of queries (c, d) with every candidate, a block of candidates at a time, in position
# order: (position of the block's first candidate, (c, B) scores). A new pass over the candidates at each call.
Scorer = Callable[[Embeddings], Iterable[tuple[int, np.ndarray]]]


def inner_products(candidates: Embeddings) -> Scorer:
    """The Scorer of cosines with candidate embeddings held in memory: one block."""
    return lambda queries: [(0, queries @ candidates.T)]


def positive_ranks(
    queries: Embeddings, candidates: Embeddings | Scorer, positive: npt.NDArray[np.int64], chunk: int = 1024
) -> np.ndarray:
    """1-based rank of candidate positive[i] among all candidates for query i, ties broken by index.
    candidates: their embeddings, or a Scorer (each chunk's scores are then gathered from its blocks)."""
    scores = candidates if callable(candidates) else inner_products(candidates)
    ranks = np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        sims = np.concatenate([block for _, block in scores(queries[s : s + chunk])], axis=1)  # (c, Nc)
        idx = np.arange(sims.shape[1])
        pos = positive[s : s + chunk]
        pos_score = sims[np.arange(len(pos)), pos][:, None]  # (c, 1)
        above = (sims > pos_score) | ((sims == pos_score) & (idx[None, :] < pos[:, None]))  # (c, Nc)
        ranks[s : s + chunk] = above.sum(1) + 1
    return ranks


Relevance = tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64]
]  # CSR: query i's positives are indices[indptr[i]:indptr[i+1]]


def relevance_from_owner(candidate_owner: npt.NDArray[np.int64], n_queries: int) -> Relevance:
    """Candidate c is a positive of query candidate_owner[c] (image->text: a caption belongs to its image)."""
    order = np.argsort(candidate_owner, kind="stable")
    indptr = np.searchsorted(candidate_owner[order], np.arange(n_queries + 1))
    return indptr.astype(np.int64), order.astype(np.int64)


def positive_mask(relevance: Relevance, rows: npt.NDArray[np.int64], n_candidates: int, start: int = 0) -> np.ndarray:
    """(len(rows), n_candidates) boolean: True where candidate start + j is a positive of the query (start: the
    position of a block's first candidate, when they are read a block at a time)."""
    indptr, indices = relevance
    starts, counts = indptr[rows], indptr[rows + 1] - indptr[rows]
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)  # position within each list
    query, column = np.repeat(np.arange(len(rows)), counts), indices[np.repeat(starts, counts) + offsets] - start
    inside = (column >= 0) & (column < n_candidates)
    mask = np.zeros((len(rows), n_candidates), dtype=bool)
    mask[query[inside], column[inside]] = True
    return mask


def relevant_ranks(
    queries: Embeddings, candidates: Embeddings, relevance: Relevance, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Per query: the best 1-based rank of its positives, and its average precision (AP).

    A query without positives gets rank len(candidates) + 1 (never retrieved) and AP 0.
    AP = mean over the query's positives of (positives at or above it) / (its rank).
    """
    best = np.full(len(queries), len(candidates) + 1, dtype=np.int64)
    ap = np.zeros(len(queries))
    chunk = max(1, min(chunk, 2**25 // max(len(candidates), 1)))  # ~35 bytes a score in flight: about 1 GB at most
    for s in range(0, len(queries), chunk):
        sims = queries[s : s + chunk] @ candidates.T  # (c, Nc)
        order = np.argsort(-sims, axis=1, kind="stable")  # (c, Nc)
        rows = np.arange(s, s + len(sims))
        is_pos = np.take_along_axis(positive_mask(relevance, rows, len(candidates)), order, axis=1)
        n_pos = is_pos.sum(1)
        has = n_pos > 0
        best[s : s + chunk][has] = is_pos.argmax(1)[has] + 1
        precision_at = np.cumsum(is_pos, axis=1) / np.arange(1, len(candidates) + 1)  # (c, Nc)
        ap[s : s + chunk][has] = (precision_at * is_pos).sum(1)[has] / n_pos[has]
    return best, ap


def best_positive_ranks(
    queries: Embeddings, candidates: Embeddings, candidate_owner: npt.NDArray[np.int64], chunk: int = 1024
) -> np.ndarray:
    """For query i, the best 1-based rank among the candidates c with candidate_owner[c] == i.

    This is image->text: queries are images, candidates are captions, candidate_owner maps a caption
    to its image. An image without captions gets rank len(candidates) + 1 (never retrieved).
    """
    return relevant_ranks(queries, candidates, relevance_from_owner(np.asarray(candidate_owner), len(queries)), chunk)[
        0
    ]


def top_k_streamed(
    queries: Embeddings, blocks: Iterable[tuple[int, Embeddings]], k: int, chunk: int = 256
) -> tuple[np.ndarray, npt.NDArray[np.int64]]:
    """(scores, positions), each (nq, k), best first: the exact top k of each query over candidates that
    arrive as (position of the block's first row, block) in position order, so only one block is held.

    Ties are broken by position, as a stable sort of all candidates would. Rows past the last candidate
    (fewer than k in all) are score -inf, position -1, as FAISS pads its answers.
    """
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    where = np.full((len(queries), k), -1, dtype=np.int64)
    for start, block in blocks:
        for s in range(0, len(queries), chunk):
            sims = queries[s : s + chunk] @ block.T  # (c, B)
            scores, positions = _block_top_k(sims, k)
            merged_s = np.concatenate([best[s : s + chunk], scores], axis=1)  # (c, k + k')
            merged_p = np.concatenate([where[s : s + chunk], positions + start], axis=1)
            # the running list comes first and holds earlier positions, so a stable sort keeps ties by position
            order = np.argsort(-merged_s, axis=1, kind="stable")[:, :k]
            best[s : s + chunk] = np.take_along_axis(merged_s, order, axis=1)
            where[s : s + chunk] = np.take_along_axis(np.where(np.isfinite(merged_s), merged_p, -1), order, axis=1)
    return best, where


def _block_top_k(sims: np.ndarray, k: int) -> tuple[np.ndarray, npt.NDArray[np.int64]]:
    """Each row's candidates scoring at least its k-th best (all the ties at the boundary, so the caller
    can break them by position), in column order, padded with -inf to the longest row: (c, k' >= k)."""
    if sims.shape[1] > k:
        kth = np.partition(sims, sims.shape[1] - k, axis=1)[:, sims.shape[1] - k][:, None]  # (c, 1)
        rows, cols = np.nonzero(sims >= kth)  # row-major: each row's columns ascending
    else:
        rows, cols = np.nonzero(np.ones(sims.shape, dtype=bool))
    counts = np.bincount(rows, minlength=len(sims))
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)  # place within the row
    scores = np.full((len(sims), max(int(counts.max(initial=0)), 1)), -np.inf, dtype=np.float32)
    positions = np.full(scores.shape, -1, dtype=np.int64)
    scores[rows, slot], positions[rows, slot] = sims[rows, cols], cols
    return scores, positions


def list_ranks(found: npt.NDArray[np.int64], relevance: Relevance) -> tuple[np.ndarray, np.ndarray]:
    """Per query: the best 1-based rank of its positives in its returned list found[q] (positions, -1 for
    none), k + 1 when none is there; and AP over the list, a positive not returned adding 0 to it.

    With every candidate in the list (k = N) both equal `relevant_ranks`.
    """
    indptr, indices = relevance
    nq, k = found.shape
    n_pos = np.diff(indptr)
    span = int(max(indices.max(initial=0), found.max(initial=0))) + 1
    wanted = np.repeat(np.arange(nq), n_pos) * span + indices  # (query, positive) as one key
    is_pos = (found >= 0) & np.isin(np.arange(nq)[:, None] * span + found, wanted)  # (nq, k)
    best = np.where(is_pos.any(1), is_pos.argmax(1) + 1, k + 1)
    precision_at = np.cumsum(is_pos, axis=1) / np.arange(1, k + 1)  # (nq, k)
    ap = (precision_at * is_pos).sum(1) / np.maximum(n_pos, 1)
    return best, ap


def recall_against_exact(
    found_scores: np.ndarray, exact_scores: np.ndarray, ks: Sequence[int], tolerance: float = 1e-5
) -> dict[str, float]:
    """Recall@k of an approximate top-k against the exact one: the fraction of the exact top k the index
    returned in its own top k, averaged over queries.

    found_scores (nq, K) are the exact scores of the items the index returned, in its order (-inf: none);
    exact_scores (nq, K) the exact top K. A returned item counts when it scores at least the exact k-th
    score (within `tolerance`, for float rounding), so items tied with the k-th are interchangeable.
    """
    out = {}
    for k in ks:
        kth = exact_scores[:, k - 1 : k]  # (nq, 1)
        available = np.isfinite(exact_scores[:, :k]).sum(1)  # fewer than k candidates: a smaller truth
        counted = np.isfinite(found_scores[:, :k]) & (found_scores[:, :k] >= kth - tolerance)
        hits = np.minimum(counted.sum(1), available)
        out[f"R@{k}"] = float(np.mean(hits / np.maximum(available, 1)))
    return out


def summarise(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS, ap: np.ndarray | None = None) -> dict[str, float]:
    """R@k, median and mean rank, mAP (1/rank when each query has one positive), number of queries."""
    out: dict[str, float] = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(np.mean(ranks))
    out["mAP"] = float(np.mean(1.0 / ranks if ap is None else ap))
    out["n_queries"] = len(ranks)
    return out


def recall_curve(ranks: np.ndarray, k_max: int = 100) -> list[float]:
    """R@k for k = 1..k_max, for the recall@k plot."""
    return np.mean(ranks[:, None] <= np.arange(1, k_max + 1)[None, :], axis=0).tolist()


def retrieval_report(
    image_emb: Embeddings,
    text_emb: Embeddings,
    text_image: npt.NDArray[np.int64],
    ks: Sequence[int] = DEFAULT_KS,
    curves: bool = False,
) -> dict[str, Any]:
    """The eval JSON: text_image[t] is the row in image_emb of caption t's image.

    curves=True adds "curves": R@k for k = 1..100 in both directions (for plots)."""
    text_image = np.asarray(text_image, dtype=np.int64)
    t2i = positive_ranks(text_emb, image_emb, text_image)
    i2t, i2t_ap = relevant_ranks(image_emb, text_emb, relevance_from_owner(text_image, len(image_emb)))
    report: dict[str, Any] = {
        "n_images": len(image_emb),
        "n_texts": len(text_emb),
        "text_to_image": summarise(t2i, ks),
        "image_to_text": summarise(i2t, ks, i2t_ap),
    }
    if curves:
        report["curves"] = {"text_to_image": recall_curve(t2i), "image_to_text": recall_curve(i2t)}
    return report
