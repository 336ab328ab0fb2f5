"""θ sweeps of R(q, D): hand-worked counts, against brute force, chunking, the query-adaptive rules, and the θ
report under each fusion rule of an item's image and caption scores."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.choices import FUSIONS
from retrieval.evaluation.fusion import fused_scores, item_scorer
from retrieval.evaluation.metrics import relevance_from_owner
from retrieval.evaluation.thresholds import (
    at_theta,
    best_f1,
    normalise,
    score_histogram,
    sweep,
    theta_for_precision,
    threshold_report,
)


def basis_case(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Queries whose score with item j is sims[:, j]: the items are the basis vectors."""
    return sims.astype(np.float32), np.eye(sims.shape[1], dtype=np.float32)


# Query 0's relevant item is 0, query 1's is 2.
SIMS = np.array([[0.61, 0.32, 0.13], [0.42, 0.21, 0.52]], dtype=np.float32)
RELEVANCE = (np.array([0, 1, 2]), np.array([0, 2]))


def test_hand_worked_sweep() -> None:
    queries, items = basis_case(SIMS)
    curve = sweep(score_histogram(queries, items, RELEVANCE))
    # scores, highest first: .61 (rel), .52 (rel), .42, .32, .21, .13
    for theta, precision, recall in [
        (0.6, 1.0, 0.5),
        (0.5, 1.0, 1.0),
        (0.4, 2 / 3, 1.0),
        (0.3, 2 / 4, 1.0),
        (0.15, 2 / 5, 1.0),
        (0.0, 2 / 6, 1.0),
        (0.7, 1.0, 0.0),
    ]:
        point = at_theta(curve, theta)
        assert point["theta"] == pytest.approx(theta, abs=1e-9)
        assert (point["precision"], point["recall"]) == pytest.approx((precision, recall)), theta
    best = best_f1(curve)
    assert best["f1"] == pytest.approx(1.0) and 0.419 < best["theta"] <= 0.52
    assert 0.32 < theta_for_precision(curve, 0.6)["theta"] <= 0.42  # 2/3 precision, the lowest θ reaching 0.6
    assert theta_for_precision(curve, 1.0)["recall"] == pytest.approx(1.0)


def random_case(seed: int, n_q: int = 37, n_i: int = 29, d: int = 8):
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n_i, d))
    owner = rng.integers(0, n_i, n_q)  # query q is relevant to item owner[q]
    queries = items[owner] + 1.0 * rng.standard_normal((n_q, d))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    indptr = np.arange(n_q + 1)
    return unit(queries), unit(items), (indptr, owner.astype(np.int64))


@pytest.mark.parametrize("rule", ["flat", "top_relative", "zscore"])
def test_sweep_equals_brute_force_counting(rule: str) -> None:
    queries, items, relevance = random_case(1)
    curve = sweep(score_histogram(queries, items, relevance, rule))
    scores = normalise(queries.astype(np.float64) @ items.T.astype(np.float64), rule)  # (Nq, Ni)
    is_rel = np.zeros_like(scores, dtype=bool)
    is_rel[np.arange(len(queries)), relevance[1]] = True
    for i in range(0, len(curve["theta"]), 97):
        above = scores >= curve["theta"][i]
        tp, retrieved = (above & is_rel).sum(), above.sum()
        assert curve["recall"][i] == pytest.approx(tp / is_rel.sum())
        assert curve["precision"][i] == pytest.approx(tp / retrieved if retrieved else 1.0)


def test_chunked_histogram_equals_one_chunk() -> None:
    queries, items, relevance = random_case(2)
    whole = score_histogram(queries, items, relevance, chunk=10_000)
    for chunk in (1, 5):
        part = score_histogram(queries, items, relevance, chunk=chunk)
        np.testing.assert_array_equal(part.relevant, whole.relevant)
        np.testing.assert_array_equal(part.other, whole.other)


@pytest.mark.parametrize("rule", ["flat", "top_relative", "zscore"])
def test_histogram_over_blocks_of_candidates_equals_the_whole_matrix(rule: str) -> None:
    """An index too large to hold is read a block at a time, the rules' row statistics in a first pass: the
    counts must be those of the whole matrix (up to a score within float rounding of a bin edge)."""
    queries, items, relevance = random_case(3, n_q=41, n_i=53)
    whole = score_histogram(queries, items, relevance, rule)
    for rows in (53, 20, 7, 1):
        scores = lambda q, rows=rows: [(a, q @ items[a : a + rows].T) for a in range(0, len(items), rows)]
        part = score_histogram(queries, scores, relevance, rule, chunk=9)
        assert part.relevant.sum() == whole.relevant.sum() == len(queries)
        assert np.abs(np.cumsum(part.relevant) - np.cumsum(whole.relevant)).max() <= 1, (rule, rows)
        assert np.abs(np.cumsum(part.other) - np.cumsum(whole.other)).max() <= 1, (rule, rows)
    if rule == "flat":  # no statistics: the same scores exactly
        np.testing.assert_array_equal(part.other, whole.other)


