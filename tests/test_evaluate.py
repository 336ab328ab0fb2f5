"""Retrieval metrics: hand-worked cases with exact numbers, the tie rule, chunking, and CLIP_benchmark's definition;
the fusion rules' ranks, and items that lost their caption (the report of `eval --fusion`)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.choices import FUSIONS
from retrieval.evaluation.fusion import (
    fusion_sweep,
    item_scorer,
    removed_captions,
    rule_ranks,
    without_captions,
)
from retrieval.evaluation.metrics import (
    best_positive_ranks,
    list_ranks,
    positive_mask,
    positive_ranks,
    recall_against_exact,
    relevance_from_owner,
    relevant_ranks,
    retrieval_report,
    summarise,
    top_k_streamed,
)

# --- a hand-worked case ------------------------------------------------------------------------------------
# Images are the first three basis vectors of R^4, so caption t's similarity to image j is simply SIMS[t, j];
# the fourth coordinate only makes each caption unit length. Captions 2t and 2t+1 belong to image t.
SIMS = np.array(
    [
        [0.5, 0.1, 0.2],  # t0 -> image 0: 0.5 is the best            rank 1
        [0.3, 0.4, 0.1],  # t1 -> image 0: 0.4 above                  rank 2
        [0.6, 0.2, 0.5],  # t2 -> image 1: 0.6 and 0.5 above          rank 3
        [0.1, 0.7, 0.0],  # t3 -> image 1: best                       rank 1
        [0.2, 0.3, 0.4],  # t4 -> image 2: best                       rank 1
        [0.3, 0.1, 0.2],  # t5 -> image 2: 0.3 above                  rank 2
    ],
    dtype=np.float32,
)
# image -> text, reading down the columns:
#   image 0: t2 .6, t0 .5, ...            its best caption t0 is at rank 2
#   image 1: t3 .7, ...                   its best caption t3 is at rank 1
#   image 2: t2 .5, t4 .4, ...            its best caption t4 is at rank 2
TEXT_IMAGE = np.array([0, 0, 1, 1, 2, 2])


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    image_emb = np.eye(3, 4, dtype=np.float32)  # (3, 4)
    rest = np.sqrt(1 - (SIMS.astype(np.float64) ** 2).sum(1, keepdims=True))
    text_emb = np.hstack([SIMS, rest.astype(np.float32)])  # (6, 4)
    return image_emb, text_emb


def test_hand_worked_ranks_in_both_directions() -> None:
    image_emb, text_emb = _hand_case()
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1, atol=1e-6)
    assert positive_ranks(text_emb, image_emb, TEXT_IMAGE).tolist() == [1, 2, 3, 1, 1, 2]
    assert best_positive_ranks(image_emb, text_emb, TEXT_IMAGE).tolist() == [2, 1, 2]


def test_hand_worked_report() -> None:
    image_emb, text_emb = _hand_case()
    report = retrieval_report(image_emb, text_emb, TEXT_IMAGE, ks=(1, 2, 5))
    assert report["n_images"] == 3 and report["n_texts"] == 6
    assert report["text_to_image"] == pytest.approx(
        {
            "R@1": 3 / 6,
            "R@2": 5 / 6,
            "R@5": 1.0,
            "median_rank": 1.5,
            "mean_rank": 10 / 6,
            "mAP": (1 + 1 / 2 + 1 / 3 + 1 + 1 + 1 / 2) / 6,
            "n_queries": 6,
        },
        abs=1e-12,
    )
    # image->text AP, reading down the columns (ties in caption order):
    #   image 0: t2 .6, t0 .5, t1 .3, t5 .3, ...   its captions t0, t1 at ranks 2, 3   AP = (1/2 + 2/3) / 2
    #   image 1: t3 .7, t1 .4, t4 .3, t2 .2, ...   t3, t2 at ranks 1, 4                AP = (1/1 + 2/4) / 2
    #   image 2: t2 .5, t4 .4, t0 .2, t5 .2, ...   t4, t5 at ranks 2, 4                AP = (1/2 + 2/4) / 2
    assert report["image_to_text"] == pytest.approx(
        {
            "R@1": 1 / 3,
            "R@2": 1.0,
            "R@5": 1.0,
            "median_rank": 2.0,
            "mean_rank": 5 / 3,
            "mAP": (7 / 12 + 3 / 4 + 1 / 2) / 3,
            "n_queries": 3,
        },
        abs=1e-12,
    )


def test_report_default_ks() -> None:
    image_emb, text_emb = _hand_case()
    report = retrieval_report(image_emb, text_emb, TEXT_IMAGE.tolist())  # a plain list is accepted
    assert set(report["text_to_image"]) == {"R@1", "R@5", "R@10", "median_rank", "mean_rank", "mAP", "n_queries"}
    assert "curves" not in report
    curves = retrieval_report(image_emb, text_emb, TEXT_IMAGE, curves=True)["curves"]
    assert (
        curves["text_to_image"][:4] == pytest.approx([3 / 6, 5 / 6, 1.0, 1.0]) and len(curves["text_to_image"]) == 100
    )
    assert curves["image_to_text"][:2] == pytest.approx([1 / 3, 1.0])
    assert report["text_to_image"]["R@1"] == pytest.approx(0.5)


def test_summarise_exact_numbers() -> None:
    out = summarise(np.array([1, 3, 4, 12]), ks=(1, 3, 10))
    assert out == pytest.approx(
        {
            "R@1": 0.25,
            "R@3": 0.5,
            "R@10": 0.75,
            "median_rank": 3.5,
            "mean_rank": 5.0,
            "mAP": (1 + 1 / 3 + 1 / 4 + 1 / 12) / 4,
            "n_queries": 4,
        },
        abs=1e-12,
    )


# --- ties ----------------------------------------------------------------------------------------------------


def test_a_tied_candidate_is_above_the_positive_only_if_its_index_is_lower() -> None:
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    cands = np.array(
        [[0.5, 0.1], [0.9, 0.0], [0.5, 0.2], [0.5, 0.3], [0.1, 0.0]], dtype=np.float32
    )  # q-scores .5 .9 .5 .5 .1
    # positive 2: above it are 1 (higher) and 0 (tied, lower index); 3 is tied but later.
    assert positive_ranks(q, cands, np.array([2])).tolist() == [3]
    assert positive_ranks(q, cands, np.array([0])).tolist() == [2]
    assert positive_ranks(q, cands, np.array([3])).tolist() == [4]
    # All candidates identical: the rank is the position.
    same = np.ones((4, 2), dtype=np.float32)
    qs = np.ones((4, 2), dtype=np.float32)
    assert positive_ranks(qs, same, np.array([0, 1, 2, 3])).tolist() == [1, 2, 3, 4]


def test_image_to_text_ties_follow_the_same_rule() -> None:
    image_emb = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    # Captions 0..3 all score 0.5 with image 0; owners: 1, 0, 1, 0.
    text_emb = np.array([[0.5, 0.1], [0.5, 0.0], [0.5, 0.2], [0.5, 0.9]], dtype=np.float32)
    owner = np.array([1, 0, 1, 0])
    # Image 0: caption 0 (another image's) ties and comes first, so caption 1 is at rank 2.
    # Image 1: scores .1 .0 .2 .9 -> caption 3 (image 0's) first, then caption 2 (its own) at rank 2.
    assert best_positive_ranks(image_emb, text_emb, owner).tolist() == [2, 2]
    # Swap the owners: now image 0's caption comes first among the tied ones.
    assert best_positive_ranks(image_emb, text_emb, 1 - owner).tolist() == [1, 1]


def test_ties_at_the_k_boundary_count_by_index() -> None:
    # Query scores: .5 .5 .5; the positive is the third, so it is rank 3, not in R@1 or R@2.
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    cands = np.array([[0.5, 0.0], [0.5, 0.1], [0.5, 0.2]], dtype=np.float32)
    ranks = positive_ranks(q, cands, np.array([2]))
    assert summarise(ranks, ks=(1, 2, 3))["R@2"] == 0.0 and summarise(ranks, ks=(3,))["R@3"] == 1.0


# --- images without captions -------------------------------------------------------------------------------


def test_an_image_without_captions_is_never_retrieved() -> None:
    image_emb = np.eye(3, dtype=np.float32)
    text_emb = np.eye(3, dtype=np.float32)[[0, 0, 2, 2]]  # (4, 3); image 1 has no caption
    owner = np.array([0, 0, 2, 2])
    assert best_positive_ranks(image_emb, text_emb, owner).tolist() == [1, 5, 1]
    report = retrieval_report(image_emb, text_emb, owner, ks=(1, 4))
    assert report["image_to_text"] == pytest.approx(
        {"R@1": 2 / 3, "R@4": 2 / 3, "median_rank": 1.0, "mean_rank": 7 / 3, "mAP": 2 / 3, "n_queries": 3}, abs=1e-12
    )
    assert report["text_to_image"]["R@1"] == 1.0


# --- chunking against the whole matrix ---------------------------------------------------------------------


def _random_set(seed: int, n_images: int = 23, d: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random unit embeddings; image i has 0..4 captions (some none), each caption near its image."""
    rng = np.random.default_rng(seed)
    image_emb = rng.standard_normal((n_images, d))
    per_image = rng.integers(0, 5, n_images)
    text_image = np.repeat(np.arange(n_images), per_image)
    text_emb = image_emb[text_image] + 1.2 * rng.standard_normal((len(text_image), d))
    image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
    text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
    return image_emb.astype(np.float32), text_emb.astype(np.float32), text_image


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_chunked_ranks_equal_unchunked(seed: int, chunk: int) -> None:
    image_emb, text_emb, text_image = _random_set(seed)
    np.testing.assert_array_equal(
        positive_ranks(text_emb, image_emb, text_image, chunk=chunk), positive_ranks(text_emb, image_emb, text_image)
    )
    np.testing.assert_array_equal(
        best_positive_ranks(image_emb, text_emb, text_image, chunk=chunk),
        best_positive_ranks(image_emb, text_emb, text_image),
    )


