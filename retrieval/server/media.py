"""Images in and out of the server: the limits on an upload, and the thumbnails of indexed images.

No client makes the server allocate much or holds it for long: a request's body must arrive within
`body_timeout_s` and `max_upload_bytes` (`BodyLimit`); an uploaded image is bounded in pixels from its header
before it is decoded, and uploads decode a few at a time whatever the number of threads, in the order they
came, and one that waits too long is told to retry (`PixelBudget`). Thumbnails are made from an item's stored
path (looked up by id, so no part of a request reaches the filesystem) and kept under the index folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import UploadFile
from PIL import Image
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.atomic import atomic_write_bytes
from retrieval.data.images import load_image
from retrieval.errors import ImageError
from retrieval.server.http_errors import error_response

THUMB_SIDE = 384  # pixels on the longer side: sharp in the grid and in the item view
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20  # a large phone photo is under 15 MB
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000  # refused from the header, before decoding: 40 MP decodes to 160 MB of RGB
DECODES_AT_ONCE = 2  # full-size uploads decoding at once: the pixel budget is this many times max_upload_pixels
DECODE_WAIT_S = 30.0  # an upload that waits longer for the pixel budget gets 503: a queue of about 20 full-size ones
DECODE_RETRY_AFTER_S = 5  # what that 503 tells the client to wait
BODY_TIMEOUT_S = 120.0  # a whole upload: 20 MB at 1.4 Mbit/s; a client trickling a body is cut off after it
logger = logging.getLogger("retrieval.server")  # one logger for the server, whichever module logs


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
            return await error_response(error.status_code, error.detail)(scope, receive, send)
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


def thumb_folder(index_path: Path) -> ThumbCache | None:
    """The thumbnail cache under the index folder; None where the folder cannot be made (a read-only index):
    thumbnails are still served, just not kept."""
    folder = index_path / "thumbs"
    try:
        folder.mkdir(exist_ok=True)
    except OSError:
        return None
    return ThumbCache(folder)


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
