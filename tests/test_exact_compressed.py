"""flat16: an fp16 scan re-ranked from the fp32 vectors answers top-k and θ as an fp32 flat scan does.

The error bound is checked on hand-worked numbers and on vectors where fp16 rounding is at its worst; the
boundary cases (items at exactly θ, ties, an item the scan cannot tell from its neighbours) use dyadic values,
whose fp32 scores are exact in any order of summation, so flat and flat16 must agree to the bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import same_ranking, store_of

from retrieval.atomic import save_npy
from retrieval.cli.main import main
from retrieval.index import rerank, search
from retrieval.index.faiss_ops import FLAT16_LISTS, inner_products_at
from retrieval.index.handle import Index
from retrieval.index.rerank import BATCH_FROM, CANDIDATES, Reranked, floor32, fp32_error_bound, score_error_bound
from retrieval.index.search import Hit, query_vectors, search_threads
from retrieval.index.store import IndexStore


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# --- the error bound ----------------------------------------------------------------------------------
def test_score_error_bound_on_hand_worked_numbers() -> None:
    """q = (3, 4): ‖q‖ = 5; N = 2; D = 2, so γ = 2u / (1 - 2u) = 1.1920930e-7 (u = 2^-24).
    (2^-11 + γ (2 + 2^-11)) · 2 · 5 = 4.8851973e-3, (1 + γ) · 2^-25 · √2 · 5 = 2.1073427e-7 (√2 · 5 >= ‖q‖₁ = 7);
    sum 4.8854080e-3, times 1.01 = 4.9342621e-3."""
    assert score_error_bound(np.array([[3.0, 4.0]], dtype=np.float32), 2.0) == pytest.approx([4.9342621e-3], rel=1e-7)
    assert score_error_bound(np.zeros((1, 2)), 2.0) == [0.0]  # a zero query scores 0 exactly either way


@pytest.mark.parametrize(
    "component",
    [
        1 + 2.0**-11 - 2.0**-23,  # fp16 rounds it down to 1: the largest relative error a normal value gets
        2.0**-25 * (1 - 2.0**-10),  # below fp16's smallest subnormal / 2: rounds to 0, an absolute error of ~2^-25
    ],
)
def test_the_bound_holds_and_is_nearly_reached(component: float) -> None:
    """Every component rounded the same way, against a query of ones: the scan's error adds up to almost ε."""
    dim = 64
    x = np.full((1, dim), component, dtype=np.float32)
    q = np.ones((1, dim), dtype=np.float32)
    scan = faiss.index_factory(dim, "SQfp16", faiss.METRIC_INNER_PRODUCT)
    scan.add(x)
    error = float(x[0] @ q[0]) - float(scan.search(q, 1)[0][0, 0])
    eps = score_error_bound(q, float(np.linalg.norm(x)))[0]
    assert 0.97 * eps <= error <= eps, (error, eps)


def test_fp32_error_bound_on_hand_worked_numbers_and_on_blas_scores() -> None:
    """ε32 = 2 γ N ‖q‖ · 1.01: for q = (3, 4), N = 2, D = 2, 2 · 1.1920930e-7 · 2 · 5 · 1.01 = 2.4080278e-6. Then
    FAISS's BLAS scores of 64 queries against 3,000 vectors of 512 dimensions, against the re-rank's per-pair ones:
    the last bits differ (so the re-rank is needed), by less than ε32."""
    assert fp32_error_bound(np.array([[3.0, 4.0]], np.float32), 2.0) == pytest.approx([2.4080278e-6])
    rng = np.random.default_rng(5)
    x, q = rng.standard_normal((3000, 512)).astype(np.float32), rng.standard_normal((64, 512)).astype(np.float32)
    scores, rows = faiss.knn(q, x, 50, metric=faiss.METRIC_INNER_PRODUCT)
    error = np.abs(scores - inner_products_at(q, x, rows))
    eps = fp32_error_bound(q, float(np.linalg.norm(x, axis=1).max()))
    assert error.max() > 0 and np.all(error <= eps[:, None])


def test_floor32_never_rounds_up() -> None:
    assert floor32(0.5) == 0.5  # representable: itself
    down = floor32(0.1)  # 0.1 is between two float32s: the lower one
    assert float(np.float32(down)) == down <= 0.1 < float(np.nextafter(np.float32(down), np.float32(1)))


