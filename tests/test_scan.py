"""FlatScan and ListScan (retrieval/index/scan.py): a call of a few queries splits its rows (or flat16's lists)
between threads, and answers as one FAISS scan of all of them does: the same scores to the bit, the same items but
for which of several tied at the k-th score."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
import pytest
from conftest import SPLIT_FLOATS, faiss_flat

from retrieval.index import scan as scan_module
from retrieval.index.faiss_ops import FLAT16_LISTS, build_faiss, search_parameters
from retrieval.index.scan import FEW_QUERIES, MAX_SLICES, SLICE_FLOATS, FlatScan, ListScan, split_rows

D = 16  # SPLIT_FLOATS (conftest's split) holds 50 rows of D floats


@pytest.fixture(params=["simd", "blas"])
def kernel(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """FAISS's two exhaustive scans: SIMD row by row below its BLAS threshold (a few queries), BLAS blocks of 1024
    rows above it (a batch). Each slice must answer as one scan with either."""
    if request.param == "blas":
        monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 1)
    return request.param


def scan_of(n: int, seed: int = 0) -> FlatScan:
    """n random rows, with ids that are not rows."""
    vectors = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return FlatScan(np.arange(n, dtype=np.int64) * 3 + 5, vectors)


def test_split_rows_gives_slices_of_at_least_slice_floats_on_at_most_the_threads_and_max_slices() -> None:
    assert split_rows(1000, 128, 2) == [0, 1000]  # 128,000 floats: too few to split
    assert split_rows(20_000, 128, 2) == [0, 10_000, 20_000]
    assert split_rows(20_000, 128, 1) == [0, 20_000]
    assert split_rows(2 * SLICE_FLOATS // 128 - 1, 128, 2) == [0, 2 * SLICE_FLOATS // 128 - 1]
    bounds = split_rows(1_000_003, 256, 64)
    assert len(bounds) == MAX_SLICES + 1 and bounds[0] == 0 and bounds[-1] == 1_000_003
    assert max(np.diff(bounds)) - min(np.diff(bounds)) <= 1
    assert split_rows(0, 128, 2) == [0, 0]


@pytest.mark.parametrize("nq", [1, 3, FEW_QUERIES])
@pytest.mark.parametrize("k", [1, 10, 700, 2600])  # 700 and 2600: more than a slice holds, more than the scan holds
def test_a_split_top_k_is_one_faiss_scan_to_the_bit(split, kernel, nq: int, k: int) -> None:
    scan = scan_of(2500, seed=nq)  # slices of 625 rows: not FAISS's BLAS blocks of 1024
    queries = np.random.default_rng(9).standard_normal((nq, D)).astype(np.float32)
    got, want = scan.search(queries, k), faiss_flat(scan.fids, scan.vectors).search(queries, k)
    assert split, "the rows were split"
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and np.array_equal(g, w)


@pytest.mark.parametrize("nq", [1, 3, FEW_QUERIES])
@pytest.mark.parametrize("radius", [-100.0, 0.0, 5.0, 100.0])
def test_a_split_range_search_is_one_faiss_scan_to_the_bit(split, kernel, nq: int, radius: float) -> None:
    scan = scan_of(2500, seed=nq)
    queries = np.random.default_rng(9).standard_normal((nq, D)).astype(np.float32)
    lims, scores, ids = scan.range_search(queries, radius)
    want_lims, want_scores, want_ids = faiss_flat(scan.fids, scan.vectors).range_search(queries, radius)
    assert split and np.array_equal(lims, want_lims)
    for j in range(nq):  # a query's results in row order, as the one scan gives them
        a, b = lims[j], lims[j + 1]
        assert np.array_equal(ids[a:b], want_ids[a:b]) and np.array_equal(scores[a:b], want_scores[a:b])


def test_tied_scores_come_back_each_with_its_own_score_however_the_rows_split(split) -> None:
    """Small-integer vectors tie often, and score exactly. Which of the items tied at the k-th score come back is
    not specified (FAISS's heap picks among them, and each slice's heap sees other rows than one scan's), so: the
    same scores as one scan, distinct items, each scoring what it is listed with, and above the k-th score the
    same items."""
    rng = np.random.default_rng(7)
    vectors = rng.integers(-1, 2, size=(1000, D)).astype(np.float32)
    scan, queries = FlatScan(np.arange(1000, dtype=np.int64) * 3 + 5, vectors), vectors[:3] + 0
    exact = vectors @ queries.T
    for k in (10, 150):
        (scores, ids), (want_scores, want_ids) = (
            scan.search(queries, k),
            faiss_flat(scan.fids, vectors).search(queries, k),
        )
        assert np.array_equal(scores, want_scores)
        for j in range(len(queries)):
            rows, above = (ids[j] - 5) // 3, scores[j] > scores[j, -1]
            assert len(set(rows)) == k and np.array_equal(exact[rows, j], scores[j])
            assert set(ids[j][above]) == set(want_ids[j][above])
    assert split


def test_a_slice_that_fails_fails_the_search(split) -> None:
    scan, query = scan_of(250), np.ones((1, D), np.float32)

    def fails_on_a_pool_thread(rows: np.ndarray) -> tuple[np.ndarray, ...]:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("a slice failed")
        return faiss.knn(query, rows, 1, metric=faiss.METRIC_INNER_PRODUCT)

    with pytest.raises(RuntimeError, match="a slice failed"):
        scan._each_slice(query, fails_on_a_pool_thread)


def test_queries_of_any_float_layout_are_read_as_float32_rows(split) -> None:
    scan = scan_of(250)
    queries = np.random.default_rng(3).standard_normal((2, D))  # float64
    want = scan.search(queries.astype(np.float32), 5)
    for q in (queries, np.asfortranarray(queries)):
        assert all(np.array_equal(g, w) for g, w in zip(scan.search(q, 5), want, strict=True))


def test_a_batch_and_a_small_scan_are_one_call_on_this_thread(split) -> None:
    queries = np.random.default_rng(2).standard_normal((FEW_QUERIES + 1, D)).astype(np.float32)
    scan = scan_of(250)
    assert np.array_equal(scan.search(queries, 5)[1], faiss_flat(scan.fids, scan.vectors).search(queries, 5)[1])
    assert len(scan_of(99).range_search(queries[:1], 0.0)[0]) == 2  # 99 rows: under two slices' worth
    assert not split, "no slice went to another thread"


def test_a_scan_beside_another_threads_search_is_one_call_on_this_thread(split) -> None:
    """Another thread in a search (a server's concurrent request) has the other cores: no split, the same answer.
    This thread's own nested searches (a server's request, then Index.search_vectors) count once."""
    scan, query, searches = scan_of(250), np.ones((1, D), np.float32), scan_module.SEARCHES
    with searches, searches:  # this thread alone, twice in: it splits
        want = scan.search(query, 5)
    assert split and searches.threads == 0
    entered, leave = threading.Event(), threading.Event()

    def other_search() -> None:
        with searches:
            entered.set()
            leave.wait(10)

    other = threading.Thread(target=other_search)
    other.start()
    try:
        assert entered.wait(10)
        split.clear()
        with searches:
            got = scan.search(query, 5)
        assert not split, "no slice went to another thread"
    finally:
        leave.set()
        other.join(10)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and searches.threads == 0


def test_a_search_that_fails_is_counted_out() -> None:
    with pytest.raises(ValueError, match="queries"), scan_module.SEARCHES:
        scan_of(10).search(np.ones((1, D + 1), np.float32), 1)
    assert scan_module.SEARCHES.threads == 0


def test_the_threads_run_faiss_on_one_openmp_thread_each() -> None:
    assert scan_module.scan_pool().submit(faiss.omp_get_max_threads).result(timeout=10) == 1


def test_slices_take_the_free_cores_or_retrieval_threads_count(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    class TwoFree:  # other processes leave two cores
        def count(self) -> int:
            asked.append(1)
            return 2

    monkeypatch.setattr(scan_module, "_free_cores", TwoFree())
    big, small = 2 * scan_module.SLICE_FLOATS, 2 * scan_module.SLICE_FLOATS - 1
    monkeypatch.setenv("RETRIEVAL_THREADS", "auto")
    assert scan_module.slice_threads(big) == 2 and len(asked) == 1
    assert scan_module.slice_threads(small) == 1 and len(asked) == 1  # one slice's worth: not asked
    monkeypatch.setenv("RETRIEVAL_THREADS", "3")
    assert scan_module.slice_threads(big) == 3 and scan_module.slice_threads(small) == 1
    monkeypatch.setenv("RETRIEVAL_THREADS", "off")
    assert scan_module.slice_threads(big) == 1 and len(asked) == 1


def in_forked_child(target: Callable[[multiprocessing.Queue], None]) -> Any:
    """What target(queue) puts on the queue, run in a forked child that must finish within 30 s."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=target, args=(queue,))
    child.start()
    child.join(30)
    assert child.exitcode == 0, "the child finished"
    return queue.get(timeout=5)


def test_a_forked_child_counts_free_cores_anew() -> None:
    """Its CPU time starts at 0: a window begun in the parent would count the parent's time as another process's."""
    scan_module._free_cores.count()  # the parent has a sample
    fresh = in_forked_child(report_free_cores)
    assert fresh and scan_module._free_cores._last is not None


def report_free_cores(queue: multiprocessing.Queue) -> None:
    queue.put(scan_module._free_cores._last is None)


def test_an_empty_scan_finds_nothing(split) -> None:
    empty = FlatScan(np.zeros(0, np.int64), np.zeros((0, D), np.float32))
    query = np.ones((1, D), np.float32)
    assert list(empty.search(query, 1)[1][0]) == [-1]
    assert [len(a) for a in empty.range_search(query, -1.0)] == [2, 0, 0]


def test_a_scan_refuses_other_widths_filters_and_matrices() -> None:
    scan = scan_of(10)
    with pytest.raises(ValueError, match="queries"):
        scan.search(np.ones((1, D + 1), np.float32), 1)
    with pytest.raises(ValueError, match="filter"):
        scan.range_search(np.ones((1, D), np.float32), 0.0, params=object())
    with pytest.raises(ValueError, match="C-contiguous float32"):
        FlatScan(np.arange(10), np.ones((D, 10), np.float32).T)
    with pytest.raises(ValueError, match="ids"):
        FlatScan(np.arange(9), np.ones((10, D), np.float32))


def split_search_in_child(queue: multiprocessing.Queue) -> None:
    scan_module.SLICE_FLOATS, scan_module.slice_threads = SPLIT_FLOATS, lambda floats: 4
    scan = scan_of(250)
    queue.put(scan.search(np.ones((1, D), np.float32), 3)[1].tolist())


def test_a_forked_child_splits_with_threads_of_its_own(split) -> None:
    """The parent's pool has live threads; a forked child has none of them, so it must make its own pool (with the
    parent's pool object it would wait forever for a thread that is not there)."""
    scan = scan_of(250)
    want = scan.search(np.ones((1, D), np.float32), 3)[1].tolist()  # the parent's pool now has threads
    assert in_forked_child(split_search_in_child) == want


# --- ListScan: flat16's fp16 scan, split by lists --------------------------------------------------------------
def fp16_scan(n: int, seed: int = 0) -> ListScan:
    """n random rows as flat16 stores them (FLAT16_LISTS lists of fp16 codes), with ids that are not rows."""
    vectors = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return ListScan(build_faiss(vectors, np.arange(n, dtype=np.int64) * 3 + 5, "flat16", {}))


@pytest.mark.parametrize("nq", [1, 3, FEW_QUERIES])
@pytest.mark.parametrize("k", [1, 10, 700, 2600])  # 700 and 2600: more than a group of lists holds, than all do
def test_a_split_fp16_top_k_is_one_faiss_call_to_the_bit(split, nq: int, k: int) -> None:
    scan = fp16_scan(2500, seed=nq)  # 4 groups of 4 lists
    queries = np.random.default_rng(9).standard_normal((nq, D)).astype(np.float32)
    (scores, ids), (want_scores, want_ids) = scan.search(queries, k), scan.index.search(queries, k)
    assert len(split) == 3, "three groups of lists went to the pool"
    assert scores.dtype == want_scores.dtype and np.array_equal(scores, want_scores)
    for j in range(nq):  # equal scores may come in another order (FAISS's heap's against ascending ids)
        above = scores[j] > scores[j, -1]
        got_pairs = sorted(zip(scores[j][above], ids[j][above], strict=True))
        assert got_pairs == sorted(zip(want_scores[j][above], want_ids[j][above], strict=True))
        assert len(set(ids[j][ids[j] >= 0])) == np.sum(want_ids[j] >= 0)


@pytest.mark.parametrize("nq", [1, 3, FEW_QUERIES])
@pytest.mark.parametrize("radius", [-100.0, 0.0, 5.0, 100.0])
def test_a_split_fp16_range_search_is_one_faiss_call_to_the_bit(split, nq: int, radius: float) -> None:
    scan = fp16_scan(2500, seed=nq)
    queries = np.random.default_rng(9).standard_normal((nq, D)).astype(np.float32)
    (lims, scores, ids), (want_lims, want_scores, want_ids) = (
        scan.range_search(queries, radius),
        scan.index.range_search(queries, radius),
    )
    assert split and np.array_equal(lims, want_lims)
    for j in range(nq):  # each query's results in an order of FAISS's own (flat16's re-rank sorts them)
        got, want = slice(lims[j], lims[j + 1]), slice(want_lims[j], want_lims[j + 1])
        by_id, want_by_id = np.argsort(ids[got]), np.argsort(want_ids[want])
        assert np.array_equal(ids[got][by_id], want_ids[want][want_by_id])
        assert np.array_equal(scores[got][by_id], want_scores[want][want_by_id])


def test_a_split_fp16_scan_keeps_the_item_filter(split) -> None:
    scan = fp16_scan(2500)
    queries = np.random.default_rng(9).standard_normal((2, D)).astype(np.float32)
    having = np.arange(2500, dtype=np.int64)[::3] * 3 + 5  # every third item
    params = search_parameters(scan.index, faiss.IDSelectorBatch(having))
    scores, ids = scan.search(queries, 50, params)
    want_scores, want_ids = scan.index.search(queries, 50, params=params)
    assert np.array_equal(scores, want_scores) and np.array_equal(np.sort(ids), np.sort(want_ids))
    lims, scores, ids = scan.range_search(queries, 1.0, params)
    want_lims, want_scores, want_ids = scan.index.range_search(queries, 1.0, params=params)
    assert np.array_equal(lims, want_lims) and lims[-1] > 100
    assert sorted(zip(ids, scores, strict=True)) == sorted(zip(want_ids, want_scores, strict=True))
    assert np.isin(ids, having).all() and split


def test_a_batch_a_small_scan_and_one_list_are_one_fp16_call(split) -> None:
    queries = np.random.default_rng(2).standard_normal((FEW_QUERIES + 1, D)).astype(np.float32)
    scan = fp16_scan(2500)
    assert np.array_equal(scan.search(queries, 5)[1], scan.index.search(queries, 5)[1])
    assert len(fp16_scan(99).range_search(queries[:1], 0.0)[0]) == 2  # 99 rows: under two groups' worth
    vectors = np.random.default_rng(0).standard_normal((2500, D)).astype(np.float32)
    for factory in ("IVF1,SQfp16", "IDMap2,IVF1,SQfp16"):  # one list; and flat16's files before it had 16
        one_list = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
        one_list.train(vectors)
        one_list.add(vectors) if factory.startswith("IVF") else one_list.add_with_ids(vectors, np.arange(2500) + 5)
        want = one_list.search(queries[:1], 3)
        assert all(np.array_equal(g, w) for g, w in zip(ListScan(one_list).search(queries[:1], 3), want, strict=True))
    assert not split, "no group of lists went to another thread"
    assert scan.index.nlist == FLAT16_LISTS


def test_a_split_fp16_scan_refuses_queries_of_another_width(split) -> None:
    scan = fp16_scan(2500)
    for call in (lambda q: scan.search(q, 3), lambda q: scan.range_search(q, 0.0)):
        with pytest.raises(ValueError, match="queries"):  # FAISS would read past the rows of a narrower query
            call(np.ones((1, D - 2), np.float32))