def test_ranks_equal_a_full_argsort() -> None:
    image_emb, text_emb, text_image = _random_set(4)
    scores = text_emb.astype(np.float64) @ image_emb.T.astype(np.float64)  # (Nt, Ni)
    order = np.argsort(-scores, axis=1, kind="stable")
    t2i = [int(np.where(order[t] == text_image[t])[0][0]) + 1 for t in range(len(text_emb))]
    i2t = []
    for i in range(len(image_emb)):
        pos = [r + 1 for r, t in enumerate(np.argsort(-scores[:, i], kind="stable")) if text_image[t] == i]
        i2t.append(min(pos, default=len(text_emb) + 1))
    assert positive_ranks(text_emb, image_emb, text_image, chunk=5).tolist() == t2i
    assert best_positive_ranks(image_emb, text_emb, text_image, chunk=5).tolist() == i2t
    assert len(text_emb) + 1 in i2t  # the set-up really has an image without captions
    assert 1 < max(t2i)  # and the ranks are not all trivially 1


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_average_precision_equals_the_textbook_loop(chunk: int) -> None:
    image_emb, text_emb, text_image = _random_set(5)
    best, ap = relevant_ranks(image_emb, text_emb, relevance_from_owner(text_image, len(image_emb)), chunk=chunk)
    scores = image_emb.astype(np.float64) @ text_emb.T.astype(np.float64)  # (Ni, Nt)
    for i in range(len(image_emb)):
        ranked = [t for t in np.argsort(-scores[i], kind="stable")]
        hits, precisions = 0, []
        for r, t in enumerate(ranked, 1):
            if text_image[t] == i:
                hits += 1
                precisions.append(hits / r)
        assert ap[i] == pytest.approx(np.mean(precisions) if precisions else 0.0, abs=1e-12)
        assert best[i] == (
            min(r for r, t in enumerate(ranked, 1) if text_image[t] == i) if precisions else len(text_emb) + 1
        )