# --- flat16 answers as flat does ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def clustered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Index, Index]:
    """1,500 items around 30 centres (every 5th image-only, every 7th caption-only), as flat and as flat16."""
    rng = np.random.default_rng(0)
    n, d = 1500, 32
    centres = rng.standard_normal((30, d))
    images = unit(centres[np.arange(n) % 30] + 0.6 * rng.standard_normal((n, d)))
    texts = unit(centres[np.arange(n) % 30] + 0.6 * rng.standard_normal((n, d)))
    parts = "".join("i" if j % 5 == 0 else "t" if j % 7 == 0 else "b" for j in range(n))
    root = tmp_path_factory.mktemp("clustered")
    flat, flat16 = (Index(store_of(root / kind, kind, images, texts, parts), root) for kind in ("flat", "flat16"))
    return flat, flat16


@pytest.mark.parametrize("target", ["item", "image", "text"])
@pytest.mark.parametrize(
    "k, theta, margin", [(10, None, None), (1, None, None), (None, 0.3, None), (50, 0.3, None), (None, None, 0.05)]
)
def test_flat16_answers_as_flat(clustered, target: str, k, theta, margin) -> None:
    flat, flat16 = clustered
    queries = unit(np.random.default_rng(1).standard_normal((12, 32)))
    want = flat.search_vectors(queries, k=k, theta=theta, target=target, margin=margin)
    got = flat16.search_vectors(queries, k=k, theta=theta, target=target, margin=margin)
    assert sum(map(len, want)) >= len(queries)
    for w, g in zip(want, got, strict=True):  # the same results; order up to ties within float rounding (flat may
        # sum with BLAS, the re-rank with SIMD: the last bits differ)
        assert tied_order(g) == tied_order(w)
        assert [h.score for h in g] == pytest.approx([h.score for h in w], abs=1e-6)


def tied_order(hits) -> list[str]:
    return [h.id for h in sorted(hits, key=lambda h: (-round(h.score, 5), h.id))]


