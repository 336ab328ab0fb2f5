"""One index from many embedding shards: train IVF once, fill one copy per shard in parallel, merge them.

The metadata goes into the index's SQLite store shard by shard (one transaction each), and FAISS ids are
the fids SQLite gives the items, so vectors and records agree as in any index. Items of the index that
no shard holds any more are removed, as a single-machine re-run removes what left the source.

The merged lists stay in memory (`faiss.merge_into`) while they fit the memory budget; beyond it each
filled copy is written to disk and `faiss.contrib.ondisk.merge_ondisk` joins them into one file of
on-disk inverted lists beside vectors.faiss, which search then memory-maps. No torch, no Ray.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
from faiss.contrib.ondisk import merge_ondisk

from retrieval.arrays import Vectors
from retrieval.choices import check_max_memory
from retrieval.errors import RetrievalError
from retrieval.index.build import IndexReport
from retrieval.index.faiss_ops import factory_string, ivfdata_name, quiet_faiss, set_search_params
from retrieval.index.store import IndexStore
from retrieval.scale.shards import read_shard

MERGED_KEY = "merged_shards"  # meta row: the shard set and generation of the last merge, to skip a repeat
TRAIN_SAMPLE = 256 * 1024  # as build_faiss: k-means sees at most this many vectors


@dataclass
class MergeReport(IndexReport):
    on_disk: bool = False  # the inverted lists were merged on disk (vectors.GEN.ivfdata)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per step: metadata, train, add + merge, files


def ivf_bytes(n: int, dim2: int, index_type: str) -> int:
    """Bytes the inverted lists of n vectors take: codes plus one int64 id each (PQ: one byte per 8 dims)."""
    return n * ((dim2 * 4 if index_type == "ivf" else max(1, dim2 // 8)) + 8)


def merge_shards(
    store: IndexStore,
    directory: Path,
    names: Sequence[str],
    max_memory: int | None = None,
    on_disk: bool | None = None,
    workers: int = 2,
    force: bool = False,
) -> MergeReport:
    """Merge the finished shards `names` (in this order) into `store`, which the caller holds `writer()` on.

    on_disk None chooses by the budget: on disk when the inverted lists would take more than max_memory.
    The same shards merged last time into an unchanged store are not merged again, unless `force`
    (the index type or its parameters changed).
    """
    t0 = time.perf_counter()
    digest = hashlib.sha256(json.dumps(list(names)).encode()).hexdigest()
    check_max_memory(max_memory)
    if (
        not force
        and _last_merge(store) == {"shards": digest, "generation": store.generation()}
        and store.derived_files_current()
    ):
        return MergeReport(
            unchanged=store.counts()["items"],
            index_type=store.manifest.index_type,
            on_disk=(store.path / ivfdata_name(store.generation())).is_file(),
        )
    report, shard_fids, parts = MergeReport(index_type=store.manifest.index_type), [], []
    # a commit re-inserts an item under a new, higher fid: what keeps a fid up to this one is in no shard
    last_fid, n_before = store.db.execute("SELECT COALESCE(MAX(fid), 0), COUNT(*) FROM items").fetchone()
    for name in names:  # metadata first: SQLite hands out the fids the FAISS ids must be
        shard = read_shard(directory, name)
        d = store.manifest.dim
        if shard.vectors.shape[1] != 2 * d:
            raise RetrievalError(
                f"shard {directory / name} holds {shard.vectors.shape[1] // 2}-d vectors, the index "
                f"{d}-d; it was made with another model: delete the shard folder and re-run"
            )
        known = store.known_vectors([k for it in shard.items for k in (it.image_key, it.text_key) if k])
        new = {}
        for it, v in zip(shard.items, shard.vectors, strict=True):
            if it.image_key and it.image_key not in known:
                new[it.image_key] = np.asarray(v[:d])
            if it.text_key and it.text_key not in known:
                new[it.text_key] = np.asarray(v[d:])
        store.commit(shard.items, new)
        fid_of = _fids(store, [it.id for it in shard.items])
        shard_fids.append(np.array([fid_of[it.id] for it in shard.items], dtype=np.int64))
        parts.append(shard.vectors)  # memory-mapped; the items (Python objects) are let go shard by shard
        report.skipped += shard.skipped
    gone = [r[0] for r in store.db.execute("SELECT id FROM items WHERE fid <= ?", (last_fid,))]
    if gone:
        store.commit([], {}, gone)
    report.removed, report.updated = len(gone), n_before - len(gone)
    report.phases["metadata"] = time.perf_counter() - t0
    fids = np.concatenate(shard_fids) if shard_fids else np.zeros(0, np.int64)
    report.added = len(fids) - report.updated
    if store.counts()["items"] != len(fids) or not np.all(np.diff(fids) > 0):  # an id in two shards, or a shard edited
        raise RetrievalError(
            f"the shards in {directory} hold {len(fids)} items but the index now holds "
            f"{store.counts()['items']} (an item id is in two shards, or a shard was changed after it "
            f"was written); delete {directory} and re-run to encode them again"
        )

    dim2, n = 2 * store.manifest.dim, len(fids)
    index_type = store.manifest.index_type
    report.on_disk = (
        ivf_bytes(n, dim2, index_type) > max_memory if on_disk is None and max_memory is not None else bool(on_disk)
    )
    t1 = time.perf_counter()
    trained = train_ivf(parts, index_type, dim2)
    t2 = time.perf_counter()
    if report.on_disk:
        index = _merge_on_disk(trained, parts, shard_fids, store.path / ivfdata_name(store.generation()), workers)
    else:
        index = _merge_in_memory(trained, parts, shard_fids, workers)
    set_search_params(index, store.manifest.params)
    t3 = time.perf_counter()
    store.publish(index, fids, lambda tmp: _concat_npy(tmp, parts, dim2), t0)
    store.set_meta(MERGED_KEY, json.dumps({"shards": digest, "generation": store.generation()}))
    report.seconds = time.perf_counter() - t0
    report.phases.update(train=t2 - t1, add_and_merge=t3 - t2, files=t0 + report.seconds - t3)
    return report


def train_ivf(parts: Sequence[Vectors], index_type: str, dim2: int, seed: int = 0) -> faiss.Index:
    """An empty IVF (or IVF-PQ) index trained once on a uniform sample of all the shards' vectors."""
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    n = int(sizes.sum())
    spec = factory_string(index_type, n, dim2).removeprefix("IDMap2,")  # IVF keeps the ids itself: merge needs that
    index = faiss.index_factory(dim2, spec, faiss.METRIC_INNER_PRODUCT)
    rows = np.sort(np.random.default_rng(seed).permutation(n)[:TRAIN_SAMPLE])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    sample = np.concatenate(
        [
            np.asarray(p[rows[(rows >= a) & (rows < b)] - a])
            for p, a, b in zip(parts, starts[:-1], starts[1:], strict=True)
        ]
    )
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


