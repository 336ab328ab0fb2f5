"""The calibrate job: choose an index's cutoff for R(q, D) on labelled queries and store it in its manifest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrieval.data.pairs import Pair
from retrieval.errors import RetrievalError
from retrieval.evaluation.thresholds import threshold_report
from retrieval.jobs.evaluate_index import labelled_queries


def calibrate_index(
    index_path: str | Path,
    pairs: Sequence[Pair],
    target: str = "image",
    weight: float = 0.5,
    target_precision: float | None = None,
    rule: str = "flat",
    fusion: str = "weighted",
) -> dict[str, Any]:
    """Choose a cutoff for R(q, D) on labelled queries and store it in the index's manifest, so that
    `search` applies it when no θ is given. rule `flat` stores a θ (F1-best, or the lowest reaching
    target_precision); `top_relative` stores a margin below each query's top score (F1-best).

    For whole items the cutoff is chosen on the scores of a fusion rule (and weight), stored with it: `search`
    applies it only under the same scoring. The manifest holds one entry per target, so calibrating items under
    another rule replaces the entry."""
    from retrieval.index.store import IndexStore

    q = labelled_queries(index_path, pairs, target, weight, fusion)  # the θ report alone: no index search, no top-k
    t = threshold_report(q.query_emb, q.scores, q.relevance, target_precision)
    if rule == "flat":
        theta = t["best_f1_theta"] if target_precision is None else t.get("target_precision_theta")
        if theta is None:
            raise RetrievalError(f"no θ reaches precision {target_precision} on these queries; ask for less")
        chosen: dict[str, Any] = {"theta": theta}
    elif rule == "top_relative":
        chosen = {"margin": -t["rules"]["top_relative"]["theta"]}
    else:
        raise RetrievalError(f"rule must be flat or top_relative, got {rule!r}")
    entry = {
        "rule": rule,
        **chosen,
        "fusion": q.fusion,
        "weight": q.weight,
        "n_queries": len(q.query_emb),
        "best_f1": t["best_f1"],
        "heldout_f1": t["rules"][rule]["heldout_f1"],
        "target_precision": target_precision,
    }
    store = IndexStore.open(index_path)
    with store.writer():
        store.set_calibration(target, entry)
    return entry
