"""R(q, D) = {(x1, x2) in D | sim(q, x1, x2) > θ}, with top-k, over an index on disk.

sim(q, x1, x2) = w cos(q, x1) + (1 - w) cos(q, x2), where x1 is an item's image and x2 its caption(s).
Every item is stored as the fused vector [e(x1), e(x2)], so the query [w q, (1 - w) q] scores sim with
one inner product: `target` picks w = 1 (images), w = 0 (captions) or the given w (whole items). An exact
scan at w = 0, 1/2 or 1 reads combined vectors instead, asked with q itself (combined.py).
θ runs through FAISS range_search, which is strict (>) as the formula is; top-k through search; with
both, the result is the top k of those above θ. Range results stay as FAISS's (lims, D, I) until they
become `Hit` records. On flat indexes the answer is exact; on HNSW and IVF it is approximate (HNSW's range
search sees only its efSearch candidates), and `exact=True` answers from a flat scan of the same vectors.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from itertools import pairwise
from typing import Any, TypeAlias

import faiss
import msgspec
import numpy as np

from retrieval.choices import FUSIONS, TARGETS
from retrieval.errors import RetrievalError
from retrieval.index.combined import Combined
from retrieval.index.rerank import Reranked
from retrieval.index.scan import FEW_QUERIES, FlatScan

Searchable: TypeAlias = faiss.Index | Reranked | FlatScan  # what IndexStore.searcher returns and `ranked` asks
Results = list[tuple[np.ndarray, np.ndarray]]  # per query: (scores, FAISS ids), best first
MAX_QUERY_CHARS = 10_000  # beyond this a "query" is a document; the tokenizer would cut it anyway


class Hit(msgspec.Struct, array_like=True, gc=False, kw_only=True):
    """A result: what its item shows, and its scores against the query. A line of the index's records file
    (store.py) decodes straight into one, in C; Index.hits_for then sets every score. That is 3x faster than
    making a Hit in Python from each decoded line (115 results: 117 -> 78 µs here). Python code makes one by
    keyword only (the fields' order is the records file's). Not tracked by the GC (gc=False: one object less per
    result for it to count and scan); a Hit put inside its own `extra` would never be freed."""

    id: str
    path: str | None
    captions: list[str]
    has_image: bool
    has_caption: bool
    extra: dict[str, Any]
    score: float = 0.0  # the fused sim(q, x1, x2)
    image_score: float | None = None  # cos(q, x1); None when the item has no image
    text_score: float | None = None  # cos(q, x2); None when the item has no caption

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
    k: int | None,
    theta: float | None,
    weight: float,
    target: str,
    margin: float | None = None,
    fusion: str = "weighted",
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
    if fusion not in FUSIONS:
        raise RetrievalError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")


def target_column(target: str) -> str | None:
    """The item column an image or text target filters on (items without that part are left out); None for items."""
    return {"image": "image_key", "text": "text_key"}.get(target)


def target_weight(target: str, weight: float) -> float:
    """The w a search scores with: 1 for images only, 0 for captions only, else the weight given."""
    return {"image": 1.0, "text": 0.0}.get(target, weight)


def query_vectors(queries: np.ndarray, target: str, weight: float) -> np.ndarray:
    """[w q, (1 - w) q] per row: its inner product with [e(x1), e(x2)] is w cos(q, x1) + (1 - w) cos(q, x2)."""
    w = target_weight(target, weight)
    nq, d = queries.shape
    out = np.empty((nq, 2 * d), dtype=np.float32)
    np.multiply(queries, w, out=out[:, :d])
    np.multiply(queries, 1.0 - w, out=out[:, d:])
    return out


def query_rows(index: Searchable, queries: np.ndarray, target: str, weight: float) -> np.ndarray:
    """The rows `index` is asked with: the queries themselves for Combined, whose rows hold the weight already,
    else the fused rows [w q, (1 - w) q] (query_vectors)."""
    return queries if isinstance(index, Combined) else query_vectors(queries, target, weight)


def search_threads(nq: int) -> int:
    """FAISS's OpenMP threads for one call of nq queries. A few queries run on one: a second thread only waits at
    barriers, and when the other core is busy the wait is long (HNSW, one query: 16 ms on two threads, under
    1 ms on one, measured here beside a training job). A large flat or flat16 scan splits its rows or lists
    between threads of its own instead, which sleep while they wait (scan.FlatScan, scan.ListScan)."""
    return faiss.omp_get_max_threads() if nq > FEW_QUERIES else 1


class GcPaused:
    """Python's cyclic GC off while a search makes its result objects, then as it was. Making them with it on runs
    a young collection every 700 tracked objects, and every few calls of 10,000 results those add up to a full
    collection of the process (60-90 ms with torch imported, in 30% of calls here); paused, one young collection
    runs after. Results hold no cycles, so none waits for the GC meanwhile. Threads that pause at once leave it
    on when the last one that found it on is done."""

    def __init__(self) -> None:
        self.was_enabled = False

    def __enter__(self) -> None:
        self.was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self.was_enabled:
            gc.enable()


def ranked(index: Searchable, qv: np.ndarray, k: int | None, theta: float | None, params: Any) -> Results:
    """Per query row of qv: (scores, ids), best first; top-k, everything above θ, or the top k of those. qv holds
    the rows the index is asked with: [w q, (1 - w) q] (nq, 2d) for the fused vectors, q (nq, d) for Combined."""
    if theta is None or k is not None:
        assert k is not None, "k, theta or both (check_search_args)"
        scores, ids = index.search(qv, min(k, max(index.ntotal, 1)), params=params)  # (nq, k) each
        keep = (ids >= 0) if theta is None else (ids >= 0) & (scores > theta)
        return [(s[m], i[m]) for s, i, m in zip(scores, ids, keep, strict=True)]
    lims, scores, ids = index.range_search(qv, theta, params=params)  # query j's results: [lims[j], lims[j + 1])
    out = []
    for a, b in pairwise(lims.tolist()):
        found, at = scores[a:b], ids[a:b]
        order = (-found).argsort(kind="stable")  # equal scores as the index returned them
        out.append((found[order], at[order]))
    return out


def with_margin(
    rank: Callable[[int | None, float | None], Results], k: int | None, theta: float | None, margin: float
) -> Results:
    """`rank(k, theta)`'s answer with each query's cutoff raised to (its top score - margin): two calls of it."""
    tops = [scores[0] if len(scores) else np.inf for scores, _ in rank(1, theta)]
    floors = np.maximum(-np.inf if theta is None else theta, np.array(tops) - margin)
    if np.all(np.isinf(floors)):  # nothing above θ for any query
        return [(np.zeros(0, np.float32), np.zeros(0, np.int64)) for _ in tops]
    # the lowest cutoff for all in one call (strictly below it, so ties at the floor survive), then each its own
    low = float(np.nextafter(np.float32(floors[np.isfinite(floors)].min()), np.float32(-2)))
    return [(s[s > f], i[s > f]) for (s, i), f in zip(rank(k, low), floors, strict=True)]