def test_rules_normalise_each_row() -> None:
    sims = np.array([[0.1, 0.5, 0.3], [0.9, 0.8, 0.7]])
    np.testing.assert_allclose(normalise(sims, "top_relative"), [[-0.4, 0, -0.2], [0, -0.1, -0.2]])
    z = normalise(sims, "zscore")
    np.testing.assert_allclose(z.mean(1), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(1), 1, atol=1e-9)
    with pytest.raises(ValueError, match="unknown rule"):
        normalise(sims, "nope")


def test_unreachable_precision_gives_none() -> None:
    queries, items = basis_case(np.array([[0.2, 0.9]], dtype=np.float32))  # the irrelevant item always wins
    curve = sweep(score_histogram(queries, items, (np.array([0, 1]), np.array([0]))))
    assert theta_for_precision(curve, 0.99) is None


def test_adaptive_rule_beats_a_flat_theta_when_queries_score_on_different_scales() -> None:
    """Each query's cosines sit at its own level (as with short vs long captions): a margin below the top
    score finds the relevant item, one flat cutoff cannot."""
    rng = np.random.default_rng(0)
    n_q, n_i = 200, 50
    owner = rng.integers(0, n_i, n_q)
    level = rng.uniform(-0.3, 0.5, (n_q, 1))  # the query's own scale
    sims = level + 0.05 * rng.standard_normal((n_q, n_i))
    sims[np.arange(n_q), owner] = level[:, 0] + 0.3  # the relevant item: clearly the query's best
    queries, items = basis_case(sims)
    report = threshold_report(queries, items, relevance_from_owner_queries(owner), target_precision=0.9)
    assert report["adaptive_rule"] in ("top_relative", "zscore")
    assert report["adaptive_f1"] > 0.95 > report["flat_heldout_f1"] + 0.2, report["rules"]
    assert set(report["rules"]) == {"flat", "top_relative", "zscore"}
    assert len(report["curve"]["theta"]) == 200 and len(report["histogram"]["edges"]) == 101
    assert sum(report["histogram"]["relevant"]) == n_q


def relevance_from_owner_queries(owner: np.ndarray):
    """Query q's single relevant item is owner[q]."""
    return np.arange(len(owner) + 1), owner.astype(np.int64)


def test_relevance_helpers_agree() -> None:
    """relevance_from_owner lists, per query, the candidates it owns (image -> its captions);
    relevance_from_owner_queries lists, per query, the one candidate that owns it (caption -> its image).
    Over the same owner array one is the transpose of the other."""
    owner = np.array([2, 0, 2, 4, 0, 2])  # candidate c belongs to query owner[c]; queries 1 and 3 own nothing
    indptr, indices = relevance_from_owner(owner, 5)
    lists = [indices[indptr[q] : indptr[q + 1]].tolist() for q in range(5)]
    assert lists == [[1, 4], [], [0, 2, 5], [], [3]]  # in candidate order within each query
    by_owner = np.zeros((5, 6), dtype=bool)
    by_owner[np.repeat(np.arange(5), np.diff(indptr)), indices] = True  # (queries, candidates)
    q_indptr, q_indices = relevance_from_owner_queries(owner)
    by_query = np.zeros((6, 5), dtype=bool)
    by_query[np.repeat(np.arange(6), np.diff(q_indptr)), q_indices] = True  # (candidates as queries, owners)
    np.testing.assert_array_equal(by_owner, by_query.T)


# --- the θ report under each fusion rule: scores that are not one inner product --------------------------------

# obvious code for each rule's item score from its image scores a and caption scores b (weighted at w = 0.3)
BRUTE = {
    "mean": lambda a, b: (a + b) / 2,
    "weighted": lambda a, b: 0.3 * a + 0.7 * b,
    "max": np.maximum,
    "min": np.minimum,
}


