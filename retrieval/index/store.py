"""IndexStore: an index folder's database plus the files derived from it, and the searchers over them.

The FAISS index, the fused vectors (fids.npy, vectors.npy) and the result records (records.jsonl) are caches
of the database: rebuilt and written atomically after a change, with manifest.json naming the database
generation they reflect, so a stale, missing or foreign file is rebuilt in memory rather than trusted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import faiss
import numpy as np
import numpy.typing as npt

from retrieval.arrays import Vectors
from retrieval.atomic import atomic_write, save_npy
from retrieval.choices import check_max_memory
from retrieval.errors import IndexChanged, RetrievalError
from retrieval.index.combined import COMBINED_WEIGHTS, Combined, combined_scan
from retrieval.index.connect import connect
from retrieval.index.database import ItemDatabase
from retrieval.index.faiss_ops import (
    PartScorer,
    build_faiss,
    faiss_digest,
    holds_vectors,
    inner_index,
    is_flat16,
    ivfdata_name,
    read_faiss,
    search_parameters,
    set_search_params,
    stored_vectors,
    use_blas_from,
    write_faiss,
)
from retrieval.index.folder import disk_writes
from retrieval.index.format import (
    DB_FILE,
    FAISS_FILE,
    FIDS_FILE,
    IVFDATA_SUFFIX,
    MANIFEST_FILE,
    OFFSETS_FILE,
    RECORDS_FILE,
    VECTORS_FILE,
    Manifest,
    read_manifest,
)
from retrieval.index.records import RESULT_COLUMNS, Records, decode_records, open_records, write_records
from retrieval.index.rerank import Reranked
from retrieval.index.scan import FlatScan
from retrieval.index.search import Hit, Searchable

# IndexStore's `faiss` property shadows the module inside the class body, so its annotations use these names
FaissIndex: TypeAlias = faiss.Index

FaissSearchParameters: TypeAlias = faiss.SearchParameters


class IndexStore(ItemDatabase):
    """One index folder: its database (ItemDatabase) and the derived files searches read."""

    def __init__(self, path: Path, manifest: Manifest, db: Any, max_memory: int | None = None):
        check_max_memory(max_memory)
        super().__init__(path, manifest, db)
        self.max_memory = max_memory  # bytes of RAM the FAISS index may take when searching; None: no limit
        self._faiss: FaissIndex | None = None
        self._vectors: tuple[npt.NDArray[np.int64], Vectors] | None = None
        self._records: Records | bool | None = None  # False: damaged
        self._exact: FaissIndex | None = None  # a flat copy for exact answers on an ANN index
        # (weight, column) -> (the items that have the column, flat scan of their combined vectors: combined.py)
        self._combined: dict[tuple[float, str | None], tuple[np.ndarray | None, Combined]] = {}  # None: all items
        self._loading = threading.RLock()  # server threads share a store: one loads, combines or makes a searcher
        self._searchers: dict[tuple[str | None, bool, float | None], tuple[Searchable, Any]] = {}
        self._rows: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64] | None] | None = None  # see _row_table
        self._scorer: tuple[FaissIndex | None, npt.NDArray[np.int64], PartScorer] | None = None  # see part_scorer

    @classmethod
    def open(cls, path: str | Path, max_memory: int | None = None) -> IndexStore:
        """Open for reading; with max_memory, an IVF index larger than that is searched memory-mapped from disk."""
        path = Path(path)
        if not (path / MANIFEST_FILE).is_file():
            raise RetrievalError(f"{path} is not an index (no {MANIFEST_FILE}); build one with `retrieval index`")
        manifest = read_manifest(path)
        if not (path / DB_FILE).is_file():
            raise RetrievalError(f"{path}/{DB_FILE} is missing; rebuild the index with `retrieval index`")
        return cls(path, manifest, connect(path / DB_FILE), max_memory)

    def _committed(self) -> None:
        """Forget what was loaded from the derived files; FAISS's stored vectors go with the index they lie in."""
        with self._loading:
            self._faiss, self._vectors, self._records, self._exact, self._searchers = None, None, None, None, {}
            self._scorer, self._combined = None, {}

    def rebuild(self) -> None:
        """Rebuild the FAISS index from the database and write it and the manifest atomically."""
        t0 = time.perf_counter()
        fids, vectors = self.all_vectors()
        index = build_faiss(vectors, fids, self.manifest.index_type, self.manifest.params)
        self.publish(index, fids, lambda tmp: save_npy(tmp, vectors), t0)
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
        atomic_write(self.path / FIDS_FILE, lambda tmp: save_npy(tmp, fids))
        atomic_write(self.path / VECTORS_FILE, write_vectors)
        ends = atomic_write(self.path / RECORDS_FILE, lambda tmp: write_records(self.db, tmp))
        atomic_write(self.path / OFFSETS_FILE, lambda tmp: save_npy(tmp, ends))
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
        self._committed()  # what was loaded belongs to the previous generation

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
                    mapped = np.load(self.path / VECTORS_FILE, mmap_mode="r")
                    # a plain array over the map (which it keeps open): np.memmap's indexing costs µs per call
                    self._vectors = (np.load(self.path / FIDS_FILE), mapped.view(np.ndarray))
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
    def records(self) -> Records | None:
        """(byte offsets (n + 1), the records file memory-mapped) when current, else None: ask SQLite."""
        if self._records is None and self._files_current():
            self._records = open_records(self.path / RECORDS_FILE, self.path / OFFSETS_FILE, len(self.vectors[0]))
        return self._records if isinstance(self._records, tuple) else None  # False: damaged

    @property
    def faiss(self) -> FaissIndex:
        """The FAISS index, from its file when that reflects the database, else rebuilt in memory.

        Over max_memory, an IVF index's inverted lists are memory-mapped (IO_FLAG_MMAP; the lists of a merged
        on-disk index always are), so the OS pages in only the lists a query probes.
        """
        with self._loading:
            if self._faiss is None:
                from_file = self._faiss_file()
                self._faiss = from_file if from_file is not None else self._faiss_in_memory()
            return self._faiss

    def _faiss_in_memory(self) -> FaissIndex:
        fids, vectors = self.vectors
        self._check_budget(vectors.nbytes, "rebuilding the FAISS index in memory (its file is stale or missing)")
        return build_faiss(np.ascontiguousarray(vectors), fids, self.manifest.index_type, self.manifest.params)

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
        if not (self.manifest.faiss_digest or holds_vectors(index, *self.vectors)):
            return None
        set_search_params(index, self.manifest.params)
        return index

    def _over_budget(self, nbytes: int) -> bool:
        return self.max_memory is not None and nbytes > self.max_memory

    def _check_budget(self, nbytes: int, what: str) -> None:
        if self.max_memory is not None and self._over_budget(nbytes):
            raise RetrievalError(
                f"{what} needs {nbytes / 2**30:.2f} GiB, over --max-memory "
                f"{self.max_memory / 2**30:.2f} GiB; raise --max-memory or build an ivf/ivfpq index"
            )

    @property
    def part_scorer(self) -> PartScorer:
        """Scores results' parts from FAISS's own copy of the vectors where it holds the same rows (HNSW, flat once
        loaded for a filter), since a search has just read its results there (17 µs of a 0.2 ms θ query at 100k
        HNSW), else from the memory-mapped ones (flat's searches read those or the combined vectors). Never loads
        FAISS."""
        (fids, vectors), index, scorer = self.vectors, self._faiss, self._scorer  # each read once: threads share it
        if scorer is None or scorer[0] is not index or scorer[1] is not fids:
            stored = None if index is None else stored_vectors(index, fids)
            scorer = self._scorer = (index, fids, PartScorer(vectors if stored is None else stored))
        return scorer[2]

    def fused_vectors(self, fids: Sequence[int] | npt.NDArray[np.int64]) -> Vectors:
        """(n, 2d) fused vectors of the given items, from the memory-mapped matrix."""
        return np.asarray(self.vectors[1][self.rows_of(fids)])

    def rows_of(self, fids: Sequence[int] | npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Each id's row in `vectors` (and in the records file). An id missing there comes from a FAISS index
        newer than the vectors this store loaded: another process changed the index since it was opened."""
        all_fids, wanted = self.vectors[0], np.asarray(fids, dtype=np.int64)
        table = self._row_table(all_fids)
        if table is None:
            rows = np.minimum(np.searchsorted(all_fids, wanted), max(len(all_fids) - 1, 0))
            if len(wanted) and (not len(all_fids) or np.any(all_fids[rows] != wanted)):
                raise self.changed()
            return rows
        rows = table.take(wanted + 1, mode="clip")  # every id outside the table reads one of its ends' -1
        if len(rows) and rows.min() < 0:
            raise self.changed()
        return rows

    def _row_table(self, all_fids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64] | None:
        """fid + 1 -> row (-1: no such item) for these fids, made once per generation: one gather per search
        instead of a binary search per result (it costs three numpy calls: each is µs when the search has just
        pushed numpy out of the caches). Its first and last entries are -1, so a gather clipped to it finds
        every id outside it missing. None where removals left ids so sparse that the table would be large."""
        if self._rows is None or self._rows[0] is not all_fids:
            top = int(all_fids[-1]) + 1 if len(all_fids) else 0
            table = None
            if top <= 4 * len(all_fids) + 1024:
                table = np.full(top + 2, -1, dtype=np.int64)
                table[all_fids + 1] = np.arange(len(all_fids))
            self._rows = (all_fids, table)
        return self._rows[1]

    def changed(self) -> IndexChanged:
        return IndexChanged(f"{self.path} changed since it was opened (re-indexed or items removed); open it again")

    def tune(self, params: dict[str, Any]) -> None:
        """Change search knobs (ef_search, nprobe) for this process's searches; the manifest on disk keeps its own."""
        self.manifest.params = {**self.manifest.params, **params}
        with self._loading:
            if self._faiss is not None:
                set_search_params(self._faiss, self.manifest.params)
            self._searchers = {}

    def searcher(
        self, column: str | None, exact: bool = False, weight: float | None = None
    ) -> tuple[Searchable, FaissSearchParameters | None]:
        """The index to ask and its per-call FAISS parameters, restricted to the items that have `column`
        (image_key or text_key), or to all items for None.

        exact=True scans the vectors, as flat always does: the memory-mapped ones (scan.FlatScan), or with an item
        filter a flat FAISS copy built in memory on first use. HNSW and IVF answer top-k and θ approximately
        (HNSW's range search sees only its efSearch candidates). A flat16 index is exact already:
        its searcher is the fp16 scan re-ranked from the fp32 vectors (rerank.Reranked), one for every column, so
        the largest vector norm its error bound needs is found once. `weight`, a weighted search's w: for w in
        COMBINED_WEIGHTS an exact scan reads the combined vectors (combined.py). The item filter is built once
        per generation (selectors over many ids are slow to make); the parameters are new on every call, since
        FAISS's IDMap swaps the filter inside them during a search, so threads must not share them."""
        key = (column, exact, weight if self._scans(exact) and weight in COMBINED_WEIGHTS else None)
        entry = self._searchers.get(key)
        if entry is None:
            with self._loading:  # re-entrant: loading FAISS and combining take it too
                entry = self._searchers.get(key)  # another thread may have made it meanwhile
                if entry is None:
                    entry = self._searchers[key] = self._new_searcher(*key)
        index, selector = entry  # kept: parameters point to the filter, not own it
        if isinstance(index, FlatScan):
            return index, None  # of the items that have the column (Combined), or of all: nothing to filter
        return index, search_parameters(index.index if isinstance(index, Reranked) else index, selector)

    def _scans(self, exact: bool) -> bool:
        """Whether a search reads every vector: always on flat, with exact=True on HNSW and IVF (flat16 re-ranks)."""
        return self.manifest.index_type == "flat" or (exact and self.manifest.index_type != "flat16")

    def _new_searcher(self, column: str | None, exact: bool, weight: float | None) -> tuple[Searchable, Any]:
        """What `searcher` keeps for a key: the index every search with it asks, and its item filter."""
        use_blas_from(self.manifest.dim)  # the combined vectors' d: a scan of the fused 2d ones passes it sooner
        having = None if column is None else self.fids_having(column)  # None: every item has it
        index: Searchable
        if weight is not None and (combined := self._combined_scan(weight, column, having)) is not None:
            return combined, None
        fids, vectors = self.vectors
        if having is None and self._scans(exact):  # FAISS's flat copy is not loaded
            flat = self.manifest.index_type == "flat"
            scanned = "the flat index (only ivf and ivfpq search from disk)" if flat else "an exact answer"
            self._check_budget(vectors.nbytes, f"{scanned} (a scan of every vector, each query)")
            return FlatScan(fids, np.ascontiguousarray(vectors, dtype=np.float32)), None  # the map is C-contiguous
        if is_flat16(self.faiss):
            shared = [s for s, _ in self._searchers.values() if isinstance(s, Reranked)]
            index = shared[0] if shared else Reranked(self.faiss, fids, vectors, self.rows_of)
        elif exact and not isinstance(inner_index(self.faiss), faiss.IndexFlat):
            if self._exact is None:
                self._check_budget(vectors.nbytes, "an exact answer (a flat copy of the vectors in memory)")
                self._exact = build_faiss(np.ascontiguousarray(vectors), fids, "flat", {})
            index = self._exact
        else:
            index = self.faiss
        return index, None if having is None else faiss.IDSelectorBatch(having)

    def _combined_scan(self, weight: float, column: str | None, having: np.ndarray | None) -> Combined | None:
        """The flat scan of this weight's combined vectors of the items `having` the column (all for None), built
        on first use and again if the database's answer changes; None, so the fused vectors answer, where it would
        take the combined ones together over max_memory. Holding only the items a filter would let through, it
        needs no filter (combined_scan)."""
        key = (weight, None if having is None else column)
        with self._loading:
            built = self._combined.get(key)
            if built is None or not np.array_equal(built[0], having):  # type: ignore[arg-type]  # None: all items
                self._combined.pop(key, None)  # a scan of other items: its bytes leave the budget
                fids, vectors = self.vectors
                # isin, not rows_of: an id the loaded vectors lack (a database ahead of them) is left out, as a filter
                rows = None if having is None else np.flatnonzero(np.isin(fids, having))
                held = sum(scan.ntotal for _, scan in self._combined.values())
                if self._over_budget((held + len(fids if rows is None else rows)) * vectors.shape[1] // 2 * 4):
                    return None
                built = self._combined[key] = (having, combined_scan(vectors, fids, weight, rows))
            return built[1]

    def result_records(
        self, fids: Sequence[int] | npt.NDArray[np.int64], rows: npt.NDArray[np.int64] | None = None
    ) -> list[Hit]:
        """What each result shows, as a new Hit without scores, in the order of `fids` (repeats allowed). `rows`
        are the fids' rows_of, when the caller has them already.

        From the memory-mapped records file when it is current (records.py), else from SQLite.
        """
        rows = self.rows_of(fids) if rows is None else rows
        if self.records is not None:
            hits = decode_records(self.records, rows)
            if hits is not None:
                return hits
            self._records = False  # damaged in place: stop trusting it, the database has every record
        wanted = np.asarray(fids).tolist()
        found = {r[0]: r[1:] for r in self._json_rows(f"i.fid, {RESULT_COLUMNS}", wanted)}
        try:
            return [
                Hit(id=i, path=path, captions=captions, has_image=bool(image), has_caption=bool(text), extra=extra)
                for i, path, captions, image, text, extra in map(found.__getitem__, wanted)
            ]
        except KeyError:
            raise self.changed() from None

    def part_vectors(self, fids: Sequence[int]) -> dict[int, tuple[np.ndarray | None, np.ndarray | None]]:
        """(image vector, text vector) per item, None for a missing part."""
        d, items = self.manifest.dim, self.items(fids)
        return {
            f: (v[:d] if items[f].image_key else None, v[d:] if items[f].text_key else None)
            for f, v in zip(fids, self.fused_vectors(fids), strict=True)
            if f in items
        }
