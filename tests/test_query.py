"""R(q, D) over a flat index equals the obvious numpy code; θ is strict; bad queries fail in one line.

The fast path (FAISS over fused [e(x1), e(x2)] vectors with ID selectors and range_search) is held to
a brute-force loop over the stored part vectors, on a collection that mixes full, text-only and
image-only items. θ boundaries use hand-made axis vectors whose scores are exactly representable.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval.cli.main import main
from retrieval.errors import ImageError, RetrievalError
from retrieval.index.build import BuildOptions, build_index
from retrieval.index.faiss_ops import PartScorer, inner_products_at, stored_vectors
from retrieval.index.format import Item, Manifest
from retrieval.index.handle import Index
from retrieval.index.search import MAX_QUERY_CHARS, TARGETS
from retrieval.index.store import IndexStore

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TOL = 1e-5
Parts = dict[str, tuple[np.ndarray | None, np.ndarray | None]]


# --- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_index(
    synth_data: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, torch_single_thread
) -> Path:
    """The 300 synthetic scenes, with every 7th made text-only and every 11th (else) image-only."""
    root = tmp_path_factory.mktemp("query")
    rows = []
    for i, line in enumerate(synth_data.read_text().splitlines()):
        row = json.loads(line)
        row["image"] = str(synth_data.parent / row["image"])  # absolute: the manifest lives elsewhere
        if i % 7 == 3:
            del row["image"]
        elif i % 11 == 5:
            del row["captions"]
        rows.append(json.dumps(row))
    manifest = root / "mixed.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    report = build_index(manifest, tiny_model, root / "index", BuildOptions(progress=False))
    assert report.added == 300 and not report.skipped
    return root / "index"


@pytest.fixture(scope="module")
def index(mixed_index: Path) -> Index:
    return Index.open(mixed_index)


@pytest.fixture(scope="module")
def parts(index: Index) -> Parts:
    """Every item's (image vector, text vector), straight from SQLite: what brute force scores."""
    items = index.store.all_items()
    by_fid = index.store.part_vectors([it.fid for it in items.values()])
    return {it.id: by_fid[it.fid] for it in items.values()}


@pytest.mark.slow
def test_mixed_fixture_has_all_three_kinds(parts: Parts) -> None:
    kinds = {(vi is not None, vt is not None) for vi, vt in parts.values()}
    assert kinds == {(True, True), (False, True), (True, False)}
    assert sum(vi is None for vi, _ in parts.values()) == sum(1 for i in range(300) if i % 7 == 3)


# --- brute force ---------------------------------------------------------------------------------
def brute_force(parts: Parts, q: np.ndarray, target: str, weight: float) -> dict[str, float]:
    """sim(q, x1, x2) = w q.e1 + (1 - w) q.e2 in float64, a missing part replaced by the part the item has."""
    w = {"image": 1.0, "text": 0.0}.get(target, weight)
    q64, scores = q.astype(np.float64), {}
    for item_id, (vi, vt) in parts.items():
        if (target == "image" and vi is None) or (target == "text" and vt is None):
            continue
        e1 = vi if vi is not None else vt
        e2 = vt if vt is not None else vi
        scores[item_id] = w * float(q64 @ e1) + (1 - w) * float(q64 @ e2)
    return scores


def expected(scores: dict[str, float], k: int | None, theta: float | None) -> list[tuple[str, float]]:
    out = sorted(scores.items(), key=lambda kv: -kv[1])
    if theta is not None:
        out = [kv for kv in out if kv[1] > theta]
    return out[:k] if k is not None else out


def assert_same_ranking(hits, want: list[tuple[str, float]], scores: dict[str, float]) -> None:
    """Same ids in the same order, scores within TOL; two ids may swap only when their true scores tie."""
    got_ids = [h.id for h in hits]
    assert len(got_ids) == len(want), (got_ids[:5], want[:5])
    assert len(set(got_ids)) == len(got_ids), "an item came back twice"
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in want], atol=TOL)
    for got, (want_id, want_score) in zip(got_ids, want, strict=True):
        assert got in scores, f"{got} is not eligible for this target"
        if got != want_id:
            assert abs(scores[got] - want_score) <= TOL, f"{got} ranked where {want_id} should be"


