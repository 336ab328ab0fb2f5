"""The exceptions users see (a message that says what failed and what to do); `user_error`, which turns what a
file, the disk, SQLite or FAISS raises into one of them for the two boundaries (the CLI and the server); and
`shown`, which makes anything a user stored safe to put in such a message or on a terminal."""

from __future__ import annotations

import errno
import re
import sqlite3


class RetrievalError(Exception):
    """Bad input or a bad file on disk. The CLI prints its message as one line and exits 1."""


class InvalidArgument(RetrievalError, ValueError):
    """A value outside what a function takes (an unknown rule, a template it cannot fill). Also a ValueError,
    for callers of the library that catch that."""


class ImageError(RetrievalError):
    """An image that cannot be read: missing, corrupt, truncated, not an image, or too large."""


class IndexChanged(RetrievalError):
    """Another process published a new generation of an index while this one read it: open it again (the
    server does so by itself and answers 503 until it has)."""


class NoSpaceError(RetrievalError):
    """A write to an index failed because its disk is full; what was committed before it is intact."""


class ReadOnlyError(RetrievalError):
    """A write to an index failed because its folder or disk cannot be written; it can still be searched."""


def shown(text: object) -> str:
    """A stored string as data for a terminal: as it is when printable, else with control characters escaped
    (\\n, \\x1b, \\u202e: no id or caption can fake an output line or colour the screen) and bytes that were not
    UTF-8 (surrogate escapes from a file name) as \\xNN."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(
        c
        if c.isprintable()
        else f"\\x{ord(c) - 0xDC00:02x}"
        if 0xDC80 <= ord(c) <= 0xDCFF
        else c.encode("unicode_escape", "backslashreplace").decode("ascii")
        for c in text
    )


class StorageError(RetrievalError):
    """A file or folder could not be read or written (missing, no permission, disk full), or SQLite or FAISS failed
    on one: what the user or the disk caused, never a bug. Made by `user_error`; `cause` is what was raised."""

    def __init__(self, message: str, cause: BaseException):
        super().__init__(message)
        self.cause = cause


OS_HINTS = {  # errno -> what to do
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "give a file, not a folder",
    errno.EEXIST: "it exists and is not a folder: choose another path",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the disk is read-only: choose another path",
    errno.ENOSPC: "the disk is full: free space and re-run",
    errno.EDQUOT: "the disk quota is used up: free space and re-run",
    errno.ENAMETOOLONG: "choose a shorter path",
}
FAISS_ERROR = re.compile(r"Error in .*? at \S+:\d+: (?:Error: )?(?:'[^']*' failed(?:: |$))?(.*)")


def user_error(e: BaseException) -> StorageError | None:
    """The one-line error a user should see for `e`, when a file, the disk, SQLite or FAISS raised it; None for
    anything else (a bug: it keeps its traceback). RetrievalError needs no translation and gives None too."""
    if isinstance(e, OSError):
        what = e.strerror or str(e) or type(e).__name__
        hint = OS_HINTS.get(e.errno or 0)
        files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return StorageError(f"{files + ': ' if files else ''}{what}{'; ' + hint if hint else ''}", e)
    if isinstance(e, sqlite3.Error):
        return StorageError(
            f"the index database (SQLite) failed: {_first_line(e)}; check that the index folder can "
            "be read and that no other process is writing it, then re-run",
            e,
        )
    if isinstance(e, RuntimeError) and (faiss := faiss_message(e)) is not None:
        return StorageError(
            f"FAISS failed: {faiss}; if an index's files were changed or damaged, re-running "
            "`retrieval index` on its source rebuilds them",
            e,
        )
    return None


def faiss_message(e: BaseException) -> str | None:
    """The substance of a FAISS error ("Error in <C++ signature> at <file>:<line>: Error: 'cond' failed: <text>"
    -> <text>, or the condition when there is no text); None when `e` is not one."""
    match = FAISS_ERROR.match(_first_line(e))
    if match is None:
        return None
    return match.group(1).strip() or _first_line(e).rsplit(": ", 1)[-1]


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
