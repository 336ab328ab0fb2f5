"""Combined vectors: an exact scan of w x1 + (1 - w) x2 answers a weighted search as the fused scan does.

Dyadic components (multiples of 1/8) make every score exact in any order of summation, so there the combined
and the fused scans must agree to the bit, items at exactly θ included; on real-valued vectors, to float rounding.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import store_of

from retrieval.index import combined
from retrieval.index.combined import COMBINED_WEIGHTS, Combined, combine
from retrieval.index.handle import Index
from retrieval.index.search import query_vectors, ranked
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


def fused_answer(index: Index, queries: np.ndarray, target: str, w: float, k, theta) -> list[list[tuple[str, float]]]:
    """The fused (n, 2d) scan's answer, through the same `ranked` and records as a search."""
    column = {"image": "image_key", "text": "text_key"}.get(target)
    fused, params = index.store.searcher(column)  # no weight: the fused FAISS index
    assert isinstance(fused, faiss.Index)
    results = ranked(fused, query_vectors(queries, target, w), k, theta, params)
    return [[(h.id, h.score) for h in hits] for hits in index.hits_for(queries, results)]


def test_combine_gives_each_part_bit_for_bit_and_the_mean_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(combined, "CHUNK_ROWS", 3)  # 10 rows: four chunks, the last one short
    vectors = np.random.default_rng(1).standard_normal((10, 2 * D)).astype(np.float32)
    assert np.array_equal(combine(vectors, 1.0), vectors[:, :D])
    assert np.array_equal(combine(vectors, 0.0), vectors[:, D:])
    assert np.array_equal(combine(vectors, 0.5), np.float32(0.5) * vectors[:, :D] + np.float32(0.5) * vectors[:, D:])


@pytest.mark.parametrize("weight", COMBINED_WEIGHTS)
def test_the_fused_query_gives_q_back_exactly(weight: float) -> None:
    q = np.random.default_rng(2).standard_normal((4, D)).astype(np.float32)
    assert np.array_equal(Combined.query(query_vectors(q, "item", weight)), q)


@pytest.mark.parametrize(("target", "weight"), [("item", 0.5), ("image", 0.5), ("text", 0.5), ("item", 1.0)])
@pytest.mark.parametrize(("k", "theta"), [(7, None), (None, 1 / 32), (5, 0.0)])
def test_combined_scan_answers_as_the_fused_scan_to_the_bit(dyadic, target: str, weight: float, k, theta) -> None:
    index, queries = dyadic
    searcher, _ = index.store.searcher({"image": "image_key", "text": "text_key"}.get(target), weight=weight)
    assert isinstance(searcher, Combined)
    w = {"image": 1.0, "text": 0.0}.get(target, weight)
    got = [[(h.id, h.score) for h in hits] for hits in index.search_vectors(queries, k, theta, weight, target)]
    assert got == fused_answer(index, queries, target, w, k, theta)
    assert any(got), "the cases must find something"


def test_other_weights_and_fusion_rules_scan_the_fused_vectors(dyadic) -> None:
    index, queries = dyadic
    assert isinstance(index.store.searcher(None, weight=0.25)[0], faiss.Index)
    assert isinstance(index.store.searcher(None)[0], faiss.Index)  # max and min ask with part queries
    assert [[h.id for h in hits] for hits in index.search_vectors(queries, 5, weight=0.25)] == [
        [i for i, _ in hits] for hits in fused_answer(index, queries, "item", 0.25, 5, None)
    ]


def test_real_valued_vectors_agree_to_rounding_and_exact_on_hnsw_scans_combined(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    images, texts = (rng.standard_normal((300, D)).astype(np.float32) for _ in range(2))
    queries = rng.standard_normal((6, D)).astype(np.float32)
    flat = index_of(tmp_path / "flat", images, texts)
    hnsw = index_of(tmp_path / "hnsw", images, texts, "hnsw")
    assert isinstance(hnsw.store.searcher(None, exact=True, weight=0.5)[0], Combined)
    assert isinstance(hnsw.store.searcher(None, weight=0.5)[0], faiss.Index)  # HNSW answers from its graph
    want = fused_answer(flat, queries, "item", 0.5, 10, None)
    for index in (flat, hnsw):
        got = [[(h.id, h.score) for h in hits] for hits in index.search_vectors(queries, 10, exact=index is hnsw)]
        assert [[i for i, _ in hits] for hits in got] == [[i for i, _ in hits] for hits in want]
        np.testing.assert_allclose([[s for _, s in h] for h in got], [[s for _, s in h] for h in want], atol=1e-6)


def test_the_combined_vectors_are_built_once_and_not_the_fused_index(dyadic) -> None:
    index, queries = dyadic
    store = IndexStore.open(index.store.path)
    Index(store, Path("no-model")).search_vectors(queries, 3)
    assert store._faiss is None, "a weighted search on a flat index reads no fused FAISS index"
    built = store._combined[0.5]
    Index(store, Path("no-model")).search_vectors(queries, 3, target="item", fusion="mean")
    assert store._combined[0.5] is built and set(store._combined) == {0.5}