def theta_at(scores: dict[str, float], rank: int) -> float:
    """A θ with about `rank` scores above it and none within 1e-4 of it, so float rounding cannot decide."""
    s = sorted(scores.values(), reverse=True)
    for i in range(rank, len(s) - 1):
        if s[i] - s[i + 1] > 1e-4:
            return (s[i] + s[i + 1]) / 2
    raise AssertionError("no gap in the scores to place theta in")


def queries(parts: Parts, d: int) -> list[np.ndarray]:
    """Random unit vectors, plus stored vectors (high scores and exact ties between duplicate captions)."""
    rng = np.random.default_rng(42)
    qs = [(v / np.linalg.norm(v)).astype(np.float32) for v in rng.standard_normal((3, d))]
    vectors = list(parts.values())
    return [*qs, vectors[0][1], vectors[1][0]]


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.slow
def test_flat_search_equals_brute_force(index: Index, parts: Parts, target: str, weight: float) -> None:
    assert index.store.manifest.index_type == "flat"
    for q in queries(parts, index.store.manifest.dim):
        scores = brute_force(parts, q, target, weight)
        theta = theta_at(scores, 30)
        for k, th in [(1, None), (10, None), (1000, None), (None, theta), (5, theta), (80, theta)]:
            hits = index.search_vector(q, k=k, theta=th, weight=weight, target=target)
            assert_same_ranking(hits, expected(scores, k, th), scores)
        # with k over the collection size, top-k is every eligible item
        assert len(index.search_vector(q, k=1000, weight=weight, target=target)) == len(scores)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.slow
def test_margin_below_the_top_score_equals_brute_force(index: Index, parts: Parts, target: str) -> None:
    for q in queries(parts, index.store.manifest.dim):
        scores = brute_force(parts, q, target, 0.4)
        top, cut = max(scores.values()), theta_at(scores, 25)
        for k, theta in [(None, None), (10, None), (None, cut - 0.05), (None, cut + 1e-9)]:
            want = expected(scores, k, max(top - (top - cut), theta if theta is not None else -2))
            hits = index.search_vector(q, k=k, theta=theta, weight=0.4, target=target, margin=top - cut)
            assert_same_ranking(hits, want, scores)
        assert len(index.search_vector(q, k=None, margin=1e-7, weight=0.4, target=target)) >= 1


@pytest.mark.parametrize("k, theta_rank", [(10, None), (None, 30), (5, 30), (10, 0)])
@pytest.mark.slow
def test_batch_search_equals_one_query_at_a_time(
    index: Index, parts: Parts, k: int | None, theta_rank: int | None
) -> None:
    qs = np.stack(queries(parts, index.store.manifest.dim))
    scores = brute_force(parts, qs[0], "item", 0.5)
    # theta_rank 0: above the best score, so the first query has no results while the others may
    theta = (
        None
        if theta_rank is None
        else (max(scores.values()) + 1e-6 if theta_rank == 0 else theta_at(scores, theta_rank))
    )
    batch = index.search_vectors(qs, k=k, theta=theta)
    single = [index.search_vector(q, k=k, theta=theta) for q in qs]
    # the same hits; scores to float rounding (from 3 queries on, a flat scan sums with BLAS, a single one with SIMD)
    assert [[h.id for h in hits] for hits in batch] == [[h.id for h in hits] for hits in single]
    for a, b in zip(batch, single, strict=True):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-6)
    assert len(batch) == len(qs) and (theta_rank != 0 or batch[0] == [])


@pytest.mark.slow
def test_an_empty_batch_has_no_results(index: Index) -> None:
    assert index.search_vectors(np.zeros((0, index.store.manifest.dim), np.float32), k=5) == []


