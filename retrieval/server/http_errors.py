"""Every error a request can meet, mapped to its HTTP status and a one-line JSON body `{"error": ...}`.

The server never answers 500 for what is not a bug: the request's fault (a bad parameter, an unreadable
upload) is 4xx; the index's state (being updated, its disk full or read-only, a file it cannot read) is 503,
which a client may retry, and is logged for whoever runs the server. File paths go to the log, not to clients.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from retrieval.errors import (
    IndexChanged,
    NoSpaceError,
    ReadOnlyError,
    RetrievalError,
    StorageError,
    faiss_message,
    shown,
    user_error,
)

logger = logging.getLogger("retrieval.server")  # one logger for the server, whichever module logs


def add_error_handlers(app: FastAPI) -> None:
    """Answer each kind of error with its status, so none a route raises becomes a 500 unless it is a bug."""
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_invalid_request)
    app.add_exception_handler(RetrievalError, _on_retrieval_error)  # and its subclasses, each to its status
    for unreadable in (OSError, sqlite3.Error, RuntimeError):  # what the disk, SQLite or FAISS raise: 503, never 500
        app.add_exception_handler(unreadable, _on_unreadable_index)


def error_response(status: int, message: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    """The body every error is answered with, from a handler here or a middleware outside the routes."""
    return JSONResponse({"error": str(message)}, status_code=status, headers=headers)


async def _on_http_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, HTTPException)
    return error_response(e.status_code, e.detail, dict(e.headers or {}))


async def _on_invalid_request(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    return error_response(422, _validation_message(e))


async def _on_retrieval_error(_: Request, e: Exception) -> JSONResponse:
    """Our errors, each to its status: the request's fault (a bad parameter, an unreadable upload) is 422; the
    index's state (being updated, its disk full or read-only, a file it cannot read) is 503, which a client
    may retry, and is logged for whoever runs the server."""
    if isinstance(e, IndexChanged):  # met a generation being published (between its commit and its manifest):
        # LiveIndex swaps the new one in once it has loaded it, so the client only has to ask again
        return error_response(503, "the index is being updated; retry in a moment", {"Retry-After": "1"})
    if isinstance(e, (NoSpaceError, ReadOnlyError, StorageError)):
        logger.warning("%s", shown(e))
        return error_response(503, _first_line(e))
    return error_response(422, _first_line(e))  # ImageError and every other RetrievalError


async def _on_unreadable_index(_: Request, e: Exception) -> JSONResponse:
    """An OSError, SQLite error or FAISS RuntimeError from a route: the index's files, not the request, so 503 with
    what failed (no file paths: those are for the log). Any other RuntimeError is a bug and stays a 500."""
    error = user_error(e)
    if error is None:
        raise e
    logger.warning("a request could not read the index: %s", shown(error))
    cause = e.strerror if isinstance(e, OSError) and e.strerror else faiss_message(e) or _first_line(e)
    return error_response(503, f"the index could not be read: {cause}")


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
