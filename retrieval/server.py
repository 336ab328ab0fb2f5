"""The HTTP API and the web page: a thin layer over `Index`, so the server and the CLI give the same answers.

The model and index load once, in `create_app`, and are warmed with one query of each kind, so no request
waits for a load. A re-index, `remove` or `calibrate` by another process is picked up with no restart: the
app holds a `LiveIndex`, which reopens the index when manifest.json (written last, atomically) changes,
keeping the loaded model, and each request takes one generation at its start and answers from it throughout.

Security is by construction: a file is only ever opened through an item's stored path, looked up by id, so
no part of a request reaches the filesystem; the page's own files are read into memory at start-up. CORS is
off unless origins are given, and a loopback bind answers only loopback Host names (so a DNS-rebinding web
page cannot read a localhost server). No client holds the server for long or makes it allocate much: a
request's head must arrive within HEAD_TIMEOUT_S and MAX_HEAD_BYTES (`HeadDeadline`), its body within
`body_timeout_s` and `max_upload_bytes` (`BodyLimit`); an uploaded image is bounded in pixels from its header
before it is decoded, and uploads decode a few at a time whatever the number of threads (`PixelBudget`).

The work of a request (embedding, FAISS, SQLite, decoding) runs on a pool of one thread per core, each
single-threaded inside; the event loop only parses and answers. The threads share each `Index` with no lock:
after `warm` it holds no lazy state, FAISS searches are read-only (their parameters, which FAISS
changes during a search, are made per call), and Python's sqlite3 is built serialized
here (threadsafety 3: threads may share a connection), which `create_app` checks.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import io
import logging
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from threadpoolctl import threadpool_limits
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import ImageError, IndexChanged, RetrievalError
from .images import load_image, read_image
from .index import MANIFEST_FILE, Item
from .query import MAX_QUERY_CHARS, Hit, Index

STATIC_DIR = Path(__file__).with_name("server_static")
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/style.css": ("style.css", "text/css; charset=utf-8"), "/favicon.svg": ("favicon.svg", "image/svg+xml")}
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
MAX_K = 1000  # a page of results a person can look at; range queries past this want the Python API
THUMB_SIDE = 384  # pixels on the longer side: sharp in the grid and in the item view
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20  # a large phone photo is under 15 MB
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000  # refused from the header, before decoding: 40 MP decodes to 160 MB of RGB
DECODES_AT_ONCE = 2  # full-size uploads decoding at once: the pixel budget is this many times max_upload_pixels
BODY_TIMEOUT_S = 120.0  # a whole upload: 20 MB at 1.4 Mbit/s; a client trickling a body is cut off after it
HEAD_TIMEOUT_S = 10.0  # a request line and its headers (serve): uvicorn itself times only idle keep-alives
MAX_HEAD_BYTES = 1 << 20  # and their size: browsers send a few KB; counted by the chunk (see HeadDeadline)
RELOAD_CHECK_S = 0.5  # a request looks at manifest.json's stat at most this often
LOOPBACK_HOSTS = ["127.0.0.1", "localhost"]
Target = Literal["item", "image", "text"]
logger = logging.getLogger(__name__)
T = TypeVar("T")
# The search parameters both search endpoints take; their ranges are check_search_args', here for the spec.
K = Annotated[int, Query(ge=1, le=MAX_K, description="At most this many results.")]
Theta = Annotated[float | None, Query(ge=-1, le=1, description="Only results with similarity above this (none: top k).")]
Weight = Annotated[float, Query(ge=0, le=1, description="w in sim = w cos(q, image) + (1-w) cos(q, caption).")]
TargetQ = Annotated[Target, Query(description="Match whole items (fused), images only, or captions only.")]
TextQ = Annotated[str | None, Query(max_length=MAX_QUERY_CHARS, description="Text query.")]
LikeQ = Annotated[str | None, Query(description="An indexed item's id: more like this.")]
UploadQ = Annotated[UploadFile, File(description="The query image (JPEG, PNG, WebP, ...).")]


# --- response records (they also document the OpenAPI spec) ------------------------------------------
class Error(BaseModel):
    error: str


class HitOut(BaseModel):
    rank: int
    id: str
    path: str | None
    caption: str | None
    score: float
    image_score: float | None
    text_score: float | None
    thumb: str | None  # URL of the thumbnail, None for a text-only item


class SearchOut(BaseModel):
    query: dict[str, Any]
    count: int
    took_ms: float
    results: list[HitOut]


class ItemOut(BaseModel):
    id: str
    path: str | None
    captions: list[str]
    extra: dict[str, Any]
    has_image: bool
    has_text: bool
    thumb: str | None


class Health(BaseModel):
    status: str
    items: int


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Error, "description": what} for code, what in (
    (400, "Malformed request"), (404, "Unknown item, or no image"), (413, "Upload too large"),
    (422, "Invalid parameter or unreadable image"), (503, "The index is being updated: retry"))}


class TooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the upload is over the limit of {limit / 2**20:.3g} MB; send a smaller image "
                              "(or start the server with a larger --max-upload-mb)")


class TooSlow(HTTPException):
    def __init__(self, seconds: float):
        super().__init__(408, f"the request body took over {seconds:g} s to arrive; send it again over a faster "
                              "connection, or a smaller image")


class BodyLimit:
    """Refuses a body over `limit` bytes by its Content-Length, or as soon as that many bytes have arrived, and
    one that has not all arrived `timeout` seconds after the request began (a client trickling it)."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float = BODY_TIMEOUT_S):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            error = TooLarge(self.limit) if length.isdigit() else HTTPException(400, "Content-Length is not a number")
            return await _error(error.status_code, error.detail)(scope, receive, send)
        received, deadline = 0, time.monotonic() + self.timeout

        async def limited() -> Message:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                raise TooSlow(self.timeout) from None
            received += len(message.get("body", b""))
            if received > self.limit:  # a chunked body, which carries no Content-Length
                raise TooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


