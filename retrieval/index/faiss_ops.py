"""FAISS operations for an index: choosing the type, the factory, search knobs, reading and writing files.

Every item has one fused 2d-dimensional vector [e(x1), e(x2)] (an item missing a part repeats the part it has),
so the query [w q, (1-w) q] scores w cos(q, x1) + (1-w) cos(q, x2) for any w with one index. No torch here.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from retrieval.arrays import Vectors
from retrieval.choices import INDEX_TYPES, search_knob
from retrieval.errors import RetrievalError
from retrieval.index.format import IVFDATA_SUFFIX

DIGEST_SPAN = 2**20  # bytes of the FAISS file's head and tail that faiss_digest hashes

FLAT_MAX_ITEMS = 200_000  # auto: exact search stays fast (< ~15 ms at d = 2 x 128) up to about here
FLAT16_LISTS = 16  # flat16's codes, dealt round-robin into lists that threads scan in parallel (is_flat16)

# faiss scans exhaustively with BLAS when nq * d >= its threshold, else query by query with SIMD. BLAS for one
# query is about 3x slower than the SIMD scan (37 vs 11 ms at 200k x 256), but reads the vectors once for the
# whole batch: at 100k x 256 on one thread, SIMD costs 14.5 ms per query, BLAS 28 ms + 0.5 ms per query, so BLAS
# pays from 3 queries (a server's batch, max/min's two part queries are a wash). The threshold is global:
# use_blas_from sets it for an index's embedding dimension d, the width of its combined vectors (combined.py), so
# its fused 2d-wide vectors pass it from 2 queries (4096 until a store makes its first searcher: batches of 16 at
# 2d = 256).
BLAS_FROM_QUERIES = 3
faiss.cvar.distance_compute_blas_threshold = 4096


class FaissThreads:
    """FAISS's OpenMP threads in this thread for a while (see search_threads). A class, not a @contextmanager
    generator: a search pays for it on every call, and setting only what changes saves about 10 µs of 0.2 ms."""

    def __init__(self, n: int) -> None:
        self.n, self.before = n, n

    def __enter__(self) -> None:
        self.before = faiss.omp_get_max_threads()
        if self.before != self.n:
            faiss.omp_set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.before != self.n:
            faiss.omp_set_num_threads(self.before)


def use_blas_from(d: int) -> None:
    """Exhaustive searches of d-dimensional vectors use BLAS from BLAS_FROM_QUERIES queries on."""
    faiss.cvar.distance_compute_blas_threshold = BLAS_FROM_QUERIES * d


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
    if index_type == "flat16":
        return f"IVF{FLAT16_LISTS},SQfp16"  # see is_flat16: the IVF holds the ids itself
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
    inner = inner_index(index)  # factory_string's IDMap2 wraps the index that searches
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efConstruction = search_knob(params, "ef_construction", 80)
    scan = flat16_scan(index)
    if scan is not None:
        fill_flat16(scan, vectors, fids)
    else:
        if not index.is_trained:
            index.train(vectors[np.random.default_rng(0).permutation(len(vectors))[: 256 * 1024]])
        if len(vectors):
            index.add_with_ids(vectors, fids)
    set_search_params(index, params)
    return index


def fill_flat16(index: faiss.IndexIVFScalarQuantizer, vectors: Vectors, fids: npt.NDArray[np.int64]) -> None:
    """fp16 codes of the vectors themselves (no residuals, no training), item i in list i mod nlist: lists of
    equal size, which is what parallel threads want, where an assignment by content would give uneven ones."""
    index.by_residual = False
    index.quantizer.add(np.zeros((index.nlist, index.d), dtype=np.float32))  # placeholders: every list is probed
    index.is_trained = True
    if len(vectors):
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(fids, dtype=np.int64)
        lists = np.arange(len(x), dtype=np.int64) % index.nlist  # named: swig_ptr keeps no reference to its array
        index.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))


def set_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    inner = inner_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = search_knob(params, "ef_search", 128)
    scan = flat16_scan(index)
    if scan is not None:
        scan.nprobe = scan.nlist  # a scan: every list
        scan.parallel_mode = 0  # a batch's threads take whole queries; one query's lists split in scan.ListScan
    elif isinstance(inner, faiss.IndexIVF):
        inner.nprobe = search_knob(params, "nprobe", 16)


def search_knobs(index: faiss.Index) -> dict[str, int]:
    """The ANN knobs its searches run with (set_search_params; a filter's parameters carry the same): none for
    flat and flat16."""
    inner = inner_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        return {"ef_search": int(inner.hnsw.efSearch)}
    if isinstance(inner, faiss.IndexIVF) and not is_flat16(index):  # flat16 probes every list: a scan
        return {"nprobe": int(inner.nprobe)}
    return {}


def search_parameters(index: faiss.Index, selector: Any) -> faiss.SearchParameters | None:
    """Per-call parameters for the item filter; a filter's parameters replace the index's knobs, so they carry
    the index's own (set_search_params). Without a filter, None: a search skips making them."""
    if selector is None:
        return None
    inner = inner_index(index)
    # faiss's stubs lack SearchParametersHNSW and the keyword arguments its wrappers give every SearchParameters
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)  # type: ignore[attr-defined]
    if isinstance(inner, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=inner.nprobe)  # type: ignore[call-arg]
    return faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]


