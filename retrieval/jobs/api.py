"""The Python API behind the CLI: whole jobs from paths to results, nothing printed.

`train_model` and `evaluate_model` read manifests and splits, call the engine parts (data, model,
train, evaluate) and return plain results; `run_demo` is the embedded default job.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from retrieval.data.pairs import Pair, image_caption_pairs, read_pairs, read_split, select
from retrieval.errors import ImageError, RetrievalError
from retrieval.evaluation.classify import (
    DEFAULT_TEMPLATE,
    check_template,
    classification_report,
    probabilities,
    prompts,
)
from retrieval.evaluation.metrics import (
    DEFAULT_KS,
    Embeddings,
    Relevance,
    fusion_sweep,
    list_ranks,
    recall_against_exact,
    recall_curve,
    retrieval_report,
    summarise,
    top_k_streamed,
)
from retrieval.evaluation.thresholds import threshold_report
from retrieval.index.build import caption_vector
from retrieval.index.search import Hit, Index
from retrieval.models.config import FINETUNE_LR, ModelConfig, preset, with_heads, with_image_tower, with_text_tower
from retrieval.models.modeldir import ModelRef, hf_config, hf_name

if TYPE_CHECKING:  # torch is imported only by the jobs that run a model: eval --index and calibrate never do
    from retrieval.index.store import IndexStore
    from retrieval.models.towers import Encoder

DEMO_ROOT = Path("index_data/demo")
DEMO_IMAGES = 2500  # the synthetic collection the demo trains and evaluates on (20% held out)
DEMO_MINUTES = 2.5  # the demo's training budget; with start-up and evaluation it stays under 3 minutes


def load_split_pairs(data: str | Path, split_file: str | Path | None, split: str | None) -> list[Pair]:
    """The pairs of one split; split_file defaults to split.json beside the manifest when there is one."""
    pairs = read_pairs(data)
    split_file = split_file or _default_split_file(data)
    if split is None:
        return pairs
    if split_file is None:
        raise RetrievalError(f"--split {split} needs a split file; none given and no split.json beside {data}")
    chosen = select(pairs, read_split(split_file, split))
    if not chosen:
        raise RetrievalError(f"split {split!r} of {split_file} matches no id in {data}")
    return chosen


def _default_split_file(data: str | Path) -> Path | None:
    candidate = Path(data).parent / "split.json" if Path(data).is_file() else Path(data) / "split.json"
    return candidate if candidate.is_file() else None


def train_model(
    data: str | Path,
    out: str | Path,
    preset_name: str = "default",
    split_file: str | Path | None = None,
    train_split: str = "train",
    val_split: str = "test",
    max_minutes: float | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    text_tower: str | None = None,
    text_trainable_layers: int = 0,
    init: str | None = None,
    freeze: str | None = None,
    image_size: int | None = None,
    image_tower: str | None = None,
    image_trainable_blocks: int = 0,
    image_head: str | None = None,
    head_dropout: float | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train on the train split, select the best epoch on the validation split; return the run summary.

    `overrides` replace TrainConfig fields (epochs, batch_size, lr, loss, seed, views, ...); None means keep.
    The towers, heads and image size are the preset's unless given: text_tower "minilm" is the pretrained
    all-MiniLM-L6-v2, locked or with its last text_trainable_layers layers trained; image_tower
    "efficientnet-lite0/1/2" is an ImageNet-pretrained tower, locked or with its last image_trainable_blocks
    blocks trained; image_head "linear" or "mlp" (head_dropout: the MLP's dropout). image_size replaces the
    input side (a checkpoint given to init keeps its own). init ("hf:<dir or name>") fine-tunes a CLIP or
    SigLIP checkpoint instead (its own loss, lr 1e-5 unless given; freeze "image" or "text" locks a side);
    the result is a Hugging Face checkpoint in `out`, loadable as hf:<out>. Without any split file, every
    pair trains and the last epoch is kept.
    """
    from retrieval.train.loop import train  # torch-heavy; imported only by the commands that train

    p = preset(preset_name)
    if init is not None and (image_size is not None or image_tower is not None or image_head is not None):
        raise RetrievalError(
            "--image-size, --image-tower and --image-head are for our own model; "
            "a checkpoint given to --init keeps its own"
        )
    model_cfg = model_config(
        p.model,
        text_tower,
        text_trainable_layers,
        image_tower,
        image_trainable_blocks,
        image_size,
        image_head,
        head_dropout,
    )
    defaults = finetune_defaults(init, freeze, text_tower, overrides.get("loss"))
    train_cfg = dataclasses.replace(p.train, **{**defaults, **{k: v for k, v in overrides.items() if v is not None}})
    has_split = split_file is not None or _default_split_file(data) is not None
    train_pairs = load_split_pairs(data, split_file, train_split if has_split else None)
    val_pairs = load_split_pairs(data, split_file, val_split) if has_split else []
    t0 = time.monotonic()
    train(train_pairs, val_pairs, out, model_cfg, train_cfg, max_minutes, resume, progress, on_epoch, init, freeze)
    summary = {"model": str(out), "minutes": (time.monotonic() - t0) / 60, "log": _read_log(Path(out))}
    (Path(out) / "train_done.json").write_text(json.dumps(summary, indent=2))
    return summary


