"""FlatScan: FAISS's exhaustive inner-product search of an (n, d) float32 matrix held in numpy, with FAISS ids.

A flat index's own scan runs one query on one thread: FAISS splits its work by query, and below a few queries
it does not start a second thread (a second OpenMP thread would only wait at barriers, and on a busy core it
waits long: search.search_threads). A scan of many rows is bound by memory and arithmetic, not by the query
count, so FlatScan splits a call of a few queries by rows instead: each free core scans a contiguous slice with
the same FAISS function, on Python threads that sleep while they wait rather than spin, and the slices' answers
merge. Every score is the one FAISS gives the row in a scan of all of them (each row's product is summed on its
own), so only equal scores can differ: their order, and which of several tied at the k-th score come back. One
query at 100k x 128, two cores here: 6.0 ms on one thread, 3.2 split (3.5 with the machine idle between
queries, when waking the second thread costs ~0.25 ms).
No torch here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import pairwise
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from retrieval.index.faiss_ops import FaissThreads
from retrieval.threads import our_cores, setting

FEW_QUERIES = 8  # up to this many queries in a call: FAISS on one thread (search.search_threads), a scan split
SLICE_FLOATS = 2**20  # the least a thread's slice of a split scan holds (4 MiB, ~0.3 ms here): a split pays from 2
MAX_SLICES = 8  # one query reads memory; past a few cores a slice more only costs its thread's wake-up
Found = tuple[np.ndarray, ...]  # one slice's answer: FAISS's (scores, rows), or (lims, scores, rows)


class FlatScan:
    """`search` and `range_search` with FAISS's signatures and results over rows `vectors` of items `fids`."""

    def __init__(self, fids: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32]):
        if not (vectors.dtype == np.float32 and vectors.flags.c_contiguous and vectors.ndim == 2):
            raise ValueError(f"a flat scan reads a C-contiguous float32 (n, d) matrix: {vectors.dtype} {vectors.shape}")
        if len(fids) != len(vectors):
            raise ValueError(f"{len(fids)} ids for {len(vectors)} vectors")
        self.fids, self.vectors = fids, vectors  # row i holds item fids[i]

    @property
    def ntotal(self) -> int:
        return len(self.fids)

    def queries(self, qv: np.ndarray, params: Any) -> npt.NDArray[np.float32]:
        """qv as FAISS reads it (C-contiguous float32, as FAISS's own wrappers convert it), each row as wide as a
        stored one, since FAISS reads raw memory. An item filter cannot apply here."""
        qv = np.ascontiguousarray(qv, dtype=np.float32)
        if qv.ndim != 2 or qv.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"queries {qv.shape} against vectors {self.vectors.shape}")
        if params is not None:
            raise ValueError("a flat scan has no item filter")
        return qv

    def search(self, qv: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (nq, k), best first, as FAISS's search gives them (-1: fewer items than k)."""
        qv = self.queries(qv, params)
        found = self._each_slice(qv, lambda rows: faiss.knn(qv, rows, k, metric=faiss.METRIC_INNER_PRODUCT))
        scores, rows = merge_top_k(found, k)
        ids, hit = np.full_like(rows, -1), rows >= 0
        ids[hit] = self.fids[rows[hit]]
        return scores, ids

    def range_search(self, qv: np.ndarray, radius: float, params: Any = None) -> tuple[np.ndarray, ...]:
        """(lims, scores, ids) of the items scoring above radius, as FAISS's range_search gives them."""
        qv = self.queries(qv, params)
        lims, scores, rows = merge_ranges(self._each_slice(qv, lambda rows: range_inner_product(qv, rows, radius)))
        return lims, scores, self.fids[rows]

    def _each_slice(self, qv: np.ndarray, scan: Callable[[np.ndarray], Found]) -> list[tuple[int, Found]]:
        """(first row, scan(rows)) per slice of the rows: one slice for a batch (FAISS then splits it by query,
        with BLAS) or beside another thread's search, else as many as split_rows gives, the first scanned on this
        thread."""
        n = len(self.vectors)
        alone = len(qv) <= FEW_QUERIES and SEARCHES.threads <= 1
        bounds = split_rows(n, self.vectors.shape[1], slice_threads()) if alone else [0, n]
        if len(bounds) == 2:
            return [(0, scan(self.vectors))]
        slices = [self.vectors[a:b] for a, b in pairwise(bounds)]
        rest: list[Future] = [scan_pool().submit(scan, rows) for rows in slices[1:]]
        with FaissThreads(1):  # as the pool's threads: FAISS opens an OpenMP team even for one query
            found = [scan(slices[0]), *(f.result() for f in rest)]
        return list(zip(bounds[:-1], found, strict=True))


class Searches:
    """The threads of this process now in a search (Index.search_vectors) or a server's request (its embedding,
    search and answer), each counted once however deep. A split pays while the other cores are idle; beside
    another thread's search they are not, and the split would only add its hand-offs."""

    def __init__(self) -> None:
        self.lock, self.depth = threading.Lock(), dict[int, int]()  # thread id -> how many times it entered

    @property
    def threads(self) -> int:
        return len(self.depth)

    def __enter__(self) -> None:
        me = threading.get_ident()
        with self.lock:
            self.depth[me] = self.depth.get(me, 0) + 1

    def __exit__(self, *exc: object) -> None:
        me = threading.get_ident()
        with self.lock:
            left = self.depth.pop(me, 1) - 1  # absent: a fork reset the table inside this search
            if left:
                self.depth[me] = left


SEARCHES = Searches()


def split_rows(n: int, d: int, threads: int) -> list[int]:
    """Slice bounds [0, ..., n] for a scan of n rows of d floats on up to `threads` threads: slices of at least
    SLICE_FLOATS each, at most MAX_SLICES."""
    slices = max(1, min(threads, MAX_SLICES, n * d // SLICE_FLOATS))
    return [n * i // slices for i in range(slices + 1)]


def range_inner_product(qv: np.ndarray, rows: np.ndarray, radius: float) -> Found:
    """(lims, scores, rows) of the rows whose inner product with each query is above radius: a flat index's
    range search of these rows (faiss's Python API has no wrapper of it for plain arrays)."""
    (nq, dim), result = qv.shape, faiss.RangeSearchResult(len(qv))
    faiss.range_search_inner_product(  # type: ignore[attr-defined]  # not in faiss's stubs
        faiss.swig_ptr(qv), faiss.swig_ptr(rows), dim, nq, len(rows), radius, result
    )
    lims = faiss.rev_swig_ptr(result.lims, nq + 1).copy()
    found = int(lims[-1])
    return lims, faiss.rev_swig_ptr(result.distances, found).copy(), faiss.rev_swig_ptr(result.labels, found).copy()


def merge_top_k(found: list[tuple[int, Found]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (scores, rows) per query of the slices' top k, each slice's rows offset by its first row; equal
    scores in row order. Which of several items tied at the k-th score come back is not specified: FAISS's heap
    picks among them by its own rule, and each slice's heap sees other rows than one scan's."""
    if len(found) == 1:
        return found[0][1]  # type: ignore[return-value]
    scores = np.concatenate([s for _, (s, _) in found], axis=1)
    rows = np.concatenate([np.where(r >= 0, r + first, -1) for first, (_, r) in found], axis=1)
    best = np.lexsort((rows, -scores), axis=1)[:, :k]  # rows -1 (no result) score -FLT_MAX: last
    return np.take_along_axis(scores, best, axis=1), np.take_along_axis(rows, best, axis=1)


def merge_ranges(found: list[tuple[int, Found]]) -> Found:
    """One (lims, scores, rows) of the slices' range results: each query's results from every slice in turn."""
    if len(found) == 1:
        return found[0][1]
    scores, rows = [], []
    for j in range(len(found[0][1][0]) - 1):  # query j's results, slice by slice
        for first, (lims, s, r) in found:
            scores.append(s[lims[j] : lims[j + 1]])
            rows.append(r[lims[j] : lims[j + 1]] + first)
    return np.sum([lims for _, (lims, _, _) in found], axis=0), np.concatenate(scores), np.concatenate(rows)


def slice_threads() -> int:
    """Threads a split scan may take: this process's cores, RETRIEVAL_THREADS's count where it sets one, and one
    for RETRIEVAL_THREADS=off (FAISS's own threads: one per query)."""
    chosen = setting()
    return chosen if isinstance(chosen, int) else 1 if chosen == "off" else len(our_cores())


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def scan_pool() -> ThreadPoolExecutor:
    """The threads that scan the slices after the first, made on first use: each runs FAISS on one OpenMP
    thread (its slice is its share of the work), and sleeps while it waits for the next."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(MAX_SLICES - 1, "flat-scan", faiss.omp_set_num_threads, (1,))
        return _pool


def _forget_pool() -> None:
    """A forked child has none of its parent's threads: it makes its own pool, and runs none of their searches."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()
    SEARCHES.lock, SEARCHES.depth = threading.Lock(), {}  # in place: other modules hold it by name


os.register_at_fork(after_in_child=_forget_pool)
