"""How good is R(q, D) = {x | sim(q, x) > θ} as θ varies, and which θ to choose. numpy only.

A query's relevant items are its paired items. Over all (query, item) pairs, R(q, D) is a binary
classifier, so precision(θ) = relevant pairs above θ / pairs above θ and recall(θ) = relevant pairs above
θ / relevant pairs (micro-averaged: every pair counts once). Both come from two histograms, of the
relevant and of the other scores, filled a chunk of queries at a time, so 100k x 100k scores are never
held; θ moves on the grid of bin edges (0.0005 apart for cosines). The scores are inner products with item
embeddings, or come from a `Scorer` (metrics.py): an index's stored vectors read a block at a time, or an
item's max or min of its image and caption cosines (fusion.py).

One flat cosine cutoff does not fit every query: a score that is relevant for one query is noise for
another. A rule maps each query's row of scores to normalised scores before the cutoff:
- `flat`: the cosine itself (what FAISS range_search does);
- `top_relative`: the cosine minus the query's best cosine, so θ is a margin below the top hit;
- `zscore`: (cosine - the row's mean) / the row's standard deviation, so θ counts standard deviations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.arrays import Embeddings
from retrieval.errors import InvalidArgument
from retrieval.evaluation.metrics import Relevance, Scorer, inner_products, positive_mask

RULES = ("flat", "top_relative", "zscore")
RANGES = {"flat": (-1.0, 1.0), "top_relative": (-2.0, 0.0), "zscore": (-10.0, 30.0)}  # where each rule's θ lives
BINS = 4000


def normalise(sims: np.ndarray, rule: str, stats: RowStats | None = None) -> np.ndarray:
    """(c, N) cosines -> (c, N) scores that a single θ cuts, per the rule. `stats`: each query's max, mean and
    standard deviation over all candidates, when `sims` holds only a block of them (default: from `sims`)."""
    if rule not in RULES:
        raise InvalidArgument(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "flat":
        return sims
    top, mean, std = stats or (
        sims.max(axis=1, keepdims=True),
        sims.mean(axis=1, keepdims=True),
        sims.std(axis=1, keepdims=True),
    )
    return sims - top if rule == "top_relative" else (sims - mean) / (std + 1e-12)


RowStats = tuple[np.ndarray, np.ndarray, np.ndarray]  # (c, 1) each: a query's max, mean and std over all candidates


def row_stats(queries: Embeddings, scores: Scorer) -> RowStats:
    """Max, mean and standard deviation of each query's scores over candidates scored a block at a time."""
    top = np.full((len(queries), 1), -np.inf)
    total, squares, n = np.zeros((len(queries), 1)), np.zeros((len(queries), 1)), 0
    for _, block in scores(queries):
        sims = block.astype(np.float64)  # (c, B)
        top = np.maximum(top, sims.max(axis=1, keepdims=True, initial=-np.inf))
        total += sims.sum(axis=1, keepdims=True)
        squares += (sims**2).sum(axis=1, keepdims=True)
        n += block.shape[1]
    mean = total / max(n, 1)
    return top, mean, np.sqrt(np.maximum(squares / max(n, 1) - mean**2, 0.0))


@dataclass
class ScoreHistogram:
    """Counts of relevant and other (query, item) scores in bins; edges has one more entry than the counts."""

    edges: np.ndarray
    relevant: np.ndarray
    other: np.ndarray

    def coarse(self, factor: int) -> ScoreHistogram:
        """Every `factor` bins summed into one: for plots and the JSON report."""
        return ScoreHistogram(
            self.edges[::factor], self.relevant.reshape(-1, factor).sum(1), self.other.reshape(-1, factor).sum(1)
        )


def score_histogram(
    queries: Embeddings,
    items: Embeddings | Scorer,
    relevance: Relevance,
    rule: str = "flat",
    query_rows: np.ndarray | None = None,
    bins: int = BINS,
    chunk: int = 1024,
) -> ScoreHistogram:
    """Histograms of normalised scores for the queries in query_rows (default: all), a chunk at a time.

    items: the candidates (N, d), or a Scorer of them (a collection too large to hold, scores that are no inner
    product): each chunk of queries is then scored a block at a time, after a first pass for the rule's row
    statistics (none for flat)."""
    rows = np.arange(len(queries)) if query_rows is None else np.asarray(query_rows)
    scorer = items if callable(items) else inner_products(items)
    lo, hi = RANGES[rule]
    edges = np.linspace(lo, hi, bins + 1)
    relevant, total = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
    for s in range(0, len(rows), chunk):
        chunk_rows = rows[s : s + chunk]
        stats = row_stats(queries[chunk_rows], scorer) if callable(items) and rule != "flat" else None
        for start, sims in scorer(queries[chunk_rows]):
            scores = np.clip(normalise(sims, rule, stats), lo, hi)  # (c, B)
            mask = positive_mask(relevance, chunk_rows, scores.shape[1], start)
            relevant += np.histogram(scores[mask], edges)[0]
            total += np.histogram(scores, edges)[0]
    return ScoreHistogram(edges, relevant, total - relevant)


