"""The HTTP API and the web page: a thin layer over `Index`, so the server and the CLI give the same answers.

The model and index load once, in `create_app`, and are warmed with one query of each kind, so no request
waits for a load. A re-index, `remove` or `calibrate` by another process is picked up with no restart: the
app holds a `LiveIndex`, which loads the new generation on a thread of its own when manifest.json (written
last, atomically) changes, keeping the loaded model, and swaps it in once warm; each request takes one
generation at its start and answers from it throughout, and none waits for a load.

Security is by construction: a file is only ever opened through an item's stored path, looked up by id, so
no part of a request reaches the filesystem; the page's own files are read into memory at start-up. CORS is
off unless origins are given, and a loopback bind answers only loopback Host names (so a DNS-rebinding web
page cannot read a localhost server). No client holds the server for long or makes it allocate much: a
request's head must arrive within HEAD_TIMEOUT_S and MAX_HEAD_BYTES (`HeadDeadline`), its body within
`body_timeout_s` and `max_upload_bytes` (`BodyLimit`); an uploaded image is bounded in pixels from its header
before it is decoded, and uploads decode a few at a time whatever the number of threads, in the order they
came, and one that waits too long is told to retry (`PixelBudget`).

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
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
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

from retrieval.atomic import atomic_write_bytes
from retrieval.data.images import load_image, read_image
from retrieval.errors import (
    ImageError,
    IndexChanged,
    NoSpaceError,
    ReadOnlyError,
    RetrievalError,
    StorageError,
    faiss_message,
    shown,
    user_error,
)
from retrieval.index.search import MAX_QUERY_CHARS, Hit, Index
from retrieval.index.store import MANIFEST_FILE, Item

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
MAX_K = 1000  # a page of results a person can look at; range queries past this want the Python API
THUMB_SIDE = 384  # pixels on the longer side: sharp in the grid and in the item view
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20  # a large phone photo is under 15 MB
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000  # refused from the header, before decoding: 40 MP decodes to 160 MB of RGB
DECODES_AT_ONCE = 2  # full-size uploads decoding at once: the pixel budget is this many times max_upload_pixels
DECODE_WAIT_S = 30.0  # an upload that waits longer for the pixel budget gets 503: a queue of about 20 full-size ones
DECODE_RETRY_AFTER_S = 5  # what that 503 tells the client to wait
BODY_TIMEOUT_S = 120.0  # a whole upload: 20 MB at 1.4 Mbit/s; a client trickling a body is cut off after it
HEAD_TIMEOUT_S = 10.0  # a request line and its headers (serve): uvicorn itself times only idle keep-alives
MAX_HEAD_BYTES = 1 << 20  # and their size: browsers send a few KB; counted by the chunk (see HeadDeadline)
RELOAD_CHECK_S = 0.5  # a request looks at manifest.json's stat at most this often
RELOAD_RETRY_S = 5.0  # a generation that failed to load is tried again after this, or when the manifest next changes
LOOPBACK_HOSTS = ["127.0.0.1", "localhost"]
Target = Literal["item", "image", "text"]
Stamp = tuple[int, int, int] | None  # manifest.json's (inode, mtime, size); None: no manifest
logger = logging.getLogger(__name__)
T = TypeVar("T")
# The search parameters both search endpoints take; their ranges are check_search_args', here for the spec.
K = Annotated[int, Query(ge=1, le=MAX_K, description="At most this many results.")]
Theta = Annotated[
    float | None, Query(ge=-1, le=1, description="Only results with similarity above this (none: top k).")
]
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


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": what}
    for code, what in (
        (400, "Malformed request"),
        (404, "Unknown item, or no image"),
        (413, "Upload too large"),
        (422, "Invalid parameter or unreadable image"),
        (
            503,
            "The index is being updated or cannot be read, or too many uploads are waiting: retry (after Retry-After)",
        ),
    )
}


class TooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(
            413,
            f"the upload is over the limit of {limit / 2**20:.3g} MB; send a smaller image "
            "(or start the server with a larger --max-upload-mb)",
        )


class Busy(HTTPException):
    def __init__(self, seconds: float):
        super().__init__(
            503,
            f"too many images are being decoded: this upload waited {seconds:g} s for its turn; retry in a moment",
            headers={"Retry-After": str(DECODE_RETRY_AFTER_S)},
        )


class TooSlow(HTTPException):
    def __init__(self, seconds: float):
        super().__init__(
            408,
            f"the request body took over {seconds:g} s to arrive; send it again over a faster "
            "connection, or a smaller image",
        )


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
            except TimeoutError:
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
    thumb_cache: ThumbCache | None  # None: thumbnails are made on every request


class ThumbCache:
    """Thumbnails kept under the index folder, each named by its image's content hash. Best effort: where it
    cannot be written (a read-only mount, a full disk) a thumbnail is served uncached, no temporary file is left
    behind, and the server says so once, not on every request."""

    def __init__(self, folder: Path):
        self.folder, self._warned = folder, False

    def file(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(f'{key}:{THUMB_SIDE}'.encode()).hexdigest()}.jpg"

    def get(self, key: str) -> bytes | None:
        file = self.file(key)
        return file.read_bytes() if file.is_file() else None

    def put(self, key: str, data: bytes) -> None:
        try:
            atomic_write_bytes(self.file(key), data, unique=True)  # own temporary name: two requests may write at once
        except OSError as e:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "thumbnails are served uncached: writing one to %s failed (%s); free space there if "
                    "the disk is full",
                    self.folder,
                    e.strerror or e,
                )


class PixelBudget:
    """At most `limit` pixels of uploaded images decoding at once; uploads take their turns in the order they
    came, and one that has waited `max_wait_s` is refused (503 with Retry-After).

    The request threads bound how many decodes run, but one per core is many 40-megapixel images on a big
    machine (each about 7 bytes a pixel at its peak), so hostile uploads queue here instead of multiplying
    memory. In order, because admitting whatever fits let a stream of small uploads keep a large one waiting
    for as long as they kept coming. The wait is on the event loop, so text searches keep every thread. It
    polls rather than awaits a wake-up because test clients run each request on its own event loop; a request
    refused or cancelled while it waits (the client went away) leaves the queue, so it never blocks the rest.
    """

    def __init__(self, limit: int, max_wait_s: float = DECODE_WAIT_S):
        self.limit, self.max_wait_s, self.used = limit, max_wait_s, 0
        self._waiting: deque[object] = deque()  # one ticket per waiting request, first come first
        self._lock = threading.Lock()  # test clients run each request on its own event loop

    def _take(self, ticket: object, pixels: int) -> bool:
        """Admit the first in the queue if it fits beside the images decoding (alone, any image fits)."""
        with self._lock:
            if self._waiting[0] is not ticket or (self.used and self.used + pixels > self.limit):
                return False
            self._waiting.popleft()
            self.used += pixels
            return True

    async def _wait_for(self, pixels: int) -> None:
        ticket, deadline = object(), time.monotonic() + self.max_wait_s
        with self._lock:
            self._waiting.append(ticket)
        try:
            while not self._take(ticket, pixels):
                if time.monotonic() >= deadline:
                    raise Busy(self.max_wait_s)
                await asyncio.sleep(0.01)
        except BaseException:  # refused, or cancelled: the ones behind it move up
            with self._lock:
                self._waiting.remove(ticket)
            raise

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        if pixels:  # none: refused from its header, it decodes nothing, so it need not wait
            await self._wait_for(pixels)
        try:
            yield
        finally:
            with self._lock:
                self.used -= pixels


@dataclass(frozen=True)
class Generation:
    """A loaded generation of the index and its counts, swapped in as one reference, so /api/health and /api/info
    count the index the request searches."""

    index: Index
    counts: dict[str, int]


def load(index: Index) -> Generation:
    """A freshly opened index, warmed and counted before any request sees it."""
    warm(index)
    return Generation(index, loaded_counts(index))


def loaded_counts(index: Index) -> dict[str, int]:
    """The counts of the generation loaded: its manifest's, written with the files loaded, and not the database's
    now, which a writer changes batch by batch until it publishes (hours on a big run). A store that rebuilt its
    FAISS index from a database ahead of the manifest (a writer was part way through as it opened) counts that
    database, here, once."""
    counts = index.store.manifest.counts
    return dict(counts) if counts.get("items") == index.store.faiss.ntotal else index.store.counts()


class LiveIndex:
    """The index a server answers from, reloaded by itself when another process publishes a new generation.

    `index`, `remove`, `merge` and `calibrate` end by replacing manifest.json atomically, so a new (inode,
    mtime, size) of it means a complete new generation. At most every `check_s` a request looks (one stat); the
    one that sees a change starts a thread that opens the new generation (its loaded model kept: see
    Index.reopen), warms it and swaps it in. Until then every request, that one too, answers from the old
    generation, so none waits for a load (seconds for a big FAISS file) or holds a request thread for one.
    A load that fails, whatever the reason (the manifest names another model, a second writer committed while
    it warmed, a FAISS read error, no memory), keeps the old generation, logs one line, and is tried again
    after `retry_s`, or as soon as the manifest changes again.
    """

    retry_s = RELOAD_RETRY_S

    def __init__(self, current: Generation, stamp: Stamp, check_s: float = RELOAD_CHECK_S):
        self.current, self.check_s = current, check_s
        self._manifest = current.index.store.path / MANIFEST_FILE
        self._stamp = stamp  # the manifest's, taken before the current generation was opened
        self._failed: tuple[Stamp, float] | None = None  # a stamp that failed to load, and when to try it again
        self._checked = time.monotonic()
        self._loading = threading.Lock()

    @classmethod
    def open(cls, path: str | Path, model: str | Path | None = None, check_s: float = RELOAD_CHECK_S) -> LiveIndex:
        """Open and warm the index. The manifest's stamp is taken first, so a generation published while the
        index opens and warms (seconds on a big one) is not taken for the one loaded, and loads next."""
        stamp = _stamp(Path(path) / MANIFEST_FILE)
        return cls(load(Index.open(path, model)), stamp, check_s)

    def poll(self) -> Generation:
        """The generation a request answers from; never waits (it runs on the event loop). A new one on disk
        starts loading in the background, unless a load is under way."""
        if self._due() and self._loading.acquire(blocking=False):
            threading.Thread(target=self._reload, name="reload", daemon=True).start()
        return self.current

    def _due(self) -> bool:
        """Is there a generation on disk to load? Cheap: one stat, at most every check_s."""
        now = time.monotonic()
        if now - self._checked < self.check_s:
            return False
        self._checked = now
        stamp = _stamp(self._manifest)
        return stamp != self._stamp and not (
            self._failed is not None and self._failed[0] == stamp and now < self._failed[1]
        )

    def _reload(self) -> None:
        """Load the generation on disk and swap it in (on its own thread; holds `_loading` until done)."""
        try:
            _single_threaded()
            stamp = _stamp(self._manifest)  # before opening: one published meanwhile is loaded after
            try:
                fresh = load(self.current.index.reopen())
            except Exception as e:  # whatever failed, the loaded generation still answers correctly
                self._failed_to_load(stamp, e)
                return
            self._stamp, self._failed, self.current = stamp, None, fresh
        finally:
            self._loading.release()

    def _failed_to_load(self, stamp: Stamp, e: Exception) -> None:
        """Try it again after retry_s; say so once for each manifest, not on every try."""
        again = self._failed is not None and self._failed[0] == stamp
        self._failed = (stamp, time.monotonic() + self.retry_s)
        logger.log(
            logging.DEBUG if again else logging.WARNING,
            "still serving generation %d of %s: loading the new one failed (%s); trying again every %g s",
            self.current.index.store.manifest.generation,
            self._manifest.parent,
            shown(e) or type(e).__name__,
            self.retry_s,
        )


def _stamp(file: Path) -> Stamp:
    try:
        st = file.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def search_defaults(index: Index) -> dict[str, Any]:
    """What the page starts with (θ: the cutoff calibrated for whole items at w = 0.5, if any). A request
    without θ gets what `Index.search` does: the cutoff calibrated for its own target and weight, or top-k."""
    return {"k": 10, "theta": index.calibrated("item", 0.5)[0], "weight": 0.5, "target": "item"}


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
) -> FastAPI:
    """Open and warm the index, then build the app. `allowed_hosts` None answers any Host header; `threads`
    (default: one per CPU core) is how many requests do their work at once, the rest wait their turn;
    `decode_pixels` (default DECODES_AT_ONCE x max_upload_pixels) how many uploaded pixels decode at once."""
    if sqlite3.threadsafety != 3:
        raise RetrievalError(
            "this Python's sqlite3 is not built serialized (threadsafety 3); the server shares one "
            "connection between threads, so use a Python built with a threadsafe SQLite"
        )
    live = LiveIndex.open(index_path, model, reload_check_s)
    budget = PixelBudget(decode_pixels or DECODES_AT_ONCE * max_upload_pixels)
    settings = Settings(max_upload_bytes, max_upload_pixels, thumb_folder(Path(index_path)) if thumb_cache else None)
    pages = {route: ((STATIC_DIR / name).read_bytes(), media) for route, (name, media) in PAGE_FILES.items()}
    defaults = search_defaults(live.current.index)  # the parameters' defaults in the spec; /api/info: the current
    # Idle pool threads cost nothing and exit with the process; an app's lifespan may run more than once
    # (test clients start and stop it per use), so the pool is not tied to it.
    pool = ThreadPoolExecutor(threads or os.cpu_count() or 1, "request", initializer=_single_threaded)

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
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_invalid_request)
    app.add_exception_handler(RetrievalError, _on_retrieval_error)  # and its subclasses, each to its status
    for unreadable in (OSError, sqlite3.Error, RuntimeError):  # what the disk, SQLite or FAISS raise: 503, never 500
        app.add_exception_handler(unreadable, _on_unreadable_index)

    @app.get("/api/search", response_model=SearchOut, responses=ERRORS)
    async def search(
        gen: Current,
        q: TextQ = None,
        like: LikeQ = None,
        k: K = defaults["k"],
        theta: Theta = None,
        weight: Weight = defaults["weight"],
        target: TargetQ = defaults["target"],
    ) -> dict[str, Any]:
        """Text search (`q`), or "more like this" (`like`): R(q, D), best first."""
        query = {"q": q, "like": like, "k": k, "theta": theta, "weight": weight, "target": target}
        return await work(
            run_search, gen.index, query, text=q, like=like, k=k, theta=theta, weight=weight, target=target
        )

    @app.post("/api/search/image", response_model=SearchOut, responses=ERRORS)
    async def search_image(
        gen: Current,
        file: UploadQ,
        k: K = defaults["k"],
        theta: Theta = None,
        weight: Weight = defaults["weight"],
        target: TargetQ = defaults["target"],
    ) -> dict[str, Any]:
        """Search by an uploaded image."""
        query = {"image": file.filename, "k": k, "theta": theta, "weight": weight, "target": target}
        pixels = await work(upload_pixels, file, settings)
        async with budget.hold(min(pixels, budget.limit)):  # decoded and searched in one go, so no image waits
            return await work(
                search_upload, gen.index, file, settings, query, k=k, theta=theta, weight=weight, target=target
            )

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
    """The generation a request answers from, taken once at its start: every route's dependency."""
    live: LiveIndex = request.app.state.live
    return live.poll()


