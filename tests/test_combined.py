"""Combined vectors: an exact scan of w x1 + (1 - w) x2 answers a weighted search as the fused scan does.

Dyadic components (multiples of 1/8) make every score exact in any order of summation, so there the combined
and the fused scans must agree to the bit, items at exactly θ included; on real-valued vectors, to float rounding.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import faiss_flat, store_of

from retrieval.index import combined
from retrieval.index.combined import Combined, combine, combined_scan
from retrieval.index.format import Item
from retrieval.index.handle import Index
from retrieval.index.scan import FlatScan
from retrieval.index.search import query_vectors, ranked, target_column, target_weight
from retrieval.index.store import IndexStore

D = 8


def index_of(path: Path, images: np.ndarray, texts: np.ndarray, index_type: str = "flat", parts: str = "") -> Index:
    return Index(store_of(path, index_type, images, texts, parts), Path("no-model"))


@pytest.fixture(scope="module")
def dyadic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Index, np.ndarray]:
    """60 items of small dyadic vectors, many of them tied, some missing a part; 5 dyadic queries."""
    rng = np.random.default_rng(0)
    images, texts = (rng.integers(-2, 3, size=(60, D)) / 8 for _ in range(2))
    parts = "it" * 5  # items 0-9 alternate image only and caption only
    index = index_of(
        tmp_path_factory.mktemp("dyadic"), images.astype(np.float32), texts.astype(np.float32), parts=parts
    )
    return index, (rng.integers(-2, 3, size=(5, D)) / 8).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def answers(results: list[list]) -> list[list[tuple[str, float]]]:
    """(id, score) of each hit, per query."""
    return [[(h.id, h.score) for h in hits] for hits in results]


def fused_answer(index: Index, queries: np.ndarray, target: str, w: float, k, theta) -> list[list[tuple[str, float]]]:
    """The answer of FAISS's own flat index of the fused (n, 2d) vectors (with an item filter where some items lack
    the target's part), through the same `ranked` and records as a search."""
    fused = faiss_flat(*index.store.vectors)
    column = target_column(target)
    having = None if column is None else index.store.fids_having(column)
    params = None if having is None else faiss.SearchParameters(sel=faiss.IDSelectorBatch(having))  # type: ignore[call-arg]
    results = ranked(fused, query_vectors(queries, target, w), k, theta, params)
    return answers(index.hits_for(queries, results))


def test_combine_gives_each_part_bit_for_bit_and_the_mean_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(combined, "CHUNK_ROWS", 3)  # 10 rows: four chunks, the last one short
    vectors = np.random.default_rng(1).standard_normal((10, 2 * D)).astype(np.float32)
    assert np.array_equal(combine(vectors, 1.0), vectors[:, :D])
    assert np.array_equal(combine(vectors, 0.0), vectors[:, D:])
    assert np.array_equal(combine(vectors, 0.5), np.float32(0.5) * vectors[:, :D] + np.float32(0.5) * vectors[:, D:])
    fids = np.arange(10, dtype=np.int64) * 7 + 1
    scan = combined_scan(vectors, fids, 0.5)  # combined a chunk at a time, with each row's id
    assert np.array_equal(scan.vectors, combine(vectors, 0.5)) and np.array_equal(scan.fids, fids)
    rows = np.array([0, 2, 3, 7, 9])  # some rows only: two chunks of them
    some = combined_scan(vectors, fids, 1.0, rows)
    assert np.array_equal(some.fids, fids[rows]) and np.array_equal(some.vectors, vectors[rows, :D])


@pytest.mark.parametrize(("target", "weight"), [("item", 0.5), ("image", 0.5), ("text", 0.5), ("item", 1.0)])
@pytest.mark.parametrize(("k", "theta"), [(7, None), (None, 1 / 32), (5, 0.0)])
def test_combined_scan_answers_as_the_fused_scan_to_the_bit(dyadic, target: str, weight: float, k, theta) -> None:
    index, queries = dyadic
    w = target_weight(target, weight)
    assert isinstance(index.store.searcher(target_column(target), weight=w)[0], Combined)
    got = answers(index.search_vectors(queries, k, theta, weight, target))
    assert got == fused_answer(index, queries, target, w, k, theta)
    assert any(got), "the cases must find something"


