"""ItemDatabase: an index folder's items and vectors in SQLite, the source of truth, and its manifest.

Every batch of items is committed in one transaction, so a run killed at any point leaves the index readable
as of its last commit, and a re-run carries on from there. Vectors are content-addressed (keyed by the sha256
of the image bytes or of the caption text), so identical content is encoded and stored once. A writer holds
the folder's lock; readers need none. The derived files (FAISS, memory maps) are IndexStore's, in store.py.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, Self

import numpy as np
import numpy.typing as npt

from retrieval.arrays import Vectors
from retrieval.atomic import atomic_write_json
from retrieval.errors import RetrievalError
from retrieval.index.connect import connect, fetch, read_generation, read_meta, vector_from_blob
from retrieval.index.faiss_ops import fused
from retrieval.index.folder import disk_writes, refuse_foreign, take_lock
from retrieval.index.format import DB_FILE, FORMAT_VERSION, MANIFEST_FILE, TMP_SUFFIX, Item, Manifest, read_manifest


class ItemDatabase:
    """One index folder's database and manifest. Open it read-only to read; `writer()` locks it for writing.

    A writer takes the folder's lock before it reads the manifest it will write under.
    """

    def __init__(self, path: Path, manifest: Manifest, db: sqlite3.Connection):
        self.path, self.manifest, self.db = path, manifest, db
        self._lock: IO[str] | None = None  # the writer lock's open file, while this store holds it

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, manifest: Manifest) -> Self:
        """A new index in a new or empty folder, open for writing, the lock released: for code that builds an
        index in one go (tests, benchmarks). `retrieval index` goes through open_writer."""
        path = Path(path)
        if (path / MANIFEST_FILE).exists():
            raise RetrievalError(f"{path} already holds an index")
        store = cls.open_writer(path, lambda: manifest)
        store.unlock()
        return store

    @classmethod
    def open_writer(
        cls, path: str | Path, new_manifest: Callable[[], Manifest], check: Callable[[Manifest], None] | None = None
    ) -> Self:
        """Lock the folder, then open its index for writing, or create one from new_manifest() in a new or empty
        folder. The lock comes first: two runs never both create the index, and the manifest `check` is given (it
        raises to refuse one built with another model) is the one this writer writes under. The check runs before
        anything is written, so a refused writer leaves the folder as it was. The store holds the lock until
        `writer()`'s block ends or unlock().

        A folder that holds anything but an index is refused: nothing is written into a folder that is not ours.
        """
        path = Path(path)
        refuse_foreign(path)
        with disk_writes(path):
            path.mkdir(parents=True, exist_ok=True)
        lock = take_lock(path)
        try:
            exists = (path / MANIFEST_FILE).is_file()
            manifest = read_manifest(path) if exists else new_manifest()
            if check is not None:
                check(manifest)
            if exists and manifest.generation and not (path / DB_FILE).is_file():
                raise RetrievalError(
                    f"{path}/{DB_FILE} is missing, and with it the index's items: "
                    f"delete {path} and run `retrieval index` to build it again"
                )
            if not exists:
                with disk_writes(path):  # first: from here on the folder is an index, even if this run is killed
                    atomic_write_json(path / MANIFEST_FILE, asdict(manifest))
            store = cls(path, manifest, writer_connection(path, manifest))
        except BaseException:
            lock.close()
            raise
        store._lock = lock
        return store

    @contextmanager
    def writer(self) -> Iterator[Self]:
        """Hold the folder's lock for the block, and release it at its end; a second writer is refused, not queued.

        Taken here unless open_writer took it already. Under the lock the manifest is read again (another writer
        may have changed it since this store opened) and the database reopened for writing. However the block
        ends, the write connection is closed, the lock released and the database open for reading again."""
        if self._lock is None:
            self._start_writing()
        try:
            yield self
        except BaseException:
            with suppress(RetrievalError):  # the block's error is the one to report (the store is left closed)
                self._stop_writing()
            raise
        self._stop_writing()

    def _start_writing(self) -> None:
        """Lock, read the manifest again, open for writing; on failure the store is as it was (reading, unlocked)."""
        lock = take_lock(self.path)
        try:
            manifest = read_manifest(self.path)
            db = writer_connection(self.path, manifest)
        except BaseException:
            lock.close()
            raise
        self.db.close()
        self.db, self.manifest, self._lock = db, manifest, lock

    def _stop_writing(self) -> None:
        """Close the write connection, release the lock, reopen for reading. The last connection out checkpoints
        the WAL into the database file and deletes it, so a copy of the folder or a read-only mount of it needs no
        -wal or -shm file."""
        try:
            self.db.close()
        finally:
            self.unlock()
        self.db = connect(self.path / DB_FILE)

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # --- writing -------------------------------------------------------------------------------
    def known_vectors(self, keys: Sequence[str]) -> set[str]:
        rows = fetch(
            self.db, "SELECT key FROM vectors WHERE key IN (SELECT value FROM json_each(?))", (json.dumps(list(keys)),)
        )
        return {r[0] for r in rows}

    def commit(
        self, items: Sequence[Item], new_vectors: dict[str, np.ndarray], removed_ids: Sequence[str] = ()
    ) -> None:
        """Insert or replace items (and their new vectors), remove ids: all or nothing, one generation."""
        with disk_writes(self.path), self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO vectors (key, vec) VALUES (?, ?)",
                [(k, np.asarray(v, np.float32).tobytes()) for k, v in new_vectors.items()],
            )
            gone = self.db.executemany(
                "DELETE FROM items WHERE id = ?", [(i,) for i in [*removed_ids, *(it.id for it in items)]]
            ).rowcount
            self.db.executemany(
                "INSERT INTO items (id, path, captions, image_key, text_key, mtime_ns, size, extra) "
                "VALUES (?,?,?,?,?,?,?,?)",
                [
                    (
                        it.id,
                        it.path,
                        json.dumps(it.captions),
                        it.image_key,
                        it.text_key,
                        it.mtime_ns,
                        it.size,
                        json.dumps(it.extra, allow_nan=False),
                    )
                    for it in items
                ],
            )
            if gone:  # vectors no item points to any more
                self.db.execute(
                    "DELETE FROM vectors WHERE key NOT IN (SELECT image_key FROM items WHERE image_key IS NOT NULL"
                    " UNION SELECT text_key FROM items WHERE text_key IS NOT NULL)"
                )
            self.db.execute(
                "INSERT INTO meta (key, value) VALUES ('generation', '1') "
                "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
            )
        self._committed()

    def _committed(self) -> None:
        """Called after each commit; IndexStore drops what it derived from the database before."""

    def _write_manifest(self) -> None:
        self.manifest.format_version = FORMAT_VERSION
        with disk_writes(self.path):
            atomic_write_json(self.path / MANIFEST_FILE, asdict(self.manifest))

    # --- reading -------------------------------------------------------------------------------
    def generation(self) -> int:
        return read_generation(self.db)

    def get_meta(self, key: str) -> str | None:
        return read_meta(self.db, key)

    def set_meta(self, key: str, value: str) -> None:
        """Bookkeeping beside the items (a merge's shard set); it does not change the generation."""
        with disk_writes(self.path), self.db:
            self.db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def counts(self) -> dict[str, int]:
        [(n, n_image, n_text, n_vectors)] = fetch(
            self.db, "SELECT COUNT(*), COUNT(image_key), COUNT(text_key), (SELECT COUNT(*) FROM vectors) FROM items"
        )
        return {"items": n, "with_image": n_image, "with_text": n_text, "stored_vectors": n_vectors}

    def all_vectors(self) -> tuple[npt.NDArray[np.int64], Vectors]:
        rows = fetch(
            self.db,
            "SELECT i.fid, vi.vec, vt.vec FROM items i LEFT JOIN vectors vi ON vi.key = i.image_key "
            "LEFT JOIN vectors vt ON vt.key = i.text_key ORDER BY i.fid",
        )
        fids = np.array([r[0] for r in rows], dtype=np.int64)
        vectors = np.empty((len(rows), 2 * self.manifest.dim), dtype=np.float32)
        for row, (_, vi, vt) in enumerate(rows):
            vectors[row] = fused(vector_from_blob(vi), vector_from_blob(vt))
        return fids, vectors

    def fids_having(self, column: str) -> npt.NDArray[np.int64] | None:
        """The fids of the items whose `column` (image_key, text_key) is set; None when every item has it."""
        fids = np.array([r[0] for r in fetch(self.db, f"SELECT fid FROM items WHERE {column} IS NOT NULL")], np.int64)
        return None if len(fids) == fetch(self.db, "SELECT COUNT(*) FROM items")[0][0] else fids

    def items(self, fids: Sequence[int]) -> dict[int, Item]:
        """Metadata for many FAISS ids in one query, returned by SQLite as one JSON document.

        One json.loads of the whole answer is about 3x faster than decoding each row's JSON columns.
        """
        return {
            r[0]: Item(*r)
            for r in self._json_rows(
                "i.fid, i.id, i.path, json(i.captions), i.image_key, i.text_key, i.mtime_ns, i.size, json(i.extra)",
                fids,
            )
        }

    def _json_rows(self, columns: str, fids: Sequence[int]) -> list[list[Any]]:
        [(document,)] = fetch(
            self.db,
            f"SELECT json_group_array(json_array({columns})) FROM json_each(?) j JOIN items i ON i.fid = j.value",
            (json.dumps(sorted(int(f) for f in fids)),),  # in key order: B-tree pages are read once, 2x faster
        )
        return json.loads(document)

    def items_by_id(self, ids: Sequence[str]) -> dict[str, Item]:
        rows = fetch(
            self.db, "SELECT fid FROM items WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(list(ids)),)
        )
        return {it.id: it for it in self.items([r[0] for r in rows]).values()}

    def all_items(self) -> dict[str, Item]:
        return {it.id: it for it in self.items([r[0] for r in fetch(self.db, "SELECT fid FROM items")]).values()}

    def id_table(self) -> tuple[npt.NDArray[np.int64], list[str], np.ndarray, np.ndarray]:
        """(fids ascending, ids, has image, has caption): every item, in the order of `vectors`."""
        rows = fetch(self.db, "SELECT fid, id, image_key IS NOT NULL, text_key IS NOT NULL FROM items ORDER BY fid")
        return (
            np.array([r[0] for r in rows], dtype=np.int64),
            [r[1] for r in rows],
            np.array([bool(r[2]) for r in rows]),
            np.array([bool(r[3]) for r in rows]),
        )

    def set_calibration(self, target: str, entry: dict[str, Any]) -> None:
        """Store the cutoff chosen for a target in manifest.json (written atomically; hold `writer()`)."""
        self.manifest = read_manifest(self.path)  # another writer may have rebuilt since this store opened
        self.manifest.calibration = {**self.manifest.calibration, target: entry}
        self._write_manifest()

    def info(self, counts: dict[str, int] | None = None) -> dict[str, Any]:
        """The path, the manifest and the counts: of the database now, or the `counts` given (a server's of the
        generation it answers from)."""
        return {"path": str(self.path), **asdict(self.manifest), "counts": self.counts() if counts is None else counts}


def writer_connection(path: Path, manifest: Manifest) -> sqlite3.Connection:
    """The folder's database opened for writing (hold the lock), with what a writer mends mended; closed again
    if that fails, so a failed writer leaves no connection (and no -wal file) behind."""
    db = connect(path / DB_FILE, write=True)
    try:
        _repair(path, db, manifest)
    except BaseException:
        db.close()
        raise
    return db


def _repair(path: Path, db: sqlite3.Connection, manifest: Manifest) -> None:
    """What a writer finds and mends under the lock: half-written derived files of a writer killed mid-write
    (the database is the truth; they are not), and extra fields an older version stored with a NaN in them,
    which SQLite's json() refuses, failing every read: they are emptied and the item marked changed, so the
    next `index` of the corrected source stores them again (its vectors are reused by content)."""
    with disk_writes(path):
        for tmp in path.glob(f"*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
        if manifest.generation != read_generation(db):  # a NaN fails publish, so only then is the scan worth it
            with db:
                db.execute("UPDATE items SET extra = '{}', mtime_ns = NULL WHERE NOT json_valid(extra)")
