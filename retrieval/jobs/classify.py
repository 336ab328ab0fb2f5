"""The classify job: zero-shot P(y | x1, x2) for the items of a manifest, and accuracy where labels are known."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.data.pairs import Pair
from retrieval.errors import RetrievalError
from retrieval.evaluation.classify import classification_report, probabilities, top_labels
from retrieval.index.build import caption_vector
from retrieval.jobs.evaluate import as_encoder, encode_pairs
from retrieval.models.modeldir import ModelRef
from retrieval.prompts import DEFAULT_TEMPLATE, check_template, prompts

if TYPE_CHECKING:  # torch is imported only when the model is loaded
    from retrieval.models.encoder import Encoder


def classify_pairs(
    model: Encoder | ModelRef,
    pairs: Sequence[Pair],
    labels: Sequence[str] | None = None,
    label_field: str | None = None,
    template: str = DEFAULT_TEMPLATE,
    weight: float = 1.0,
) -> dict[str, Any]:
    """Zero-shot P(y | x1, x2) for each item (see classify.py); with label_field, also accuracy against the truth.

    weight 1 classifies by the image alone, 0 by the caption alone. Labels default to the distinct values
    of label_field. Items whose parts are unusable (an unreadable image at weight 1) are skipped and counted.
    A zero-shot model asked for ImageNet classes by image alone answers with its own classifier.
    """
    check_template(template)  # before loading the model: a bad template fails at once
    model = as_encoder(model)
    if labels is None:
        if label_field is None:
            raise RetrievalError("give the labels (--labels a,b,c) or a field of the manifest that holds them")
        labels = sorted({str(p.extra[label_field]) for p in pairs if label_field in p.extra})
    if len(labels) < 2:
        raise RetrievalError(f"classification needs at least two labels, got {list(labels)}")
    from retrieval.models.zeroshot import class_probabilities, own_classes  # the model is loaded: torch is in already

    classes = own_classes(model, labels) if weight == 1 else None
    if classes is not None:
        enc = encode_pairs(
            model,
            [p for p in pairs if p.image is not None],
            encode=lambda pixels: class_probabilities(model, pixels, classes),
        )
        return _classification(
            enc.image_emb,
            enc.pairs,
            pairs,
            labels,
            label_field,
            {"template": None, "weight": weight, "classifier": "imagenet"},
        )
    try:
        label_emb = model.encode_text(prompts(labels, template))
    except ValueError as e:
        raise RetrievalError(str(e)) from e
    image_of = {}
    if weight > 0:
        enc = encode_pairs(model, [p for p in pairs if p.image is not None])
        image_of = {p.id: v for p, v in zip(enc.pairs, enc.image_emb, strict=True)}
    caption_of = {}
    if weight < 1:
        with_captions = [p for p in pairs if p.captions]
        emb = model.encode_text([c for p in with_captions for c in p.captions])
        starts = np.cumsum([0] + [len(p.captions) for p in with_captions])
        caption_of = {
            p.id: caption_vector(emb[a:b]) for p, a, b in zip(with_captions, starts[:-1], starts[1:], strict=True)
        }
    kept, vectors = [], []
    for p in pairs:
        x1, x2 = image_of.get(p.id), caption_of.get(p.id)
        x1, x2 = (x1 if x1 is not None else x2), (x2 if x2 is not None else x1)  # a missing part: the other one
        if x1 is None or x2 is None:  # neither part
            continue
        vectors.append(weight * x1 + (1 - weight) * x2)
        kept.append(p)
    if not kept:
        raise RetrievalError("none of the items could be classified (no readable image or caption)")
    probs = probabilities(label_emb, np.stack(vectors), float(model.inverse_temperature().detach()))
    return _classification(probs, kept, pairs, labels, label_field, {"template": template, "weight": weight})


def _classification(
    probs: np.ndarray,
    kept: Sequence[Pair],
    pairs: Sequence[Pair],
    labels: Sequence[str],
    label_field: str | None,
    how: dict[str, Any],
) -> dict[str, Any]:
    """The classify result for the `kept` items' (n, L) probabilities, with accuracy when label_field is given."""
    result: dict[str, Any] = {
        "labels": list(labels),
        **how,
        "skipped": len(pairs) - len(kept),
        "ids": [p.id for p in kept],
        "probabilities": probs,
        "top": top_labels(probs, labels, [p.id for p in kept]),
    }
    if label_field is not None:
        index = {label: i for i, label in enumerate(labels)}
        has = np.array([str(p.extra.get(label_field)) in index for p in kept])
        truth = np.array(
            [index[str(p.extra[label_field])] for p, h in zip(kept, has, strict=True) if h], dtype=np.int64
        )
        if not len(truth):
            raise RetrievalError(f"no item has a {label_field!r} value among the labels {list(labels)}")
        result["report"] = {**classification_report(probs[has], truth, labels), "unlabelled": int((~has).sum())}
    return result
