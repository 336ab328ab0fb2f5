"""Fusion rules of R(q, D): how an item's image score and caption score make its one score sim(q, x1, x2).

- weighted: w cos(q, x1) + (1 - w) cos(q, x2); mean is w = 1/2. One FAISS call on the fused vectors
  [e(x1), e(x2)] with the query [w q, (1 - w) q] (search.query_vectors).
- max: the image OR the caption matches. min: the image AND the caption match.
An item missing a part is scored on the part it has, under every rule: its fused vector repeats that part, so
both cosines equal it.

max and min search each part on its own, with the part queries [q, 0] and [0, q] in one batched call, and score
the candidates exactly from the stored vectors:
- max: θ is the union of the two parts' range searches; top-k is in the union of the two parts' top-k lists (an
  item's max is one of its part scores, and fewer than k items beat it on that part).
- min: θ is the intersection (both parts above θ); top-k reads both lists deeper until the k-th best min found
  is at least the smaller of the two lists' last scores, which bounds the min of every item not read yet
  (Fagin's threshold algorithm).
On an exact index the answer is exact; on HNSW and IVF each part's list is approximate, as the weighted answer is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from retrieval.index.combined import Combined
from retrieval.index.search import Results, Searchable, ranked
from retrieval.rules import fuse

PartScores = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (ids (n,), q (d,)) -> (2, n) images', captions' cosines
FIRST_DEPTH = 64  # min's first read of each part's list, at least 4k; each further read is 4x deeper
# parts are range-searched this far below θ, then cut at θ on their exact scores: FAISS and numpy may round a
# score at θ differently, and the cut is numpy's, the same as for the scores the results show
THETA_SLACK = 1e-5


def part_queries(queries: np.ndarray) -> np.ndarray:
    """(2 nq, 2d): rows 2i and 2i + 1 are [q_i, 0] and [0, q_i], whose inner products with a fused vector are its
    image and its caption cosine."""
    n, d = queries.shape
    out = np.zeros((2 * n, 2 * d), dtype=np.float32)
    out[0::2, :d] = queries
    out[1::2, d:] = queries
    return out


def ranked_by_rule(
    index: Searchable,
    queries: np.ndarray,
    k: int | None,
    theta: float | None,
    fusion: str,
    params: Any,
    parts_of: PartScores,
) -> Results:
    """Per query of queries (nq, d): (scores, ids) best first under max or min; top-k, above θ, or both."""
    assert not isinstance(index, Combined), "part queries [q, 0] and [0, q] need the fused vectors"
    if fusion == "min" and k is not None:
        return _min_top_k(index, queries, k, theta, params, parts_of)
    lists = ranked(index, part_queries(queries), k, _below(theta), params)
    out = []
    for i, q in enumerate(queries):
        image_ids, text_ids = lists[2 * i][1], lists[2 * i + 1][1]
        ids = np.union1d(image_ids, text_ids) if fusion == "max" else np.intersect1d(image_ids, text_ids)
        out.append(_best(parts_of(ids, q), ids, fusion, k, theta))
    return out


def _below(theta: float | None) -> float | None:
    return None if theta is None else theta - THETA_SLACK


def _best(
    parts: np.ndarray, ids: np.ndarray, fusion: str, k: int | None, theta: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """The candidates `ids` (ascending) with their part scores, ranked under the rule (ties: lower id first),
    those above θ, at most k."""
    scores = fuse(parts[0], parts[1], fusion, 0.5).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    if theta is not None:
        order = order[scores[order] > theta]
    return scores[order][:k], ids[order][:k]


def _min_top_k(
    index: Searchable, queries: np.ndarray, k: int, theta: float | None, params: Any, parts_of: PartScores
) -> Results:
    """Top-k under min, by the threshold algorithm: each round reads both parts' lists to `depth` for the queries
    not settled yet. A query is settled when its k-th best min is at least min(last image score, last caption
    score) of the lists read, or when a list ran out (every item above θ in that part has been read)."""
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(queries)
    pending = np.arange(len(queries))
    depth = max(FIRST_DEPTH, 4 * k)
    while len(pending):
        lists = ranked(index, part_queries(queries[pending]), depth, _below(theta), params)
        whole = depth >= index.ntotal
        unsettled = []
        for j, i in enumerate(pending.tolist()):
            (image_scores, image_ids), (text_scores, text_ids) = lists[2 * j], lists[2 * j + 1]
            ids = np.union1d(image_ids, text_ids)
            scores, found = _best(parts_of(ids, queries[i]), ids, "min", k, theta)
            ran_out = whole or len(image_ids) < depth or len(text_ids) < depth
            bound = -np.inf if ran_out else min(image_scores[-1], text_scores[-1])
            if ran_out or (len(scores) == k and scores[-1] >= bound):
                results[i] = (scores, found)
            else:
                unsettled.append(i)
        pending, depth = np.array(unsettled, dtype=np.int64), depth * 4
    return [r for r in results if r is not None]
