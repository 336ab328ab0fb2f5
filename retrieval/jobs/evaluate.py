"""The evaluate job for a model: recall@k, ranks and mAP of a model over labelled pairs, θ sweeps, fusion rules.

It also holds what the model jobs share: a model given as a path loaded once, and the images of pairs
encoded a batch at a time with the unreadable ones skipped and listed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.arrays import Embeddings
from retrieval.data.pairs import Pair, image_caption_pairs
from retrieval.errors import ImageError, RetrievalError
from retrieval.evaluation.fusion import fusion_sweep, item_scorer, removed_captions, rule_ranks, without_captions
from retrieval.evaluation.metrics import DEFAULT_KS, recall_curve, retrieval_report, summarise
from retrieval.evaluation.thresholds import threshold_report
from retrieval.models.modeldir import ModelRef

if TYPE_CHECKING:  # torch is imported only when a model is loaded
    from retrieval.models.encoder import Encoder

FUSION_WEIGHTS = [i / 10 for i in range(11)]  # the weighted rule's sweep: w = 0 (the caption alone) to 1 (the image)
MISSING_CAPTIONS, MISSING_SEED = 0.3, 0  # the fusion report's second run: this fraction of captions removed, seeded


@dataclass
class Encoded:
    """Embeddings of the pairs whose images could be read, and the reasons for those that could not."""

    pairs: list[Pair]
    image_emb: Embeddings
    skipped: list[str]


def as_encoder(model: Encoder | ModelRef) -> Encoder:
    """The model itself, loaded first when it is given as a directory or an hf: name."""
    from retrieval.models.load import load_model

    return load_model(model) if isinstance(model, (str, Path)) else model


def encode_pairs(
    model: Encoder,
    pairs: Sequence[Pair],
    batch_size: int = 128,
    encode: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Encoded:
    """Load, preprocess and encode (model.encode_image unless `encode` is given) the images of `pairs` a batch at
    a time; unreadable ones are skipped."""
    kept, chunks, skipped = [], [], []
    for start in range(0, len(pairs), batch_size):
        arrays = []
        for pair in pairs[start : start + batch_size]:
            if pair.image is None:  # skipped like an unreadable one (callers pass pairs that have images)
                skipped.append(f"item {pair.id} has no image")
                continue
            try:
                arrays.append(model.transform.load(pair.image))
                kept.append(pair)
            except ImageError as e:
                skipped.append(str(e))
        if arrays:
            chunks.append(encode(np.stack(arrays)) if encode else model.encode_image(np.stack(arrays), batch_size))
    emb = np.concatenate(chunks) if chunks else np.zeros((0, model.embed_dim), np.float32)
    return Encoded(kept, emb, skipped)


def evaluate_model(
    model: Encoder | ModelRef,
    pairs: Sequence[Pair],
    ks: Sequence[int] = DEFAULT_KS,
    thresholds: bool = False,
    target_precision: float | None = None,
    fusion: bool = False,
    curves: bool = False,
) -> dict[str, Any]:
    """Recall@k, ranks and mAP in both directions over `pairs` (each image against every caption).

    thresholds: precision/recall/F1 of text->image R(q, D) as θ varies, the F1-best θ and the query-adaptive
    rules (thresholds.py). fusion: text->item retrieval under each fusion rule, with and without missing
    captions, and their θ reports if thresholds (fusion_report). curves: R@k for k = 1..100, for plots.
    """
    model = as_encoder(model)
    pairs = image_caption_pairs(pairs)
    if not pairs:
        raise RetrievalError("no pairs with both an image and a caption to evaluate")
    enc = encode_pairs(model, pairs)
    if not enc.pairs:
        raise RetrievalError(f"none of the {len(pairs)} images could be read; first error: {enc.skipped[0]}")
    texts = [c for p in enc.pairs for c in p.captions]
    text_image = np.array([i for i, p in enumerate(enc.pairs) for _ in p.captions])
    text_emb = model.encode_text(texts)
    report = retrieval_report(enc.image_emb, text_emb, text_image, ks, curves=curves)
    report["skipped_images"] = len(enc.skipped)
    if thresholds:
        relevance = (np.arange(len(texts) + 1), text_image)  # caption t's one relevant item: its image
        report["threshold"] = threshold_report(text_emb, enc.image_emb, relevance, target_precision)
    if fusion:
        report["fusion"] = fusion_report(enc.image_emb, text_emb, text_image, ks, thresholds, target_precision, curves)
    return report


def fusion_report(
    image_emb: Embeddings,
    text_emb: Embeddings,
    text_image: np.ndarray,
    ks: Sequence[int],
    thresholds: bool = False,
    target_precision: float | None = None,
    curves: bool = False,
    missing: float = MISSING_CAPTIONS,
    seed: int = MISSING_SEED,
) -> dict[str, Any]:
    """Text->item retrieval under each fusion rule: each image indexed with its first caption, its other captions
    the queries (images need 2+ captions). Then the same with the caption of a random `missing` fraction of the
    items removed (seeded), such an item scored on its image alone (see evaluation/fusion.py).

    The weighted sweep's keys stay at the top level, as before there were rules; "rules" holds each rule's R@k,
    ranks and mAP (weighted at the sweep's best w), "threshold" each rule's θ report, "curves" each rule's R@k for
    k = 1..100, and "missing_captions" the same figures with the captions removed.
    """
    first = np.searchsorted(text_image, np.arange(len(image_emb)))  # captions are grouped by image, in order
    is_first = np.zeros(len(text_image), dtype=bool)
    is_first[first[first < len(text_image)]] = True
    queries = ~is_first
    if not queries.any():
        raise RetrievalError(
            "the fusion report needs images with at least two captions (one indexed, others as queries)"
        )
    caption_emb = text_emb[np.minimum(first, len(text_emb) - 1)]
    figures = lambda captions: _fusion_figures(
        image_emb, captions, text_emb[queries], text_image[queries], ks, thresholds, target_precision, curves
    )
    rows = removed_captions(len(image_emb), missing, seed)
    return {
        "n_items": len(image_emb),
        "n_queries": int(queries.sum()),
        **figures(caption_emb),
        "missing_captions": {
            "fraction": missing,
            "seed": seed,
            "n_missing": len(rows),
            **figures(without_captions(image_emb, caption_emb, rows)),
        },
    }


def _fusion_figures(
    image_emb: Embeddings,
    caption_emb: Embeddings,
    query_emb: Embeddings,
    query_item: np.ndarray,
    ks: Sequence[int],
    thresholds: bool,
    target_precision: float | None,
    curves: bool,
) -> dict[str, Any]:
    """The weighted sweep, then every rule's figures at the sweep's best w, for one set of items."""
    sweep = fusion_sweep(image_emb, caption_emb, query_emb, query_item, FUSION_WEIGHTS, ks)
    w = sweep["best_weight"]
    ranks = rule_ranks(image_emb, caption_emb, query_emb, query_item, w)
    weights = {"mean": 0.5, "weighted": w}
    out = {
        **sweep,
        "rules": {
            f: {**summarise(r, ks), **({"weight": weights[f]} if f in weights else {})} for f, r in ranks.items()
        },
    }
    if curves:
        out["curves"] = {f: recall_curve(r) for f, r in ranks.items()}
    if thresholds:
        relevance = (np.arange(len(query_emb) + 1), np.asarray(query_item, dtype=np.int64))  # a query's one item
        out["threshold"] = {
            f: threshold_report(query_emb, item_scorer(image_emb, caption_emb, f, w), relevance, target_precision)
            for f in ranks
        }
    return out
