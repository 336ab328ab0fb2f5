"""R(q, D) = {(x1, x2) in D | sim(q, x1, x2) > θ}, with top-k, over an index on disk.

sim(q, x1, x2) = w cos(q, x1) + (1 - w) cos(q, x2), where x1 is an item's image and x2 its caption(s).
Every item is stored as the fused vector [e(x1), e(x2)], so the query [w q, (1 - w) q] scores sim with
one inner product: `target` picks w = 1 (images), w = 0 (captions) or the given w (whole items).
θ runs through FAISS range_search, which is strict (>) as the formula is; top-k through search; with
both, the result is the top k of those above θ. Range results stay as FAISS's (lims, D, I) until they
become `Hit` records. On flat indexes the answer is exact; on HNSW and IVF it is approximate (HNSW's range
search sees only its efSearch candidates), and `exact=True` answers from a flat scan of the same vectors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from retrieval.choices import TARGETS
from retrieval.errors import RetrievalError

FEW_QUERIES = 8  # up to this many queries in one call, FAISS runs on one thread (see faiss_threads)
MAX_QUERY_CHARS = 10_000  # beyond this a "query" is a document; the tokenizer would cut it anyway


@dataclass(slots=True)
class Hit:
    id: str
    path: str | None
    captions: list[str]
    score: float  # the fused sim(q, x1, x2)
    image_score: float | None  # cos(q, x1); None when the item has no image
    text_score: float | None  # cos(q, x2); None when the item has no caption
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "caption": self.captions[0] if self.captions else None,
            "score": self.score,
            "image_score": self.image_score,
            "text_score": self.text_score,
        }


def check_search_args(
    k: int | None, theta: float | None, weight: float, target: str, margin: float | None = None
) -> None:
    if k is None and theta is None and margin is None:
        raise RetrievalError("give k (top-k), theta (threshold), margin (below the top score), or a combination")
    if k is not None and k < 1:
        raise RetrievalError(f"k must be at least 1, got {k}")
    if theta is not None and not -1.0 <= theta <= 1.0:
        raise RetrievalError(f"theta must be in [-1, 1] (a cosine similarity), got {theta}")
    if margin is not None and not 0.0 < margin <= 2.0:
        raise RetrievalError(
            f"margin must be in (0, 2] (a cosine difference; results score above top - margin), got {margin}"
        )
    if not 0.0 <= weight <= 1.0:
        raise RetrievalError(f"weight must be in [0, 1], got {weight}")
    if target not in TARGETS:
        raise RetrievalError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")


def query_vectors(queries: np.ndarray, target: str, weight: float) -> np.ndarray:
    """[w q, (1 - w) q] per row: its inner product with [e(x1), e(x2)] is w cos(q, x1) + (1 - w) cos(q, x2)."""
    w = {"image": 1.0, "text": 0.0}.get(target, weight)
    return np.ascontiguousarray(
        np.concatenate([w * queries, (1.0 - w) * queries], axis=1), dtype=np.float32
    )  # (nq, 2d)


@contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """FAISS's OpenMP threads in this thread for a while. A few queries run fastest on one: a second
    thread only waits at barriers, and when the other core is busy the wait is long (HNSW, one query:
    16 ms on two threads, under 1 ms on one, measured here beside a training job)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def part_scores(vectors: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(n, 2) cosines of q with each fused vector's halves, as one matrix product with [[q, 0], [0, q]]."""
    d = len(q)
    block = np.zeros((2 * d, 2), dtype=np.float32)
    block[:d, 0], block[d:, 1] = q, q
    return vectors @ block


def ranked(
    index: faiss.Index, qv: np.ndarray, k: int | None, theta: float | None, params: Any
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query of qv (nq, 2d): (scores, ids), best first; top-k, everything above θ, or the top k of those."""
    if theta is None or k is not None:
        assert k is not None, "k, theta or both (check_search_args)"
        scores, ids = index.search(qv, min(k, max(index.ntotal, 1)), params=params)  # (nq, k) each
        keep = (ids >= 0) if theta is None else (ids >= 0) & (scores > theta)
        return [(s[m], i[m]) for s, i, m in zip(scores, ids, keep, strict=True)]
    lims, scores, ids = index.range_search(qv, theta, params=params)  # query j's results: [lims[j], lims[j + 1])
    out = []
    for a, b in zip(lims[:-1].tolist(), lims[1:].tolist(), strict=True):
        order = np.argsort(-scores[a:b], kind="stable")
        out.append((scores[a:b][order], ids[a:b][order]))
    return out


def ranked_with_margin(
    index: faiss.Index, qv: np.ndarray, k: int | None, theta: float | None, margin: float, params: Any
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Like `ranked`, with each query's cutoff raised to (its top score - margin)."""
    tops = [scores[0] if len(scores) else np.inf for scores, _ in ranked(index, qv, 1, theta, params)]
    floors = np.maximum(-np.inf if theta is None else theta, np.array(tops) - margin)
    if np.all(np.isinf(floors)):  # nothing above θ for any query
        return [(np.zeros(0, np.float32), np.zeros(0, np.int64)) for _ in tops]
    # the lowest cutoff for all in one call (strictly below it, so ties at the floor survive), then each its own
    low = float(np.nextafter(np.float32(floors[np.isfinite(floors)].min()), np.float32(-2)))
    return [(s[s > f], i[s > f]) for (s, i), f in zip(ranked(index, qv, k, low, params), floors, strict=True)]