def test_relevance_lists_from_owner() -> None:
    indptr, indices = relevance_from_owner(np.array([2, 0, 2, 2]), 4)
    assert [indices[indptr[i] : indptr[i + 1]].tolist() for i in range(4)] == [[1], [], [0, 2, 3], []]
    mask = positive_mask((indptr, indices), np.array([1, 2, 0]), 4)
    assert mask.tolist() == [[False] * 4, [True, False, True, True], [False, True, False, False]]


# --- CLIP_benchmark's definition ---------------------------------------------------------------------------


def _clip_benchmark_recall(scores: np.ndarray, positive_pairs: np.ndarray, k: int) -> float:
    """CLIP_benchmark zeroshot_retrieval.recall_at_k, then (> 0).mean().

    A query is a hit if any positive is in its top k.
    """
    topk = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Nq, k)
    hits = np.take_along_axis(positive_pairs, topk, axis=1).any(axis=1)  # (Nq,)
    return float(hits.mean())


@pytest.mark.parametrize("seed", [10, 11])
def test_report_matches_clip_benchmark_recall(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_images, d = 40, 16
    image_emb = rng.standard_normal((n_images, d))
    text_image = np.repeat(np.arange(n_images), rng.integers(1, 6, n_images))  # 1..5 captions each
    text_emb = image_emb[text_image] + 1.5 * rng.standard_normal((len(text_image), d))
    image_emb = (image_emb / np.linalg.norm(image_emb, axis=1, keepdims=True)).astype(np.float32)
    text_emb = (text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)).astype(np.float32)

    ks = (1, 5, 10)
    report = retrieval_report(image_emb, text_emb, text_image, ks=ks)
    scores = text_emb.astype(np.float64) @ image_emb.T.astype(np.float64)  # (Nt, Ni)
    positive_pairs = np.zeros_like(scores, dtype=bool)
    positive_pairs[np.arange(len(text_image)), text_image] = True
    for k in ks:
        assert report["text_to_image"][f"R@{k}"] == pytest.approx(
            _clip_benchmark_recall(scores, positive_pairs, k), abs=1e-12
        )
        assert report["image_to_text"][f"R@{k}"] == pytest.approx(
            _clip_benchmark_recall(scores.T, positive_pairs.T, k), abs=1e-12
        )
    # Neither trivial nor perfect, so the comparison means something.
    assert 0 < report["text_to_image"]["R@1"] < 1 and 0 < report["image_to_text"]["R@1"] < 1
    assert report["text_to_image"]["R@1"] < report["text_to_image"]["R@10"]