@pytest.mark.slow
def test_per_modality_scores_are_the_part_cosines(index: Index, parts: Parts) -> None:
    q = queries(parts, index.store.manifest.dim)[0]
    hits = index.search_vector(q, k=300, weight=0.3)
    assert len(hits) == 300
    for h in hits:
        vi, vt = parts[h.id]
        assert (h.image_score is None) == (vi is None) and (h.text_score is None) == (vt is None)
        if vi is not None:
            assert h.image_score == pytest.approx(float(q @ vi), abs=TOL)
        if vt is not None:
            assert h.text_score == pytest.approx(float(q @ vt), abs=TOL)
        if vi is not None and vt is not None:
            assert h.score == pytest.approx(0.3 * h.image_score + 0.7 * h.text_score, abs=TOL)


def test_in_place_inner_products_refuse_rows_outside_the_matrix() -> None:
    """FAISS reads raw memory: a row past the end would read another object's bytes, so it is refused."""
    y = np.eye(4, dtype=np.float32)
    assert inner_products_at(y[:1], y, np.array([[0, 3, -1]])).tolist() == [[1.0, 0.0, -np.inf]]
    with pytest.raises(IndexError):
        inner_products_at(y[:1], y, np.array([[4]]))
    with pytest.raises(ValueError):
        inner_products_at(y[:1, :3], y, np.array([[0]]))