def inner_index(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def holds_vectors(index: faiss.Index, fids: npt.NDArray[np.int64], vectors: Vectors) -> bool:
    """For a manifest from before the digest: does a FAISS index hold these vectors, not another index's (a copied
    file)? Its dimension, count and ids, and for an exact store its first and last vectors (same ids is not
    enough: two indexes of 600 items both have ids 1..600; an IVF copy passes)."""
    if index.d != vectors.shape[1] or index.ntotal != len(fids):
        return False
    if isinstance(index, faiss.IndexIDMap) and not np.array_equal(faiss.vector_to_array(index.id_map), fids):
        return False
    if (
        len(fids)
        and isinstance(index, faiss.IndexIDMap2)
        and isinstance(inner_index(index), (faiss.IndexFlat, faiss.IndexHNSW))
    ):
        return all(np.array_equal(index.reconstruct(int(fids[row])), vectors[row]) for row in (0, len(fids) - 1))
    return True


def inner_products_at(x: np.ndarray, y: Vectors, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    """(nx, m) inner products of x[j] with y[rows[j, i]], for x (nx, d) and y (n, d) read in place (no gathered
    copy): FAISS's fvec_inner_product per pair, so a score never depends on the other rows. A row < 0 gets -inf.
    FAISS reads raw memory, so shapes and rows are checked here, with errors rather than asserts."""
    x, rows = np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(rows, dtype=np.int64)
    if y.dtype != np.float32 or not y.flags.c_contiguous or y.shape[1] != x.shape[1] or rows.shape[0] != len(x):
        raise ValueError(f"inner products of {x.shape} with rows {rows.shape} of {y.dtype} {y.shape}: shapes differ")
    if rows.size and rows.max() >= len(y):
        raise IndexError(f"row {rows.max()} of a matrix of {len(y)} rows")
    out = np.empty(rows.shape, dtype=np.float32)
    faiss.fvec_inner_products_by_idx(  # type: ignore[attr-defined]  # not in faiss's stubs
        faiss.swig_ptr(out), faiss.swig_ptr(x), faiss.swig_ptr(y), faiss.swig_ptr(rows), x.shape[1], *rows.shape
    )
    return out


class PartScorer:
    """cos(q, x1) and cos(q, x2) of results, read in place from the fused vectors [x1, x2] (n, 2d) by FAISS's
    fvec_inner_products_by_idx: the matrix is checked and its halves' addresses taken once, here, so a search
    pays for two FAISS calls and one bound check. Right after an HNSW search at 100k, 100 results cost 45 µs
    this way against 90 for inner_products_at on the matrix seen as (2n, d) halves (Xeon, 2 GHz)."""

    def __init__(self, fused: Vectors):
        if fused.dtype != np.float32 or not fused.flags.c_contiguous or fused.ndim != 2 or fused.shape[1] % 2:
            raise ValueError(f"part scores read a C-contiguous float32 (n, 2d) matrix, not {fused.dtype} {fused.shape}")
        self.vectors, self.d = fused, fused.shape[1] // 2  # kept: the addresses below point into it
        halves = fused.reshape(2 * len(fused), self.d)  # row 2i: item i's image half; row 2i + 1: its caption half
        self.images, self.captions = faiss.swig_ptr(halves), faiss.swig_ptr(halves[1:])

    def __call__(self, q: np.ndarray, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """(2, m): q (d,)'s inner products with the image halves, then the caption halves, of `rows`."""
        q, rows = np.ascontiguousarray(q, dtype=np.float32), np.asarray(rows, dtype=np.int64)
        if q.shape != (self.d,) or rows.ndim != 1:
            raise ValueError(f"part scores of a query {q.shape} at rows {rows.shape}: the halves are {self.d}-d")
        if len(rows) and rows.view(np.uint64).max() >= len(self.vectors):  # a negative row is huge unsigned
            raise IndexError(f"rows {rows.min()} to {rows.max()} of a matrix of {len(self.vectors)} rows")
        twice = rows * 2  # below 2n: no overflow
        out = np.empty((2, len(twice)), dtype=np.float32)
        for half, start in enumerate((self.images, self.captions)):
            faiss.fvec_inner_products_by_idx(  # type: ignore[attr-defined]  # not in faiss's stubs
                faiss.swig_ptr(out[half]), faiss.swig_ptr(q), start, faiss.swig_ptr(twice), self.d, 1, len(twice)
            )
        return out


class _Owned:
    """The base of an array over FAISS's memory: holding the index that owns it, it keeps it alive with the array."""

    def __init__(self, view: np.ndarray, owner: faiss.Index):
        self.__array_interface__ = view.__array_interface__
        self.owner = owner


def stored_vectors(index: faiss.Index, fids: npt.NDArray[np.int64]) -> Vectors | None:
    """The vectors a flat or HNSW index holds, as a read-only array over its memory (no copy), when its i-th vector
    is the item at row i of `fids`; None for every other index. A search has just read its results' vectors there,
    so scoring them from it finds them in cache."""
    inner = inner_index(index)
    flat = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner
    if (
        not isinstance(index, faiss.IndexIDMap)
        or type(flat) not in (faiss.IndexFlat, faiss.IndexFlatIP)
        or not np.array_equal(faiss.vector_to_array(index.id_map), fids)
    ):
        return None
    xb = flat.get_xb()  # type: ignore[attr-defined]  # IndexFlat's, not in faiss's stubs
    view = faiss.rev_swig_ptr(xb, flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
    array = np.asarray(_Owned(view, index))
    array.flags.writeable = False
    return array


def flat16_scan(index: faiss.Index) -> faiss.IndexIVFScalarQuantizer | None:
    """flat16's scan (is_flat16) inside `index`, or None for every other type."""
    inner = inner_index(index)
    return inner if isinstance(inner, faiss.IndexIVFScalarQuantizer) else None


def is_flat16(index: faiss.Index) -> bool:
    """flat16's FAISS index (see index/rerank.py): an IVF whose lists hold fp16 codes of the vectors themselves,
    not residuals, and are all probed, so a search is a flat scan of half the bytes of fp32. An IVF rather than
    FAISS's IndexScalarQuantizer: the same scan for top-k, but IVF's range search runs the SIMD scanner (15x
    faster at 100k), and its lists split one query's scan between threads (scan.ListScan: 1M x 256 in 44 ms
    on two threads, 80 on one, on 2026-12-03). Indexes built before that hold one list (IDMap2,IVF1,SQfp16)
    and scan on one thread. fp16 rather than SQ8: 42 vs 54 ms at 1M x 256 here (SQ8's decode costs more than its
    bytes save)."""
    return flat16_scan(index) is not None


def fused(image_vec: np.ndarray | None, text_vec: np.ndarray | None) -> np.ndarray:
    """[e(x1), e(x2)]; a missing part repeats the part the item has, so every w scores it on what it has."""
    image_vec = text_vec if image_vec is None else image_vec
    text_vec = image_vec if text_vec is None else text_vec
    return np.concatenate([image_vec, text_vec]).astype(np.float32)


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