# --- fusion of an item's image and caption --------------------------------------------------------------------


def test_fusion_sweep_hand_worked() -> None:
    """Two items; the query matches item 0 by its caption and item 1 by its image."""
    image_emb = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    caption_emb = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    query = np.array([[0.0, 0.6, 0.8]], dtype=np.float32)  # cos to image 1: .6, to caption 0: .8
    out = fusion_sweep(image_emb, caption_emb, query, np.array([0]), weights=[0.0, 0.5, 1.0], ks=(1,))
    # w = 0: item 0 scores .8, item 1 scores 0 -> rank 1; w = .5: .4 vs .3 -> rank 1; w = 1: 0 vs .6 -> rank 2
    assert out["R@1"] == [1.0, 1.0, 0.0] and out["mAP"] == [1.0, 1.0, 0.5]
    assert out["best_weight"] == 0.0 and out["best"]["R@1"] == 1.0


# Three items, three queries; query t's item is item t. The queries are the basis vectors, so query t's image
# score with item i is IMAGE[t, i] and its caption score CAPTION[t, i] (binary fractions: exact in float32).
IMAGE = np.array([[0.5, 0.875, 0.0], [0.25, 1.0, 0.5], [0.75, 0.0, 0.5]], dtype=np.float32)
CAPTION = np.array([[0.75, 0.0, 0.5], [0.25, 0.0, 0.625], [0.0, 0.75, 0.5]], dtype=np.float32)
# Item scores per rule (weighted at w = 0.75) and the rank of the query's own item:
#          query 0 (item 0)             query 1 (item 1)               query 2 (item 2)
# mean     .625  .4375 .25     -> 1     .25 .5    .5625    -> 2        .375  .375  .5   -> 1
# weighted .5625 .65625 .125   -> 2     .25 .75   .53125   -> 1        .5625 .1875 .5   -> 2
# max      .75   .875  .5      -> 2     .25 1.0   .625     -> 1        .75   .75   .5   -> 3
# min      .5    0     0       -> 1     .25 0     .5       -> 3        0     0     .5   -> 1
# max finds item 1 by its image alone (its caption misses); min finds item 2, whose two parts agree, where the
# weighted mean prefers item 0's strong image.
HAND_RANKS = {"mean": [1, 2, 1], "weighted": [2, 1, 2], "max": [2, 1, 3], "min": [1, 3, 1]}


def test_each_fusion_rule_ranks_a_hand_worked_case() -> None:
    ranks = rule_ranks(IMAGE.T.copy(), CAPTION.T.copy(), np.eye(3, dtype=np.float32), np.arange(3), weight=0.75)
    assert set(ranks) == set(FUSIONS)
    for fusion, expected in HAND_RANKS.items():
        assert ranks[fusion].tolist() == expected, fusion
        figures = summarise(ranks[fusion], (1, 2))
        assert figures["R@1"] == pytest.approx(expected.count(1) / 3), fusion
        assert figures["mAP"] == pytest.approx(np.mean([1 / r for r in expected])), fusion


