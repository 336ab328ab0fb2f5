"""flat16: exact top-k and θ from a scan of half-precision vectors, re-ranked against the fp32 ones.

A flat scan is bound by memory bandwidth, so scanning fp16 copies of the fused vectors (QT_fp16 codes in
FAISS, see faiss_ops.is_flat16) takes about half the time of an fp32 scan. Its scores are off by a little;
the candidates it returns are then scored again from the fp32 vectors the store memory-maps (vectors.npy).
A bound on the scan's error says how far down its list an item could still belong to the answer, so the
re-ranked top-k and θ sets are those of an fp32 scan, not approximately. The fp32 score is FAISS's
fvec_inner_product, the one a flat index computes with an item filter; without one, flat sums in another
order, which can differ in the last bit (so a flat index's own answers can differ that much too).

The bound, for a query q (D dimensions) and any stored item x of norm at most N, u = 2^-24 the fp32 unit
roundoff and γ_D = Du / (1 - Du): fp16 rounds each component to within 2^-11 of itself (2^-25 absolute
below 2^-14, where fp16 is subnormal), and an fp32 dot product of D terms, summed in any order, is within
γ_D Σ|q_i x_i| of the true one (Higham, Accuracy and Stability of Numerical Algorithms, 3.1). The scan's
score of x and its fp32 score then differ by at most (Cauchy-Schwarz for Σ|q_i x_i| <= ‖q‖ N, and for
‖q‖₁ <= √D ‖q‖, which is tight only for a query of equal |q_i| and keeps the bound one norm per query)
    ε(q) = ((2^-11 + γ_D (2 + 2^-11)) N + (1 + γ_D) 2^-25 √D) ‖q‖,
taken 1% larger for the arithmetic of the bound itself.

A batch of queries reads the fp32 vectors instead, once for all of them (scan.FlatScan: FAISS's exhaustive
search, with BLAS), where the fp16 scan would read its codes once per query: a server's concurrent searches
then share one pass, as they do on flat. Its scores and the re-rank's are two fp32 sums of the same products,
each within γ_D Σ|q_i x_i| of the true one, so they differ by at most ε32(q) = 2 γ_D N ‖q‖ (1% larger, as
above), and the re-rank makes the batch's answers those of its queries asked one at a time. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from itertools import pairwise
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from retrieval.arrays import Vectors
from retrieval.index.faiss_ops import inner_products_at
from retrieval.index.scan import FlatScan, ListScan

FP16_RELATIVE = 2.0**-11  # fp16 keeps 11 significant bits: rounding moves a normal value by at most this fraction
FP16_SUBNORMAL = 2.0**-25  # half the spacing of fp16's subnormals (below 2^-14): the most one moves absolutely
FP32_ROUNDOFF = 2.0**-24
BOUND_SLACK = 1.01  # the bound, rounded up for the float arithmetic that computes it
CANDIDATES = 32  # top-k asks the scan for 2k + this many: on clustered vectors at 1M the bound then holds for
# every query measured, so the fallback (a range search below the k-th score) is rare
NO_RESULT = -np.finfo(np.float32).max  # FAISS's score beside id -1 in an inner-product search
# queries from which an unfiltered search reads the fp32 vectors once for all (FlatScan) rather than the fp16 codes
# once each. 100k x 256 here, ms per query, fp16 scan / fp32 BLAS: one thread 7.5 / 6.5 at 4 queries, 8.6 / 4.4 at
# 8, 6.7 / 1.5 at 64; two threads 3.5 / 3.8 at 4, 4.2 / 2.5 at 8, 3.3 / 0.52 at 64
BATCH_FROM = 8

RowsOf = Callable[[npt.NDArray[np.int64]], npt.NDArray[np.int64]]  # fids -> rows of the fp32 vectors


def gamma(dim: int) -> float:
    """γ_D: an fp32 sum of D products, in any order, is within γ_D Σ|q_i x_i| of the true one (Higham 3.1)."""
    return dim * FP32_ROUNDOFF / (1 - dim * FP32_ROUNDOFF)


def per_norm_bound(qv: np.ndarray, per_norm: float) -> npt.NDArray[np.float64]:
    """(nq,) ‖q‖ · per_norm for each query row of qv, 1% larger (BOUND_SLACK)."""
    return np.sqrt(np.einsum("ij,ij->i", qv, qv, dtype=np.float64)) * (per_norm * BOUND_SLACK)


def score_error_bound(qv: np.ndarray, max_norm: float) -> npt.NDArray[np.float64]:
    """ε per query of qv (nq, D): how far the fp16 scan's score of any item of norm <= max_norm can be from its
    fp32 score (see the module docstring)."""
    dim = qv.shape[1]
    g = gamma(dim)
    return per_norm_bound(
        qv, (FP16_RELATIVE + g * (2 + FP16_RELATIVE)) * max_norm + (1 + g) * FP16_SUBNORMAL * np.sqrt(dim)
    )


def fp32_error_bound(qv: np.ndarray, max_norm: float) -> npt.NDArray[np.float64]:
    """ε32 per query of qv (nq, D): how far an fp32 BLAS score of any item of norm <= max_norm can be from the
    re-rank's fp32 score of it: 2 γ_D N ‖q‖ (see the module docstring)."""
    return per_norm_bound(qv, 2 * gamma(qv.shape[1]) * max_norm)


