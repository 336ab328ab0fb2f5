"""The server's process: uvicorn running the app, with a deadline and a size bound on each request's head.

What only a process that serves should change lives here, not in `create_app`, which may build an app inside
someone else's process (a test, a notebook): the HTTP protocol uvicorn speaks, and how glibc hands memory back.
A loopback bind answers only loopback Host names, so a DNS-rebinding web page cannot read a localhost server.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from retrieval.server.app import create_app

HEAD_TIMEOUT_S = 10.0  # a request line and its headers: uvicorn itself times only idle keep-alives
MAX_HEAD_BYTES = 1 << 20  # and their size: browsers send a few KB; counted by the chunk (see HeadDeadline)
LOOPBACK_HOSTS = ["127.0.0.1", "localhost"]
MMAP_THRESHOLD = 4 * 2**20  # bytes: blocks this large come from mmap and go back to the OS when freed


def serve(
    index_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    cors_origins: list[str] | None = None,
    allowed_hosts: list[str] | None = None,
    **app_args: Any,
) -> None:
    """Run the app with uvicorn until interrupted. On a loopback bind only loopback Host names are answered."""
    if allowed_hosts is None and host in LOOPBACK_HOSTS:
        allowed_hosts = LOOPBACK_HOSTS
    hand_back_large_blocks()
    app = create_app(index_path, cors_origins, allowed_hosts=allowed_hosts, **app_args)
    uvicorn.run(
        app, host=host, port=port, access_log=False, log_level="info", http=HeadDeadline, timeout_keep_alive=5
    )  # an idle keep-alive connection closes after 5 s (uvicorn's default)


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