@dataclass
class Settings:
    max_upload_bytes: int
    max_upload_pixels: int
    thumb_cache: Path | None  # None: thumbnails are made on every request


class PixelBudget:
    """At most `limit` pixels of uploaded images decoding at once; a request over the rest waits its turn.

    The request threads bound how many decodes run, but one per core is many 40-megapixel images on a big
    machine (each about 7 bytes a pixel at its peak), so hostile uploads queue here instead of multiplying
    memory. The wait is on the event loop, so text searches keep every thread. It polls rather than queues:
    a cancelled request (the client went away) then never holds or leaks a share.
    """

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()  # test clients run each request on its own event loop

    def _take(self, pixels: int) -> bool:
        with self._lock:
            if self.used and self.used + pixels > self.limit:  # alone, any image may decode
                return False
            self.used += pixels
            return True

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        while not self._take(pixels):
            await asyncio.sleep(0.01)
        try:
            yield
        finally:
            with self._lock:
                self.used -= pixels


class LiveIndex:
    """The index a server answers from, reopened by itself when another process publishes a new generation.

    `index`, `remove`, `merge` and `calibrate` end by replacing manifest.json atomically, so a new (inode,
    mtime, size) of it means a complete new generation. At most every `check_s` a request looks; the one that
    sees the change reopens the index (its loaded model kept: see Index.reopen) and warms it before swapping
    the reference, and others that see it wait for that. A reopening that fails (the manifest now names
    another model, ...) keeps the old generation, logs why, and is tried again when the manifest next changes.
    """

    def __init__(self, index: Index, check_s: float = RELOAD_CHECK_S):
        self.index, self.check_s = index, check_s
        self._manifest = index.store.path / MANIFEST_FILE
        self._stamp, self._checked = _stamp(self._manifest), time.monotonic()
        self._lock = threading.Lock()

    def changed(self) -> bool:
        """Has the manifest changed since the index was opened? Cheap: one stat, at most every check_s."""
        now = time.monotonic()
        if now - self._checked < self.check_s:
            return False
        self._checked = now
        return _stamp(self._manifest) != self._stamp

    def reopen(self) -> None:
        """Open and warm the generation on disk now, then swap it in (blocking: run it on a request thread)."""
        with self._lock:
            stamp = _stamp(self._manifest)
            if stamp == self._stamp:
                return  # another request reopened it while this one waited
            self._stamp = stamp
            try:
                fresh = self.index.reopen()
                warm(fresh)
            except (RetrievalError, OSError, sqlite3.Error) as e:
                logger.warning("still serving the index as it was: reopening %s failed: %s", self._manifest.parent, e)
                return
            self.index = fresh