def test_part_scorer_reads_each_rows_halves_and_refuses_what_would_read_past_the_matrix() -> None:
    """FAISS reads the halves of the fused rows in place; the matrix is checked once, each call's rows and query
    every time, since a row past the end or a short query would read another object's bytes."""
    fused = np.arange(24, dtype=np.float32).reshape(3, 8)  # 3 items, d = 4: image half, then caption half
    q = np.array([1, 0, 0, 2], dtype=np.float32)
    scores = PartScorer(fused)(q.astype(np.float64), np.array([2, 0, 2]))  # a float64 query is converted
    assert scores.tolist() == [[16 + 38, 0 + 6, 16 + 38], [20 + 46, 4 + 14, 20 + 46]]  # images, then captions
    assert PartScorer(fused)(q, np.zeros(0, np.int64)).shape == (2, 0)
    assert PartScorer(fused[:0])(q, np.zeros(0, np.int64)).shape == (2, 0)
    for past in ([0, 3], [0, -1], [-(2**63)]):  # past the end, or negative (FAISS would score some other row)
        with pytest.raises(IndexError):
            PartScorer(fused)(q, np.array(past))
    with pytest.raises(ValueError):
        PartScorer(fused)(q[:3], np.array([0]))
    for bad in (fused.astype(np.float64), fused[:, :7], np.asfortranarray(fused)):
        with pytest.raises(ValueError):
            PartScorer(bad)


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf", "flat16"])
def test_part_scores_are_the_part_cosines_on_every_index_type(tmp_path: Path, index_type: str) -> None:
    """Flat and HNSW score results' parts from FAISS's own copy of the vectors (stored_vectors), the others from
    vectors.npy; the copy is an array over FAISS's memory, and it must outlive every other reference to the index."""
    rng = np.random.default_rng(7)
    d, n = 8, 240
    unit = rng.standard_normal((2 * n, d)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    no_image, no_caption = (lambda j: j % 5 == 1), (lambda j: j % 7 == 2 and j % 5 != 1)  # never both
    items = [
        Item(
            0,
            f"i{j}",
            None if no_image(j) else f"/x/{j}.png",
            [] if no_caption(j) else [f"c{j}"],
            None if no_image(j) else f"v{2 * j}",
            None if no_caption(j) else f"v{2 * j + 1}",
        )
        for j in range(n)
    ]
    store = IndexStore.create(tmp_path / "idx", Manifest("no-model", "0" * 16, d, index_type))
    store.commit(items, {f"v{j}": v for j, v in enumerate(unit)})
    store.rebuild()
    index = Index(IndexStore.open(tmp_path / "idx"), tmp_path)
    q = unit[0]
    hits = index.search_vector(q, k=None, theta=-1.0, exact=True)
    assert len(hits) == n
    for h in hits:
        j = int(h.id[1:])
        assert (h.image_score is None) == no_image(j) and (h.text_score is None) == no_caption(j)
        if h.image_score is not None:
            assert h.image_score == pytest.approx(float(q @ unit[2 * j]), abs=TOL)
        if h.text_score is not None:
            assert h.text_score == pytest.approx(float(q @ unit[2 * j + 1]), abs=TOL)
    fids, vectors = index.store.vectors
    stored = stored_vectors(index.store.faiss, fids)
    assert (stored is not None) == (index_type in ("flat", "hnsw"))
    assert (index.store.part_scorer.vectors is vectors) == (stored is None)
    if stored is not None:
        index.store._faiss = index.store._scorer = None  # the array is now the index's last holder
        gc.collect()
        assert np.array_equal(stored, vectors) and not stored.flags.writeable


# --- θ boundary and mixed items, on exact vectors ----------------------------------------------------
@pytest.fixture
def exact(tmp_path: Path) -> Index:
    """d = 4 axis vectors: every score below is exactly 1, 0.5, 0 or -1 in float32."""
    e = np.eye(4, dtype=np.float32)
    store = IndexStore.create(tmp_path / "exact", Manifest("no-model", "0" * 16, 4))
    vectors = {"e0": e[0], "e1": e[1], "e2": e[2], "e3": e[3], "-e0": -e[0]}
    store.commit(
        [
            Item(0, "both", "/x/both.png", ["both"], "e0", "e1"),
            Item(0, "text_only", None, ["text"], None, "e2"),
            Item(0, "image_only", "/x/image.png", [], "e3", None),
            Item(0, "anti", "/x/anti.png", ["anti"], "-e0", "-e0"),
        ],
        vectors,
    )
    store.rebuild()
    return Index(IndexStore.open(tmp_path / "exact"), tmp_path / "no-model")


BELOW = float(np.nextafter(np.float32(0.5), np.float32(0)))


@pytest.mark.parametrize("enabled", [True, False])
def test_making_many_results_runs_no_garbage_collection(exact: Index, enabled: bool) -> None:
    """Before: a young collection every 700 results, and every few calls of 10,000 a full one (60-90 ms). The
    GC is left as the caller had it."""
    fids = np.resize(exact.store.vectors[0], 5000)  # repeats: each is a result of its own
    phases: list[str] = []
    record = lambda phase, info: phases.append(phase)
    gc.enable() if enabled else gc.disable()
    gc.callbacks.append(record)
    try:
        hits = exact.hits(np.eye(4, dtype=np.float32)[0], np.zeros(len(fids), np.float32), fids)
        assert gc.isenabled() == enabled
    finally:
        gc.callbacks.remove(record)
        gc.enable()
    assert len(hits) == 5000 and len({id(h) for h in hits}) == 5000 and phases == []
    assert [h.image_score for h in hits[:4]] == [1.0, None, 0.0, -1.0]


@pytest.mark.parametrize("k", [None, 10])  # range_search, and top-k then filter
def test_theta_is_strict(exact: Index, k: int | None) -> None:
    q = np.eye(4, dtype=np.float32)[0]
    # fused: 0.5 * cos(e0, e0) + 0.5 * cos(e0, e1) = 0.5 exactly
    assert [h.id for h in exact.search_vector(q, k=k, theta=0.5, weight=0.5)] == []
    hits = exact.search_vector(q, k=k, theta=BELOW, weight=0.5)
    assert [(h.id, h.score) for h in hits] == [("both", 0.5)]
    # images only: cos = 1 exactly
    assert exact.search_vector(q, k=k, theta=1.0, target="image") == []
    assert [h.id for h in exact.search_vector(q, k=k, theta=0.999, target="image")] == ["both"]
    # θ = -1: the antipodal item scores exactly -1 and is not above it; the orthogonal ones (0) are
    ids = {h.id for h in exact.search_vector(q, k=k, theta=-1.0, weight=0.5)}
    assert ids == {"both", "text_only", "image_only"}


@pytest.mark.parametrize("k, theta", [(10, None), (None, -1.0), (10, -1.0)])
def test_target_filters_items_missing_that_part(exact: Index, k: int | None, theta: float | None) -> None:
    e = np.eye(4, dtype=np.float32)
    # q is text_only's own vector, yet an image search must not return it (its fused vector would score 1)
    images = {h.id for h in exact.search_vector(e[2], k=k, theta=theta, target="image")}
    assert images == {"both", "image_only", "anti"}
    # and q is image_only's own vector for a caption search
    texts = {h.id for h in exact.search_vector(e[3], k=k, theta=theta, target="text")}
    assert texts == {"both", "text_only", "anti"}


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.7, 1.0])
def test_item_missing_a_part_is_scored_on_the_part_it_has(exact: Index, weight: float) -> None:
    e = np.eye(4, dtype=np.float32)
    top = exact.search_vector(e[2], k=1, weight=weight)[0]
    assert (top.id, top.score, top.image_score, top.text_score) == ("text_only", 1.0, None, 1.0)
    top = exact.search_vector(e[3], k=1, weight=weight)[0]
    assert (top.id, top.score, top.image_score, top.text_score) == ("image_only", 1.0, 1.0, None)
    # the full item is weighted: w cos(q, e0) + (1 - w) cos(q, e1)
    both = {h.id: h.score for h in exact.search_vector(e[1], k=4, weight=weight)}["both"]
    assert both == pytest.approx(1 - weight, abs=1e-7)


