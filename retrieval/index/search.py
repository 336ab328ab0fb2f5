"""R(q, D) = {(x1, x2) in D | sim(q, x1, x2) > θ}, with top-k, over an index on disk.

sim(q, x1, x2) = w cos(q, x1) + (1 - w) cos(q, x2), where x1 is an item's image and x2 its caption(s).
Every item is stored as the fused vector [e(x1), e(x2)], so the query [w q, (1 - w) q] scores sim with
one inner product: `target` picks w = 1 (images), w = 0 (captions) or the given w (whole items).
θ runs through FAISS range_search, which is strict (>) as the formula is; top-k through search; with
both, the result is the top k of those above θ. Range results stay as FAISS's (lims, D, I) until they
become `Hit` records. On flat indexes the answer is exact; on HNSW and IVF it is approximate (HNSW's range
search sees only its efSearch candidates), and `exact=True` answers from a flat scan of the same vectors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
from PIL import Image

from retrieval.choices import TARGETS, check_params
from retrieval.errors import RetrievalError
from retrieval.index.store import IndexStore, check_model
from retrieval.models.modeldir import ModelRef, fingerprint, numpy_text

if TYPE_CHECKING:  # loaded on first use (model, embed_texts): encoder imports torch, which text search may not need
    from retrieval.models.encoder import Encoder
    from retrieval.models.text_numpy import NumpyTextEncoder

FEW_QUERIES = 8  # up to this many queries in one call, FAISS runs on one thread (see faiss_threads)
MAX_QUERY_CHARS = 10_000  # beyond this a "query" is a document; the tokenizer would cut it anyway


@dataclass(slots=True)
class Hit:
    id: str
    path: str | None
    captions: list[str]
    score: float  # the fused sim(q, x1, x2)
    image_score: float | None  # cos(q, x1); None when the item has no image
    text_score: float | None  # cos(q, x2); None when the item has no caption
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "caption": self.captions[0] if self.captions else None,
            "score": self.score,
            "image_score": self.image_score,
            "text_score": self.text_score,
        }


def check_search_args(
    k: int | None, theta: float | None, weight: float, target: str, margin: float | None = None
) -> None:
    if k is None and theta is None and margin is None:
        raise RetrievalError("give k (top-k), theta (threshold), margin (below the top score), or a combination")
    if k is not None and k < 1:
        raise RetrievalError(f"k must be at least 1, got {k}")
    if theta is not None and not -1.0 <= theta <= 1.0:
        raise RetrievalError(f"theta must be in [-1, 1] (a cosine similarity), got {theta}")
    if margin is not None and not 0.0 < margin <= 2.0:
        raise RetrievalError(
            f"margin must be in (0, 2] (a cosine difference; results score above top - margin), got {margin}"
        )
    if not 0.0 <= weight <= 1.0:
        raise RetrievalError(f"weight must be in [0, 1], got {weight}")
    if target not in TARGETS:
        raise RetrievalError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")


def query_vectors(queries: np.ndarray, target: str, weight: float) -> np.ndarray:
    """[w q, (1 - w) q] per row: its inner product with [e(x1), e(x2)] is w cos(q, x1) + (1 - w) cos(q, x2)."""
    w = {"image": 1.0, "text": 0.0}.get(target, weight)
    return np.ascontiguousarray(
        np.concatenate([w * queries, (1.0 - w) * queries], axis=1), dtype=np.float32
    )  # (nq, 2d)


@contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """FAISS's OpenMP threads in this thread for a while. A few queries run fastest on one: a second
    thread only waits at barriers, and when the other core is busy the wait is long (HNSW, one query:
    16 ms on two threads, under 1 ms on one, measured here beside a training job)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def part_scores(vectors: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(n, 2) cosines of q with each fused vector's halves, as one matrix product with [[q, 0], [0, q]]."""
    d = len(q)
    block = np.zeros((2 * d, 2), dtype=np.float32)
    block[:d, 0], block[d:, 1] = q, q
    return vectors @ block


def ranked(
    index: faiss.Index, qv: np.ndarray, k: int | None, theta: float | None, params: Any
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query of qv (nq, 2d): (scores, ids), best first; top-k, everything above θ, or the top k of those."""
    if theta is None or k is not None:
        assert k is not None, "k, theta or both (check_search_args)"
        scores, ids = index.search(qv, min(k, max(index.ntotal, 1)), params=params)  # (nq, k) each
        keep = (ids >= 0) if theta is None else (ids >= 0) & (scores > theta)
        return [(s[m], i[m]) for s, i, m in zip(scores, ids, keep, strict=True)]
    lims, scores, ids = index.range_search(qv, theta, params=params)  # query j's results: [lims[j], lims[j + 1])
    out = []
    for a, b in zip(lims[:-1].tolist(), lims[1:].tolist(), strict=True):
        order = np.argsort(-scores[a:b], kind="stable")
        out.append((scores[a:b][order], ids[a:b][order]))
    return out


def ranked_with_margin(
    index: faiss.Index, qv: np.ndarray, k: int | None, theta: float | None, margin: float, params: Any
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Like `ranked`, with each query's cutoff raised to (its top score - margin)."""
    tops = [scores[0] if len(scores) else np.inf for scores, _ in ranked(index, qv, 1, theta, params)]
    floors = np.maximum(-np.inf if theta is None else theta, np.array(tops) - margin)
    if np.all(np.isinf(floors)):  # nothing above θ for any query
        return [(np.zeros(0, np.float32), np.zeros(0, np.int64)) for _ in tops]
    # the lowest cutoff for all in one call (strictly below it, so ties at the floor survive), then each its own
    low = float(np.nextafter(np.float32(floors[np.isfinite(floors)].min()), np.float32(-2)))
    return [(s[s > f], i[s > f]) for (s, i), f in zip(ranked(index, qv, k, low, params), floors, strict=True)]


class Index:
    """An index opened for search: `Index.open(path).search(text="a dog on a beach", k=10)`."""

    def __init__(self, store: IndexStore, model_dir: ModelRef, model_override: ModelRef | None = None):
        self.store, self.model_dir = store, model_dir
        self.model_override = model_override  # what `open` was given, so `reopen` follows the manifest otherwise
        self._text_encoder: NumpyTextEncoder | Encoder | None = None
        self._model: Encoder | None = None

    @classmethod
    def open(cls, path: str | Path, model: ModelRef | None = None, max_memory: int | None = None) -> Index:
        """Open for search; `model` overrides the model named in the manifest (same weights only); max_memory
        (bytes) keeps an IVF index larger than that on disk, memory-mapped (see IndexStore.faiss)."""
        store = IndexStore.open(path, max_memory)
        model_dir = model or store.manifest.model
        check_model(store.manifest, path, fingerprint(model_dir), model_dir)
        return cls(store, model_dir, model)

    def reopen(self) -> Index:
        """This index as it is on disk now (another process may have re-indexed it), opened with the same model
        override and memory bound. The loaded model and text encoder are kept while it names the same model, so a
        server picks up a new generation in the time it takes to read the FAISS file."""
        fresh = Index.open(self.store.path, self.model_override, self.store.max_memory)
        if fresh.store.manifest.fingerprint == self.store.manifest.fingerprint:
            fresh._model, fresh._text_encoder = self._model, self._text_encoder
        return fresh

    # --- embedding the query ---------------------------------------------------------------------
    def embed_text(self, text: str) -> np.ndarray:
        return self.embed_texts([text])[0]

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """(n, d) unit vectors: our model directories' text towers run in numpy (no torch import); hf: ones in torch."""
        for text in texts:
            if not text.strip():
                raise RetrievalError("the text query is empty; type some words")
            if len(text) > MAX_QUERY_CHARS:
                raise RetrievalError(f"the text query is {len(text)} characters; keep it under {MAX_QUERY_CHARS}")
        if self._text_encoder is None:
            if numpy_text(self.model_dir):
                from retrieval.models.text_numpy import load_numpy_text_encoder

                self._text_encoder = load_numpy_text_encoder(self.model_dir)
            else:
                self._text_encoder = self.model()
        chunks = [self._text_encoder.encode_text(texts[s : s + batch_size]) for s in range(0, len(texts), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.store.manifest.dim), np.float32)

    def model(self) -> Encoder:
        """The torch model, loaded on first use: only image queries and text queries on hf: models pay for torch."""
        if self._model is None:
            from retrieval.models.towers import load_model

            self._model = load_model(self.model_dir)
        return self._model

    def embed_image(self, image: str | Path | Image.Image) -> np.ndarray:
        """A path, or a PIL image decoded the way its file would be (`Transform.decode`), encoded in the precision
        the index's images were: a JPEG opened with `Image.open` gives the vector its path, its upload and its
        indexed copy give."""
        model = self.model()
        precision = model.image_precision("auto", self.store.manifest.image_precision)  # as the index's images were
        return model.encode_image(
            [model.transform.decode(image) if isinstance(image, Image.Image) else image], precision=precision
        )[0]

    def embed_item(self, item_id: str) -> np.ndarray:
        """'More like this': the stored vector of an indexed item, its image if it has one."""
        item = self.store.items_by_id([item_id]).get(item_id)
        if item is None:
            raise RetrievalError(f"no item with id {item_id!r} in {self.store.path}")
        image_vec, text_vec = self.store.part_vectors([item.fid])[item.fid]
        vec = image_vec if image_vec is not None else text_vec
        assert vec is not None, "an indexed item has an image or a text"
        return vec

    # --- R(q, D) ----------------------------------------------------------------------------------
    def search(
        self,
        text: str | None = None,
        image: str | Path | Image.Image | None = None,
        like: str | None = None,
        k: int | None = 10,
        theta: float | None = None,
        weight: float = 0.5,
        target: str = "item",
        exact: bool = False,
        margin: float | None = None,
    ) -> list[Hit]:
        """Exactly one of text, image, like; see the module docstring for k, theta, weight, target, exact, margin.

        With neither theta nor margin given, the cutoff stored by `retrieval calibrate` for this target (and
        weight) applies, if there is one: see `calibrated`.
        """
        if sum(x is not None for x in (text, image, like)) != 1:
            raise RetrievalError("give exactly one query: text, image or like (an item id)")
        if theta is None and margin is None:
            theta, margin = self.calibrated(target, weight)
        check_search_args(k, theta, weight, target, margin)
        if text is not None:
            q = self.embed_text(text)
        elif image is not None:
            q = self.embed_image(image)
        else:
            assert like is not None  # exactly one of the three, checked above
            q = self.embed_item(like)
        return self.search_vector(q, k, theta, weight, target, exact, margin)

    def calibrated(self, target: str, weight: float) -> tuple[float | None, float | None]:
        """(theta, margin) stored by `retrieval calibrate` for this target (and, for items, this weight)."""
        c = self.store.manifest.calibration.get(target)
        if not c or (target == "item" and abs(c["weight"] - weight) > 1e-9):
            return None, None
        return c.get("theta"), c.get("margin")

    def search_vector(
        self,
        q: np.ndarray,
        k: int | None = 10,
        theta: float | None = None,
        weight: float = 0.5,
        target: str = "item",
        exact: bool = False,
        margin: float | None = None,
    ) -> list[Hit]:
        """R(q, D) for an embedded query q of shape (d,)."""
        return self.search_vectors(np.asarray(q)[None], k, theta, weight, target, exact, margin)[0]

    def search_vectors(
        self,
        queries: np.ndarray,
        k: int | None = 10,
        theta: float | None = None,
        weight: float = 0.5,
        target: str = "item",
        exact: bool = False,
        margin: float | None = None,
    ) -> list[list[Hit]]:
        """R(q, D) for a batch of embedded queries (nq, d): one FAISS call and one metadata fetch for all.

        margin keeps only results above (the query's top score - margin): a query-adaptive cutoff.
        On an HNSW or IVF index, top-k and θ are approximate; exact=True answers from a flat scan instead.
        """
        check_search_args(k, theta, weight, target, margin)
        d = self.store.manifest.dim
        if queries.ndim != 2 or queries.shape[1] != d:
            raise RetrievalError(f"query vectors have shape {queries.shape[1:]}, the index holds {d}-d vectors")
        column = {"image": "image_key", "text": "text_key"}.get(target)  # only image/text targets filter items
        if not len(queries):
            return []
        index, params = self.store.searcher(column, exact)
        qv = query_vectors(queries, target, weight)
        with faiss_threads(1 if len(queries) <= FEW_QUERIES else faiss.omp_get_max_threads()):
            if margin is None:
                results = ranked(index, qv, k, theta, params)
            else:
                results = ranked_with_margin(index, qv, k, theta, margin, params)
        rows = self.store.result_rows(np.unique(np.concatenate([ids for _, ids in results])).tolist())
        return [self.hits(q, scores, ids, rows) for q, (scores, ids) in zip(queries, results, strict=True)]

    def hits(
        self, q: np.ndarray, scores: np.ndarray, ids: np.ndarray, rows: dict[int, list[Any]] | None = None
    ) -> list[Hit]:
        """Result records: metadata from the store (or `rows` already fetched), per-modality scores from the vectors."""
        rows = self.store.result_rows(ids.tolist()) if rows is None else rows
        parts = part_scores(self.store.fused_vectors(ids), q).tolist()  # (n, 2): cos(q, x1), cos(q, x2)
        out = []
        for score, fid, (si, st) in zip(scores.tolist(), ids.tolist(), parts, strict=True):
            item_id, path, captions, has_image, has_text, extra = rows[fid]
            out.append(Hit(item_id, path, captions, score, si if has_image else None, st if has_text else None, extra))
        return out

    def tune(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Trade speed for recall on ANN indexes: HNSW's efSearch, IVF's nprobe (no effect on flat)."""
        knobs = {k: v for k, v in (("ef_search", ef_search), ("nprobe", nprobe)) if v is not None}
        check_params(knobs)
        self.store.tune(knobs)

    def info(self) -> dict[str, Any]:
        return self.store.info()