def _stamp(file: Path) -> tuple[int, int, int] | None:
    try:
        st = file.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def search_defaults(index: Index) -> dict[str, Any]:
    """What the page starts with (θ: the cutoff calibrated for whole items at w = 0.5, if any). A request
    without θ gets what `Index.search` does: the cutoff calibrated for its own target and weight, or top-k."""
    return {"k": 10, "theta": index.calibrated("item", 0.5)[0], "weight": 0.5, "target": "item"}


def create_app(index_path: str | Path, cors_origins: list[str] | None = None, model: str | Path | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS,
               allowed_hosts: list[str] | None = None, thumb_cache: bool = True, threads: int | None = None,
               decode_pixels: int | None = None, body_timeout_s: float = BODY_TIMEOUT_S,
               reload_check_s: float = RELOAD_CHECK_S) -> FastAPI:
    """Open and warm the index, then build the app. `allowed_hosts` None answers any Host header; `threads`
    (default: one per CPU core) is how many requests do their work at once, the rest wait their turn;
    `decode_pixels` (default DECODES_AT_ONCE x max_upload_pixels) how many uploaded pixels decode at once."""
    if sqlite3.threadsafety != 3:
        raise RetrievalError("this Python's sqlite3 is not built serialized (threadsafety 3); the server shares one "
                             "connection between threads, so use a Python built with a threadsafe SQLite")
    index = Index.open(index_path, model)
    warm(index)
    live = LiveIndex(index, reload_check_s)
    budget = PixelBudget(decode_pixels or DECODES_AT_ONCE * max_upload_pixels)
    cache = Path(index_path) / "thumbs" if thumb_cache else None
    if cache is not None:
        try:
            cache.mkdir(exist_ok=True)
        except OSError:
            cache = None  # a read-only index folder: thumbnails are still served, just not kept
    settings = Settings(max_upload_bytes, max_upload_pixels, cache)
    pages = {route: ((STATIC_DIR / name).read_bytes(), media) for route, (name, media) in PAGE_FILES.items()}
    defaults = search_defaults(index)  # the parameters' defaults in the spec; /api/info gives the current ones
    # Idle pool threads cost nothing and exit with the process; an app's lifespan may run more than once
    # (test clients start and stop it per use), so the pool is not tied to it.
    pool = ThreadPoolExecutor(threads or os.cpu_count() or 1, "request", initializer=_single_threaded)

    async def work(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args, **kwargs))

    app = FastAPI(title="retrieval", version="1", summary="Cross-modal (text <-> image) search over one index.",
                  docs_url=None, redoc_url=None)  # the docs pages load their scripts from a CDN
    app.state.live, app.state.work = live, work
    app.add_middleware(BodyLimit, limit=max_upload_bytes, timeout=body_timeout_s)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"])
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_invalid_request)
    app.add_exception_handler(RetrievalError, _on_retrieval_error)
    app.add_exception_handler(IndexChanged, _on_index_changed)

    @app.get("/api/search", response_model=SearchOut, responses=ERRORS)
    async def search(index: Current, q: TextQ = None, like: LikeQ = None, k: K = defaults["k"], theta: Theta = None,
                     weight: Weight = defaults["weight"], target: TargetQ = defaults["target"]) -> dict[str, Any]:
        """Text search (`q`), or "more like this" (`like`): R(q, D), best first."""
        query = {"q": q, "like": like, "k": k, "theta": theta, "weight": weight, "target": target}
        return await work(run_search, index, query, text=q, like=like, k=k, theta=theta, weight=weight, target=target)

    @app.post("/api/search/image", response_model=SearchOut, responses=ERRORS)
    async def search_image(index: Current, file: UploadQ, k: K = defaults["k"], theta: Theta = None,
                           weight: Weight = defaults["weight"], target: TargetQ = defaults["target"]) -> dict[str, Any]:
        """Search by an uploaded image."""
        query = {"image": file.filename, "k": k, "theta": theta, "weight": weight, "target": target}
        pixels = await work(upload_pixels, file, settings)
        async with budget.hold(min(pixels, budget.limit)):  # decoded and searched in one go, so no image waits
            return await work(search_upload, index, file, settings, query, k=k, theta=theta, weight=weight,
                              target=target)

    @app.get("/api/items/{item_id:path}", response_model=ItemOut, responses=ERRORS)
    async def item(index: Current, item_id: str) -> dict[str, Any]:
        """One item's metadata: all its captions and extra fields."""
        it = await work(item_or_404, index, item_id)
        return {"id": it.id, "path": it.path, "captions": it.captions, "extra": it.extra,
                "has_image": it.image_key is not None, "has_text": it.text_key is not None,
                "thumb": thumb_url(it.id) if it.path else None}

    @app.get("/api/thumb/{item_id:path}", responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
             response_class=Response)
    async def thumb(index: Current, item_id: str) -> Response:
        """A JPEG thumbnail of an indexed image, made on first request and cached under the index folder."""
        it = await work(item_or_404, index, item_id)
        if it.path is None:
            raise HTTPException(404, f"item {it.id!r} has no image (it is text only)")
        jpeg = await work(thumbnail, it.path, it.image_key or it.path, settings.thumb_cache)
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})

    @app.get("/api/health", response_model=Health)
    async def health(index: Current) -> dict[str, Any]:
        """Answered on the event loop, so it stays quick while every request thread is busy."""
        return {"status": "ok", "items": int(index.store.faiss.ntotal)}

    @app.get("/api/info")
    async def info(index: Current) -> dict[str, Any]:
        """The index's manifest and counts, the defaults the page starts with, and the upload limits."""
        return {**await work(index.info), "defaults": search_defaults(index), "max_k": MAX_K,
                "max_upload_bytes": settings.max_upload_bytes, "max_upload_pixels": settings.max_upload_pixels}

    for route, (body, media) in pages.items():
        app.add_api_route(route, _page(body, media), methods=["GET"], include_in_schema=False)
    return app