def test_query_vector_of_the_wrong_dimension_is_refused(exact: Index) -> None:
    with pytest.raises(RetrievalError, match="4-d"):
        exact.search_vector(np.ones(5, np.float32))


# --- embedding queries -----------------------------------------------------------------------------
@pytest.mark.slow
def test_text_search_uses_the_models_text_embedding(index: Index, parts: Parts, tiny_model: Path) -> None:
    from retrieval.models.load import load_model

    text = "a small red circle left of a large blue square"
    q = load_model(tiny_model).encode_text([text])[0]
    scores = brute_force(parts, q, "item", 0.5)
    assert_same_ranking(index.search(text=text, k=10), expected(scores, 10, None), scores)


@pytest.mark.slow
def test_image_query_finds_its_own_image(index: Index, parts: Parts, synth_data: Path) -> None:
    image_id = next(i for i, (vi, _) in parts.items() if vi is not None and _unique_image(parts, i))
    path = synth_data.parent / "images" / f"{image_id}.png"
    top = index.search(image=path, k=1, target="image")[0]
    assert top.id == image_id and top.score == pytest.approx(1.0, abs=1e-4)


def _unique_image(parts: Parts, item_id: str) -> bool:
    vi = parts[item_id][0]
    return sum(1 for other, _ in parts.values() if other is not None and float(other @ vi) > 0.9999) == 1


@pytest.mark.slow
def test_cold_text_search_does_not_import_torch_or_transformers(mixed_index: Path) -> None:
    code = (
        "import sys; from retrieval.index.handle import Index\n"
        f"hits = Index.open({str(mixed_index)!r}).search(text='a small red circle', k=3)\n"
        "assert len(hits) == 3, hits\n"
        "assert 'torch' not in sys.modules, 'a text query imported torch'\n"
        "assert 'transformers' not in sys.modules, 'a text query imported transformers'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"text": ""}, "empty"),
        ({"text": "  \t\n "}, "empty"),
        ({"text": "a" * (MAX_QUERY_CHARS + 1)}, f"under {MAX_QUERY_CHARS}"),
        ({"text": "a red circle", "k": 0}, "k must be at least 1"),
        ({"text": "a red circle", "k": -3}, "k must be at least 1"),
        ({"text": "a red circle", "k": None}, "give k"),
        ({"text": "a red circle", "theta": 2.0}, r"theta must be in \[-1, 1\]"),
        ({"text": "a red circle", "theta": -1.5}, r"theta must be in \[-1, 1\]"),
        ({"text": "a red circle", "theta": float("nan")}, r"theta must be in \[-1, 1\]"),
        ({"text": "a red circle", "weight": 1.5}, r"weight must be in \[0, 1\]"),
        ({"text": "a red circle", "weight": -0.1}, r"weight must be in \[0, 1\]"),
        ({"text": "a red circle", "target": "video"}, "target must be one of"),
        ({}, "exactly one query"),
        ({"text": "a red circle", "like": "synth-000000"}, "exactly one query"),
        ({"like": "no-such-id"}, "no item with id 'no-such-id'"),
    ],
)
@pytest.mark.slow
def test_bad_api_query_raises_retrieval_error(index: Index, kwargs: dict, message: str) -> None:
    with pytest.raises(RetrievalError, match=message):
        index.search(**kwargs)