Current = Annotated[Generation, Depends(current_generation)]


def thumb_folder(index_path: Path) -> ThumbCache | None:
    """The thumbnail cache under the index folder; None where the folder cannot be made (a read-only index):
    thumbnails are still served, just not kept."""
    folder = index_path / "thumbs"
    try:
        folder.mkdir(exist_ok=True)
    except OSError:
        return None
    return ThumbCache(folder)


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
    return {
        "query": query,
        "count": len(hits),
        "took_ms": 1000 * (time.perf_counter() - t0),
        "results": [hit_json(rank, hit) for rank, hit in enumerate(hits, 1)],
    }


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


def search_upload(
    index: Index, file: UploadFile, settings: Settings, query: dict[str, Any], **search_args: Any
) -> dict[str, Any]:
    """Decode an upload as an indexed file is decoded (one path: `read_image`, straight from the upload's bytes,
    the pixel bound read from the header) and search with it; the image is dropped as soon as it is embedded."""
    image = read_image(file.file, "the uploaded image", index.model().transform.size_hint, settings.max_upload_pixels)
    return run_search(index, query, image=image, **search_args)


def thumbnail(path: str, key: str, cache: ThumbCache | None) -> bytes:
    """JPEG bytes, from the cache when made before (`key`: the image's content hash)."""
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        return cached
    try:
        img = load_image(path, size_hint=THUMB_SIDE)
    except ImageError as e:
        raise HTTPException(404, f"{e}; re-run `retrieval index` to update the index") from None
    img.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85, optimize=True)
    data = out.getvalue()
    if cache is not None:
        cache.put(key, data)
    return data


