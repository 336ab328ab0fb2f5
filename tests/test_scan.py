"""FlatScan (retrieval/index/scan.py): a call of a few queries splits its rows between threads, and answers as
one FAISS scan of all the rows does: the same scores to the bit, the same items, equal scores in row order."""

from __future__ import annotations

import multiprocessing
import threading

import faiss
import numpy as np
import pytest

from retrieval.index import scan as scan_module
from retrieval.index.scan import FEW_QUERIES, MAX_SLICES, SLICE_FLOATS, FlatScan, split_rows

D = 16


@pytest.fixture
def split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices of 50 rows of D floats on up to 4 threads, so a small scan splits as a large one does."""
    monkeypatch.setattr(scan_module, "SLICE_FLOATS", 50 * D)
    monkeypatch.setattr(scan_module, "slice_threads", lambda: 4)


def scan_of(n: int, seed: int = 0, duplicates: bool = False) -> FlatScan:
    """n random rows (with duplicates: the first 40 rows again at the end, so equal scores straddle slices), with
    ids that are not rows."""
    vectors = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    if duplicates:
        vectors = np.concatenate([vectors, vectors[:40]])
    return FlatScan(np.arange(len(vectors), dtype=np.int64) * 3 + 5, vectors)


def faiss_flat(scan: FlatScan) -> faiss.Index:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(D))
    index.add_with_ids(scan.vectors, scan.fids)
    return index


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
@pytest.mark.parametrize("k", [1, 10, 60, 260])  # 60 and 260: more than a slice holds, more than the scan holds
def test_a_split_top_k_is_one_faiss_scan_to_the_bit(split, nq: int, k: int) -> None:
    scan = scan_of(250, seed=nq)
    queries = np.random.default_rng(9).standard_normal((nq, D)).astype(np.float32)
    assert len(split_rows(250, D, 4)) == 5, "four slices"
    got, want = scan.search(queries, k), faiss_flat(scan).search(queries, k)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and np.array_equal(g, w)


@pytest.mark.parametrize("nq", [1, 3, FEW_QUERIES])
@pytest.mark.parametrize("radius", [-10.0, 0.0, 2.5, 100.0])
def test_a_split_range_search_is_one_faiss_scan_to_the_bit(split, nq: int, radius: float) -> None:
    scan = scan_of(250, seed=nq)
    queries = np.random.default_rng(9).standard_normal((nq, D)).astype(np.float32)
    lims, scores, ids = scan.range_search(queries, radius)
    want_lims, want_scores, want_ids = faiss_flat(scan).range_search(queries, radius)
    assert np.array_equal(lims, want_lims)
    for j in range(nq):  # a query's results in row order, as the one scan gives them
        a, b = lims[j], lims[j + 1]
        assert np.array_equal(ids[a:b], want_ids[a:b]) and np.array_equal(scores[a:b], want_scores[a:b])


def test_equal_scores_across_slices_answer_as_one_scan(split) -> None:
    """Equal scores everywhere: one scan keeps the earliest rows, and so does the split, in row order (FAISS's own
    order of them is not). Rows 250-289 repeat rows 0-39, in another slice: the earlier of a pair comes first."""
    same = FlatScan(np.arange(250, dtype=np.int64) + 7, np.ones((250, D), np.float32))
    query = np.ones((1, D), np.float32)
    for k in (5, 20, 100, 240):
        (scores, ids), want = same.search(query, k), faiss_flat(same).search(query, k)
        assert np.array_equal(scores, want[0]) and list(ids[0]) == sorted(want[1][0]) == list(range(7, 7 + k))
    pairs = scan_of(250, duplicates=True)
    scores, ids = pairs.search(pairs.vectors[:1] * 2, 2)
    assert scores[0, 0] == scores[0, 1] and list(ids[0]) == [pairs.fids[0], pairs.fids[250]]


def test_a_batch_and_a_small_scan_are_one_call_on_this_thread(split, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan_module, "scan_pool", lambda: pytest.fail("no slice goes to another thread"))
    queries = np.random.default_rng(2).standard_normal((FEW_QUERIES + 1, D)).astype(np.float32)
    scan = scan_of(250)
    assert np.array_equal(scan.search(queries, 5)[1], faiss_flat(scan).search(queries, 5)[1])
    assert len(scan_of(99).range_search(queries[:1], 0.0)[0]) == 2  # 99 rows: under two slices' worth


def test_a_scan_beside_another_threads_search_is_one_call_on_this_thread(split, monkeypatch) -> None:
    """Another thread in a search (a server's concurrent request) has the other cores: no split, the same answer.
    This thread's own nested searches (a server's request, then Index.search_vectors) count once."""
    scan, query, searches = scan_of(250), np.ones((1, D), np.float32), scan_module.SEARCHES
    calls, pool = [], scan_module.scan_pool
    monkeypatch.setattr(scan_module, "scan_pool", lambda: calls.append(1) or pool())
    with searches, searches:  # this thread alone, twice in: it splits
        want = scan.search(query, 5)
    assert calls and searches.threads == 0
    entered, leave = threading.Event(), threading.Event()

    def other_search() -> None:
        with searches:
            entered.set()
            leave.wait(10)

    other = threading.Thread(target=other_search)
    other.start()
    try:
        assert entered.wait(10)
        calls.clear()
        with searches:
            got = scan.search(query, 5)
        assert not calls, "no slice goes to another thread"
    finally:
        leave.set()
        other.join(10)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and searches.threads == 0


def test_the_threads_run_faiss_on_one_openmp_thread_each() -> None:
    assert scan_module.scan_pool().submit(faiss.omp_get_max_threads).result(timeout=10) == 1


def test_retrieval_threads_caps_the_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRIEVAL_THREADS", "1")
    assert scan_module.slice_threads() == 1
    monkeypatch.setenv("RETRIEVAL_THREADS", "3")
    assert scan_module.slice_threads() == 3
    monkeypatch.setenv("RETRIEVAL_THREADS", "off")
    assert scan_module.slice_threads() == 1


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
    scan_module.SLICE_FLOATS, scan_module.slice_threads = 50 * D, lambda: 4
    scan = scan_of(250)
    queue.put(scan.search(np.ones((1, D), np.float32), 3)[1].tolist())


def test_a_forked_child_splits_with_threads_of_its_own(split) -> None:
    """The parent's pool has live threads; a forked child has none of them, so it must make its own pool (with the
    parent's pool object it would wait forever for a thread that is not there)."""
    scan = scan_of(250)
    want = scan.search(np.ones((1, D), np.float32), 3)[1].tolist()  # the parent's pool now has threads
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=split_search_in_child, args=(queue,))
    child.start()
    child.join(30)
    assert child.exitcode == 0, "the child's split search finished"
    assert queue.get(timeout=5) == want