@pytest.mark.slow
def test_image_query_that_is_not_an_image(index: Index, tmp_path: Path) -> None:
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is text, not a JPEG")
    with pytest.raises(ImageError, match=r"notes\.jpg"):
        index.search(image=fake)


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--text", ""], "empty"),
        (["--text", "   "], "empty"),
        (["--text", "a" * (MAX_QUERY_CHARS + 1)], "characters"),
        (["--text", "a red circle", "--theta", "2"], "theta must be in"),
        (["--text", "a red circle", "--theta", "-1.5"], "theta must be in"),
        (["--text", "a red circle", "--weight", "1.5"], "weight must be in"),
        (["--text", "a red circle", "--k", "-1"], "k must be at least 1"),
        (["--text", "a red circle", "--k", "0"], "give k"),
        (["--text", "a red circle", "--margin", "0"], "margin must be in (0, 2]"),
        ([], "exactly one query"),
        (["--text", "a red circle", "--like", "synth-000000"], "exactly one query"),
        (["--like", "no-such-id"], "no-such-id"),
        (["--image", "NOT_AN_IMAGE"], "cannot read image"),
    ],
)
@pytest.mark.slow
def test_bad_cli_query_is_one_error_line(mixed_index: Path, tmp_path: Path, args: list[str], message: str) -> None:
    fake = tmp_path / "notes.txt"
    fake.write_text("plain text\n")
    args = [str(fake) if a == "NOT_AN_IMAGE" else a for a in args]
    result = run_cli("search", "--index", mixed_index, *args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"crashed: {result.exception!r}"
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert message in lines[0] and "Traceback" not in result.output


@pytest.mark.slow
def test_cli_search_json_lines(mixed_index: Path, index: Index) -> None:
    result = run_cli("search", "--index", mixed_index, "--text", "a large green star", "--k", "7", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert len(rows) == 7
    for row in rows:
        assert {"id", "path", "caption", "score"} <= set(row)
    api = index.search(text="a large green star", k=7)
    assert [r["id"] for r in rows] == [h.id for h in api]
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)


@pytest.mark.slow
def test_cli_more_like_this_returns_the_item_first(mixed_index: Path, parts: Parts) -> None:
    item_id = next(i for i, (vi, _) in parts.items() if vi is not None and _unique_image(parts, i))
    result = run_cli("search", "--index", mixed_index, "--like", item_id, "--target", "image", "--k", "3", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert rows[0]["id"] == item_id and rows[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert rows[1]["score"] < rows[0]["score"]


@pytest.mark.slow
def test_cli_search_knobs_are_refused_below_one(mixed_index: Path) -> None:
    result = run_cli("search", "--index", mixed_index, "--text", "a red circle", "--nprobe", "0")
    assert result.exit_code == 1 and "nprobe must be a whole number from 1 to 2147483647, got 0" in result.output


@pytest.mark.slow
def test_cli_theta_with_no_results_says_so(mixed_index: Path) -> None:
    result = run_cli("search", "--index", mixed_index, "--text", "a red circle", "--theta", "1", "--k", "0")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "no results above theta 1.0"
