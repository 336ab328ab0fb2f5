"""Embedding shards: the unit of work of a distributed build, and what the merge reads. No torch, no Ray.

A shard is a contiguous slice of the source's items. Its name holds its position and a digest of what
it encodes (the model's fingerprint, and each item's id, image path, file state, captions and extra), so
a re-run finds the shards it already finished and a changed item makes a new shard, never a stale hit.

On disk, beside one another in the shard folder (the index folder's shards/, or shared storage):
  NAME.npy      float32 (n, 2d): the fused vectors [e(x1), e(x2)], one row per readable item
  NAME.parquet  one row per readable item: id, path, captions, image_key, text_key, mtime_ns, size, extra
  NAME.json     {"format_version": 1, "items": n, "skipped": [messages]}: written last, so it marks the shard
                complete (a shard from before versions has no format_version: it is format 1)
Parquet because it is columnar and typed (nullable keys, a list column for captions), pyarrow comes with
Ray Data, and Spark, pandas or DuckDB read it as it is; the vectors stay .npy so the merge memory-maps
them straight into FAISS. Each file is written under a temporary name and renamed when complete, so a
worker killed halfway leaves no marker and the shard is encoded again, never merged half-written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.arrays import Vectors
from retrieval.atomic import TMP_SUFFIX, atomic_write_stream
from retrieval.data.pairs import Pair
from retrieval.errors import RetrievalError
from retrieval.index.build import encode_batch, file_state
from retrieval.index.faiss_ops import fused
from retrieval.index.format import Item

DISTRIBUTED_INSTALL_HINT = "pip install 'retrieval[distributed]'"
FORMAT_VERSION = 1  # of a shard's files; a newer one is refused with what to do, an older one would be read here
COLUMNS = ("id", "path", "captions", "image_key", "text_key", "mtime_ns", "size", "extra")


@dataclass
class Shard:
    """One finished shard as the merge reads it: items in row order, their vectors (memory-mapped), skips."""

    name: str
    items: list[Item]
    vectors: Vectors  # (n, 2d)
    skipped: list[str]


def plan_shards(pairs: Sequence[Pair], shard_size: int, model_fingerprint: str) -> list[tuple[str, list[Pair]]]:
    """(name, pairs) per shard of shard_size consecutive items, named by position and content digest."""
    if shard_size < 1:
        raise RetrievalError(f"--shard-size must be at least 1, got {shard_size}")
    plan = []
    for k, start in enumerate(range(0, len(pairs), shard_size)):
        part = list(pairs[start : start + shard_size])
        content = [
            [p.id, str(p.image) if p.image else None, file_state(p.image), list(p.captions), p.extra] for p in part
        ]
        digest = hashlib.sha256(json.dumps([model_fingerprint, content], sort_keys=True).encode()).hexdigest()
        plan.append((f"shard-{k:06d}-{digest[:16]}", part))
    return plan


def is_done(directory: Path, name: str) -> bool:
    return (directory / f"{name}.json").is_file()


def clear_partial(directory: Path, names: Sequence[str]) -> None:
    """Remove what writers of these shards killed mid-write left (temporary files, named per attempt): call it
    with the pending shards before any worker starts on them."""
    for name in names:
        for tmp in directory.glob(f"{glob_escape(name)}.*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)


def encode_shard(
    model: Any, pairs: Sequence[Pair], directory: Path, name: str, batch_size: int = 256
) -> dict[str, Any]:
    """Encode one shard a batch at a time (content repeated inside the shard is encoded once) and write it."""
    vectors: dict[str, np.ndarray] = {}
    items: list[Item] = []
    skipped: list[str] = []
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, len(pairs), batch_size):
            batch_items, new, batch_skipped = encode_batch(
                model, pairs[start : start + batch_size], pool, lambda keys: vectors.keys() & set(keys)
            )
            vectors.update(new)
            items += batch_items
            skipped += batch_skipped

    def part(key: str | None) -> np.ndarray | None:  # an item's image or text vector; None for a missing part
        return None if key is None else vectors.get(key)

    rows = [fused(part(it.image_key), part(it.text_key)) for it in items]
    matrix = np.stack(rows) if rows else np.zeros((0, 2 * model.embed_dim), np.float32)  # (n, 2d)
    return write_shard(directory, name, items, matrix, skipped)


def write_shard(
    directory: Path, name: str, items: Sequence[Item], vectors: Vectors, skipped: Sequence[str]
) -> dict[str, Any]:
    """Write a shard's three files, each under a temporary name first; the marker (NAME.json) goes last."""
    pa, pq = _pyarrow()
    assert len(items) == len(vectors), (len(items), len(vectors))
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "id": pa.array([it.id for it in items], pa.string()),
            "path": pa.array([it.path for it in items], pa.string()),
            "captions": pa.array([it.captions for it in items], pa.list_(pa.string())),
            "image_key": pa.array([it.image_key for it in items], pa.string()),
            "text_key": pa.array([it.text_key for it in items], pa.string()),
            "mtime_ns": pa.array([it.mtime_ns for it in items], pa.int64()),
            "size": pa.array([it.size for it in items], pa.int64()),
            "extra": pa.array([json.dumps(it.extra) for it in items], pa.string()),
        }
    )
    summary = {"format_version": FORMAT_VERSION, "items": len(items), "skipped": list(skipped)}
    # each under a temporary name of its own (a retried task may write the shard while the first attempt still
    # runs), fsynced: on shared storage the rename must not land before the data
    atomic_write_stream(directory / f"{name}.npy", lambda f: np.save(f, np.asarray(vectors, np.float32)), unique=True)
    atomic_write_stream(directory / f"{name}.parquet", lambda f: pq.write_table(table, f), unique=True)
    atomic_write_stream(directory / f"{name}.json", lambda f: f.write(json.dumps(summary).encode()), unique=True)
    return summary


