"""Zero-shot classification with the retrieval model: P(y | x1, x2) = softmax_y(s · sim(y, x1, x2)). numpy only.

Each label y becomes a text prompt ("a photo of a {label}"), and sim is the same fused similarity as in
R(q, D): w cos(e(prompt_y), e(x1)) + (1 - w) cos(e(prompt_y), e(x2)), for an item with image x1 and
caption x2 (an item missing a part uses the part it has). s is the model's learned logit scale, so the
probabilities are the ones the contrastive loss trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval.arrays import Embeddings


def probabilities(label_emb: Embeddings, item_emb: Embeddings, scale: float) -> np.ndarray:
    """(n_items, n_labels) softmax over labels of scale * cosine; item_emb may be a fused (unnormalised) vector."""
    logits = scale * (item_emb @ label_emb.T)  # (N, L)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def top_k_accuracy(probs: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Fraction of items whose true label is among the k most probable (ties broken by label order)."""
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean((top == truth[:, None]).any(axis=1)))


def confusion_matrix(truth: np.ndarray, predicted: np.ndarray, n_labels: int) -> np.ndarray:
    """(n_labels, n_labels) counts: rows are true labels, columns predicted ones."""
    m = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(m, (truth, predicted), 1)
    return m


def classification_report(probs: np.ndarray, truth: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Top-1/top-5 accuracy against chance (uniform and always-the-most-common-label), per label, confusion."""
    predicted = probs.argmax(axis=1)
    counts = np.bincount(truth, minlength=len(labels))
    matrix = confusion_matrix(truth, predicted, len(labels))
    return {
        "n_items": len(truth),
        "n_labels": len(labels),
        "top1": top_k_accuracy(probs, truth, 1),
        "top5": top_k_accuracy(probs, truth, min(5, len(labels))),
        "chance_top1": 1.0 / len(labels),
        "chance_top5": min(5, len(labels)) / len(labels),
        "majority_top1": float(counts.max() / max(counts.sum(), 1)),
        "per_label": {
            label: {"n": int(counts[i]), "top1": float(matrix[i, i] / counts[i]) if counts[i] else None}
            for i, label in enumerate(labels)
        },
        "labels": list(labels),
        "confusion": matrix.tolist(),
    }


def top_labels(probs: np.ndarray, labels: Sequence[str], ids: Sequence[str], k: int = 3) -> dict[str, list[Any]]:
    """Each item's k most probable labels with their probabilities, best first (ties in label order)."""
    order = (-probs).argsort(axis=1, kind="stable")[:, :k]
    return {i: [[labels[j], float(p[j])] for j in o] for i, p, o in zip(ids, probs, order, strict=True)}