async def current_index(request: Request) -> Index:
    """The generation a request answers from, taken once at its start: every route's dependency."""
    live: LiveIndex = request.app.state.live
    if live.changed():
        await request.app.state.work(live.reopen)
    return live.index


Current = Annotated[Index, Depends(current_index)]


def warm(index: Index) -> None:
    """Load the text tower, the image model, the FAISS index and the item filters now, not on a request."""
    for target in ("item", "image", "text"):
        index.search(text="warm up", k=1, target=target)
    index.search(image=Image.new("RGB", (64, 64)), k=1)


def run_search(index: Index, query: dict[str, Any], **search_args: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    if search_args.get("like") is not None:
        item_or_404(index, search_args["like"])  # a 404, where Index.search would say only "bad request"
    hits = index.search(**search_args)
    return {"query": query, "count": len(hits), "took_ms": 1000 * (time.perf_counter() - t0),
            "results": [hit_json(rank, hit) for rank, hit in enumerate(hits, 1)]}


def hit_json(rank: int, hit: Hit) -> dict[str, Any]:
    return {"rank": rank, **hit.to_json(), "thumb": thumb_url(hit.id) if hit.path else None}


def thumb_url(item_id: str) -> str:
    return f"/api/thumb/{quote(item_id, safe='')}"


def item_or_404(index: Index, item_id: str) -> Item:
    item = index.store.items_by_id([item_id]).get(item_id)
    if item is None:
        raise HTTPException(404, f"no item with id {item_id!r} in this index")
    return item


def upload_pixels(file: UploadFile, settings: Settings) -> int:
    """The upload's pixel count from its header (0 for what is no image, or is over the bound: refused unread)."""
    try:
        with Image.open(file.file) as img:
            w, h = img.size
    except Exception:  # read_image says what is wrong with it
        return 0
    finally:
        file.file.seek(0)
    return w * h if w * h <= settings.max_upload_pixels else 0


def search_upload(index: Index, file: UploadFile, settings: Settings, query: dict[str, Any], **search_args: Any
                  ) -> dict[str, Any]:
    """Decode an upload as an indexed file is decoded (one path: `read_image`, straight from the upload's bytes,
    the pixel bound read from the header) and search with it; the image is dropped as soon as it is embedded."""
    image = read_image(file.file, "the uploaded image", index.model().transform.size_hint, settings.max_upload_pixels)
    return run_search(index, query, image=image, **search_args)


def thumbnail(path: str, key: str, cache: Path | None) -> bytes:
    """JPEG bytes, from the cache when made before; the cache file is named by the image's content hash."""
    file = cache / f"{hashlib.sha256(f'{key}:{THUMB_SIDE}'.encode()).hexdigest()}.jpg" if cache else None
    if file is not None and file.is_file():
        return file.read_bytes()
    try:
        img = load_image(path, size_hint=THUMB_SIDE)
    except ImageError as e:
        raise HTTPException(404, f"{e}; re-run `retrieval index` to update the index") from None
    img.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85, optimize=True)
    data = out.getvalue()
    if file is not None:
        fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".tmp")  # own name: two requests may write at once
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, file)
    return data