def test_an_item_without_its_caption_is_scored_on_its_image_under_every_rule() -> None:
    """Item 1's caption removed: its image scores 1.0 for query 1, the best under every rule; its scores are its
    image scores, and the other items' scores are unchanged."""
    images, captions, queries = IMAGE.T.copy(), CAPTION.T.copy(), np.eye(3, dtype=np.float32)
    dropped = without_captions(images, captions, np.array([1]))
    np.testing.assert_array_equal(captions, CAPTION.T)  # the input is left as it was
    ranks = rule_ranks(images, dropped, queries, np.arange(3), weight=0.75)
    for fusion in FUSIONS:
        (_, scores), *_ = item_scorer(images, dropped, fusion, 0.75)(queries)
        np.testing.assert_array_equal(scores[:, 1], IMAGE[:, 1])  # item 1 on its image alone
        (_, before), *_ = item_scorer(images, captions, fusion, 0.75)(queries)
        np.testing.assert_array_equal(scores[:, [0, 2]], before[:, [0, 2]])
        assert ranks[fusion][1] == 1, fusion


def test_removed_captions_are_seeded_and_a_fraction_of_the_items() -> None:
    rows = removed_captions(1000, 0.3, seed=0)
    assert len(rows) == 300 == len(np.unique(rows)) and rows.min() >= 0 and rows.max() < 1000
    assert np.all(np.diff(rows) > 0)  # ascending
    np.testing.assert_array_equal(rows, removed_captions(1000, 0.3, seed=0))  # the same seed, the same items
    assert not np.array_equal(rows, removed_captions(1000, 0.3, seed=1))
    assert len(removed_captions(7, 0.3, seed=0)) == 2 and len(removed_captions(7, 0.0, seed=0)) == 0