def model_config(
    base: ModelConfig,
    text_tower: str | None,
    text_trainable_layers: int,
    image_tower: str | None,
    image_trainable_blocks: int,
    image_size: int | None,
    image_head: str | None,
    head_dropout: float | None,
) -> ModelConfig:
    """A preset's model config with the towers, input side and head the user chose (None: the preset's)."""
    config = base
    if text_tower is not None or text_trainable_layers:
        config = with_text_tower(config, text_tower or config.text.kind, text_trainable_layers)
    if image_tower is not None or image_trainable_blocks:
        config = with_image_tower(config, image_tower or config.image.kind, image_trainable_blocks)
    if image_size is not None:
        config = dataclasses.replace(config, image=dataclasses.replace(config.image, image_size=image_size))
    return with_heads(config, image_head, head_dropout)


def finetune_defaults(init: str | None, freeze: str | None, text_tower: str | None, loss: str | None) -> dict[str, Any]:
    """TrainConfig fields that fine-tuning a checkpoint changes: a low learning rate, and its own loss."""
    if init is None:
        if freeze:
            raise RetrievalError(
                "--freeze is for fine-tuning (--init hf:...); our own text tower locks with --text-tower minilm"
            )
        return {}
    if hf_name(init) is None:
        raise RetrievalError(f"--init takes a Hugging Face checkpoint, hf:<dir or name>; got {init!r}")
    if text_tower is not None:
        raise RetrievalError("--text-tower builds our own model; it does not combine with --init")
    family = hf_config(init)["model_type"]  # clip or siglip: the names of the losses they were trained with
    if loss not in (None, family):
        raise RetrievalError(f"{init} is a {family} model: fine-tune it with its own loss (--loss {family})")
    return {"lr": FINETUNE_LR, "loss": family}


def _read_log(out: Path) -> list[dict[str, Any]]:
    log = out / "train_log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


@dataclass
class Encoded:
    """Embeddings of the pairs whose images could be read, and the reasons for those that could not."""

    pairs: list[Pair]
    image_emb: Embeddings
    skipped: list[str]


def _load(model: Encoder | ModelRef) -> Encoder:
    from retrieval.models.towers import load_model

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
    rules (thresholds.py). fusion: index each image with its first caption, query with the others, sweep the
    fusion weight w. curves: R@k for k = 1..100, for plots.
    """
    model = _load(model)
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
        report["fusion"] = fusion_report(enc.image_emb, text_emb, text_image, ks)
    return report


def fusion_report(
    image_emb: Embeddings, text_emb: Embeddings, text_image: np.ndarray, ks: Sequence[int]
) -> dict[str, Any]:
    """Each image indexed with its first caption; its other captions are the queries (images need 2+ captions)."""
    first = np.searchsorted(text_image, np.arange(len(image_emb)))  # captions are grouped by image, in order
    is_first = np.zeros(len(text_image), dtype=bool)
    is_first[first[first < len(text_image)]] = True
    queries = ~is_first
    if not queries.any():
        raise RetrievalError(
            "the fusion sweep needs images with at least two captions (one indexed, others as queries)"
        )
    sweep = fusion_sweep(
        image_emb,
        text_emb[np.minimum(first, len(text_emb) - 1)],
        text_emb[queries],
        text_image[queries],
        np.round(np.linspace(0, 1, 11), 2).tolist(),
        ks,
    )
    return {"n_items": len(image_emb), "n_queries": int(queries.sum()), **sweep}


EVAL_DEPTH = 100  # eval --index: results asked of the index (and of exact search) per query
EXACT_BLOCK_ROWS = 65_536  # rows of the memory-mapped vectors scanned at a time by the exact search
THRESHOLD_BLOCK_ROWS = 16_384  # and by the θ report, whose query chunks are larger: (1024, B) scores at a time


@dataclass
class LabelledQueries:
    """An index's items for one target, and labelled text queries against them, embedded: what evaluating and
    calibrating an index share. Positions count the kept items in fid order (the order of the stored vectors)."""

    index: Index
    target: str
    weight: float  # w: 1 for images, 0 for captions
    keep: np.ndarray  # (N,) bool: the items the target matches
    kept_fids: npt.NDArray[np.int64]
    vectors: np.ndarray  # (N, 2d) the stored fused vectors, memory-mapped
    query_emb: Embeddings  # (nq, d)
    relevance: Relevance
    unmatched: int  # captions whose relevant ids are not in the index

    def fused_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """w e(x1) + (1 - w) e(x2) of the kept items, a block of the stored vectors at a time (for the θ report)."""
        d, w = self.index.store.manifest.dim, self.weight
        return (
            (start, w * block[:, :d] + (1 - w) * block[:, d:])
            for start, block in _kept_blocks(self.vectors, self.keep, THRESHOLD_BLOCK_ROWS)
        )


def labelled_queries(index_path: str | Path, pairs: Sequence[Pair], target: str, weight: float) -> LabelledQueries:
    """Open the index and embed the pairs' captions as queries; their relevant items are the indexed items with
    the pair's id (or the ids in its `relevant` field)."""
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
        {"image": 1.0, "text": 0.0}.get(target, weight),
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
    from retrieval.index.search import query_vectors, ranked

    q = labelled_queries(index_path, pairs, target, weight)
    store = q.index.store
    q.index.tune(ef_search, nprobe)
    k = max(depth, *ks)
    qv = query_vectors(q.query_emb, target, q.weight)  # (nq, 2d): scores the fused stored vectors as the index does
    searcher, params = store.searcher({"image": "image_key", "text": "text_key"}.get(target))
    found_fids = _padded(ranked(searcher, qv, k, None, params), k)  # (nq, K) fids, -1 past the end
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
        "search_params": _search_knobs(params),
        "depth": k,
        direction: summarise(ranks, ks, ap),
        "exact": {direction: summarise(exact_ranks, ks, exact_ap)},
        "index_recall": recall_against_exact(_exact_scores(store, qv, found_fids), exact_scores, ks),
    }
    if curves:
        report["curves"] = {direction: recall_curve(ranks, min(100, k))}
    if thresholds:
        report["threshold"] = threshold_report(q.query_emb, q.fused_blocks, q.relevance, target_precision)
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