@pytest.mark.parametrize("target", ["image", "text"])
def test_a_part_target_scans_only_the_items_with_that_part_and_a_batch_answers_as_one_query(dyadic, target) -> None:
    """Items 0-9 each miss a part. The combined scan for a part holds only the items that have it, so it asks
    FAISS with no filter, and a batch of queries (BLAS, from 3 of them) answers as each query alone."""
    index, queries = dyadic
    column = target_column(target)
    searcher, params = index.store.searcher(column, weight=target_weight(target, 0.5))
    assert isinstance(searcher, Combined) and params is None
    held = searcher.fids
    assert sorted(held) == sorted(index.store.fids_having(column)) and len(held) == 55
    many = np.concatenate([queries] * 4)
    for k, theta in [(5, None), (None, 1 / 32), (5, 0.0)]:
        batch = index.search_vectors(many, k, theta, target=target)
        alone = [index.search_vectors(q[None], k, theta, target=target)[0] for q in many]
        assert answers(batch) == answers(alone)
        assert answers(batch) == fused_answer(index, many, target, target_weight(target, 0.5), k, theta)


def test_part_targets_after_removals_and_beside_whole_items_of_the_same_weight(tmp_path: Path) -> None:
    """Removals leave gaps in the FAISS ids, so a row is not its id: the part scan must still hold the right items.
    A whole-item search at w = 1 (caption-only items answer with their caption) and an image search (they are left
    out) share a weight, not a scan."""
    from retrieval.index.build import remove_items

    rng = np.random.default_rng(5)
    images, texts, queries = (rng.integers(-2, 3, size=(n, D)).astype(np.float32) / 8 for n in (40, 40, 6))
    store_of(tmp_path / "gaps", "flat", images, texts, parts="ti" * 6)
    remove_items(tmp_path / "gaps", [f"item{j}" for j in range(0, 40, 3)])
    index = Index(IndexStore.open(tmp_path / "gaps"), Path("no-model"))
    for target, k, theta, no_part in [("image", 40, None, "t"), ("text", None, -1.0, "i")]:
        got = answers(index.search_vectors(queries, k, theta, target=target))
        assert got == fused_answer(index, queries, target, target_weight(target, 0.5), k, theta)
        kept = [f"item{j}" for j in range(40) if j % 3 and (j >= 12 or "ti"[j % 2] != no_part)]
        assert sorted(i for i, _ in got[0]) == sorted(kept), "every item with the part, and none other"
    whole = index.search_vectors(queries, 40, weight=1.0)
    assert any(h.id == "item2" and not h.has_image for h in whole[0]), (
        "a caption alone still answers a whole-item search"
    )
    assert len(index.store._combined) == 3


def test_a_part_scan_follows_the_database_when_a_new_searcher_asks(dyadic, monkeypatch: pytest.MonkeyPatch) -> None:
    """The items with a part are read again for every new searcher (after `tune`, say): a scan built for other
    items is built anew, so it never answers with an item the database no longer has that part for."""
    index, _ = dyadic
    store = IndexStore.open(index.store.path)
    searcher = store.searcher("image_key", weight=1.0)[0]
    assert isinstance(searcher, Combined) and searcher.ntotal == 55
    fewer = store.fids_having("image_key")[5:]
    monkeypatch.setattr(store, "fids_having", lambda column: fewer)
    assert store.searcher("image_key", weight=1.0)[0] is searcher, "kept while the searcher is"
    store.tune({})
    again = store.searcher("image_key", weight=1.0)[0]
    assert isinstance(again, Combined) and sorted(again.fids) == sorted(fewer)


def test_no_item_with_the_part_answers_nothing(tmp_path: Path) -> None:
    images = unit(np.random.default_rng(6).standard_normal((5, D)))
    index = index_of(tmp_path / "captions", images, images, parts="ttttt")
    assert index.search_vectors(images[:4], 3, target="image") == [[]] * 4
    assert index.search_vectors(images[:1], None, -1.0, target="image") == [[]]
    assert len(index.search_vectors(images[:1], 3, target="text")[0]) == 3


@pytest.mark.parametrize("kwargs", [{"weight": 0.25}, {"fusion": "max"}, {"fusion": "min"}])
def test_other_weights_and_fusion_rules_scan_the_fused_vectors(dyadic, kwargs: dict) -> None:
    """max and min ask with part queries [q, 0] and [0, q], which only the fused vectors answer: a scan of the
    memory-mapped ones, without loading FAISS's flat copy of them."""
    index, queries = dyadic
    store = IndexStore.open(index.store.path)
    got = Index(store, Path("no-model")).search_vectors(queries, 5, **kwargs)
    assert store._combined == {} and store._faiss is None
    fused = store.searcher(None)[0]
    assert type(fused) is FlatScan and np.shares_memory(fused.vectors, store.vectors[1])
    if "weight" in kwargs:
        assert [[h.id for h in hits] for hits in got] == [
            [i for i, _ in hits] for hits in fused_answer(index, queries, "item", 0.25, 5, None)
        ]