def test_flat16_stores_half_and_searches_through_the_reranker(clustered) -> None:
    flat, flat16 = clustered
    store = flat16.store
    scan = store.faiss
    assert isinstance(scan, faiss.IndexIVFScalarQuantizer) and scan.nlist == FLAT16_LISTS
    assert scan.nprobe == FLAT16_LISTS and scan.parallel_mode == 0  # every list; a batch's threads take queries
    sizes = [scan.invlists.list_size(j) for j in range(scan.nlist)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1500  # dealt round-robin: even work per thread
    assert store.manifest.faiss_bytes < 0.6 * flat.store.manifest.faiss_bytes
    searchers = {store.searcher(column, exact)[0] for column in (None, "image_key") for exact in (False, True)}
    assert len(searchers) == 1 and isinstance(searchers.pop(), Reranked)  # one, its max norm found once
    q = unit(np.random.default_rng(2).standard_normal(32))
    assert flat16.search_vector(q, k=7, exact=True) == flat16.search_vector(q, k=7)


def test_a_flat16_file_of_one_list_still_answers_as_flat(clustered, tmp_path: Path) -> None:
    """flat16 files written before the parallel lists hold IDMap2,IVF1,SQfp16: opened, they answer as flat."""
    flat, flat16 = clustered
    shutil.copytree(flat16.store.path, tmp_path / "old")
    store = IndexStore.open(tmp_path / "old")
    fids, vectors = store.vectors
    old = faiss.index_factory(vectors.shape[1], "IDMap2,IVF1,SQfp16", faiss.METRIC_INNER_PRODUCT)
    inner = faiss.downcast_index(old.index)
    inner.by_residual = False
    inner.quantizer.add(np.zeros((1, vectors.shape[1]), dtype=np.float32))
    inner.is_trained = old.is_trained = True
    old.add_with_ids(np.ascontiguousarray(vectors), fids)
    store.publish(old, fids, lambda tmp: save_npy(tmp, vectors), 0.0)
    reopened = Index(IndexStore.open(tmp_path / "old"), tmp_path)
    assert isinstance(reopened.store.faiss, faiss.IndexIDMap2)  # the old file, not a rebuild
    queries = unit(np.random.default_rng(4).standard_normal((6, 32)))
    for k, theta in ((10, None), (None, 0.3)):
        want = flat.search_vectors(queries, k=k, theta=theta)
        got = reopened.search_vectors(queries, k=k, theta=theta)
        assert [tied_order(g) for g in got] == [tied_order(w) for w in want]


@pytest.mark.parametrize(
    "k, theta, margin, fusion",
    [(10, None, None, "weighted"), (None, 0.3, None, "weighted"), (5, 0.3, None, "max"), (None, None, 0.05, "min")],
)
def test_a_batch_reads_the_fp32_vectors_once_and_answers_as_one_query_at_a_time(
    clustered, monkeypatch: pytest.MonkeyPatch, k, theta, margin, fusion
) -> None:
    flat, flat16 = clustered
    reranked = flat16.store.searcher(None)[0]
    passes = []
    for method in ("search", "range_search"):  # count the batch's fp32 passes
        real = getattr(reranked.batch, method)
        monkeypatch.setattr(
            reranked.batch, method, lambda qv, *a, real=real, **kw: passes.append(len(qv)) or real(qv, *a, **kw)
        )
    queries = unit(np.random.default_rng(6).standard_normal((BATCH_FROM + 4, 32)))
    args = {"k": k, "theta": theta, "margin": margin, "fusion": fusion}
    together = flat16.search_vectors(queries, **args)
    assert passes and min(passes) >= BATCH_FROM  # the whole batch (or its part queries) in one pass each
    passes.clear()
    alone = [flat16.search_vector(q, **args) for q in queries]
    assert not passes and together == alone and sum(map(len, alone)) >= len(queries)  # ids and scores, to the bit
    assert [tied_order(t) for t in together] == [tied_order(w) for w in flat.search_vectors(queries, **args)]


def test_only_unfiltered_batches_take_the_fp32_pass(clustered) -> None:
    """A batch with an item filter (captions only, images only) scans the fp16 codes: FAISS's exhaustive functions
    filter rows, not ids. One query, or a few, scan them too."""
    reranked = clustered[1].store.searcher(None)[0]
    qv = unit(np.random.default_rng(7).standard_normal((BATCH_FROM, 64)))
    assert reranked.scan(qv, None)[0] is reranked.batch
    assert reranked.scan(qv[: BATCH_FROM - 1], None)[0] is reranked.fp16
    assert reranked.scan(qv, clustered[1].store.searcher("image_key")[1])[0] is reranked.fp16
    with pytest.raises(ValueError, match="queries"):  # FAISS would read past the rows of a narrower query
        reranked.batch.search(qv[:, :32].copy(), 3)


def test_a_batch_over_removed_items_answers_with_their_ids(tmp_path: Path) -> None:
    """Removing items leaves gaps in the FAISS ids: the fp32 pass finds rows, which must become the items' ids."""
    from retrieval.index.build import remove_items

    vectors = unit(np.random.default_rng(8).standard_normal((40, 8)))
    store_of(tmp_path / "gaps", "flat16", vectors, vectors)
    remove_items(tmp_path / "gaps", [f"item{j}" for j in range(0, 40, 3)])
    index = Index(IndexStore.open(tmp_path / "gaps"), tmp_path)
    queries = vectors[1:3].repeat(BATCH_FROM // 2, axis=0)  # items 1 and 2 themselves, still indexed
    for args in ({"k": 3}, {"k": None, "theta": 0.2}):
        together = index.search_vectors(queries, **args)
        assert together == [index.search_vector(q, **args) for q in queries]
        assert [hits[0].id for hits in together[:2]] == ["item1", "item1"] and together[-1][0].id == "item2"
        assert all(int(h.id.removeprefix("item")) % 3 for hits in together for h in hits)


@pytest.mark.parametrize("target", ["item", "image"])  # image: an item filter, which each thread's lists keep
@pytest.mark.parametrize("k, theta", [(10, None), (None, 0.3), (5, 0.3)])
def test_one_query_split_between_threads_by_lists_answers_as_flat(clustered, split, target: str, k, theta) -> None:
    flat, flat16 = clustered
    for q in unit(np.random.default_rng(6).standard_normal((4, 32))):
        want = flat.search_vector(q, k=k, theta=theta, target=target)
        got = flat16.search_vector(q, k=k, theta=theta, target=target)
        assert want and tied_order(got) == tied_order(want)
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-6)
    assert split, "the fp16 scan's lists were split"
    assert search_threads(1) == 1 and search_threads(search.FEW_QUERIES + 1) == faiss.omp_get_max_threads()


def test_fewer_items_than_k_and_an_empty_index(tmp_path: Path) -> None:
    vectors = unit(np.random.default_rng(3).standard_normal((3, 8)))
    small = Index(store_of(tmp_path / "small", "flat16", vectors, vectors), tmp_path)
    assert [h.id for h in small.search_vector(vectors[0], k=10)] == ["item0", "item2", "item1"]
    assert len(small.search_vector(vectors[0], k=None, theta=-1.0)) == 3
    batch = vectors[:1].repeat(BATCH_FROM, axis=0)  # the same, through the fp32 pass
    want = [["item0", "item2", "item1"]] * BATCH_FROM
    assert [[h.id for h in hits] for hits in small.search_vectors(batch, k=10)] == want
    empty = Index(store_of(tmp_path / "empty", "flat16", vectors[:0], vectors[:0]), tmp_path)
    assert empty.search_vector(vectors[0], k=10) == empty.search_vector(vectors[0], k=None, theta=0.0) == []
    assert empty.search_vectors(batch, k=10) == empty.search_vectors(batch, k=None, theta=0.0) == [[]] * BATCH_FROM


# --- the boundary: items at exactly θ, ties, and an item only the re-rank can place ------------------------
A = 0.5  # scores exactly θ: never in the θ set
B = 0.5 + 2.0**-13  # above θ, but fp16 rounds it to 0.5: the scan alone puts it at θ
C = 0.5 - 2.0**-13  # below θ; fp16 rounds it (to even) to 0.5 too
FILLERS = 0.5 - np.arange(1, 101) * 2.0**-24  # 100 items below θ that the scan also sees at 0.5


@pytest.fixture(scope="module")
def boundary(tmp_path_factory: pytest.TempPathFactory) -> tuple[Index, Index, np.ndarray]:
    """Items whose score against q = e1 is their first component a (the rest of the unit vector in the second):
    item0 0.75, item1 and item2 0.625 (a tie), item3 A, item4-103 FILLERS, item104 C, item105 B."""
    a = np.concatenate([[0.75, 0.625, 0.625, A], FILLERS, [C, B]])
    vectors = np.zeros((len(a), 4), dtype=np.float32)
    vectors[:, 0], vectors[:, 1] = a, np.sqrt(1 - a**2)
    root = tmp_path_factory.mktemp("boundary")
    flat, flat16 = (Index(store_of(root / kind, kind, vectors, vectors), root) for kind in ("flat", "flat16"))
    return flat, flat16, a


def obvious(a: np.ndarray, k: int | None, theta: float | None) -> list[str]:
    """Every item above θ, best first, equal scores by position, the first k."""
    order = [j for j in np.lexsort((np.arange(len(a)), -a)) if theta is None or a[j] > theta]
    return [f"item{j}" for j in order[:k]]


def by_score(hits: list[Hit]) -> list[str]:
    """Hit ids, best first, equal scores by id number."""
    return [h.id for h in sorted(hits, key=lambda h: (-h.score, int(h.id.removeprefix("item"))))]


@pytest.mark.parametrize("target", ["item", "image", "text"])
def test_theta_set_at_the_boundary_equals_flat(boundary, target: str) -> None:
    flat, flat16, a = boundary
    q = np.array([1, 0, 0, 0], dtype=np.float32)
    for k in (None, 3):
        want = obvious(a, k, 0.5)
        assert [h.id for h in flat16.search_vector(q, k=k, theta=0.5, target=target)] == want
        batch = flat16.search_vectors(np.tile(q, (BATCH_FROM, 1)), k=k, theta=0.5, target=target)  # the fp32 pass
        assert [[h.id for h in hits] for hits in batch] == [want] * BATCH_FROM
        assert by_score(flat.search_vector(q, k=k, theta=0.5, target=target)) == want  # flat orders ties as it may
    assert obvious(a, None, 0.5) == ["item0", "item1", "item2", "item105"]  # B in; A at exactly θ, C and fillers out
    scan = flat16.store.faiss  # the scan alone sees B at θ: without the re-rank B would be lost
    assert 105 + 1 not in scan.range_search(query_vectors(q[None], target, 0.5), 0.5)[2]


@pytest.mark.parametrize("target", ["item", "image", "text"])
def test_top_k_at_the_boundary_equals_flat(boundary, target: str) -> None:
    """k = 4 needs B, which the scan ties with 101 others at 0.5, more than its 2k + 32 candidates hold: which
    of them it returns is the scan's choice (its threads'), so the re-rank must look below them. Ties go to the
    lower id; flat keeps the same scores."""
    flat, flat16, a = boundary
    q = np.array([1, 0, 0, 0], dtype=np.float32)
    qv = query_vectors(q[None], target, 0.5)
    scan_scores = flat16.store.faiss.search(qv, len(a))[0][0]
    assert scan_scores[3] == 0.5 and np.sum(scan_scores == 0.5) > 2 * 4 + CANDIDATES  # B among them
    for k in (1, 2, 3, 4, 5):
        got = flat16.search_vector(q, k=k, target=target)
        assert [h.id for h in got] == obvious(a, k, None)
        batch = flat16.search_vectors(np.tile(q, (BATCH_FROM, 1)), k=k, target=target)  # the fp32 pass
        assert [[h.id for h in hits] for hits in batch] == [obvious(a, k, None)] * BATCH_FROM
        assert [h.score for h in got] == [h.score for h in flat.search_vector(q, k=k, target=target)]
    assert obvious(a, 5, None) == ["item0", "item1", "item2", "item105", "item3"]


def test_a_batch_that_needs_the_fallback_asks_the_fp16_scan_for_it(boundary, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no spare candidates (2k), the fp32 pass's 10th best, a filler at 0.5 - 5 * 2^-24, could still reach the
    5th exact score (A = 0.5) within ε32: each query falls back to the fp16 scan's range search below it."""
    _, flat16, a = boundary
    monkeypatch.setattr(rerank, "CANDIDATES", 0)
    reranked, asked = flat16.store.searcher(None)[0], []
    real = reranked.could_reach
    monkeypatch.setattr(reranked, "could_reach", lambda q, *args: asked.append(len(q)) or real(q, *args))
    batch = flat16.search_vectors(np.tile(np.array([1, 0, 0, 0], np.float32), (BATCH_FROM, 1)), k=5)
    assert asked == [1] * BATCH_FROM  # one query each
    assert [[h.id for h in hits] for hits in batch] == [obvious(a, 5, None)] * BATCH_FROM


# --- through the engine: index, search, info, eval, the server -------------------------------------------
def run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.mark.slow
def test_flat16_through_the_cli_eval_and_server(synth_data: Path, tiny_model: Path, tmp_path: Path) -> None:
    from retrieval.index.build import BuildOptions, build_index

    build_index(synth_data, tiny_model, tmp_path / "flat", BuildOptions("flat", progress=False))
    shutil.copytree(tmp_path / "flat", tmp_path / "flat16")
    code, out = run(
        "index", synth_data, "--model", tiny_model, "--index", tmp_path / "flat16", "--index-type", "flat16"
    )
    assert code == 0 and "300 unchanged" in out and "flat16" in out, out
    code, out = run("info", "--index", tmp_path / "flat16")
    assert code == 0 and json.loads(out)["index_type"] == "flat16", out

    for query in (
        ["--text", "a small red circle", "--k", "10"],
        ["--text", "two blue squares", "--target", "text", "--k", "5", "--theta", "0.1"],
        ["--like", "synth-000010", "--target", "image", "--theta", "0.5"],
        ["--text", "a green star", "--margin", "0.1", "--target", "image"],
    ):
        answers = []
        for kind in ("flat", "flat16"):
            code, out = run("search", "--index", tmp_path / kind, *query, "--json")
            assert code == 0, out
            answers.append([(r["id"], r["score"]) for r in map(json.loads, out.splitlines())])
        assert answers[0], query  # flat scans the combined vectors, flat16 re-ranks the fused: float rounding apart
        same_ranking(answers[1], answers[0])

    code, out = run(
        "eval", "--index", tmp_path / "flat16", "--data", synth_data, "--target", "image", "--no-thresholds", "--json"
    )
    assert code == 0, out
    report = json.loads(out)
    assert report["index_type"] == "flat16" and report["index_recall"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    assert report["text_to_image"] == report["exact"]["text_to_image"]

    pytest.importorskip("fastapi", reason="the server extra is not installed: pip install -e '.[dev,serve]'")
    from fastapi.testclient import TestClient

    from retrieval.server.app import create_app

    flat = Index.open(tmp_path / "flat")
    with TestClient(create_app(tmp_path / "flat16")) as client:
        for params in ({"q": "a small red circle", "k": 8}, {"q": "two blue squares", "k": 20, "theta": 0.2}):
            body = client.get("/api/search", params=params).json()
            want = flat.search(text=params["q"], k=params["k"], theta=params.get("theta"))
            assert [r["id"] for r in body["results"]] == [h.id for h in want] and want
