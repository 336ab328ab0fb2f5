"""records.jsonl: what each result shows, one JSON array a line in fid order, and records.npy, its lines' ends.

A derived file of the database, like the FAISS index: `write_records` writes it from SQLite; a search slices its
results' lines out of the memory-mapped file and decodes them into `Hit`s in one msgspec call, in C (about 3x
faster than asking SQLite for 10,000 results: see scripts/bench_search.py). A line that no longer parses, or
parses as other than one record, says the file is damaged; the database still has every record.
"""

from __future__ import annotations

import array
import mmap
import sqlite3
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

from retrieval.index.search import Hit

RESULT_COLUMNS = "i.id, i.path, json(i.captions), i.image_key IS NOT NULL, i.text_key IS NOT NULL, json(i.extra)"
# records.jsonl's lines are arrays of RESULT_COLUMNS: a search's lines decode into Hits, 0/1 flags into booleans
RECORDS = msgspec.json.Decoder(list[Hit], strict=False)
Records = tuple[npt.NDArray[np.int64], bytes | mmap.mmap]  # (byte offsets of the n lines' ends after a 0, file)


def write_records(db: sqlite3.Connection, file: Path) -> npt.NDArray[np.int64]:
    """Write every item's record line to `file`, in fid order; return the offsets (n + 1) that records.npy keeps."""
    ends = array.array("q", [0])  # 8 B per item, not the lines themselves
    with open(file, "wb") as f:
        for (line,) in db.execute(f"SELECT json_array({RESULT_COLUMNS}) FROM items i ORDER BY i.fid"):
            data = line.encode() + b"\n"
            f.write(data)
            ends.append(ends[-1] + len(data))
    return np.frombuffer(ends, dtype=np.int64)


def open_records(records: Path, offsets: Path, n_items: int) -> Records | None:
    """The records file memory-mapped with its offsets, or None where either is missing, truncated or not of
    n_items lines."""
    try:
        ends = np.load(offsets)
        with open(records, "rb") as f:  # the map outlives the file object
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if ends[-1] else b""
    except (OSError, ValueError, EOFError, IndexError):
        return None
    return (ends, data) if len(ends) == n_items + 1 and len(data) == ends[-1] else None


def joined_lines(records: Records, rows: npt.NDArray[np.int64]) -> bytes:
    """The lines at `rows` as one JSON array, which RECORDS decodes in one call."""
    ends, data = records
    lines = map(data.__getitem__, map(slice, ends[rows].tolist(), ends[rows + 1].tolist()))
    return b"[" + b",".join(lines) + b"]"


def decode_records(records: Records, rows: npt.NDArray[np.int64]) -> list[Hit] | None:
    """New Hits, without scores, of the lines at `rows`; None when the file turns out damaged."""
    try:
        hits = RECORDS.decode(joined_lines(records, rows))
    except msgspec.DecodeError:
        return None
    return hits if len(hits) == len(rows) else None  # a damaged line may still parse, as none or as two