def test_real_valued_vectors_agree_to_rounding_and_exact_on_hnsw_scans_combined(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images, texts, queries = (unit(rng.standard_normal((n, D))) for n in (300, 300, 6))
    flat = index_of(tmp_path / "flat", images, texts)
    hnsw = index_of(tmp_path / "hnsw", images, texts, "hnsw")
    assert isinstance(hnsw.store.searcher(None, exact=True, weight=0.5)[0], Combined)
    assert isinstance(hnsw.store.searcher(None, weight=0.5)[0], faiss.Index)  # HNSW answers from its graph
    want = fused_answer(flat, queries, "item", 0.5, 10, None)
    for index in (flat, hnsw):
        got = answers(index.search_vectors(queries, 10, exact=index is hnsw))
        assert [[i for i, _ in hits] for hits in got] == [[i for i, _ in hits] for hits in want]
        np.testing.assert_allclose([[s for _, s in h] for h in got], [[s for _, s in h] for h in want], atol=1e-6)


def test_queries_in_float64_or_fortran_order_answer_as_float32_rows(dyadic) -> None:
    """The scans read C-contiguous float32, as FAISS's own wrappers convert any float array to (dyadic: exact)."""
    index, queries = dyadic
    for k, theta in [(5, None), (None, 1 / 32)]:
        want = answers(index.search_vectors(queries, k, theta))
        assert answers(index.search_vectors(queries.astype(np.float64), k, theta)) == want
        assert answers(index.search_vectors(np.asfortranarray(queries), k, theta)) == want


def test_exact_on_hnsw_at_another_weight_scans_the_mapped_vectors_without_a_copy(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    images, texts, queries = (unit(rng.standard_normal((n, D))) for n in (300, 300, 6))
    hnsw = index_of(tmp_path / "hnsw", images, texts, "hnsw")
    got = answers(hnsw.search_vectors(queries, 10, weight=0.25, exact=True))
    assert got == fused_answer(hnsw, queries, "item", 0.25, 10, None)  # FAISS's own flat scan, to the bit
    scan = hnsw.store.searcher(None, exact=True)[0]
    assert type(scan) is FlatScan and np.shares_memory(scan.vectors, hnsw.store.vectors[1])
    assert hnsw.store._exact is None, "no flat copy of the vectors in memory"


def test_the_combined_vectors_are_built_once_and_not_the_fused_index(dyadic) -> None:
    index, queries = dyadic
    store = IndexStore.open(index.store.path)
    Index(store, Path("no-model")).search_vectors(queries, 3)
    assert store._faiss is None, "a weighted search on a flat index reads no fused FAISS index"
    built = store._combined[0.5, None]
    Index(store, Path("no-model")).search_vectors(queries, 3, target="item", fusion="mean")
    assert store._combined[0.5, None] is built and set(store._combined) == {(0.5, None)}


def test_a_new_generation_drops_the_combined_vectors(tmp_path: Path) -> None:
    images = unit(np.random.default_rng(4).standard_normal((20, D)))
    store = store_of(tmp_path / "index", "flat", images, images)
    new = unit(np.ones((1, D)))[0]
    with IndexStore.open_writer(store.path, lambda: store.manifest).writer() as writer:
        assert isinstance(writer.searcher(None, weight=0.5)[0], Combined) and writer._combined
        writer.commit([Item(0, "new", None, ["new"], "inew", "tnew")], {"inew": new, "tnew": new})
        writer.rebuild()
        assert writer._combined == {}, "publishing a generation forgets the vectors combined from the last one"
        assert [h.id for h in Index(writer, Path("no-model")).search_vector(new, k=1)] == ["new"]


def test_beyond_max_memory_the_fused_vectors_answer(dyadic) -> None:
    """The whole items' combined matrix here is 60 x 8 x 4 = 1,920 B and the images' 55 x 8 x 4 = 1,760 B (five
    items have no image), so they fit in 5,000 B together, and the captions' 1,760 B more do not; the fused
    index's file (4,410 B) does."""
    index, queries = dyadic
    store = IndexStore.open(index.store.path, max_memory=5_000)
    assert isinstance(store.searcher(None, weight=0.5)[0], Combined)
    assert isinstance(store.searcher("image_key", weight=1.0)[0], Combined)
    assert isinstance(store.searcher("text_key", weight=0.0)[0], faiss.Index)
    got = Index(store, Path("no-model")).search_vectors(queries, 5, target="text")
    want = fused_answer(index, queries, "text", 0.0, 5, None)
    assert answers(got) == want


def test_threads_that_first_ask_for_a_weight_at_once_share_one_matrix(dyadic) -> None:
    index, _ = dyadic
    store = IndexStore.open(index.store.path)
    start = threading.Barrier(4)

    def ask(_: int) -> object:
        start.wait()
        return store.searcher(None, weight=0.5)[0]

    with ThreadPoolExecutor(4) as pool:
        searchers = list(pool.map(ask, range(4)))
    assert len({id(s) for s in searchers}) == 1 and len(store._combined) == 1
