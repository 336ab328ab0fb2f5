"""The HTTP API and the web page: a thin layer over `Index`, so the server and the CLI give the same answers.

`create_app` opens and warms the index (a `LiveIndex`, which picks up a new generation with no restart) and
routes each request to it: the route takes one generation at its start, runs its work on the request threads,
and answers from that generation throughout; errors become statuses in `http_errors`, never a 500 unless a bug.
Searches that arrive together share one FAISS call (`Batcher`, answered in searches.py).

Security is by construction: a file is only ever opened through an item's stored path, looked up by id, so
no part of a request reaches the filesystem; the page's own files are read into memory at start-up. CORS is
off unless origins are given, and `allowed_hosts` limits the Host names answered (see `process.serve`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from retrieval.errors import RetrievalError
from retrieval.index.handle import Index
from retrieval.server.batcher import MAX_BATCH, Batcher
from retrieval.server.http_errors import add_error_handlers
from retrieval.server.live import RELOAD_CHECK_S, Generation, LiveIndex
from retrieval.server.media import (
    BODY_TIMEOUT_S,
    DECODES_AT_ONCE,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_MAX_UPLOAD_PIXELS,
    BodyLimit,
    PixelBudget,
    Settings,
    thumb_folder,
    thumbnail,
    upload_pixels,
)
from retrieval.server.query_route import QueryRoute
from retrieval.server.schemas import (
    ERRORS,
    MAX_K,
    Health,
    ItemOut,
    SearchOptions,
    SearchOptionsQ,
    SearchOut,
    TextSearchQ,
    UploadQ,
)
from retrieval.server.searches import Query, SearchCall, embed_upload, item_or_404, run_search, thumb_url
from retrieval.server.threads import pool_threads, request_pool

STATIC_DIR = Path(__file__).with_name("static")
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
T = TypeVar("T")


def search_defaults(index: Index) -> dict[str, Any]:
    """What the page starts with (θ: the cutoff calibrated for whole items at w = 0.5, if any). A request
    without θ gets what `Index.search` does: the cutoff calibrated for its own target and weight, or top-k."""
    defaults = SearchOptions()
    theta = index.calibrated(defaults.target, defaults.weight)[0]
    return {"k": defaults.k, "theta": theta, "weight": defaults.weight, "target": defaults.target}


def create_app(
    index_path: str | Path,
    cors_origins: list[str] | None = None,
    model: str | Path | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS,
    allowed_hosts: list[str] | None = None,
    thumb_cache: bool = True,
    threads: int | None = None,
    decode_pixels: int | None = None,
    body_timeout_s: float = BODY_TIMEOUT_S,
    reload_check_s: float = RELOAD_CHECK_S,
    max_batch: int = MAX_BATCH,
) -> FastAPI:
    """Open and warm the index, then build the app. `allowed_hosts` None answers any Host header; `threads`
    (default: one per CPU core) is how many requests do their work at once, the rest wait their turn;
    `decode_pixels` (default DECODES_AT_ONCE x max_upload_pixels) how many uploaded pixels decode at once;
    `max_batch` how many concurrent searches one FAISS call answers at most (1: each its own)."""
    pool = request_pool(threads)  # first: it refuses a sqlite3 the threads cannot share, before a load
    batcher = Batcher(run_search, pool, pool_threads(threads), max_batch)  # a call on each request thread at most
    live = LiveIndex.open(index_path, model, reload_check_s)
    budget = PixelBudget(decode_pixels or DECODES_AT_ONCE * max_upload_pixels)
    settings = Settings(max_upload_bytes, max_upload_pixels, thumb_folder(Path(index_path)) if thumb_cache else None)
    pages = {route: ((STATIC_DIR / name).read_bytes(), media) for route, (name, media) in PAGE_FILES.items()}

    async def work(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args, **kwargs))

    app = FastAPI(
        title="retrieval",
        version="1",
        summary="Cross-modal (text <-> image) search over one index.",
        docs_url=None,
        redoc_url=None,
    )  # the docs pages load their scripts from a CDN
    app.state.live, app.state.work, app.state.budget = live, work, budget
    app.add_middleware(BodyLimit, limit=max_upload_bytes, timeout=body_timeout_s)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"])
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    add_error_handlers(app)

    async def search(request: Request, params: TextSearchQ) -> Response:
        """Text search (`q`), or "more like this" (`like`): R(q, D), best first."""
        if (params.q is None) == (params.like is None):
            raise RetrievalError("give exactly one query: q (a text) or like (an item id)")
        query = Query(params.model_dump(), time.perf_counter(), text=params.q, like=params.like)
        gen = await current_generation(request)
        return await batcher(SearchCall.of(gen.index, params), query)

    app.router.add_api_route(
        "/api/search", search, response_model=SearchOut, responses=ERRORS, route_class_override=QueryRoute
    )  # every search passes here: checked against its model without FastAPI's dependency solving (query_route.py)

    @app.post("/api/search/image", response_model=SearchOut, responses=ERRORS)
    async def search_image(gen: Current, file: UploadQ, options: SearchOptionsQ) -> Response:
        """Search by an uploaded image."""
        t0 = time.perf_counter()
        pixels = await work(upload_pixels, file, settings)
        async with budget.hold(min(pixels, budget.limit)):  # decoded and embedded in one go, so no image waits
            vector = await work(embed_upload, gen.index, file, settings)
        query = Query({"image": file.filename, **options.model_dump()}, t0, vector=vector)
        return await batcher(SearchCall.of(gen.index, options), query)

    @app.get("/api/items/{item_id:path}", response_model=ItemOut, responses=ERRORS)
    async def item(gen: Current, item_id: str) -> dict[str, Any]:
        """One item's metadata: all its captions and extra fields."""
        it = await work(item_or_404, gen.index, item_id)
        return {
            "id": it.id,
            "path": it.path,
            "captions": it.captions,
            "extra": it.extra,
            "has_image": it.image_key is not None,
            "has_text": it.text_key is not None,
            "thumb": thumb_url(it.id) if it.path else None,
        }

    @app.get(
        "/api/thumb/{item_id:path}", responses={200: {"content": {"image/jpeg": {}}}, **ERRORS}, response_class=Response
    )
    async def thumb(gen: Current, item_id: str) -> Response:
        """A JPEG thumbnail of an indexed image, made on first request and cached under the index folder."""
        it = await work(item_or_404, gen.index, item_id)
        if it.path is None:
            raise HTTPException(404, f"item {it.id!r} has no image (it is text only)")
        jpeg = await work(thumbnail, it.path, it.image_key or it.path, settings.thumb_cache)
        return Response(
            jpeg,
            media_type="image/jpeg",
            headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    @app.get("/api/health", response_model=Health)
    async def health(gen: Current) -> dict[str, Any]:
        """The items of the generation answering, as /api/info counts them. Answered on the event loop (nothing
        in it waits: not for a thread, nor for a new generation loading), so it stays quick while all are busy."""
        return {"status": "ok", "items": gen.counts["items"]}

    @app.get("/api/info")
    async def info(gen: Current) -> dict[str, Any]:
        """The manifest and counts of the generation answering (not of the database now: a writer may be part way
        through the next), the defaults the page starts with, and the upload limits. On the event loop."""
        return {
            **gen.index.store.info(gen.counts),
            "defaults": search_defaults(gen.index),
            "max_k": MAX_K,
            "max_upload_bytes": settings.max_upload_bytes,
            "max_upload_pixels": settings.max_upload_pixels,
        }

    for route, (body, media) in pages.items():
        app.add_api_route(route, _page(body, media), methods=["GET"], include_in_schema=False)
    return app


async def current_generation(request: Request) -> Generation:
    """The generation a request answers from, taken once: every route's dependency, and called directly by
    /api/search (its route solves no dependencies: query_route.py), so override it by replacing this function."""
    live: LiveIndex = request.app.state.live
    return live.poll()


Current = Annotated[Generation, Depends(current_generation)]


def _page(body: bytes, media: str) -> Any:
    async def page() -> Response:
        return Response(body, media_type=media, headers=PAGE_HEADERS)

    return page
