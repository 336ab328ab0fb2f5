"""Search requests answered together: the call they share, each one's query, and each one's answer.

The routes hand each search to the `Batcher` (batcher.py) under a `SearchCall` key: the generation's index and
every parameter of the search, so one FAISS call can answer all the requests under one key. `run_search` answers
them: their vectors (the texts through the text tower in one go), one `Index.search_vectors`, and each
request's JSON, made on the request thread. A request's own fault (an unknown item, an empty text) is its
answer alone; the others in its call are answered as if it had not come. The answers are those of `Index.search`
one request at a time, to float rounding: a batched FAISS call may add up a score in another order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import msgspec
import numpy as np
from fastapi import UploadFile
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from retrieval.data.images import read_image
from retrieval.errors import RetrievalError
from retrieval.index.format import Item
from retrieval.index.handle import Index
from retrieval.index.scan import SEARCHES
from retrieval.index.search import Hit
from retrieval.server.media import Settings
from retrieval.server.schemas import SearchOptions

T = TypeVar("T")
JSON = msgspec.json.Encoder()


@dataclass(frozen=True)
class SearchCall:
    """What one FAISS call answers: a generation's index (so no call mixes generations) and every parameter of
    the search, θ and margin as given or as calibrated (a request without θ gets what `Index.search` gives)."""

    index: Index
    k: int
    theta: float | None
    margin: float | None
    weight: float
    target: str
    fusion: str = "weighted"

    @classmethod
    def of(cls, index: Index, options: SearchOptions) -> SearchCall:
        theta, margin = options.theta, None
        if theta is None:
            theta, margin = index.calibrated(options.target, options.weight, options.fusion)
        return cls(index, options.k, theta, margin, options.weight, options.target, options.fusion)


@dataclass(frozen=True, eq=False)
class Query:
    """One request's query: a text, an indexed item's id (more like this) or an uploaded image's vector; with the
    parameters its answer echoes and when the request began."""

    echo: dict[str, Any]
    t0: float
    text: str | None = None
    like: str | None = None
    vector: np.ndarray | None = None


def run_search(call: SearchCall, queries: list[Query]) -> list[Response | Exception]:
    """Each request's answer, or the error that is its answer, from one FAISS call and one metadata fetch.
    Counted as one search throughout (scan.SEARCHES): a flat scan beside it keeps to its own core."""
    with SEARCHES:
        vectors = embedded(call.index, queries)
        found = [v for v in vectors if not isinstance(v, Exception)]
        hits = iter(
            call.index.search_vectors(
                np.stack(found), call.k, call.theta, call.weight, call.target, margin=call.margin, fusion=call.fusion
            )
            if found
            else []
        )
        return [
            v if isinstance(v, Exception) else answer(q, next(hits), len(found))
            for q, v in zip(queries, vectors, strict=True)
        ]


def embedded(index: Index, queries: list[Query]) -> list[np.ndarray | Exception]:
    """Each query's vector, or the error that is its answer. The texts go through the text tower together; if
    one is refused (an empty text), each goes alone, so the refusal answers only the request that sent it."""
    texts = [q.text for q in queries if q.text is not None]
    try:
        text_vectors: Iterator[np.ndarray | Exception] = iter(index.embed_texts(texts))
    except RetrievalError:
        text_vectors = iter([attempt(index.embed_text, text) for text in texts])

    def vector(q: Query) -> np.ndarray | Exception:
        if q.text is not None:
            return next(text_vectors)
        return q.vector if q.vector is not None else attempt(liked, index, q.like)

    return [vector(q) for q in queries]


def liked(index: Index, item_id: str | None) -> np.ndarray:
    """More like this: the item's stored vector; an unknown id is a 404 (Index.embed_item would say only 422)."""
    assert item_id is not None, "a query is a text, an item id or a vector"
    item_or_404(index, item_id)
    return index.embed_item(item_id)


def attempt(fn: Callable[..., T], *args: Any) -> T | Exception:
    try:
        return fn(*args)
    except Exception as e:  # the answer of the one request it belongs to, raised there
        return e


def answer(query: Query, hits: list[Hit], batch: int) -> Response:
    """A `SearchOut` as JSON, made here on the request thread, so the event loop, which every request passes
    through, only sends it (FastAPI does not check a returned Response against the route's response_model).
    msgspec encodes it in C: JSONResponse's `json.dumps` was 6% of the time the server held the GIL under load
    (py-spy); the same values, floats in their shortest round-trip form either way."""
    body = {
        "query": query.echo,
        "count": len(hits),
        "took_ms": 1000 * (time.perf_counter() - query.t0),
        "batch": batch,
        "results": [hit_json(rank, hit) for rank, hit in enumerate(hits, 1)],
    }
    return Response(JSON.encode(body), media_type="application/json")


def hit_json(rank: int, hit: Hit) -> dict[str, Any]:
    return {"rank": rank, **hit.to_json(), "thumb": thumb_url(hit.id) if hit.path else None}


def thumb_url(item_id: str) -> str:
    return f"/api/thumb/{quote(item_id, safe='')}"


def item_or_404(index: Index, item_id: str) -> Item:
    item = index.store.items_by_id([item_id]).get(item_id)
    if item is None:
        raise HTTPException(404, f"no item with id {item_id!r} in this index")
    return item


def embed_upload(index: Index, file: UploadFile, settings: Settings) -> np.ndarray:
    """Decode an upload as an indexed file is decoded (one path: `read_image`, straight from the upload's bytes,
    the pixel bound read from the header) and embed it; the image is dropped as soon as it is embedded. A search's
    work for the cores, as run_search's is."""
    with SEARCHES:
        size = index.model().transform.size_hint
        return index.embed_image(read_image(file.file, "the uploaded image", size, settings.max_upload_pixels))
