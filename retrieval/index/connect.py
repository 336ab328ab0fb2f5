"""The index's SQLite database: its schema, and connections for a writer and for readers.

A reader never needs write access: its connection is read-only, and where SQLite cannot make the -shm file a
WAL reader needs (a read-only folder, a full disk) it opens the file immutable. Errors say whether the file is
damaged, busy, or on a disk with a problem. No faiss here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from retrieval.errors import IndexChanged, RetrievalError
from retrieval.index.folder import disk_full, disk_writes

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vec BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    fid INTEGER PRIMARY KEY AUTOINCREMENT,  -- the FAISS id; never reused
    id TEXT UNIQUE NOT NULL,                -- the user's id: a relative path or the manifest's id
    path TEXT,                              -- absolute image path, NULL for a text-only item
    captions TEXT NOT NULL,                 -- JSON list
    image_key TEXT REFERENCES vectors(key), -- sha256 of the image bytes
    text_key TEXT REFERENCES vectors(key),  -- sha256 of the captions
    mtime_ns INTEGER, size INTEGER,         -- of the image file, to skip unchanged files on a re-run
    extra TEXT NOT NULL DEFAULT '{}'        -- JSON object
);
"""


def connect(path: Path, write: bool = False) -> sqlite3.Connection:
    """The index database: for writing (WAL, the schema), or read-only, so a reader needs no write access."""
    try:
        if not write:
            return _connect_reader(path)
        with disk_writes(path.parent):
            db = sqlite3.connect(path, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")  # readers keep reading while a writer commits
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
        return db
    except sqlite3.DatabaseError as e:
        raise _database_error(path, e) from e


def _connect_reader(path: Path) -> sqlite3.Connection:
    """mode=ro reads a WAL database while a writer commits, but it must open (or create) the -shm file beside it.
    Where it cannot (a read-only folder the last writer closed cleanly, a full disk) the file is opened immutable:
    nothing can be writing it there, and the last checkpoint holds every commit. Any other failure (a database
    locked by a writer in a writable folder) is reported, never read around without locks."""
    uri = "file:" + quote(str(path.absolute()))
    try:
        return _query_ready(sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False))
    except sqlite3.OperationalError as e:
        if not _needs_immutable(path, e):
            raise
        wal = path.with_name(path.name + "-wal")
        if wal.is_file() and wal.stat().st_size:  # commits an immutable open would not see
            raise RetrievalError(
                f"cannot read {path} ({e}): {wal.name} beside it holds commits that only a writer can "
                "fold in; make the folder writable and run `retrieval index` or `remove` once"
            ) from e
    db = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, check_same_thread=False, factory=ImmutableConnection)
    db.path = path
    try:
        return _query_ready(db)
    except sqlite3.DatabaseError as e:
        raise db.changed(e) from e


class ImmutableConnection(sqlite3.Connection):
    """A read-only connection opened with immutable=1, where the -shm file a WAL reader needs cannot be made (a
    read-only folder, a full disk): SQLite then takes no locks and assumes the file never changes, so a writer
    that changes it later (the folder made writable again) can show this connection torn pages."""

    path: Path

    def changed(self, e: sqlite3.DatabaseError) -> IndexChanged:
        return IndexChanged(
            f"cannot read {self.path} ({e}) in immutable mode (its folder could not be written): a writer "
            "may have changed it while it was read; open the index again, or make the folder writable"
        )


def _needs_immutable(path: Path, e: sqlite3.OperationalError) -> bool:
    """Did mode=ro fail only for want of the -shm file: a read-only folder or file, or a full disk (SQLite calls
    that an I/O error)?"""
    name = getattr(e, "sqlite_errorname", None) or ""
    no_shm = name.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY"))
    return no_shm or (name.startswith("SQLITE_IOERR") and disk_full(path.parent))


def _query_ready(db: sqlite3.Connection) -> sqlite3.Connection:
    """SQLite opens lazily: read the schema now, so a connection that cannot read fails here, not in a search."""
    try:
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        db.close()
        raise
    return db


def _database_error(path: Path, e: sqlite3.DatabaseError) -> RetrievalError:
    """Advise a rebuild only when the file really is not a database: a disk problem does not damage an index,
    and a database another process holds locked is only busy."""
    if (getattr(e, "sqlite_errorname", None) or "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return RetrievalError(
            f"cannot read {path} ({e}): another process holds it locked; wait for it to finish, then retry"
        )
    if "file is not a database" in str(e) or "malformed" in str(e):
        return RetrievalError(f"{path} is not a readable index database ({e}); rebuild the index")
    return RetrievalError(f"cannot read {path} ({e}): check the disk, and that the file and its folder can be read")


def fetch(db: sqlite3.Connection, sql: str, args: Sequence[Any] = ()) -> list[Any]:
    """Every row of a read. A connection opened immutable cannot see a writer, so a page it reads torn
    ("malformed") means the file changed under it, not that the index is damaged: it says so."""
    try:
        return db.execute(sql, args).fetchall()
    except sqlite3.DatabaseError as e:
        if isinstance(db, ImmutableConnection):
            raise db.changed(e) from e
        raise


def read_meta(db: sqlite3.Connection, key: str) -> str | None:
    rows = fetch(db, "SELECT value FROM meta WHERE key = ?", (key,))
    return rows[0][0] if rows else None


def read_generation(db: sqlite3.Connection) -> int:
    return int(read_meta(db, "generation") or 0)


def vector_from_blob(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32)
