"""Index: an index opened for search, with the model that embeds its queries.

`Index.open(path).search(text="a dog on a beach", k=10)`. It checks that the model is the one that built the
index, embeds text (in numpy where the text tower allows, so a text search needs no torch), images and
indexed items, and turns FAISS's answers into `Hit` records. The ranking itself is in search.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from retrieval.choices import check_params
from retrieval.errors import RetrievalError
from retrieval.index.faiss_ops import FaissThreads
from retrieval.index.format import check_model
from retrieval.index.fusion import ranked_by_rule
from retrieval.index.scan import SEARCHES
from retrieval.index.search import (
    MAX_QUERY_CHARS,
    GcPaused,
    Hit,
    Results,
    check_search_args,
    query_rows,
    ranked,
    search_threads,
    target_column,
    target_weight,
    with_margin,
)
from retrieval.index.store import IndexStore
from retrieval.models.modeldir import ModelRef, fingerprint, numpy_text
from retrieval.rules import score_rule

if TYPE_CHECKING:  # loaded on first use (model, embed_texts): encoder imports torch, which text search may not need
    from retrieval.models.encoder import Encoder
    from retrieval.models.text_numpy import NumpyTextEncoder


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
        server picks up a new generation in the time it takes to read its FAISS file or vectors."""
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
            from retrieval.models.load import load_model

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
        fusion: str = "weighted",
    ) -> list[Hit]:
        """Exactly one of text, image, like; see search_vectors for the rest.

        With neither theta nor margin given, the cutoff stored by `retrieval calibrate` for this target (and
        fusion rule and weight) applies, if there is one: see `calibrated`.
        """
        if sum(x is not None for x in (text, image, like)) != 1:
            raise RetrievalError("give exactly one query: text, image or like (an item id)")
        if theta is None and margin is None:
            theta, margin = self.calibrated(target, weight, fusion)
        check_search_args(k, theta, weight, target, margin, fusion)
        if text is not None:
            q = self.embed_text(text)
        elif image is not None:
            q = self.embed_image(image)
        else:
            assert like is not None  # exactly one of the three, checked above
            q = self.embed_item(like)
        return self.search_vector(q, k, theta, weight, target, exact, margin, fusion)

    def calibrated(self, target: str, weight: float, fusion: str = "weighted") -> tuple[float | None, float | None]:
        """(theta, margin) stored by `retrieval calibrate` for this target (and, for items, this fusion rule and
        weight), else (None, None)."""
        c = self.store.manifest.calibration.get(target)
        if not c or (
            target == "item" and score_rule(c.get("fusion", "weighted"), c["weight"]) != score_rule(fusion, weight)
        ):
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
        fusion: str = "weighted",
    ) -> list[Hit]:
        """R(q, D) for an embedded query q of shape (d,)."""
        return self.search_vectors(np.asarray(q)[None], k, theta, weight, target, exact, margin, fusion)[0]

    def search_vectors(
        self,
        queries: np.ndarray,
        k: int | None = 10,
        theta: float | None = None,
        weight: float = 0.5,
        target: str = "item",
        exact: bool = False,
        margin: float | None = None,
        fusion: str = "weighted",
    ) -> list[list[Hit]]:
        """R(q, D) for a batch of embedded queries (nq, d): one FAISS call and one metadata fetch for all.

        k: the k best; theta: only those scoring above it; both: the k best of those. margin keeps only results
        above (the query's top score - margin): a query-adaptive cutoff. target: whole items, or only images
        (w = 1) or only captions (w = 0). fusion, for whole items: how an item's image and caption scores make
        one (fusion.py): "weighted" by `weight` (w cos(q, image) + (1 - w) cos(q, caption)), "mean" (w = 1/2),
        "max" or "min". On an HNSW or IVF index the answer is approximate; exact=True answers from a flat scan.
        """
        check_search_args(k, theta, weight, target, margin, fusion)
        d = self.store.manifest.dim
        if queries.ndim != 2 or queries.shape[1] != d:
            raise RetrievalError(f"query vectors have shape {queries.shape[1:]}, the index holds {d}-d vectors")
        column = target_column(target)
        if not len(queries):
            return []
        by_rule = target == "item" and fusion in ("max", "min")
        w = target_weight(target, 0.5 if fusion == "mean" else weight)
        index, params = self.store.searcher(column, exact, None if by_rule else w)  # max, min: part queries
        qv = query_rows(index, queries, target, w)

        def rank(k: int | None, theta: float | None) -> Results:
            if by_rule:
                return ranked_by_rule(index, queries, k, theta, fusion, params, self._part_scores)
            return ranked(index, qv, k, theta, params)

        with SEARCHES:  # a flat scan splits between the cores only while no other search has work for them
            with FaissThreads(search_threads(len(queries))):
                results = rank(k, theta) if margin is None else with_margin(rank, k, theta, margin)
            return self.hits_for(queries, results)

    def _part_scores(self, ids: np.ndarray, q: np.ndarray) -> np.ndarray:
        """(2, n) exact cosines of q with the items' images, then their captions, from the stored vectors."""
        return self.store.part_scorer(q, self.store.rows_of(ids))

    def hits(self, q: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        """Result records of one query q (d,): `ids` (FAISS ids) with their fused `scores`."""
        return self.hits_for(q[None], [(scores, ids)])[0]

    def hits_for(self, queries: np.ndarray, results: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[list[Hit]]:
        """Result records per query: metadata from the store and per-modality scores from the vectors, fetched
        for all queries at once (each item's row is looked up once, for its record and its vector)."""
        ids = results[0][1] if len(results) == 1 else np.concatenate([np.zeros(0, np.int64), *(i for _, i in results)])
        rows, part_scores = self.store.rows_of(ids), self.store.part_scorer
        out, start = [], 0
        with GcPaused(), FaissThreads(1):  # scoring parts: one thread, no OpenMP team for a few rows
            hits = self.store.result_records(ids, rows)
            for q, (scores, found) in zip(queries, results, strict=True):
                end = start + len(found)
                images, texts = part_scores(q, rows[start:end]).tolist()  # cos(q, x1) per hit, then cos(q, x2)
                for hit, score, image_score, text_score in zip(
                    hits[start:end], scores.tolist(), images, texts, strict=True
                ):
                    hit.score = score
                    hit.image_score = image_score if hit.has_image else None
                    hit.text_score = text_score if hit.has_caption else None
                out.append(hits[start:end])
                start = end
        return out

    def tune(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Trade speed for recall on ANN indexes: HNSW's efSearch, IVF's nprobe (no effect on flat)."""
        knobs = {k: v for k, v in (("ef_search", ef_search), ("nprobe", nprobe)) if v is not None}
        check_params(knobs)
        self.store.tune(knobs)

    def info(self) -> dict[str, Any]:
        return self.store.info()
