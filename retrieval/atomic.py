"""Write-to-temp, fsync, rename: the one copy.

Every file the engine replaces in place (an index's derived files and manifest, a shard, a model directory's
files, the training state and log, the synthetic set's lists, a server thumbnail) is written under a temporary
name beside its target, flushed to the disk, renamed over the target, and the folder flushed too. Readers see
the old file or the whole new one, never a part; a crash just after the rename cannot leave the name pointing
at data still in the page cache (on shared storage the rename must not land before the data). A write that
fails (a full disk) removes its temporary file; one left by a kill ends in TMP_SUFFIX, and the index's next
writer removes those it finds.

Errors pass through as OSError: callers that owe the user one line (the index: `disk_writes`) map them.
A leaf module: standard library only, so anything may import it.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")

TMP_SUFFIX = ".tmp"  # the end of every temporary name written here


def atomic_write(path: str | Path, write: Callable[[Path], T], *, unique: bool = False) -> T:
    """Replace `path` whole by what `write` writes to the temporary path it is given; return what `write` returns.

    unique: a fresh temporary name per call (`NAME.<random>.tmp`, created exclusively), for targets that two
    writers may write at once (server thumbnails, shards written by retried workers); else `NAME.tmp`, for a
    target with one writer (an index under its lock, a model directory), so a kill leaves a name to clean up.
    """
    path = Path(path)
    tmp = _unique_tmp(path) if unique else path.with_name(path.name + TMP_SUFFIX)
    try:
        result = write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)  # the rename itself
    return result


def atomic_write_stream(path: str | Path, write: Callable[[IO[bytes]], Any], *, unique: bool = False) -> None:
    """atomic_write with a binary file object: for writers that take one (np.save, which would otherwise append
    .npy to the temporary name; pyarrow.parquet.write_table; torch.save)."""
    atomic_write(path, lambda tmp: _to_file(tmp, write), unique=unique)


def atomic_write_bytes(path: str | Path, data: bytes, *, unique: bool = False) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data), unique=unique)


def atomic_write_text(path: str | Path, text: str, *, unique: bool = False) -> None:
    """UTF-8 text, whatever the locale says."""
    atomic_write_bytes(path, text.encode("utf-8"), unique=unique)


def atomic_write_json(path: str | Path, value: Any, *, unique: bool = False) -> None:
    """`value` as indented JSON."""
    atomic_write_text(path, json.dumps(value, indent=2), unique=unique)


def save_npy(path: Path, array: Any) -> None:
    """np.save through a file object, so numpy does not append .npy to a temporary name: a `write` for
    atomic_write. numpy is imported here only: whoever has an array to save has imported it already."""
    import numpy as np

    _to_file(path, lambda f: np.save(f, array))


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (a rename in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_file(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    with open(path, "wb") as f:
        write(f)


def _unique_tmp(path: Path) -> Path:
    """A new empty file beside `path` that no other writer has: created with O_EXCL (and mode 0o666 less the
    umask, as open() would give the target; mkstemp's 0o600 would survive the rename)."""
    while True:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # 2^-48 a try
            continue
        return tmp