def _search_knobs(params: Any) -> dict[str, int]:
    """The ANN knobs the search ran with, read back from its FAISS parameters (none for flat)."""
    return {
        name: int(getattr(params, attr))
        for name, attr in (("ef_search", "efSearch"), ("nprobe", "nprobe"))
        if hasattr(params, attr)
    }


def calibrate_index(
    index_path: str | Path,
    pairs: Sequence[Pair],
    target: str = "image",
    weight: float = 0.5,
    target_precision: float | None = None,
    rule: str = "flat",
) -> dict[str, Any]:
    """Choose a cutoff for R(q, D) on labelled queries and store it in the index's manifest, so that
    `search` applies it when no θ is given. rule `flat` stores a θ (F1-best, or the lowest reaching
    target_precision); `top_relative` stores a margin below each query's top score (F1-best)."""
    from retrieval.index.store import IndexStore

    q = labelled_queries(index_path, pairs, target, weight)  # the θ report alone: no index search, no top-k
    t = threshold_report(q.query_emb, q.fused_blocks, q.relevance, target_precision)
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
    model = _load(model)
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


@dataclass
class DemoResult:
    data: Path
    model: Path
    index: Path
    trained: bool  # False when an earlier run's model was reused
    train_minutes: float | None
    report: dict[str, Any]
    examples: list[tuple[str, str, list[Hit]]]  # (query, the id of the image it was written for, hits)


def run_demo(
    root: str | Path = DEMO_ROOT,
    n: int = DEMO_IMAGES,
    minutes: float = DEMO_MINUTES,
    preset_name: str = "default",
    progress: bool = True,
    n_examples: int = 3,
) -> DemoResult:
    """Synthesise the sample collection, train (or reuse) the default model, evaluate it, index and query it."""
    from retrieval.data.synth import generate
    from retrieval.index.build import build_index
    from retrieval.index.search import Index

    root = Path(root)
    manifest = root / "data" / "pairs.jsonl"
    if not manifest.is_file():
        generate(root / "data", n, seed=0)
    model_dir = root / "model"
    trained = not (model_dir / "train_done.json").is_file()
    train_minutes = None
    if trained:
        resume = (model_dir / "train_state.pt").is_file()
        train_minutes = train_model(
            manifest, model_dir, preset_name, max_minutes=minutes, resume=resume, progress=progress
        )["minutes"]
        shutil.rmtree(root / "index", ignore_errors=True)  # built with the previous model
    model = _load(model_dir)
    test = image_caption_pairs(load_split_pairs(manifest, None, "test"))
    report = evaluate_model(model, test)
    build_index(manifest, model_dir, root / "index", progress=progress)
    index = Index.open(root / "index")
    picks = [test[i] for i in np.linspace(0, len(test) - 1, n_examples).astype(int)]
    examples = [(p.captions[0], p.id, index.search(text=p.captions[0], k=3, target="image")) for p in picks]
    return DemoResult(manifest.parent, model_dir, root / "index", trained, train_minutes, report, examples)