def serve(index_path: str | Path, host: str = "127.0.0.1", port: int = 8000, cors_origins: list[str] | None = None,
          allowed_hosts: list[str] | None = None, **app_args: Any) -> None:
    """Run the app with uvicorn until interrupted. On a loopback bind only loopback Host names are answered."""
    import uvicorn

    if allowed_hosts is None and host in LOOPBACK_HOSTS:
        allowed_hosts = LOOPBACK_HOSTS
    hand_back_large_blocks()
    app = create_app(index_path, cors_origins, allowed_hosts=allowed_hosts, **app_args)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info", http=HeadDeadline,
                timeout_keep_alive=5)  # an idle keep-alive connection closes after 5 s (uvicorn's default)


MMAP_THRESHOLD = 4 * 2**20  # bytes: blocks this large come from mmap and go back to the OS when freed


def hand_back_large_blocks() -> None:
    """Make glibc give a decoded image's memory back to the OS when it is freed (a no-op elsewhere).

    glibc raises its mmap threshold as large blocks are freed (up to 32 MB), after which images' blocks come
    from its heaps and stay with the process: 8 clients uploading 40-megapixel PNGs left the server at 744 MB
    after the burst, against 280 MB idle. A fixed 4 MB threshold hands them back (281 MB after; the same peak;
    scripts/bench_upload.py). Process-wide, so only `serve` sets it, not an app built inside someone's process."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


class HeadDeadline(HttpToolsProtocol):
    """uvicorn's protocol with a deadline and a size bound on each request's head (request line and headers).

    uvicorn times only the idle wait between keep-alive requests and bounds no head, so a client trickling its
    headers a byte at a time held a connection for as long as it liked (enough of them hold every socket),
    and one sending endless headers grew the server's memory. The clock starts when a connection opens and
    again when a response ends, and a complete head stops it (a slow body is BodyLimit's to cut off); too slow,
    the connection is closed, as uvicorn closes an idle keep-alive one. The bytes that arrive while a head is
    incomplete are counted, a chunk at a time, so the first chunk of a body may count too: hence a bound far
    above any real head (browsers send a few KB), and a plain 400 past it.
    """

    head_timeout_s = HEAD_TIMEOUT_S
    max_head_bytes = MAX_HEAD_BYTES

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head()

    def _start_head(self) -> None:
        self._head_bytes, self._in_head = 0, True
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._head_timer.cancel()
                return self.send_400_response("Request head too large.")
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._head_timer.cancel()
        self._in_head = False
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._head_timer.cancel()
        if not self.transport.is_closing():
            self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer.cancel()
        super().connection_lost(exc)

    def _head_too_slow(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def _single_threaded() -> None:
    """One core per request thread: concurrent requests are the parallelism. Left at two threads, OpenMP
    (FAISS) and OpenBLAS (the numpy text tower) made a text search 4x slower here while another process was
    busy (p50 8 ms -> 1.9 ms on 300 items). OpenMP's limit holds per thread, so each thread sets it."""
    threadpool_limits(1)


def _page(body: bytes, media: str) -> Any:
    async def page() -> Response:
        return Response(body, media_type=media, headers=PAGE_HEADERS)
    return page


def _error(status: int, message: Any) -> JSONResponse:
    return JSONResponse({"error": str(message)}, status_code=status)


async def _on_http_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, HTTPException)
    return _error(e.status_code, e.detail)


async def _on_invalid_request(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    return _error(422, _validation_message(e))


async def _on_retrieval_error(_: Request, e: Exception) -> JSONResponse:
    return _error(422, str(e))


async def _on_index_changed(_: Request, e: Exception) -> JSONResponse:
    """A request that met a generation being published (between its commit and its manifest): LiveIndex
    swaps the new one in on a later request, so the client only has to ask again."""
    response = _error(503, "the index is being updated; retry in a moment")
    response.headers["Retry-After"] = "1"
    return response


def _validation_message(e: RequestValidationError) -> str:
    """FastAPI's error list as one line: `k: Input should be greater than or equal to 1`."""
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ())[1:]) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