def floor32(x: float) -> float:
    """The largest float32 at or below x: FAISS takes a radius as float32, and rounding up would drop items."""
    y = np.float32(x)
    return float(np.nextafter(y, np.float32(-np.inf)) if float(y) > x else y)  # float(y): compared in float64


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (score, id) pairs, best first, equal scores by ascending id; id -1 (no result) left out."""
    found = ids >= 0
    scores, ids = scores[found], ids[found]
    order = np.lexsort((ids, -scores))[:k]
    return scores[order], ids[order]


class Reranked:
    """A flat16 index as `ranked` asks it: `search` and `range_search` with FAISS's signatures and results,
    answered by the fp16 scan, or for a batch by one fp32 pass, and re-ranked exactly from the fp32 vectors;
    `index` is the fp16 scan alone."""

    def __init__(self, index: faiss.Index, fids: npt.NDArray[np.int64], vectors: Vectors, rows_of: RowsOf):
        self.fp16 = ListScan(index)  # the fp16 scan (faiss_ops.is_flat16), a few queries split between threads
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (n, D) fp32, rows in fid order (no copy)
        self.batch = FlatScan(fids, self.vectors)  # maps rows to fids; rows_of, the other way (both the store's)
        self.rows_of = rows_of  # raises IndexChanged for a fid the vectors do not hold

    @property
    def index(self) -> faiss.Index:
        """The fp16 scan's FAISS index itself, on one call a query: answers with fids."""
        return self.fp16.index

    @property
    def ntotal(self) -> int:
        return self.fp16.ntotal

    @cached_property
    def max_norm(self) -> float:
        """N in the bound: the largest stored vector's norm (√2 for unit parts). One pass over the vectors, once."""
        if not len(self.vectors):
            return 0.0
        squares = np.empty(len(self.vectors), dtype=np.float32)
        faiss.fvec_norms_L2sqr(  # type: ignore[attr-defined]  # not in faiss's stubs
            faiss.swig_ptr(squares), faiss.swig_ptr(self.vectors), self.vectors.shape[1], len(self.vectors)
        )
        return float(np.sqrt(squares.max(), dtype=np.float64))

    def exact_scores(self, qv: np.ndarray, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """(nq, m) fp32 inner products of query j with the items ids[j] (-1: NO_RESULT). FAISS's
        fvec_inner_product scores each pair on its own, so a score never depends on the other candidates."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        found = ids >= 0
        rows = np.full(ids.shape, -1, dtype=np.int64)
        rows[found] = self.rows_of(ids[found])
        out = inner_products_at(qv, self.vectors, rows)
        out[~found] = NO_RESULT
        return out

    def scan(self, qv: np.ndarray, params: Any) -> tuple[ListScan | FlatScan, npt.NDArray[np.float64]]:
        """What a search of qv asks first, and ε per query for its scores: one fp32 pass for a batch of
        BATCH_FROM queries or more without an item filter, else the fp16 scan."""
        if len(qv) >= BATCH_FROM and params is None and self.ntotal:
            return self.batch, fp32_error_bound(qv, self.max_norm)
        return self.fp16, score_error_bound(qv, self.max_norm)

    def could_reach(self, q: np.ndarray, floor: float, params: Any) -> npt.NDArray[np.int64]:
        """The ids of every item whose fp32 score against the one query q (1, D) could be floor or more: the fp16
        scan's range search at floor - ε. Never the fp32 pass: for one query it reads twice the bytes."""
        radius = floor32(floor - float(score_error_bound(q, self.max_norm)[0]))
        return self.fp16.range_search(q, radius, params=params)[2]

    def search(self, qv: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (nq, k), best first: the exact top k. The scan's 2k + 32 best are re-ranked; when
        the last of them could still beat the k-th re-ranked score (its scan score + ε >= it), every item that could
        score as high is re-ranked instead (could_reach)."""
        qv = np.ascontiguousarray(qv, dtype=np.float32)
        wanted = max(1, min(self.ntotal, 2 * k + CANDIDATES))
        scan, eps = self.scan(qv, params)
        approx, ids = scan.search(qv, wanted, params=params)  # (nq, wanted) each
        scores = self.exact_scores(qv, ids)
        out_scores = np.full((len(qv), k), NO_RESULT, dtype=np.float32)
        out_ids = np.full((len(qv), k), -1, dtype=np.int64)
        for j in range(len(qv)):
            best, best_ids = top_k(scores[j], ids[j], k)
            complete = ids[j, -1] < 0 or wanted == self.ntotal  # the scan returned every item it may
            if not complete and approx[j, -1] + eps[j] >= best[-1]:
                more = self.could_reach(qv[j : j + 1], best[-1], params)
                best, best_ids = top_k(self.exact_scores(qv[j : j + 1], more[None])[0], more, k)
            out_scores[j, : len(best)], out_ids[j, : len(best)] = best, best_ids
        return out_scores, out_ids

    def range_search(self, qv: np.ndarray, theta: float, params: Any = None) -> tuple[np.ndarray, ...]:
        """(lims, scores, ids) as FAISS gives them: every item whose fp32 score is above θ (strictly, θ as FAISS
        takes it, in float32), each query's in id order. The scan's range search at θ - ε holds them all;
        re-ranking keeps those above θ."""
        qv = np.ascontiguousarray(qv, dtype=np.float32)
        scan, eps = self.scan(qv, params)
        lims, _, ids = scan.range_search(qv, floor32(theta - float(eps.max())), params=params)
        bounds = lims.tolist()
        scores = np.concatenate(
            [np.zeros(0, np.float32)]
            + [self.exact_scores(qv[j : j + 1], ids[a:b][None])[0] for j, (a, b) in enumerate(pairwise(bounds))]
        )
        ends = np.asarray(lims, dtype=np.int64)
        query = np.repeat(np.arange(len(qv)), ends[1:] - ends[:-1])  # each result's query
        by_id = np.lexsort((ids, query))  # each query's results by id: the scan's threads return them in any order
        keep = by_id[scores[by_id] > np.float32(theta)]
        counts = np.bincount(query[keep], minlength=len(qv))
        return np.concatenate([[0], np.cumsum(counts)]).astype(lims.dtype), scores[keep], ids[keep]