def read_shard(directory: Path, name: str) -> Shard:
    """A finished shard; a damaged one (files that disagree with its marker) is an error naming it."""
    _, pq = _pyarrow()
    try:
        summary = read_summary(directory, name)
        vectors = np.load(directory / f"{name}.npy", mmap_mode="r")
        table = pq.read_table(directory / f"{name}.parquet", columns=list(COLUMNS))
    except (OSError, ValueError) as e:
        raise RetrievalError(
            f"shard {directory / name} is damaged ({e}); delete its files and re-run to encode it again"
        ) from e
    if not len(vectors) == table.num_rows == summary["items"]:
        raise RetrievalError(
            f"shard {directory / name} is damaged (its files disagree on the item count); "
            "delete its files and re-run to encode it again"
        )
    c = table.to_pydict()
    items = [
        Item(
            0,
            c["id"][j],
            c["path"][j],
            c["captions"][j],
            c["image_key"][j],
            c["text_key"][j],
            c["mtime_ns"][j],
            c["size"][j],
            json.loads(c["extra"][j]),
        )
        for j in range(table.num_rows)
    ]
    return Shard(name, items, vectors, summary["skipped"])


def read_skipped(directory: Path, name: str) -> list[str]:
    """The unreadable-file messages of a finished shard, without reading its vectors."""
    return read_summary(directory, name)["skipped"]


def read_summary(directory: Path, name: str) -> dict[str, Any]:
    """A finished shard's marker (NAME.json), checked for a format this version reads."""
    summary = json.loads((directory / f"{name}.json").read_text())
    version = summary.get("format_version", 1)  # shards written before they carried a version are format 1
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise RetrievalError(
            f"shard {directory / name} is format {version}, which this retrieval does not read "
            f"({FORMAT_VERSION}): upgrade retrieval, or delete the shard folder to encode the shards again"
        )
    return summary


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise RetrievalError(
            f"embedding shards are Parquet files and need pyarrow: {DISTRIBUTED_INSTALL_HINT}"
        ) from None
    return pa, pq
