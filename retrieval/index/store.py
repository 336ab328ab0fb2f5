"""The index on disk: items and their vectors in SQLite, a FAISS index derived from them, manifest.json.

SQLite is the source of truth. Every batch of items is committed in one transaction, so a run killed at
any point leaves the index readable as of its last commit, and a re-run carries on from there. Vectors
are content-addressed (keyed by the sha256 of the image bytes or of the caption text), so identical
content is encoded and stored once. The FAISS index is a cache of the vectors: it is rebuilt and
written atomically after a change, and manifest.json names the database generation it reflects, so a
stale or missing FAISS file is rebuilt rather than trusted.

Each item has one fused 2d-dimensional vector [e(x1), e(x2)] (an item missing a part repeats the part it
has), so the query [w q, (1-w) q] scores w cos(q, x1) + (1-w) cos(q, x2) for any w with one index.
No torch here.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any, TypeAlias
from urllib.parse import quote

import faiss
import numpy as np
import numpy.typing as npt

from retrieval.atomic import atomic_write
from retrieval.atomic import atomic_write_json as _write_json
from retrieval.atomic import save_npy as _save_npy
from retrieval.choices import INDEX_TYPES, check_max_memory, search_knob
from retrieval.errors import IndexChanged, NoSpaceError, ReadOnlyError, RetrievalError, shown

FORMAT_VERSION = 2  # 2: the manifest gains image_precision and faiss_digest (a format 1 index is read as it is, and
# written as 2 on its next change: a version that knows only 1 then says to upgrade rather than failing on the fields)
DB_FILE, FAISS_FILE, MANIFEST_FILE, LOCK_FILE = "items.sqlite", "vectors.faiss", "manifest.json", ".lock"
FIDS_FILE, VECTORS_FILE = "fids.npy", "vectors.npy"  # fused vectors in fid order, memory-mapped for result scores
RECORDS_FILE, OFFSETS_FILE = "records.jsonl", "records.npy"  # what a result shows, a line per item in fid order
IVFDATA_SUFFIX = ".ivfdata"  # a merged on-disk IVF index's inverted lists (faiss OnDiskInvertedLists)
TMP_SUFFIX = ".tmp"  # a derived file being written (atomic_write); one left by a killed writer is removed by the next
DIGEST_SPAN = 2**20  # bytes of the FAISS file's head and tail that faiss_digest hashes
CALIBRATION_CUTOFFS = {"flat": "theta", "top_relative": "margin"}  # a calibration rule -> the cutoff stored with it
RESULT_COLUMNS = "i.id, i.path, json(i.captions), i.image_key IS NOT NULL, i.text_key IS NOT NULL, json(i.extra)"
FLAT_MAX_ITEMS = 200_000  # auto: exact search stays fast (< ~15 ms at d = 2 x 128) up to about here
Vectors: TypeAlias = npt.NDArray[np.float32]
# IndexStore's `faiss` property shadows the module inside the class body, so its annotations use these names
FaissIndex: TypeAlias = faiss.Index
FaissSearchParameters: TypeAlias = faiss.SearchParameters

# faiss uses BLAS when nq * d >= this threshold. The default (128000) sends small query batches down a path
# about 8x slower, but BLAS for one query is about 3x slower than the SIMD scan (measured here: 37 vs 11 ms
# at 200k x 256). 4096 keeps single queries on SIMD and batches of a few queries on BLAS.
faiss.cvar.distance_compute_blas_threshold = 4096

_SCHEMA = """
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


@dataclass(slots=True)
class Item:
    fid: int
    id: str
    path: str | None
    captions: list[str]
    image_key: str | None
    text_key: str | None
    mtime_ns: int | None = None  # integer nanoseconds: a float would lose digits on the way through JSON
    size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    """manifest.json: what a reader needs to know before touching the vectors."""

    model: str  # the model directory the index was built with
    fingerprint: str  # modeldir.fingerprint of that model
    dim: int  # embedding dimension d; FAISS vectors are 2d
    index_type: str = "flat"  # chosen type (never "auto")
    params: dict[str, Any] = field(default_factory=dict)  # efSearch, nprobe, ...
    metric: str = "inner_product"
    format_version: int = FORMAT_VERSION
    generation: int = 0  # the database generation the FAISS file reflects
    counts: dict[str, int] = field(default_factory=dict)
    build_seconds: float = 0.0
    faiss_bytes: int = 0
    faiss_digest: str = ""  # faiss_digest of the FAISS file published with this generation ("" before there was one)
    calibration: dict[str, Any] = field(default_factory=dict)  # per target: the cutoff `retrieval calibrate` chose
    image_precision: str = ""  # what its images were encoded in (fp32, bf16; "" before any): image queries match it


