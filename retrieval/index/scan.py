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
from retrieval.threads import FreeCores, setting

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
        """qv as FAISS reads it (faiss_rows). An item filter cannot apply here."""
        if params is not None:
            raise ValueError("a flat scan has no item filter")
        return faiss_rows(qv, self.vectors.shape[1])

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
        with BLAS) or beside another thread's search, else as many as split_rows gives."""
        n = len(self.vectors)
        d = self.vectors.shape[1]
        bounds = split_rows(n, d, slice_threads(n * d)) if may_split(len(qv)) else [0, n]
        found = on_threads([self.vectors[a:b] for a, b in pairwise(bounds)], scan)
        return list(zip(bounds[:-1], found, strict=True))


class ListScan:
    """flat16's fp16 scan (faiss_ops.is_flat16: an IVF holding the items' ids, every list probed) as `ranked` asks
    it, with FAISS's signatures and results. A call of a few queries splits the lists between threads as FlatScan
    splits rows, each thread asking FAISS for its lists alone (search_preassigned); the lists hold equal shares of
    the items. A file of one list (from before flat16 had 16) answers in one call."""

    def __init__(self, index: faiss.Index):
        self.index = index

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, qv: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (nq, k), best first, as the IVF's own search gives them."""
        groups = self._groups(len(qv), params)
        if not groups:
            return self.index.search(qv, k, params=params)
        qv = faiss_rows(qv, self.index.d)
        return merge_top_k(self._each_group(groups, lambda lists: self._knn(qv, k, lists, params)), k)

    def range_search(self, qv: np.ndarray, radius: float, params: Any = None) -> tuple[np.ndarray, ...]:
        """(lims, scores, ids) of the items scoring above radius, as the IVF's own range_search gives them."""
        groups = self._groups(len(qv), params)
        if not groups:
            return self.index.range_search(qv, radius, params=params)
        qv = faiss_rows(qv, self.index.d)
        return merge_ranges(self._each_group(groups, lambda lists: self._range(qv, radius, lists, params)))

    def _groups(self, nq: int, params: Any) -> list[npt.NDArray[np.int64]]:
        """The lists each thread scans, as the (nq, nprobe) list numbers FAISS reads (-1: none); none (one call)
        for a batch, beside another search, for too few items to split, or unless the index is one IVF that
        probes each of several lists."""
        index = self.index
        if not (isinstance(index, faiss.IndexIVF) and index.nlist > 1 and may_split(nq)):
            return []
        probes = index.nprobe if params is None else params.nprobe  # a filter's parameters carry their own
        per_list = -(-self.ntotal * index.d // index.nlist)  # the codes' components in each list, rounded up
        threads = min(slice_threads(self.ntotal * index.d), index.nlist)  # a group holds one list at least
        bounds = split_rows(index.nlist, per_list, threads) if probes == index.nlist else [0]
        groups = []
        for a, b in pairwise(bounds):
            lists = np.full((nq, probes), -1, dtype=np.int64)  # FAISS skips a list number below 0
            lists[:, : b - a] = np.arange(a, b)
            groups.append(lists)
        return groups if len(groups) > 1 else []

    @staticmethod
    def _each_group(
        groups: list[npt.NDArray[np.int64]], scan: Callable[[np.ndarray], Found]
    ) -> list[tuple[int, Found]]:
        """scan(lists) of each group on threads (on_threads), as the merges take them: the IVF answers with ids,
        so no group's results are offset."""
        return [(0, found) for found in on_threads(groups, scan)]

    def _knn(self, qv: np.ndarray, k: int, lists: np.ndarray, params: Any) -> Found:
        """FAISS's top k of qv among the items of `lists`: search_preassigned, whose wrapper takes no filter."""
        nq = len(qv)
        scores, ids = np.empty((nq, k), dtype=np.float32), np.empty((nq, k), dtype=np.int64)
        coarse = np.zeros(lists.shape, dtype=np.float32)
        ptr = faiss.swig_ptr
        self.index.search_preassigned_c(  # type: ignore[attr-defined]  # the C++ call under FAISS's wrapper
            nq, ptr(qv), k, ptr(lists), ptr(coarse), ptr(scores), ptr(ids), False, params
        )
        return scores, ids

    def _range(self, qv: np.ndarray, radius: float, lists: np.ndarray, params: Any) -> Found:
        """FAISS's range search of qv among the items of `lists`: range_search_preassigned, as _knn."""
        nq, result = len(qv), faiss.RangeSearchResult(len(qv))
        coarse = np.zeros(lists.shape, dtype=np.float32)
        ptr = faiss.swig_ptr
        self.index.range_search_preassigned_c(  # type: ignore[attr-defined]  # the C++ call under FAISS's wrapper
            nq, ptr(qv), radius, ptr(lists), ptr(coarse), result, False, params
        )
        return range_result(result, nq)


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


def faiss_rows(qv: np.ndarray, d: int) -> npt.NDArray[np.float32]:
    """qv as FAISS reads it (C-contiguous float32, as FAISS's own wrappers convert it), refused unless its rows are
    d wide: FAISS reads raw memory, and would read past narrower rows."""
    qv = np.ascontiguousarray(qv, dtype=np.float32)
    if qv.ndim != 2 or qv.shape[1] != d:
        raise ValueError(f"queries {qv.shape} against vectors of {d} dimensions")
    return qv


def may_split(nq: int) -> bool:
    """Whether a call of nq queries splits its scan: a few queries (a batch FAISS splits by query itself), and no
    other thread of this process in a search."""
    return nq <= FEW_QUERIES and SEARCHES.threads <= 1


def on_threads(parts: list[Any], scan: Callable[[Any], Found]) -> list[Found]:
    """scan(part) for each part: one part on this thread as it is, else the first here and the rest on the pool's
    threads, each with FAISS on one OpenMP thread (FAISS opens a team even for one query)."""
    if len(parts) == 1:
        return [scan(parts[0])]
    rest: list[Future] = [scan_pool().submit(scan, part) for part in parts[1:]]
    with FaissThreads(1):
        return [scan(parts[0]), *(f.result() for f in rest)]


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
    return range_result(result, nq)


def range_result(result: faiss.RangeSearchResult, nq: int) -> Found:
    """(lims, scores, labels) copied out of FAISS's result of nq queries, as FAISS's wrappers copy them."""
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


def slice_threads(floats: int) -> int:
    """Threads a split scan of `floats` floats may take: one below two slices' worth (SLICE_FLOATS), else the
    cores other processes leave free (a split beside a busy core only adds its hand-offs: 0.85x of one thread's
    queries/s at 100k here), RETRIEVAL_THREADS's count where it sets one, and one for RETRIEVAL_THREADS=off
    (FAISS's own threads: one per query)."""
    chosen = setting()
    if floats < 2 * SLICE_FLOATS or chosen == "off":
        return 1
    return chosen if isinstance(chosen, int) else _free_cores.count()


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_free_cores = FreeCores()  # what other processes leave this one, for slice_threads


def scan_pool() -> ThreadPoolExecutor:
    """The threads that scan the slices after the first, made on first use: each runs FAISS on one OpenMP
    thread (its slice is its share of the work), and sleeps while it waits for the next."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(MAX_SLICES - 1, "flat-scan", faiss.omp_set_num_threads, (1,))
        return _pool


def _after_fork() -> None:
    """A forked child has none of its parent's threads: it makes its own pool, and runs none of their searches.
    Its CPU time starts at 0, so its count of free cores starts anew."""
    global _pool, _pool_lock, _free_cores
    _pool, _pool_lock = None, threading.Lock()
    SEARCHES.lock, SEARCHES.depth = threading.Lock(), {}  # in place: other modules hold it by name
    _free_cores = FreeCores()


os.register_at_fork(after_in_child=_after_fork)