def serve(
    index_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    cors_origins: list[str] | None = None,
    allowed_hosts: list[str] | None = None,
    **app_args: Any,
) -> None:
    """Run the app with uvicorn until interrupted. On a loopback bind only loopback Host names are answered."""
    import uvicorn

    if allowed_hosts is None and host in LOOPBACK_HOSTS:
        allowed_hosts = LOOPBACK_HOSTS
    hand_back_large_blocks()
    app = create_app(index_path, cors_origins, allowed_hosts=allowed_hosts, **app_args)
    uvicorn.run(
        app, host=host, port=port, access_log=False, log_level="info", http=HeadDeadline, timeout_keep_alive=5
    )  # an idle keep-alive connection closes after 5 s (uvicorn's default)


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


def _error(status: int, message: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": str(message)}, status_code=status, headers=headers)


async def _on_http_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, HTTPException)
    return _error(e.status_code, e.detail, dict(e.headers or {}))


async def _on_invalid_request(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    return _error(422, _validation_message(e))


async def _on_retrieval_error(_: Request, e: Exception) -> JSONResponse:
    """Our errors, each to its status: the request's fault (a bad parameter, an unreadable upload) is 422; the
    index's state (being updated, its disk full or read-only, a file it cannot read) is 503, which a client
    may retry, and is logged for whoever runs the server."""
    if isinstance(e, IndexChanged):  # met a generation being published (between its commit and its manifest):
        # LiveIndex swaps the new one in once it has loaded it, so the client only has to ask again
        return _error(503, "the index is being updated; retry in a moment", {"Retry-After": "1"})
    if isinstance(e, (NoSpaceError, ReadOnlyError, StorageError)):
        logger.warning("%s", shown(e))
        return _error(503, _first_line(e))
    return _error(422, _first_line(e))  # ImageError and every other RetrievalError


async def _on_unreadable_index(_: Request, e: Exception) -> JSONResponse:
    """An OSError, SQLite error or FAISS RuntimeError from a route: the index's files, not the request, so 503 with
    what failed (no file paths: those are for the log). Any other RuntimeError is a bug and stays a 500."""
    error = user_error(e)
    if error is None:
        raise e
    logger.warning("a request could not read the index: %s", shown(error))
    cause = e.strerror if isinstance(e, OSError) and e.strerror else faiss_message(e) or _first_line(e)
    return _error(503, f"the index could not be read: {cause}")


def _first_line(e: Exception) -> str:
    """An error as one line for a response (its later lines, if any, go to the log)."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _validation_message(e: RequestValidationError) -> str:
    """FastAPI's error list as one line: `k: Input should be greater than or equal to 1`."""
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ())[1:]) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