def check_model(manifest: Manifest, path: str | Path, model_fp: str, model_dir: str | Path) -> None:
    """Refuse to add to or query an index with a model other than the one that built it (its vectors would live
    in another space): the one check, for `index` and for search alike."""
    if manifest.fingerprint != model_fp:
        raise RetrievalError(
            f"model mismatch: {path} was built with model {manifest.fingerprint} ({manifest.model}), "
            f"but {model_dir} is {model_fp}; use the model that built it, or build a new index for this one"
        )


def choose_index_type(n: int, dim: int, memory_budget: int) -> str:
    """autofaiss-style rule: exact while small, HNSW while its graph fits the budget, else compressed IVF-PQ."""
    if n <= FLAT_MAX_ITEMS:
        return "flat"
    if n * (2 * dim * 4 + 32 * 2 * 8) <= memory_budget:
        return "hnsw"
    return "ivfpq"


def factory_string(index_type: str, n: int, dim2: int) -> str:
    if index_type == "flat":
        return "IDMap2,Flat"
    if index_type == "hnsw":
        return "IDMap2,HNSW32"
    nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
    if index_type == "ivf":
        return f"IDMap2,IVF{nlist},Flat"
    if index_type == "ivfpq":
        return f"IDMap2,IVF{nlist},PQ{max(1, dim2 // 8)}"
    raise RetrievalError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")


def min_items(index_type: str) -> int:
    """IVF trains k-means (>= 39 points per list) and PQ trains 256 centroids per sub-quantiser."""
    return {"ivf": 39, "ivfpq": 256}.get(index_type, 0)


def build_faiss(vectors: Vectors, fids: npt.NDArray[np.int64], index_type: str, params: dict[str, Any]) -> faiss.Index:
    if len(vectors) < min_items(index_type):
        index_type = "flat"  # too few vectors to train on (an index emptied by removals): exact is never worse
    index = faiss.index_factory(
        vectors.shape[1], factory_string(index_type, len(vectors), vectors.shape[1]), faiss.METRIC_INNER_PRODUCT
    )
    inner = _inner(index)  # factory_string's IDMap2 wraps the index that searches
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efConstruction = search_knob(params, "ef_construction", 80)
    if not index.is_trained:
        sample = vectors[np.random.default_rng(0).permutation(len(vectors))[: 256 * 1024]]
        index.train(sample)
    if len(vectors):
        index.add_with_ids(vectors, fids)
    set_search_params(index, params)
    return index


def set_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    inner = _inner(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = search_knob(params, "ef_search", 128)
    if isinstance(inner, faiss.IndexIVF):
        inner.nprobe = search_knob(params, "nprobe", 16)


def search_parameters(index: faiss.Index, params: dict[str, Any], selector: Any) -> faiss.SearchParameters | None:
    """Per-call parameters: the item filter, with the ANN knobs of the index type (a selector replaces them)."""
    inner = _inner(index)
    # faiss's stubs lack SearchParametersHNSW and the keyword arguments its wrappers give every SearchParameters
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
            sel=selector, efSearch=search_knob(params, "ef_search", 128)
        )
    if isinstance(inner, faiss.IndexIVF):
        return faiss.SearchParametersIVF(  # type: ignore[call-arg]
            sel=selector, nprobe=search_knob(params, "nprobe", 16)
        )
    return faiss.SearchParameters(sel=selector) if selector is not None else None  # type: ignore[call-arg]


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def fused(image_vec: np.ndarray | None, text_vec: np.ndarray | None) -> np.ndarray:
    """[e(x1), e(x2)]; a missing part repeats the part the item has, so every w scores it on what it has."""
    image_vec = text_vec if image_vec is None else image_vec
    text_vec = image_vec if text_vec is None else text_vec
    return np.concatenate([image_vec, text_vec]).astype(np.float32)