def _fusion_set(seed: int, n_items: int = 40, d: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, captions grouped by image: 3 each, their images): captions near their image."""
    rng = np.random.default_rng(seed)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    images = unit(rng.standard_normal((n_items, d)))
    text_image = np.repeat(np.arange(n_items), 3)
    return images, unit(images[text_image] + 1.5 * rng.standard_normal((len(text_image), d))), text_image


def test_fusion_report_is_deterministic_and_keeps_the_weighted_sweep_keys() -> None:
    from retrieval.jobs.evaluate import fusion_report

    images, texts, text_image = _fusion_set(0)
    report = fusion_report(images, texts, text_image, (1, 5), thresholds=True, curves=True)
    assert report == fusion_report(images, texts, text_image, (1, 5), thresholds=True, curves=True)
    # the keys of the report before there were rules
    assert {"n_items", "n_queries", "weights", "R@1", "R@5", "mAP", "best_weight", "best"} <= set(report)
    assert (report["n_items"], report["n_queries"]) == (40, 80)
    m = report["missing_captions"]
    assert (m["fraction"], m["seed"], m["n_missing"]) == (0.3, 0, 12)
    for figures in (report, m):
        assert set(figures["rules"]) == set(figures["threshold"]) == set(figures["curves"]) == set(FUSIONS)
        assert figures["rules"]["weighted"]["weight"] == figures["best_weight"]
        assert figures["rules"]["mean"]["weight"] == 0.5
        i = figures["weights"].index(figures["best_weight"])
        assert figures["rules"]["weighted"]["R@1"] == figures["R@1"][i]  # the sweep's best w, the same figures
        assert figures["rules"]["mean"]["R@1"] == figures["R@1"][5]  # w = 0.5
        assert figures["rules"]["max"]["R@1"] == pytest.approx(figures["curves"]["max"][0])


def test_with_every_caption_removed_each_rule_ranks_by_the_image() -> None:
    """The fallback taken to its end: no item keeps its caption, so every rule gives text->image ranks."""
    from retrieval.jobs.evaluate import fusion_report

    images, texts, text_image = _fusion_set(1)
    queries = np.ones(len(texts), dtype=bool)
    queries[::3] = False  # each image's first caption is indexed, not a query
    by_image = summarise(positive_ranks(texts[queries], images, text_image[queries]), (1, 5))
    every = fusion_report(images, texts, text_image, (1, 5), missing=1.0)["missing_captions"]
    assert every["n_missing"] == 40
    for fusion in FUSIONS:
        assert {k: every["rules"][fusion][k] for k in by_image} == pytest.approx(by_image), fusion
    none = fusion_report(images, texts, text_image, (1, 5), missing=0.0)
    assert none["missing_captions"]["rules"] == none["rules"]


# --- the streamed exact top k, and ranks read from a returned list (eval --index) --------------------------


def _blocks(candidates: np.ndarray, rows: int) -> list[tuple[int, np.ndarray]]:
    return [(a, candidates[a : a + rows]) for a in range(0, len(candidates), rows)]


def test_streamed_top_k_hand_worked() -> None:
    """Five candidates in blocks of two; query scores .2 .9 .5 .9 .1: the tie at .9 goes to the earlier (1 before 3)."""
    candidates = np.array([[0.2], [0.9], [0.5], [0.9], [0.1]], dtype=np.float32)
    scores, positions = top_k_streamed(np.ones((1, 1), np.float32), _blocks(candidates, 2), 3)
    assert positions.tolist() == [[1, 3, 2]]
    np.testing.assert_allclose(scores, [[0.9, 0.9, 0.5]])
    scores, positions = top_k_streamed(np.ones((1, 1), np.float32), _blocks(candidates, 2), 7)  # more than there are
    assert positions.tolist() == [[1, 3, 2, 0, 4, -1, -1]] and np.isneginf(scores[0, 5:]).all()


@pytest.mark.parametrize("rows, k", [(1, 1), (3, 5), (7, 40), (64, 10)])
def test_streamed_top_k_equals_a_full_argsort(rows: int, k: int) -> None:
    """Small integer vectors, so every score is exact whatever the block shape, with repeated rows (ties at
    the k boundaries): the same lists as a stable argsort of all scores."""
    rng = np.random.default_rng(rows)
    base = rng.integers(-3, 4, (30, 8)).astype(np.float32)
    candidates = base[rng.integers(0, 30, 50)]  # (50, 8), many repeated rows
    queries = rng.integers(-3, 4, (9, 8)).astype(np.float32)
    scores, positions = top_k_streamed(queries, _blocks(candidates, rows), k, chunk=4)
    full = queries @ candidates.T
    order = np.argsort(-full, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(positions, order)
    np.testing.assert_array_equal(scores, np.take_along_axis(full, order, axis=1))


def test_list_ranks_hand_worked() -> None:
    """Query 0's positives {4, 7}, lists [7, 2, 4]: rank 1, AP (1/1 + 2/3) / 2. Query 1's positive 5 is not in
    [1, 2, -1]: rank k + 1 = 4, AP 0."""
    relevance = (np.array([0, 2, 3]), np.array([4, 7, 5]))
    best, ap = list_ranks(np.array([[7, 2, 4], [1, 2, -1]]), relevance)
    assert best.tolist() == [1, 4]
    assert ap.tolist() == pytest.approx([(1 + 2 / 3) / 2, 0.0])


def test_list_ranks_of_the_whole_list_equal_relevant_ranks() -> None:
    image_emb, text_emb, text_image = _random_set(6)
    relevance = relevance_from_owner(text_image, len(image_emb))
    _, everything = top_k_streamed(image_emb, _blocks(text_emb, 5), len(text_emb))
    best, ap = list_ranks(everything, relevance)
    want_best, want_ap = relevant_ranks(image_emb, text_emb, relevance)
    np.testing.assert_array_equal(best, want_best)
    np.testing.assert_allclose(ap, want_ap, atol=1e-12)
    best, _ = list_ranks(everything[:, :3], relevance)  # read to depth 3: the others are not found
    np.testing.assert_array_equal(best, np.where(want_best <= 3, want_best, 4))


def test_recall_against_exact_hand_worked() -> None:
    """Exact top 3 scores .9 .8 .8 (a tie at the 3rd); the index returned items scoring .9, .8 (the other of the
    tie: as good) and .1; R@1 = 1, R@3 = 2/3. A query with 2 candidates, both returned: R@3 = 1."""
    exact = np.array([[0.9, 0.8, 0.8], [0.5, 0.4, -np.inf]], dtype=np.float32)
    found = np.array([[0.9, 0.8, 0.1], [0.4, 0.5, -np.inf]], dtype=np.float32)
    assert recall_against_exact(found, exact, (1, 3)) == pytest.approx({"R@1": 0.5, "R@3": (2 / 3 + 1) / 2})
