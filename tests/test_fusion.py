"""The four fusion rules of R(q, D) on an exact index, against brute-force numpy over the same vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import RetrievalError
from retrieval.index.format import Item, Manifest
from retrieval.index.fusion import part_queries
from retrieval.index.handle import Index
from retrieval.index.store import IndexStore
from retrieval.rules import fuse, score_rule

D = 8
N = 300
RULES = ("mean", "weighted", "max", "min")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Index, np.ndarray, np.ndarray, np.ndarray]:
    """N items, every 7th without an image and every 11th without a caption; (index, images, captions, queries),
    with a missing part's row holding the part the item has (the rule: scored on the part it has)."""
    rng = np.random.default_rng(0)
    image, text = unit(rng.standard_normal((N, D))), unit(rng.standard_normal((N, D)))
    text = unit(0.6 * image + 0.8 * text)  # an item's two parts agree somewhat, as real ones do
    no_image = np.arange(N) % 7 == 3
    no_text = (np.arange(N) % 11 == 5) & ~no_image
    store = IndexStore.create(tmp_path_factory.mktemp("fusion") / "idx", Manifest("m", "f", D))
    store.commit(
        [
            Item(
                0,
                f"x{i}",
                None if no_image[i] else f"/x/{i}.png",
                [] if no_text[i] else [f"c{i}"],
                None if no_image[i] else f"i{i}",
                None if no_text[i] else f"t{i}",
            )
            for i in range(N)
        ],
        {**{f"i{i}": image[i] for i in range(N)}, **{f"t{i}": text[i] for i in range(N)}},
    )
    store.rebuild()
    image[no_image], text[no_text] = text[no_image], image[no_text]
    return Index(store, Path(".")), image, text, unit(rng.standard_normal((6, D)))


def brute(
    image: np.ndarray, text: np.ndarray, q: np.ndarray, fusion: str, k: int | None, theta: float | None, w: float = 0.3
) -> tuple[list[int], np.ndarray]:
    """(item numbers, scores), best first (ties: lower number first), above θ, at most k: the obvious way."""
    si, st = image @ q, text @ q
    s = {"mean": (si + st) / 2, "weighted": w * si + (1 - w) * st, "max": np.maximum(si, st), "min": np.minimum(si, st)}
    scores = s[fusion]
    order = [int(i) for i in np.lexsort((np.arange(len(scores)), -scores)) if theta is None or scores[i] > theta]
    return order[:k], scores[order[:k]]


def numbers(hits) -> list[int]:
    return [int(h.id[1:]) for h in hits]


@pytest.mark.parametrize("fusion", RULES)
@pytest.mark.parametrize("k, theta", [(10, None), (None, 0.3), (5, 0.3), (40, 0.55), (N, None)])
def test_each_rule_equals_brute_force(collection, fusion: str, k: int | None, theta: float | None) -> None:
    index, image, text, queries = collection
    for q in queries:
        hits = index.search_vector(q, k=k, theta=theta, weight=0.3, fusion=fusion)
        want, scores = brute(image, text, q, fusion, k, theta)
        assert numbers(hits) == want
        np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)
        for h in hits:  # the parts stay in every hit, whatever the rule
            i = int(h.id[1:])
            assert h.image_score is None or h.image_score == pytest.approx(float(image[i] @ q), abs=1e-5)
            assert h.text_score is None or h.text_score == pytest.approx(float(text[i] @ q), abs=1e-5)


@pytest.mark.parametrize("fusion", RULES)
def test_a_batch_answers_as_single_queries_do(collection, fusion: str) -> None:
    index, _, _, queries = collection
    batch = index.search_vectors(queries, k=7, weight=0.3, fusion=fusion)
    assert [numbers(h) for h in batch] == [
        numbers(index.search_vector(q, k=7, weight=0.3, fusion=fusion)) for q in queries
    ]


@pytest.mark.parametrize("fusion", RULES)
def test_margin_under_each_rule(collection, fusion: str) -> None:
    index, image, text, queries = collection
    for q in queries:
        everything, scores = brute(image, text, q, fusion, None, None)
        want = [i for i, s in zip(everything, scores, strict=True) if s > scores[0] - 0.2]
        assert numbers(index.search_vector(q, k=None, margin=0.2, weight=0.3, fusion=fusion)) == want


@pytest.mark.parametrize("target", ["image", "text"])
def test_a_rule_does_not_change_an_image_or_caption_search(collection, target: str) -> None:
    index, _, _, queries = collection
    answers = {numbers(index.search_vector(queries[0], k=20, target=target, fusion=f)).__repr__() for f in RULES}
    assert len(answers) == 1