class IndexStore:
    """One index folder. Open it read-only to search; `writer()` locks it for adding and removing.

    A reader never needs write access (a read-only mount, a full disk): its SQLite connection is read-only.
    A writer takes the folder's lock before it reads the manifest it will write under.
    """

    def __init__(self, path: Path, manifest: Manifest, db: sqlite3.Connection, max_memory: int | None = None):
        check_max_memory(max_memory)
        self.path, self.manifest, self.db = path, manifest, db
        self.max_memory = max_memory  # bytes of RAM the FAISS index may take when searching; None: no limit
        self._lock: IO[str] | None = None  # the writer lock's open file, while this store holds it
        self._faiss: FaissIndex | None = None
        self._vectors: tuple[npt.NDArray[np.int64], Vectors] | None = None
        self._records: tuple[npt.NDArray[np.int64], bytes | mmap.mmap] | bool | None = None  # False: damaged
        self._exact: FaissIndex | None = None  # a flat copy for exact answers on an ANN index
        self._searchers: dict[tuple[str | None, bool], tuple[FaissIndex, Any]] = {}

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, manifest: Manifest) -> IndexStore:
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
    ) -> IndexStore:
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
        lock = _take_lock(path)
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
                    _write_json(path / MANIFEST_FILE, asdict(manifest))
            store = cls(path, manifest, _writer_connection(path, manifest))
        except BaseException:
            lock.close()
            raise
        store._lock = lock
        return store

    @classmethod
    def open(cls, path: str | Path, max_memory: int | None = None) -> IndexStore:
        """Open for reading; with max_memory, an IVF index larger than that is searched memory-mapped from disk."""
        path = Path(path)
        if not (path / MANIFEST_FILE).is_file():
            raise RetrievalError(f"{path} is not an index (no {MANIFEST_FILE}); build one with `retrieval index`")
        manifest = read_manifest(path)
        if not (path / DB_FILE).is_file():
            raise RetrievalError(f"{path}/{DB_FILE} is missing; rebuild the index with `retrieval index`")
        return cls(path, manifest, _connect(path / DB_FILE), max_memory)

    @contextmanager
    def writer(self) -> Iterator[IndexStore]:
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
        lock = _take_lock(self.path)
        try:
            manifest = read_manifest(self.path)
            db = _writer_connection(self.path, manifest)
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
        self.db = _connect(self.path / DB_FILE)

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # --- writing -------------------------------------------------------------------------------
    def known_vectors(self, keys: Sequence[str]) -> set[str]:
        rows = _fetch(
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
        self._faiss, self._vectors, self._records, self._exact, self._searchers = None, None, None, None, {}

    def rebuild(self) -> None:
        """Rebuild the FAISS index from the database and write it and the manifest atomically."""
        t0 = time.perf_counter()
        fids, vectors = self.all_vectors()
        index = build_faiss(vectors, fids, self.manifest.index_type, self.manifest.params)
        self.publish(index, fids, lambda tmp: _save_npy(tmp, vectors), t0)
        self._faiss, self._vectors = index, (fids, vectors)

    def publish(
        self, index: FaissIndex, fids: npt.NDArray[np.int64], write_vectors: Callable[[Path], Any], t0: float
    ) -> None:
        """Write the derived files for the database as it is now: the FAISS index (ids = fids), fids, the fused
        vectors in fid order (`write_vectors` writes the .npy to the path it is given), the result records;
        then the manifest naming this generation. A merged index comes in here with its own FAISS index."""
        with disk_writes(self.path):
            self._publish(index, fids, write_vectors, t0)

    def _publish(
        self, index: FaissIndex, fids: npt.NDArray[np.int64], write_vectors: Callable[[Path], Any], t0: float
    ) -> None:
        atomic_write(self.path / FAISS_FILE, lambda tmp: write_faiss(index, tmp))
        atomic_write(self.path / FIDS_FILE, lambda tmp: _save_npy(tmp, fids))
        atomic_write(self.path / VECTORS_FILE, write_vectors)
        ends = array.array("q", [0])  # byte offset of each line's end: 8 B per item, not the lines themselves

        def write_records(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                for (line,) in self.db.execute(f"SELECT json_array({RESULT_COLUMNS}) FROM items i ORDER BY i.fid"):
                    data = line.encode() + b"\n"
                    f.write(data)
                    ends.append(ends[-1] + len(data))

        atomic_write(self.path / RECORDS_FILE, write_records)
        atomic_write(self.path / OFFSETS_FILE, lambda tmp: _save_npy(tmp, np.frombuffer(ends, dtype=np.int64)))
        self.manifest.generation = self.generation()
        self.manifest.counts = self.counts()
        if (self.path / MANIFEST_FILE).is_file():  # a `calibrate` that ran since this store opened must survive
            self.manifest.calibration = read_manifest(self.path).calibration
        self.manifest.build_seconds = time.perf_counter() - t0
        self.manifest.faiss_bytes = (self.path / FAISS_FILE).stat().st_size
        self.manifest.faiss_digest = faiss_digest(self.path / FAISS_FILE)
        self._write_manifest()  # last: until it names the new generation, readers rebuild from the database
        for stale in self.path.glob(f"*{IVFDATA_SUFFIX}"):  # on-disk lists of an earlier merge, no longer named
            if stale.name != ivfdata_name(self.manifest.generation):
                stale.unlink()
        self._faiss, self._vectors, self._records, self._exact, self._searchers = None, None, None, None, {}

    def _write_manifest(self) -> None:
        self.manifest.format_version = FORMAT_VERSION
        with disk_writes(self.path):
            _write_json(self.path / MANIFEST_FILE, asdict(self.manifest))

    # --- reading -------------------------------------------------------------------------------
    def generation(self) -> int:
        return _generation(self.db)

    def get_meta(self, key: str) -> str | None:
        return _meta(self.db, key)

    def set_meta(self, key: str, value: str) -> None:
        """Bookkeeping beside the items (a merge's shard set); it does not change the generation."""
        with disk_writes(self.path), self.db:
            self.db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def counts(self) -> dict[str, int]:
        [(n, n_image, n_text, n_vectors)] = _fetch(
            self.db, "SELECT COUNT(*), COUNT(image_key), COUNT(text_key), (SELECT COUNT(*) FROM vectors) FROM items"
        )
        return {"items": n, "with_image": n_image, "with_text": n_text, "stored_vectors": n_vectors}

    def all_vectors(self) -> tuple[npt.NDArray[np.int64], Vectors]:
        rows = _fetch(
            self.db,
            "SELECT i.fid, vi.vec, vt.vec FROM items i LEFT JOIN vectors vi ON vi.key = i.image_key "
            "LEFT JOIN vectors vt ON vt.key = i.text_key ORDER BY i.fid",
        )
        fids = np.array([r[0] for r in rows], dtype=np.int64)
        vectors = np.empty((len(rows), 2 * self.manifest.dim), dtype=np.float32)
        for row, (_, vi, vt) in enumerate(rows):
            vectors[row] = fused(_vec(vi), _vec(vt))
        return fids, vectors

    def _files_current(self) -> bool:
        """Do the derived files (FAISS, fids, vectors) reflect the database as it is now?"""
        return self.manifest.generation == self.generation()

    def derived_files_current(self) -> bool:
        """Does the manifest name the database's generation, with the FAISS file published with it? A writer
        rewrites the derived files when not: after a run killed while writing them, or over a FAISS file copied
        from another index. Cheap (2 MiB read, see faiss_digest) on every no-op `index`, `remove` and merge; a
        manifest from before the digest has the file read and checked, and kept for searching."""
        if not self._files_current():
            return False
        if self.manifest.faiss_digest:
            return self._faiss_file_published()
        self._faiss = self._faiss_file()
        return self._faiss is not None

    def _faiss_file_published(self) -> bool:
        """Is the FAISS file the one the manifest was published with (not stale, damaged or another index's)?"""
        try:
            return faiss_digest(self.path / FAISS_FILE) == self.manifest.faiss_digest
        except OSError:
            return False  # missing or unreadable: the database still holds every vector

    @property
    def vectors(self) -> tuple[npt.NDArray[np.int64], Vectors]:
        """(fids ascending, fused vectors (n, 2d)): memory-mapped from disk when current, else from the database."""
        if self._vectors is None:
            if self._files_current():
                try:
                    self._vectors = (np.load(self.path / FIDS_FILE), np.load(self.path / VECTORS_FILE, mmap_mode="r"))
                except (OSError, ValueError, EOFError):
                    self._vectors = None  # missing, empty or truncated: the database still holds every vector
            n_items = self.manifest.counts.get("items")  # of this generation, written beside it by publish
            if (
                self._vectors is None
                or len(self._vectors[0]) != len(self._vectors[1])
                or (n_items is not None and len(self._vectors[0]) != n_items)
            ):
                self._vectors = self.all_vectors()
        return self._vectors

    @property
    def records(self) -> tuple[npt.NDArray[np.int64], bytes | mmap.mmap] | None:
        """(byte offsets (n + 1), the records file memory-mapped) when current, else None: ask SQLite."""
        if self._records is None and self._files_current():
            try:
                offsets = np.load(self.path / OFFSETS_FILE)
                with open(self.path / RECORDS_FILE, "rb") as f:  # the map outlives the file object
                    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if offsets[-1] else b""
            except (OSError, ValueError, EOFError, IndexError):
                return None  # missing, empty or truncated: the database has every record
            if len(offsets) == len(self.vectors[0]) + 1 and len(data) == offsets[-1]:
                self._records = (offsets, data)
        return self._records if isinstance(self._records, tuple) else None  # False: damaged

    @property
    def faiss(self) -> FaissIndex:
        """The FAISS index, from its file when that reflects the database, else rebuilt in memory.

        Over max_memory, an IVF index's inverted lists are memory-mapped (IO_FLAG_MMAP; the lists of a merged
        on-disk index always are), so the OS pages in only the lists a query probes.
        """
        if self._faiss is None:
            self._faiss = self._faiss_file()
        if self._faiss is None:
            fids, vectors = self.vectors
            self._check_budget(vectors.nbytes, "rebuilding the FAISS index in memory (its file is stale or missing)")
            self._faiss = build_faiss(
                np.ascontiguousarray(vectors), fids, self.manifest.index_type, self.manifest.params
            )
        return self._faiss

    def _faiss_file(self) -> FaissIndex | None:
        """The FAISS file, its search knobs set, when it reflects the database as it is now, else None (stale,
        missing, damaged, or another index's): the database still holds every vector. The manifest's digest
        names the file it was published with; a manifest from before the digest has the file checked instead."""
        file = self.path / FAISS_FILE
        if not (file.is_file() and self._files_current()):
            return None
        if self.manifest.faiss_digest and not self._faiss_file_published():
            return None
        size = file.stat().st_size
        if self.manifest.index_type not in ("ivf", "ivfpq"):
            self._check_budget(size, f"the {self.manifest.index_type} index (only ivf and ivfpq search from disk)")
        on_disk = (self.path / ivfdata_name(self.manifest.generation)).is_file()  # mapped already
        try:
            index = read_faiss(file, mmap=self._over_budget(size) and not on_disk)
        except RuntimeError:
            return None  # truncated or not a FAISS file
        if not (self.manifest.faiss_digest or self._holds_database(index)):
            return None
        set_search_params(index, self.manifest.params)
        return index

    def _holds_database(self, index: FaissIndex) -> bool:
        """For a manifest from before the digest: checks that a FAISS index holds this database's vectors, not
        another index's (a copied file): its dimension, count and ids, and for an exact store its first and last
        vectors (same ids is not enough: two indexes of 600 items both have ids 1..600; an IVF copy passes)."""
        fids, vectors = self.vectors
        if index.d != vectors.shape[1] or index.ntotal != len(fids):
            return False
        if isinstance(index, faiss.IndexIDMap) and not np.array_equal(faiss.vector_to_array(index.id_map), fids):
            return False
        if (
            len(fids)
            and isinstance(index, faiss.IndexIDMap2)
            and isinstance(_inner(index), (faiss.IndexFlat, faiss.IndexHNSW))
        ):
            return all(np.array_equal(index.reconstruct(int(fids[row])), vectors[row]) for row in (0, len(fids) - 1))
        return True

    def _over_budget(self, nbytes: int) -> bool:
        return self.max_memory is not None and nbytes > self.max_memory

    def _check_budget(self, nbytes: int, what: str) -> None:
        if self.max_memory is not None and self._over_budget(nbytes):
            raise RetrievalError(
                f"{what} needs {nbytes / 2**30:.2f} GiB, over --max-memory "
                f"{self.max_memory / 2**30:.2f} GiB; raise --max-memory or build an ivf/ivfpq index"
            )

    def fused_vectors(self, fids: Sequence[int] | npt.NDArray[np.int64]) -> Vectors:
        """(n, 2d) fused vectors of the given items, from the memory-mapped matrix."""
        return np.asarray(self.vectors[1][self._rows(fids)])

    def _rows(self, fids: Sequence[int] | npt.NDArray[np.int64]) -> np.ndarray:
        """Each id's row in `vectors`. An id missing there comes from a FAISS index newer than the vectors
        this store loaded: another process changed the index since it was opened."""
        all_fids, wanted = self.vectors[0], np.asarray(fids, dtype=np.int64)
        rows = np.minimum(np.searchsorted(all_fids, wanted), max(len(all_fids) - 1, 0))
        if len(wanted) and (not len(all_fids) or np.any(all_fids[rows] != wanted)):
            raise self.changed()
        return rows

    def changed(self) -> IndexChanged:
        return IndexChanged(f"{self.path} changed since it was opened (re-indexed or items removed); open it again")

    def tune(self, params: dict[str, Any]) -> None:
        """Change search knobs (ef_search, nprobe) for this process's searches; the manifest on disk keeps its own."""
        self.manifest.params = {**self.manifest.params, **params}
        if self._faiss is not None:
            set_search_params(self._faiss, self.manifest.params)
        self._searchers = {}

    def searcher(self, column: str | None, exact: bool = False) -> tuple[FaissIndex, FaissSearchParameters | None]:
        """The FAISS index to ask and its per-call parameters, restricted to the items that have `column`
        (image_key or text_key), or to all items for None.

        exact=True asks a flat copy of the vectors, built in memory on first use: HNSW and IVF answer top-k and
        θ approximately (HNSW's range search sees only its efSearch candidates). The item filter is built once
        per generation, since selectors over many ids are slow to make; the parameters are new on every call,
        because FAISS's IDMap swaps the filter inside them during a search, so threads must not share them.
        """
        if (column, exact) not in self._searchers:
            index = self.faiss
            if exact and not isinstance(_inner(index), faiss.IndexFlat):
                if self._exact is None:
                    fids, vectors = self.vectors
                    self._check_budget(vectors.nbytes, "an exact answer (a flat copy of the vectors in memory)")
                    self._exact = build_faiss(np.ascontiguousarray(vectors), fids, "flat", {})
                index = self._exact
            self._searchers[column, exact] = (index, self._selector(column))  # kept: parameters point to it, not own it
        index, selector = self._searchers[column, exact]
        return index, search_parameters(index, self.manifest.params, selector)

    def _selector(self, column: str | None) -> Any:
        if column is None:
            return None
        fids = np.array(
            [r[0] for r in _fetch(self.db, f"SELECT fid FROM items WHERE {column} IS NOT NULL")], dtype=np.int64
        )
        total = _fetch(self.db, "SELECT COUNT(*) FROM items")[0][0]
        return None if len(fids) == total else faiss.IDSelectorBatch(fids)

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

    def result_rows(self, fids: Sequence[int]) -> dict[int, list[Any]]:
        """What a search result shows: [id, path, captions, has image, has caption, extra] per FAISS id.

        From the memory-mapped records file when it is current: slicing the lines out and decoding them
        with one json.loads is about 3x faster than SQLite for 10,000 results (see scripts/bench_search.py).
        """
        if self.records is not None:
            offsets, data = self.records
            rows = self._rows(fids)
            lines = [data[a:b] for a, b in zip(offsets[rows].tolist(), offsets[rows + 1].tolist(), strict=True)]
            try:
                records = json.loads(b"[" + b",".join(lines) + b"]")
                if all(len(r) == 6 for r in records):
                    return dict(zip(fids, records, strict=True))
            except ValueError:
                pass
            self._records = False  # damaged in place: stop trusting it, the database has every record
        found = {r[0]: r[1:] for r in self._json_rows(f"i.fid, {RESULT_COLUMNS}", fids)}
        if len(found) != len(set(fids)):
            raise self.changed()
        return found

    def _json_rows(self, columns: str, fids: Sequence[int]) -> list[list[Any]]:
        [(document,)] = _fetch(
            self.db,
            f"SELECT json_group_array(json_array({columns})) FROM json_each(?) j JOIN items i ON i.fid = j.value",
            (json.dumps(sorted(int(f) for f in fids)),),  # in key order: B-tree pages are read once, 2x faster
        )
        return json.loads(document)

    def items_by_id(self, ids: Sequence[str]) -> dict[str, Item]:
        rows = _fetch(
            self.db, "SELECT fid FROM items WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(list(ids)),)
        )
        return {it.id: it for it in self.items([r[0] for r in rows]).values()}

    def all_items(self) -> dict[str, Item]:
        return {it.id: it for it in self.items([r[0] for r in _fetch(self.db, "SELECT fid FROM items")]).values()}

    def id_table(self) -> tuple[npt.NDArray[np.int64], list[str], np.ndarray, np.ndarray]:
        """(fids ascending, ids, has image, has caption): every item, in the order of `vectors`."""
        rows = _fetch(self.db, "SELECT fid, id, image_key IS NOT NULL, text_key IS NOT NULL FROM items ORDER BY fid")
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

    def part_vectors(self, fids: Sequence[int]) -> dict[int, tuple[np.ndarray | None, np.ndarray | None]]:
        """(image vector, text vector) per item, None for a missing part."""
        d, items = self.manifest.dim, self.items(fids)
        return {
            f: (v[:d] if items[f].image_key else None, v[d:] if items[f].text_key else None)
            for f, v in zip(fids, self.fused_vectors(fids), strict=True)
            if f in items
        }


def read_faiss(file: Path, mmap: bool = False) -> faiss.Index:
    """Read a FAISS file; on-disk inverted lists are looked for beside it, so the folder can move."""
    with quiet_faiss():
        return faiss.read_index(str(file), faiss.IO_FLAG_ONDISK_SAME_DIR | (faiss.IO_FLAG_MMAP if mmap else 0))


@contextmanager
def quiet_faiss() -> Iterator[None]:
    """Drop what FAISS prints with C printf while reading or merging on-disk lists ("updating ondisk
    filename", "resizing"): it goes to stdout, where `search --json` writes its results."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            try:
                yield
            finally:
                ctypes.CDLL(None).fflush(None)  # C's buffer, before fd 1 points back at the real stdout
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def ivfdata_name(generation: int) -> str:
    """The on-disk inverted lists of a merged index, named by generation: a new merge never overwrites the
    lists the current FAISS file points to, and `publish` deletes the old ones once the manifest moves on."""
    return f"vectors.{generation}{IVFDATA_SUFFIX}"


def write_faiss(index: faiss.Index, path: Path) -> None:
    """faiss.write_index through a Python file: a full disk raises OSError here. FAISS's own file writer reports a
    failed write as a RuntimeError and ignores a failed close, which can leave a truncated file without an error."""
    with open(path, "wb") as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))  # type: ignore[attr-defined]  # not in faiss's stubs


def faiss_digest(file: Path) -> str:
    """sha256 of a FAISS file's size, first and last MiB: cheap on any size, and another index's file differs
    there for every type (flat: its first vectors; IVF: its trained centroids, in the header; HNSW: graph and
    vectors), even one with the same count and ids."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(size.to_bytes(8, "little") + f.read(DIGEST_SPAN))
        f.seek(max(0, size - DIGEST_SPAN))
        digest.update(f.read(DIGEST_SPAN))
    return digest.hexdigest()


def _take_lock(path: Path) -> IO[str]:
    """The folder's writer lock, held while the returned file is open. flock belongs to the open file
    description, so a second open() conflicts even in one process. A filesystem without locks (NFS without a
    lock daemon: ENOLCK) is refused: two writers there could not be kept apart."""
    with disk_writes(path):
        lock = open(path / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise RetrievalError(
            f"another process is writing {path}; wait for it to finish (or end it) and retry"
        ) from None
    except OSError as e:
        lock.close()
        raise RetrievalError(
            f"cannot lock {path / LOCK_FILE} ({e.strerror or e}): writing an index needs a filesystem "
            "with file locks; put the index on a local disk"
        ) from e
    return lock


def refuse_foreign(path: Path) -> None:
    """An index goes into a new folder, an empty one, or one that holds an index (its manifest): never into a
    folder of someone else's files, where it would overwrite a records.jsonl or add tables to an items.sqlite."""
    if path.exists() and not path.is_dir():
        raise RetrievalError(f"{path} is a file, not a folder: choose an empty or new folder for --index")
    if not path.is_dir() or (path / MANIFEST_FILE).is_file():
        return
    # what a first run killed before its manifest was written leaves, and the Ray engine's default --shard-dir
    # (INDEX/shards), where shards encoded elsewhere may be put for a first run to merge
    ours = {LOCK_FILE, MANIFEST_FILE + TMP_SUFFIX, "shards"}
    try:
        names = sorted(p.name for p in path.iterdir() if p.name not in ours)
    except OSError as e:
        raise RetrievalError(f"cannot list {path} ({e.strerror}): choose a folder you can read for --index") from e
    if names:
        listed = ", ".join(shown(name) for name in names[:5]) + (", ..." if len(names) > 5 else "")
        raise RetrievalError(
            f"{path} is not empty and is not an index (it holds {listed}): choose an empty or new folder for --index"
        )


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
NO_SPACE_TEXT = ("database or disk is full", "No space left on device", "Disk quota exceeded")
READ_ONLY_TEXT = ("readonly database", "Read-only file system", "Permission denied")
DISK_TEXT = ("disk I/O error", "unable to open database file")


@contextmanager
def disk_writes(path: Path) -> Iterator[None]:
    """Turn a write to the index folder `path` that the disk refused into one line saying what is wrong: no space,
    or read-only. Other errors pass through. Every batch is its own transaction, so the index stays as of its
    last commit, and the readers of it keep working."""
    try:
        yield
    except (OSError, sqlite3.OperationalError) as e:
        error = storage_error(path, e)
        if error is None:
            raise
        raise error from e


def storage_error(path: Path, e: OSError | sqlite3.OperationalError) -> RetrievalError | None:
    """Our error for a write the disk refused (OSError by errno; SQLite only says it in words), else None."""
    text, code = str(e), getattr(e, "errno", None)
    if (
        code in NO_SPACE
        or any(t in text for t in NO_SPACE_TEXT)
        or (any(t in text for t in DISK_TEXT) and _disk_full(path))
    ):
        return NoSpaceError(
            f"no space left on the disk holding {path}: free some space and run the command again "
            "(the index is intact as of its last commit)"
        )
    if code in READ_ONLY or any(t in text for t in READ_ONLY_TEXT):
        why = e.strerror if isinstance(e, OSError) and e.strerror else "it cannot be written"
        return ReadOnlyError(
            f"{path} is read-only ({why}): writing an index needs a writable folder (searching one does "
            "not); make it writable, or copy the index to a writable folder and use that"
        )
    if any(t in text for t in DISK_TEXT):
        return RetrievalError(
            f"writing {path} failed ({text}): check the disk it is on, then run the command again "
            "(the index is intact as of its last commit)"
        )
    return None


def _disk_full(path: Path) -> bool:
    """SQLite reports a full disk met while growing its shared-memory file only as a 'disk I/O error'."""
    try:
        return shutil.disk_usage(path).free < 64 * 1024
    except OSError:
        return False


def _vec(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32)


def _writer_connection(path: Path, manifest: Manifest) -> sqlite3.Connection:
    """The folder's database opened for writing (hold the lock), with what a writer mends mended; closed again
    if that fails, so a failed writer leaves no connection (and no -wal file) behind."""
    db = _connect(path / DB_FILE, write=True)
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
        if manifest.generation != _generation(db):  # a NaN fails publish, so only then is the scan worth it
            with db:
                db.execute("UPDATE items SET extra = '{}', mtime_ns = NULL WHERE NOT json_valid(extra)")


def _generation(db: sqlite3.Connection) -> int:
    return int(_meta(db, "generation") or 0)


def _meta(db: sqlite3.Connection, key: str) -> str | None:
    rows = _fetch(db, "SELECT value FROM meta WHERE key = ?", (key,))
    return rows[0][0] if rows else None


def _fetch(db: sqlite3.Connection, sql: str, args: Sequence[Any] = ()) -> list[Any]:
    """Every row of a read. A connection opened immutable cannot see a writer, so a page it reads torn
    ("malformed") means the file changed under it, not that the index is damaged: it says so."""
    try:
        return db.execute(sql, args).fetchall()
    except sqlite3.DatabaseError as e:
        if isinstance(db, ImmutableConnection):
            raise db.changed(e) from e
        raise


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


def _connect(path: Path, write: bool = False) -> sqlite3.Connection:
    """The index database: for writing (WAL, the schema), or read-only, so a reader needs no write access."""
    try:
        if not write:
            return _connect_reader(path)
        with disk_writes(path.parent):
            db = sqlite3.connect(path, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")  # readers keep reading while a writer commits
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
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


def _needs_immutable(path: Path, e: sqlite3.OperationalError) -> bool:
    """Did mode=ro fail only for want of the -shm file: a read-only folder or file, or a full disk (SQLite calls
    that an I/O error)?"""
    name = getattr(e, "sqlite_errorname", None) or ""
    no_shm = name.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY"))
    return no_shm or (name.startswith("SQLITE_IOERR") and _disk_full(path.parent))


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


def read_manifest(path: Path) -> Manifest:
    try:
        d = json.loads((path / MANIFEST_FILE).read_text())
    except OSError as e:
        raise RetrievalError(
            f"cannot read {path}/{MANIFEST_FILE} ({e.strerror or e}): check the disk, and that the file "
            "and its folder can be read"
        ) from e
    except ValueError as e:
        raise RetrievalError(
            f"{path}/{MANIFEST_FILE} is damaged ({e}); rebuild the index with `retrieval index`"
        ) from e
    if not isinstance(d, dict):
        raise RetrievalError(f"{path}/{MANIFEST_FILE} is not a JSON object; rebuild the index with `retrieval index`")
    version = d.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RetrievalError(
            f"{path} is index format {version}, newer than this retrieval reads ({FORMAT_VERSION}): upgrade retrieval"
        )
    try:
        manifest = Manifest(**d)
    except TypeError as e:
        raise RetrievalError(
            f"{path}/{MANIFEST_FILE} does not match format {FORMAT_VERSION} ({e}); rebuild the index"
        ) from e
    for name, value in asdict(manifest).items():
        problem = _manifest_value_problem(name, value)
        if problem:
            raise RetrievalError(
                f"{path}/{MANIFEST_FILE} is damaged: {name} is {json.dumps(value)[:40]}, {problem}; "
                f"correct it, or delete {path} and run `retrieval index` to build it again"
            )
    return manifest


MANIFEST_TYPES: dict[str, tuple[tuple[type, ...], str]] = {  # Manifest's annotations: the JSON types and their words
    "str": ((str,), "a string"),
    "int": ((int,), "a whole number"),
    "float": ((int, float), "a number"),
    "dict": ((dict,), "an object"),
}


def _manifest_value_problem(name: str, value: Any) -> str | None:
    """What is wrong with one manifest value, or None: its type (the annotation on Manifest) and its range."""
    annotation = next(f.type for f in fields(Manifest) if f.name == name)
    types, words = MANIFEST_TYPES[str(annotation).split("[")[0]]
    if isinstance(value, bool) or not isinstance(value, types):
        return f"not {words}"
    if isinstance(value, int) and (  # dim, generation, faiss_bytes are ints by now: this narrows `value` to compare
        (name == "dim" and value < 1) or (name in ("generation", "faiss_bytes") and value < 0)
    ):
        return "out of range"
    if name == "index_type" and value not in INDEX_TYPES[1:]:
        return f"not one of {', '.join(INDEX_TYPES[1:])}"
    if name == "image_precision" and value not in ("", "fp32", "bf16"):
        return "not fp32 or bf16"
    if name == "calibration" and isinstance(value, dict):
        return next(filter(None, (_calibration_problem(target, entry) for target, entry in value.items())), None)
    return None


def _calibration_problem(target: str, entry: Any) -> str | None:
    """What is wrong with the cutoff stored for one target, or None: search reads an object as `retrieval calibrate`
    writes it, naming its rule, with that rule's cutoff (theta or margin) and the fusion weight as numbers."""
    rule = entry.get("rule") if isinstance(entry, dict) else None
    cutoff = CALIBRATION_CUTOFFS.get(rule) if isinstance(rule, str) else None
    if cutoff is None or not all(_is_number(entry.get(key)) for key in (cutoff, "weight")):
        return (
            f"its {json.dumps(target)} entry is not a cutoff as `retrieval calibrate` stores it (rule flat with theta, "
            "or top_relative with margin, and weight)"
        )
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
