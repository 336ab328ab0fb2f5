"""The evaluate job for an index: labelled text queries against what the index returns, beside exact search.

The exact search is streamed over the index's memory-mapped vectors a block at a time, so an index larger than
memory can be evaluated. The labelled queries are shared with calibration (calibrate.py). No torch: the
queries are embedded by the index's own text tower.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from retrieval.arrays import Embeddings
from retrieval.choices import FUSIONS
from retrieval.data.pairs import Pair
from retrieval.errors import RetrievalError
from retrieval.evaluation.fusion import fused_scores
from retrieval.evaluation.metrics import (
    DEFAULT_KS,
    Relevance,
    list_ranks,
    recall_against_exact,
    recall_curve,
    summarise,
    top_k_streamed,
)
from retrieval.evaluation.thresholds import threshold_report
from retrieval.index.handle import Index

if TYPE_CHECKING:
    from retrieval.index.store import IndexStore


EVAL_DEPTH = 100  # eval --index: results asked of the index (and of exact search) per query
EXACT_BLOCK_ROWS = 65_536  # rows of the memory-mapped vectors scanned at a time by the exact search
THRESHOLD_BLOCK_ROWS = 16_384  # and by the θ report, whose query chunks are larger: (1024, B) scores at a time


@dataclass
class LabelledQueries:
    """An index's items for one target, and labelled text queries against them, embedded: what evaluating and
    calibrating an index share. Positions count the kept items in fid order (the order of the stored vectors)."""

    index: Index
    target: str
    fusion: str  # how an item's image and caption scores make one (rules.fuse); weighted for images and captions
    weight: float  # w: 1 for images, 0 for captions, 1/2 for the mean
    keep: np.ndarray  # (N,) bool: the items the target matches
    kept_fids: npt.NDArray[np.int64]
    vectors: np.ndarray  # (N, 2d) the stored fused vectors, memory-mapped
    query_emb: Embeddings  # (nq, d)
    relevance: Relevance
    unmatched: int  # captions whose relevant ids are not in the index

    def scores(self, queries: Embeddings) -> Iterator[tuple[int, np.ndarray]]:
        """sim(q, x1, x2) of queries (c, d) with the kept items under the rule, a block of the stored vectors at a
        time: the θ report's Scorer (metrics.py). An item missing a part repeats the other in its stored vector,
        so it is scored on the part it has, as the index scores it."""
        d = self.index.store.manifest.dim
        return (
            (start, fused_scores(queries, block[:, :d], block[:, d:], self.fusion, self.weight))
            for start, block in _kept_blocks(self.vectors, self.keep, THRESHOLD_BLOCK_ROWS)
        )


def labelled_queries(
    index_path: str | Path, pairs: Sequence[Pair], target: str, weight: float, fusion: str = "weighted"
) -> LabelledQueries:
    """Open the index and embed the pairs' captions as queries; their relevant items are the indexed items with
    the pair's id (or the ids in its `relevant` field). fusion applies to whole items (target item); an image or
    caption search scores that part alone (weighted, w = 1 or 0)."""
    if fusion not in FUSIONS:
        raise RetrievalError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    if target != "item" and fusion != "weighted":
        raise RetrievalError(f"--fusion {fusion} scores whole items: it goes with --target item, not {target}")
    index = Index.open(index_path)
    fids, ids, has_image, has_text = index.store.id_table()
    keep = {"image": has_image, "text": has_text}.get(target, np.ones(len(fids), dtype=bool))
    vector_fids, vectors = index.store.vectors
    if not np.array_equal(vector_fids, fids):
        raise RetrievalError(f"{index_path} changed while it was being read; run the evaluation again")
    texts, relevance, unmatched = index_queries(pairs, np.asarray(ids, dtype=object)[keep])
    if not texts:
        raise RetrievalError(
            f"none of the queries' relevant ids is in {index_path} (for target {target}); "
            "check that the manifest's ids are the index's item ids"
        )
    return LabelledQueries(
        index,
        target,
        fusion,
        {"image": 1.0, "text": 0.0}.get(target, 0.5 if fusion == "mean" else weight),
        keep,
        fids[keep],
        vectors,
        index.embed_texts(texts),
        relevance,
        unmatched,
    )


def evaluate_index(
    index_path: str | Path,
    pairs: Sequence[Pair],
    ks: Sequence[int] = DEFAULT_KS,
    target: str = "image",
    weight: float = 0.5,
    thresholds: bool = False,
    target_precision: float | None = None,
    curves: bool = False,
    depth: int = EVAL_DEPTH,
    ef_search: int | None = None,
    nprobe: int | None = None,
) -> dict[str, Any]:
    """Text queries against an existing index (see labelled_queries).

    The task figures (text_to_<target>) are those of what the index returns: its FAISS search with its
    knobs (ef_search, nprobe: the manifest's unless given), so ivf and ivfpq, or two nprobe, can be compared.
    "exact" holds the same figures for an exact search, streamed over the stored vectors a block at a time,
    and "index_recall" the fraction of the exact top k the index returned. Both lists are K = max(depth,
    max(ks)) long: a relevant item beyond them is not found (rank K + 1, adding 0 to AP).
    The threshold report needs every (query, item) score: it is exact, streamed over the stored vectors too.
    """
    from retrieval.index.faiss_ops import search_knobs
    from retrieval.index.search import query_rows, query_vectors, ranked, target_column, target_weight

    q = labelled_queries(index_path, pairs, target, weight)
    store = q.index.store
    q.index.tune(ef_search, nprobe)
    k = max(depth, *ks)
    qv = query_vectors(q.query_emb, target, q.weight)  # (nq, 2d): scores the fused stored vectors as the index does
    searcher, params = store.searcher(target_column(target), weight=target_weight(target, q.weight))  # as a search
    found_fids = _padded(ranked(searcher, query_rows(searcher, q.query_emb, target, q.weight), k, None, params), k)
    found = np.where(found_fids >= 0, np.searchsorted(q.kept_fids, found_fids), -1)  # positions among kept items
    exact_scores, exact = top_k_streamed(qv, _kept_blocks(q.vectors, q.keep), k)
    ranks, ap = list_ranks(found, q.relevance)
    exact_ranks, exact_ap = list_ranks(exact, q.relevance)
    direction = f"text_to_{target}"
    report: dict[str, Any] = {
        "n_items": int(q.keep.sum()),
        "n_texts": len(q.query_emb),
        "target": target,
        "weight": q.weight,
        "unmatched_queries": q.unmatched,
        "index_type": store.manifest.index_type,
        "search_params": search_knobs(store.faiss),
        "depth": k,
        direction: summarise(ranks, ks, ap),
        "exact": {direction: summarise(exact_ranks, ks, exact_ap)},
        "index_recall": recall_against_exact(_exact_scores(store, qv, found_fids), exact_scores, ks),
    }
    if curves:
        report["curves"] = {direction: recall_curve(ranks, min(100, k))}
    if thresholds:
        report["threshold"] = threshold_report(q.query_emb, q.scores, q.relevance, target_precision)
    return report


def index_queries(pairs: Sequence[Pair], ids: Sequence[str]) -> tuple[list[str], Relevance, int]:
    """(texts, relevance over the positions of `ids`, captions whose relevant ids are none of `ids`)."""
    position = {item_id: j for j, item_id in enumerate(ids)}
    texts, relevant, unmatched = [], [], 0
    for pair in pairs:
        wanted = [position[r] for r in pair.extra.get("relevant", [pair.id]) if r in position]
        if not wanted:
            unmatched += len(pair.captions)
            continue
        for caption in pair.captions:
            texts.append(caption)
            relevant.append(wanted)
    indptr = np.cumsum([0] + [len(r) for r in relevant]).astype(np.int64)
    indices = np.concatenate(relevant).astype(np.int64) if relevant else np.zeros(0, np.int64)
    return texts, (indptr, indices), unmatched


def _padded(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> npt.NDArray[np.int64]:
    """FAISS's per-query ids as one (nq, k) array, -1 past each query's last result."""
    out = np.full((len(results), k), -1, dtype=np.int64)
    for row, (_, found) in enumerate(results):
        out[row, : len(found)] = found
    return out


def _kept_blocks(
    vectors: np.ndarray, keep: np.ndarray, rows: int = EXACT_BLOCK_ROWS
) -> Iterator[tuple[int, np.ndarray]]:
    """The stored fused vectors of the kept items, a block of the memory-mapped matrix at a time, with the
    position of each block's first kept item."""
    start = 0
    for a in range(0, len(vectors), rows):
        block = np.asarray(vectors[a : a + rows])[keep[a : a + rows]]  # (B, 2d)
        yield start, block
        start += len(block)


def _exact_scores(store: IndexStore, qv: np.ndarray, found_fids: npt.NDArray[np.int64], chunk: int = 256) -> np.ndarray:
    """(nq, K) exact scores of the items the index returned (-inf where it returned none)."""
    out = np.full(found_fids.shape, -np.inf, dtype=np.float32)
    for s in range(0, len(qv), chunk):
        part = found_fids[s : s + chunk]
        valid = part >= 0
        rows = store.fused_vectors(part[valid])  # (n, 2d)
        out[s : s + chunk][valid] = np.einsum("nd,nd->n", rows, np.repeat(qv[s : s + chunk], valid.sum(1), axis=0))
    return out