def test_scores_equal_to_theta_are_out_and_max_is_the_union_min_the_intersection(tmp_path: Path) -> None:
    """Exactly representable cosines: part scores at θ = 0.5 are not above it, under any rule."""
    parts = {  # item: (image, caption) cosines with q = e1
        "both_above": (0.75, 0.625),
        "image_only_above": (0.75, 0.5),  # caption exactly at θ
        "caption_only_above": (0.25, 0.875),
        "both_at": (0.5, 0.5),
        "no_caption": (0.625, None),  # scored on its image under every rule
        "no_image": (None, 0.5),  # its caption is at θ
    }
    store = IndexStore.create(tmp_path / "idx", Manifest("m", "f", 2))
    vectors, items = {}, []
    for fid, (name, (ci, ct)) in enumerate(parts.items()):
        for key, c in ((f"i{fid}", ci), (f"t{fid}", ct)):
            if c is not None:
                vectors[key] = np.array([c, np.sqrt(1 - c * c)], np.float32)
        items.append(Item(0, name, None, [], None if ci is None else f"i{fid}", None if ct is None else f"t{fid}"))
    store.commit(items, vectors)
    store.rebuild()
    index, q = Index(store, Path(".")), np.array([1.0, 0.0], np.float32)

    def ids(fusion: str, **kwargs) -> set[str]:
        return {h.id for h in index.search_vector(q, k=None, theta=0.5, fusion=fusion, **kwargs)}

    assert ids("max") == {"both_above", "image_only_above", "caption_only_above", "no_caption"}
    assert ids("min") == {"both_above", "no_caption"}
    assert ids("mean") == {"both_above", "image_only_above", "caption_only_above", "no_caption"}  # 0.625 > 0.5
    assert ids("weighted", weight=0.0) == {"both_above", "caption_only_above", "no_caption"}  # its image stands in
    top = index.search_vector(q, k=1, fusion="min")[0]
    assert (top.id, top.score) == ("both_above", 0.625)


def test_min_top_k_reads_deeper_than_either_part_alone(tmp_path: Path) -> None:
    """The item best under min ranks low in each part's own list, below items that match one part only, so a
    single read of each list to depth 4k would miss it: the threshold algorithm reads on until it is settled."""
    rng = np.random.default_rng(1)
    n, q = 400, np.array([1.0, 0.0, 0.0], np.float32)
    cos = np.concatenate([rng.uniform(0.9, 1.0, 200), rng.uniform(-0.5, 0.0, 200)])  # one part high, the other low
    image_cos, text_cos = cos.copy(), cos[::-1].copy()  # items 0-199: image high, 200-399: caption high
    image_cos[-1] = text_cos[-1] = 0.6  # the one item both parts match fairly well: the best min
    store = IndexStore.create(tmp_path / "idx", Manifest("m", "f", 3))

    def vec(c: float) -> np.ndarray:
        angle = rng.uniform(0, 2 * np.pi)
        s = np.sqrt(1 - c * c)
        return np.array([c, s * np.cos(angle), s * np.sin(angle)], np.float32)

    store.commit(
        [Item(0, f"x{i}", f"/{i}.png", [f"c{i}"], f"i{i}", f"t{i}") for i in range(n)],
        {**{f"i{i}": vec(image_cos[i]) for i in range(n)}, **{f"t{i}": vec(text_cos[i]) for i in range(n)}},
    )
    store.rebuild()
    top = Index(store, Path(".")).search_vector(q, k=1, fusion="min")
    assert [h.id for h in top] == ["x399"] and top[0].score == pytest.approx(0.6, abs=1e-6)


def test_rules_and_part_queries_hand_worked() -> None:
    image, text = np.array([0.2, 0.6]), np.array([0.8, 0.4])
    assert fuse(image, text, "max", 0.3).tolist() == [0.8, 0.6]
    assert fuse(image, text, "min", 0.3).tolist() == [0.2, 0.4]
    np.testing.assert_allclose(fuse(image, text, "mean", 0.3), [0.5, 0.5])
    np.testing.assert_allclose(fuse(image, text, "weighted", 0.25), [0.65, 0.45])
    assert score_rule("mean", 0.9) == score_rule("weighted", 0.5) != score_rule("weighted", 0.6)
    assert score_rule("max", 0.1) == score_rule("max", 0.9) == ("max", None)
    assert part_queries(np.array([[1.0, 2.0]])).tolist() == [[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0]]


def test_an_unknown_rule_is_refused(collection) -> None:
    index, _, _, queries = collection
    with pytest.raises(RetrievalError, match="fusion must be one of mean, weighted, max, min, got 'avg'"):
        index.search_vector(queries[0], fusion="avg")