def _fill(trained: faiss.Index, vectors: Vectors, fids: npt.NDArray[np.int64]) -> faiss.Index:
    """A copy of the trained index holding one shard (FAISS releases the GIL: copies fill in parallel)."""
    copy = faiss.clone_index(trained)
    if len(fids):
        copy.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), fids)
    return copy


def _merge_in_memory(
    trained: faiss.Index, parts: Sequence[Vectors], shard_fids: Sequence[np.ndarray], workers: int
) -> faiss.Index:
    index = faiss.clone_index(trained)
    with ThreadPoolExecutor(workers) as pool:
        for part in pool.map(_fill, [trained] * len(parts), parts, shard_fids):
            faiss.merge_into(index, part, False)  # ids are global fids already: no shift
    return index


def _merge_on_disk(
    trained: faiss.Index, parts: Sequence[Vectors], shard_fids: Sequence[np.ndarray], ivfdata: Path, workers: int
) -> faiss.Index:
    """Each filled copy written to a scratch folder (at most `workers` in memory at once), then merged into
    on-disk inverted lists at `ivfdata`; the scratch copies are deleted."""
    scratch = ivfdata.parent / ".merge"
    scratch.mkdir(exist_ok=True)
    files = [scratch / f"part-{j}.faiss" for j in range(len(parts))]
    try:

        def fill_and_write(j: int) -> None:
            faiss.write_index(_fill(trained, parts[j], shard_fids[j]), str(files[j]))

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill_and_write, range(len(parts))))
        index = faiss.clone_index(trained)
        with quiet_faiss():
            merge_ondisk(index, [str(f) for f in files], str(ivfdata))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return index


def _concat_npy(path: Path, parts: Sequence[Vectors], dim2: int) -> None:
    """The shards' vectors as one .npy, copied a shard at a time (never the whole matrix in memory)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(sum(len(p) for p in parts), dim2))
    row = 0
    for p in parts:
        out[row : row + len(p)] = p
        row += len(p)
    out.flush()
    del out


def _fids(store: IndexStore, ids: Sequence[str]) -> dict[str, int]:
    rows = store.db.execute(
        "SELECT id, fid FROM items WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(list(ids)),)
    )
    return dict(rows.fetchall())


def _last_merge(store: IndexStore) -> dict[str, Any] | None:
    value = store.get_meta(MERGED_KEY)
    return json.loads(value) if value else None
