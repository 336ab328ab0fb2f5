"""The index folder on disk: its writer lock, refusing folders that are not ours, and disk errors in one line.

A full or read-only disk is reported as what it is and what to do, never as a damaged index: every batch is
its own transaction, so the index stays as of its last commit. No faiss here.
"""

from __future__ import annotations

import errno
import fcntl
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from retrieval.errors import NoSpaceError, ReadOnlyError, RetrievalError, shown
from retrieval.index.format import LOCK_FILE, MANIFEST_FILE, TMP_SUFFIX


def take_lock(path: Path) -> IO[str]:
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
        or (any(t in text for t in DISK_TEXT) and disk_full(path))
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


def disk_full(path: Path) -> bool:
    """SQLite reports a full disk met while growing its shared-memory file only as a 'disk I/O error'."""
    try:
        return shutil.disk_usage(path).free < 64 * 1024
    except OSError:
        return False