def sweep(h: ScoreHistogram) -> dict[str, np.ndarray]:
    """Precision, recall and F1 of R(q, D) at θ = each lower bin edge (items scoring >= θ are retrieved;
    search keeps > θ, which differs only for scores exactly on a grid edge).

    Where nothing is retrieved, precision is taken as 1 (no false positives), as is usual for PR curves.
    """
    tp = np.cumsum(h.relevant[::-1])[::-1]  # relevant pairs at or above each edge
    fp = np.cumsum(h.other[::-1])[::-1]
    retrieved = tp + fp
    precision = np.where(retrieved > 0, tp / np.maximum(retrieved, 1), 1.0)
    recall = tp / max(int(h.relevant.sum()), 1)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return {"theta": h.edges[:-1], "precision": precision, "recall": recall, "f1": f1}


def best_f1(curve: dict[str, np.ndarray]) -> dict[str, float]:
    i = int(np.argmax(curve["f1"]))
    return {key: float(curve[key][i]) for key in ("theta", "f1", "precision", "recall")}


def theta_for_precision(curve: dict[str, np.ndarray], target: float) -> dict[str, float] | None:
    """The lowest θ (most recall) whose precision reaches target while retrieving something relevant; else None."""
    ok = np.nonzero((curve["precision"] >= target) & (curve["recall"] > 0))[0]
    if not len(ok):
        return None
    i = int(ok[0])
    return {key: float(curve[key][i]) for key in ("theta", "f1", "precision", "recall")}


def at_theta(curve: dict[str, np.ndarray], theta: float) -> dict[str, float]:
    """The curve's point at the first grid θ at or above `theta`."""
    i = int(np.clip(np.searchsorted(curve["theta"], theta), 0, len(curve["theta"]) - 1))
    return {key: float(curve[key][i]) for key in ("theta", "f1", "precision", "recall")}


def threshold_report(
    queries: Embeddings,
    items: Embeddings | Scorer,
    relevance: Relevance,
    target_precision: float | None = None,
    rules: tuple[str, ...] = RULES,
) -> dict[str, Any]:
    """The report's `threshold` object: the F1-best flat θ over all queries, and, per rule, θ chosen on half
    the queries (even rows) and F1 measured on the other half (odd rows), so the rules compare on held-out data.
    items: the candidates, or a Scorer of them (see score_histogram).

    The adaptive rule reported is the one with the best held-out F1 among the non-flat rules.
    """
    histogram = score_histogram(queries, items, relevance, "flat")
    curve = sweep(histogram)
    best = best_f1(curve)
    calibration, held_out = np.arange(0, len(queries), 2), np.arange(1, len(queries), 2)
    per_rule = {}
    for rule in rules:
        chosen = best_f1(sweep(score_histogram(queries, items, relevance, rule, calibration)))
        test = at_theta(sweep(score_histogram(queries, items, relevance, rule, held_out)), chosen["theta"])
        per_rule[rule] = {
            "theta": chosen["theta"],
            "calibration_f1": chosen["f1"],
            "heldout_f1": test["f1"],
            "heldout_precision": test["precision"],
            "heldout_recall": test["recall"],
        }
    adaptive = max((r for r in rules if r != "flat"), key=lambda r: per_rule[r]["heldout_f1"], default=None)
    report: dict[str, Any] = {
        "best_f1_theta": best["theta"],
        "best_f1": best["f1"],
        "precision_at_best_f1": best["precision"],
        "recall_at_best_f1": best["recall"],
        "flat_heldout_f1": per_rule.get("flat", {}).get("heldout_f1"),
        "adaptive_rule": adaptive,
        "adaptive_theta": per_rule[adaptive]["theta"] if adaptive else None,
        "adaptive_f1": per_rule[adaptive]["heldout_f1"] if adaptive else None,
        "rules": per_rule,
        # for plots: the flat sweep every 0.01 and the score histograms in 100 bins
        "curve": {key: values[::20].tolist() for key, values in curve.items()},
        "histogram": {key: getattr(histogram.coarse(40), key).tolist() for key in ("edges", "relevant", "other")},
    }
    if target_precision is not None:
        hit = theta_for_precision(curve, target_precision)
        report["target_precision"] = target_precision
        report["target_precision_theta"] = hit["theta"] if hit else None
        report["recall_at_target_precision"] = hit["recall"] if hit else None
    return report