def fusion_case(seed: int, n_q: int = 37, n_i: int = 29, d: int = 8):
    """Items with an image and a caption embedding, each near a shared item vector; queries near their item."""
    rng = np.random.default_rng(seed)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    items = rng.standard_normal((n_i, d))
    owner = rng.integers(0, n_i, n_q)
    images, captions = unit(items + rng.standard_normal((n_i, d))), unit(items + rng.standard_normal((n_i, d)))
    queries = unit(items[owner] + rng.standard_normal((n_q, d)))
    return queries, images, captions, (np.arange(n_q + 1), owner.astype(np.int64))


def brute_counts(queries, images, captions, owner, fusion: str, theta: float) -> tuple[int, int, int]:
    """(relevant pairs at or above θ, pairs at or above θ, relevant pairs) by brute force, in float64."""
    q, i, c = (x.astype(np.float64) for x in (queries, images, captions))
    scores = BRUTE[fusion](q @ i.T, q @ c.T)  # (Nq, Ni)
    is_rel = np.zeros(scores.shape, dtype=bool)
    is_rel[np.arange(len(q)), owner] = True
    above = scores >= theta
    return int((above & is_rel).sum()), int(above.sum()), int(is_rel.sum())


@pytest.mark.parametrize("fusion", FUSIONS)
def test_the_sweep_under_each_fusion_rule_equals_brute_force_counting(fusion: str) -> None:
    queries, images, captions, relevance = fusion_case(4)
    curve = sweep(score_histogram(queries, item_scorer(images, captions, fusion, 0.3), relevance))
    for i in range(0, len(curve["theta"]), 37):
        tp, retrieved, relevant = brute_counts(queries, images, captions, relevance[1], fusion, curve["theta"][i])
        assert curve["recall"][i] == pytest.approx(tp / relevant), (fusion, i)
        assert curve["precision"][i] == pytest.approx(tp / retrieved if retrieved else 1.0), (fusion, i)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_the_report_under_each_fusion_rule_picks_the_brute_force_best_theta(fusion: str) -> None:
    """The F1-best θ of the report is the best of every grid θ counted by brute force, and its F1 is theirs."""
    queries, images, captions, relevance = fusion_case(5)
    report = threshold_report(queries, item_scorer(images, captions, fusion, 0.3), relevance, target_precision=0.5)

    def f1(theta: float) -> float:
        tp, retrieved, relevant = brute_counts(queries, images, captions, relevance[1], fusion, theta)
        p, r = (tp / retrieved if retrieved else 1.0), tp / relevant
        return 2 * p * r / (p + r) if p + r else 0.0

    assert f1(report["best_f1_theta"]) == pytest.approx(report["best_f1"])
    grid = np.linspace(-1, 1, 4001)[:-1]
    assert max(f1(t) for t in grid[::7]) <= report["best_f1"] + 1e-12
    assert set(report["rules"]) == {"flat", "top_relative", "zscore"}


@pytest.mark.parametrize("fusion", FUSIONS)
def test_an_index_read_a_block_at_a_time_gives_the_same_report_under_each_rule(fusion: str) -> None:
    """As eval --index and calibrate score an index's stored vectors [e(x1), e(x2)], a block at a time."""
    queries, images, captions, relevance = fusion_case(6, n_i=53)
    stored = np.concatenate([images, captions], axis=1)  # (N, 2d)
    d = images.shape[1]

    def blocks(q: np.ndarray, rows: int = 10):
        for a in range(0, len(stored), rows):
            yield a, fused_scores(q, stored[a : a + rows, :d], stored[a : a + rows, d:], fusion, 0.3)

    whole = threshold_report(queries, item_scorer(images, captions, fusion, 0.3), relevance)
    part = threshold_report(queries, blocks, relevance)
    assert part["best_f1_theta"] == pytest.approx(whole["best_f1_theta"], abs=1e-3)
    assert part["best_f1"] == pytest.approx(whole["best_f1"], abs=0.02)
    for rule in ("flat", "top_relative", "zscore"):
        assert part["rules"][rule]["heldout_f1"] == pytest.approx(whole["rules"][rule]["heldout_f1"], abs=0.02)


def test_the_mean_is_the_weighted_rule_at_one_half_and_max_min_bracket_it() -> None:
    queries, images, captions, _ = fusion_case(7)
    mean = fused_scores(queries, images, captions, "mean", 0.9)  # the weight is ignored
    np.testing.assert_allclose(mean, fused_scores(queries, images, captions, "weighted", 0.5), atol=1e-6)
    top, low = (fused_scores(queries, images, captions, f, 0.5) for f in ("max", "min"))
    assert np.all(low <= mean + 1e-6) and np.all(mean <= top + 1e-6) and np.any(top > low)
