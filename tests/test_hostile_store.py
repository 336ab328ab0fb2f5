"""Issue 14, the index store: what a careless or hostile user does to an index folder must never break it.

Each test reproduces one case (a second writer with another model, a full or read-only disk, a database another
process holds locked, a folder that is not ours, a copied FAISS file, a damaged or unreadable manifest, a
filesystem without file locks, a kill while `remove` writes, knobs out of range), then checks the one-line
message and that the index is intact and searchable afterwards.

A full or read-only disk is tested on a real small tmpfs where this process may mount one (root with
CAP_SYS_ADMIN), and always by simulation: SQLite's own "database or disk is full" (PRAGMA max_page_count),
an OSError ENOSPC from the file writes, and for a read-only folder chmod where that stops this process
(not root), else the errors a read-only mount raises (EROFS on open, SQLite refusing the -shm file).
"""

from __future__ import annotations

import errno
import fcntl
import gc
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import retrieval.atomic as atomic_module
import retrieval.index.connect as connect_module
import retrieval.index.database as database_module
import retrieval.index.faiss_ops as faiss_ops_module
import retrieval.index.folder as folder_module
import retrieval.index.records as records_module
import retrieval.index.store as index_module

WRITERS = (index_module, records_module, faiss_ops_module, folder_module)  # modules that open files in an index
from retrieval.cli.main import main
from retrieval.errors import IndexChanged, NoSpaceError, ReadOnlyError, RetrievalError
from retrieval.index.build import BuildOptions, build_index, remove_items
from retrieval.index.faiss_ops import set_search_params
from retrieval.index.format import Manifest, read_manifest
from retrieval.index.handle import Index
from retrieval.index.store import IndexStore
from retrieval.models.modeldir import fingerprint

pytestmark = pytest.mark.usefixtures("torch_single_thread")

N = 20
NO_SPACE = "no space left on the disk holding"
INTACT = "the index is intact as of its last commit"


# --- helpers ------------------------------------------------------------------------------------------
def write_source(synth_data: Path, path: Path, rows: range) -> Path:
    """A pair manifest of the given synthetic scenes, with absolute image paths."""
    lines = synth_data.read_text().splitlines()
    out = []
    for i in rows:
        row = json.loads(lines[i])
        row["image"] = str(synth_data.parent / row["image"])
        out.append(json.dumps(row) + "\n")
    path.write_text("".join(out))
    return path


@pytest.fixture
def source(synth_data: Path, tmp_path: Path) -> Path:
    return write_source(synth_data, tmp_path / "pairs.jsonl", range(N))


def build(source: Path, index_path: Path, model: Path, **options: Any) -> Any:
    return build_index(source, model, index_path, BuildOptions(progress=False, **options))


def run_cli(*args: Any) -> Any:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error_line(result: Any, message: str) -> str:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error:") and message in lines[-1], result.output
    assert "Traceback" not in result.output
    return lines[-1]


def results(index_path: Path) -> list[list[tuple[str, float]]]:
    """Top 100 (id, score) for three fixed query vectors, on items and on captions: equal lists, equal index."""
    index = Index.open(index_path)
    d = index.store.manifest.dim
    qs = np.random.default_rng(0).standard_normal((3, d)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    return [
        [(h.id, round(h.score, 5)) for h in index.search_vector(q, k=100, target=t)]
        for q in qs
        for t in ("item", "text")
    ]


def assert_current(index_path: Path, n_items: int) -> None:
    """The derived files reflect the database, no half-written file is left, and every item is found."""
    store = IndexStore.open(index_path)
    assert store.counts()["items"] == n_items and store.derived_files_current()
    assert not list(index_path.glob("*.tmp"))
    assert len(results(index_path)[0]) == n_items


def sqlite_error(message: str, name: str) -> sqlite3.OperationalError:
    """An error as SQLite raises it, with the code name the store decides by (sqlite_errorname)."""
    error = sqlite3.OperationalError(message)
    error.sqlite_errorname = name  # type: ignore[attr-defined]
    return error


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@contextmanager
def lock_held(index_path: Path) -> Iterator[None]:
    """Another process writing the index: its lock, taken as IndexStore does (flock on .lock)."""
    index_path.mkdir(parents=True, exist_ok=True)
    with open(index_path / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


@pytest.fixture(scope="module")
def other_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with perturbed weights: same architecture and dimension, another fingerprint."""
    import torch

    from retrieval.models.dual_encoder import save_model
    from retrieval.models.load import load_model

    model = load_model(tiny_model)
    with torch.no_grad():
        model.image_proj.weight.add_(0.1 * torch.randn_like(model.image_proj.weight))
    return save_model(model, tmp_path_factory.mktemp("other") / "model")


# --- 6. a second writer with another model ---------------------------------------------------------------
def test_a_refused_writer_with_another_model_writes_nothing(source, tiny_model, other_model, tmp_path) -> None:
    """Before: the refused run wrote its manifest (naming its model) before it asked for the lock, so the run
    holding the lock filled an index whose manifest named the other model, and later runs said "unchanged"."""
    idx = tmp_path / "idx"
    with lock_held(idx):  # run A (tiny_model) holds the lock and has not written its manifest yet
        with pytest.raises(RetrievalError, match="another process is writing"):
            build(source, idx, other_model)
        assert sorted(p.name for p in idx.iterdir()) == [".lock"]  # no manifest, no database
        assert_one_error_line(
            run_cli("index", source, "--model", other_model, "--index", idx), "another process is writing"
        )
    assert build(source, idx, tiny_model).added == N
    before = results(idx)

    with lock_held(idx):  # the lock comes before the manifest is read: refused as a writer, not a model
        with pytest.raises(RetrievalError, match="another process is writing"):
            build(source, idx, other_model)
    assert read_manifest(idx).fingerprint == fingerprint(tiny_model)
    with pytest.raises(RetrievalError, match="model mismatch"):
        build(source, idx, other_model)
    assert read_manifest(idx).fingerprint == fingerprint(tiny_model)
    assert results(idx) == before
    assert build(source, idx, tiny_model).unchanged == N


def test_a_run_with_another_model_is_refused_before_it_writes_anything(
    source, tiny_model, other_model, tmp_path, monkeypatch
) -> None:
    """Before: the model was checked after the refused run had opened the database for writing (a -wal and a -shm
    file, the schema, a repair that deletes *.tmp files and may update items), and that connection stayed open."""
    idx = tmp_path / "idx"
    build(source, idx, tiny_model)
    before = results(idx)
    close_cleanly(idx)
    unchanged = files(idx)
    real_connect, opened_for_writing = database_module.connect, []

    def connect(path: Path, write: bool = False) -> sqlite3.Connection:
        if write:
            opened_for_writing.append(path)
        return real_connect(path, write)

    monkeypatch.setattr(database_module, "connect", connect)
    with pytest.raises(RetrievalError, match="model mismatch") as refused:  # held: its frames keep what it opened
        build(source, idx, other_model)
    assert files(idx) == unchanged and not opened_for_writing  # byte for byte, and no -wal or -shm file
    assert_one_error_line(run_cli("index", source, "--model", other_model, "--index", idx), "model mismatch")
    assert files(idx) == unchanged and not opened_for_writing
    del refused
    assert results(idx) == before


def test_a_writer_that_fails_closes_its_connection_and_the_store_reads_again(
    source, tiny_model, tmp_path, monkeypatch
) -> None:
    """Before: a writer failing while it opened (its repair, on a disk that refused it) left its write connection
    open, and an error inside `writer()`'s block left the store with a closed connection."""
    idx = tmp_path / "idx"
    build(source, idx, tiny_model)
    close_cleanly(idx)
    (idx / "vectors.npy.tmp").write_bytes(b"left by a killed writer")
    real_unlink = Path.unlink

    def full_disk_unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_unlink(self, missing_ok)

    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", full_disk_unlink)
        with pytest.raises(NoSpaceError) as failed:  # held: its frames keep what it opened
            build(source, idx, tiny_model)
        assert not (idx / "items.sqlite-wal").exists()  # the last connection out closed: no write connection left
        del failed
        store = IndexStore.open(idx)
        with pytest.raises(NoSpaceError):
            with store.writer():
                pass
        assert store.counts()["items"] == N  # still reading, and the lock released:
    with pytest.raises(ValueError, match="the block failed"):
        with store.writer():
            raise ValueError("the block failed")
    assert store.counts()["items"] == N and len(store.items_by_id(["synth-000001"])) == 1
    with store.writer():
        assert store.derived_files_current()
    assert build(source, idx, tiny_model).unchanged == N
    assert_current(idx, N)


# --- 7. a full disk -------------------------------------------------------------------------------------
class FullDiskFile:
    """A file on a disk that fills up after `room` bytes."""

    def __init__(self, f: Any, room: int):
        self._f, self._room = f, room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            self._f.write(bytes(data[: self._room]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> FullDiskFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()


def fill_disk_at(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Make the next write of one kind fail as on a full disk: SQLite's commit (its real SQLITE_FULL, from
    a page limit), or one derived file (a real partial write, then ENOSPC)."""
    if where == "database":
        real_connect = database_module.connect

        def connect(path: Path, write: bool = False) -> sqlite3.Connection:
            db = real_connect(path, write)
            if write:
                db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
            return db

        monkeypatch.setattr(database_module, "connect", connect)
        return

    def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = open(file, mode, *args, **kwargs)
        return FullDiskFile(f, room=100) if Path(file).name == where + ".tmp" else f

    for module in WRITERS:
        monkeypatch.setattr(module, "open", full_open, raising=False)
    monkeypatch.setattr(atomic_module, "open", full_open, raising=False)  # save_npy (vectors.npy) writes there


@pytest.mark.parametrize("where", ["database", "vectors.faiss", "vectors.npy", "records.jsonl"])
def test_a_full_disk_is_one_line_and_the_index_stays_searchable(
    synth_data, source, tiny_model, tmp_path, monkeypatch, where
) -> None:
    """Before: raw tracebacks ("database or disk is full", a FAISS write error, OSError 28) and *.tmp files."""
    idx = tmp_path / "idx"
    build(source, idx, tiny_model)
    before = results(idx)
    more = write_source(synth_data, tmp_path / "more.jsonl", range(N + 5))
    with monkeypatch.context() as m:
        fill_disk_at(m, where)
        result = run_cli("index", more, "--model", tiny_model, "--index", idx)
        line = assert_one_error_line(result, f"{NO_SPACE} {idx}: free some space")
        assert INTACT in line and not list(idx.glob("*.tmp"))
        with pytest.raises(NoSpaceError):
            build(more, idx, tiny_model)
        assert not list(idx.glob("*.tmp"))
        assert run_cli("info", "--index", idx).exit_code == 0
        during = results(idx)
    if where == "database":
        assert during == before  # nothing of the failed batch was committed
    # space again: the re-run completes (the derived files too), and answers as the index read during the failure did
    report = build(more, idx, tiny_model)
    assert report.added == (5 if where == "database" else 0)
    assert_current(idx, N + 5)
    if where != "database":
        assert results(idx) == during


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs, where this process may mount one (root with CAP_SYS_ADMIN); skipped elsewhere."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a small filesystem here; the simulated tests cover it")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_then_read_only_disk(synth_data, source, tiny_model, tmp_path, small_disk) -> None:
    """Before: `index` on the full disk gave a traceback, then `info` and `search` failed with "not a readable index
    database (disk I/O error); rebuild the index"; a fresh index on a read-only mount failed the same way."""
    idx = small_disk / "idx"
    build(source, idx, tiny_model)
    before = results(idx)
    more = write_source(synth_data, tmp_path / "more.jsonl", range(N + 5))
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # every last block
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert_one_error_line(run_cli("index", more, "--model", tiny_model, "--index", idx), f"{NO_SPACE} {idx}")
    assert run_cli("info", "--index", idx).exit_code == 0
    result = run_cli("search", "--index", idx, "--text", "a red circle")
    assert result.exit_code == 0, result.output
    during = results(idx)
    assert during == before or len(during[0]) == N + 5
    filler.unlink()
    build(more, idx, tiny_model)
    assert_current(idx, N + 5)

    gc.collect()  # close this process's connections: a mount with files open for writing cannot go read-only
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    after = results(idx)  # a reader needs no write access
    assert run_cli("info", "--index", idx).exit_code == 0
    assert_one_error_line(run_cli("remove", "--index", idx, "synth-000001"), f"{idx} is read-only")
    assert_one_error_line(run_cli("index", more, "--model", tiny_model, "--index", small_disk / "new"), "is read-only")
    assert results(idx) == after


# --- 7. a read-only folder -------------------------------------------------------------------------------
def chmod_stops_writes(folder: Path) -> bool:
    """chmod stops this process from writing, unless it is root (or has CAP_DAC_OVERRIDE)."""
    probe = folder / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        (probe / "x").touch()
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe)


def close_cleanly(folder: Path) -> None:
    """The folder as the last process out leaves it: every connection closed, no -wal or -shm file (the hard
    case for a read-only reader, which cannot create the -shm file a WAL database needs)."""
    gc.collect()
    wal, shm = folder / "items.sqlite-wal", folder / "items.sqlite-shm"
    if wal.is_file() and wal.stat().st_size == 0:  # checkpointed: it holds nothing
        wal.unlink()
        shm.unlink(missing_ok=True)
    assert not wal.exists() and not shm.exists()


@contextmanager
def read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The folder and its files read-only: by chmod where that stops this process, else by the errors a read-only
    mount gives us (EROFS opening a file to write; SQLite cannot create the -shm file a WAL database needs, so
    mode=ro fails while it is missing, and only an immutable open reads)."""
    close_cleanly(folder)
    if chmod_stops_writes(folder.parent):
        modes = {p: p.stat().st_mode for p in [folder, *folder.iterdir()]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    real_connect, inside = sqlite3.connect, str(folder)

    def connect(target: Any, *args: Any, uri: bool = False, **kwargs: Any) -> sqlite3.Connection:
        shm_missing = not (folder / "items.sqlite-shm").exists()
        if inside in str(target) and not uri:  # a writer
            raise sqlite_error("attempt to write a readonly database", "SQLITE_READONLY")
        if (
            inside in str(target) and "immutable=1" not in str(target) and shm_missing
        ):  # what mode=ro meets on a ro mount
            raise sqlite_error("unable to open database file", "SQLITE_CANTOPEN")
        return real_connect(target, *args, uri=uri, **kwargs)

    def ro_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if str(file).startswith(inside) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return open(file, mode, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(sqlite3, "connect", connect)
        for module in WRITERS:
            m.setattr(module, "open", ro_open, raising=False)
        yield


def test_a_read_only_index_is_searchable_and_writes_say_read_only(source, tiny_model, tmp_path, monkeypatch) -> None:
    """Before: a freshly built index on a read-only mount failed `info` and `search` with "not a readable index
    database (unable to open database file); rebuild the index"."""
    idx = tmp_path / "idx"
    build(source, idx, tiny_model)
    before = results(idx)
    with read_only(idx, monkeypatch):
        assert results(idx) == before
        result = run_cli("info", "--index", idx)
        assert result.exit_code == 0 and json.loads(result.output)["counts"]["items"] == N
        result = run_cli("remove", "--index", idx, "synth-000001")
        assert "rebuild the index" not in assert_one_error_line(result, f"{idx} is read-only")
        with pytest.raises(ReadOnlyError):
            remove_items(idx, ["synth-000001"])
        assert_one_error_line(run_cli("index", source, "--model", tiny_model, "--index", idx), f"{idx} is read-only")
        assert results(idx) == before
    assert remove_items(idx, ["synth-000001"]) == []  # writable again: the write goes through
    assert_current(idx, N - 1)


def test_a_reader_opens_the_database_read_only(source, tiny_model, tmp_path) -> None:
    idx = tmp_path / "idx"
    build(source, idx, tiny_model)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        IndexStore.open(idx).db.execute("CREATE TABLE x (a)")


def test_rebuild_is_advised_only_for_a_file_that_is_not_a_database(source, tiny_model, tmp_path, monkeypatch) -> None:
    idx = tmp_path / "idx"
    build(source, idx, tiny_model)
    real_connect = sqlite3.connect

    def failing(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        raise sqlite3.OperationalError("disk I/O error")

    with monkeypatch.context() as m:
        m.setattr(sqlite3, "connect", failing)
        line = assert_one_error_line(run_cli("info", "--index", idx), "cannot read")
        assert "disk I/O error" in line and "check the disk" in line and "rebuild the index" not in line
    assert real_connect is sqlite3.connect
    for name in ("items.sqlite-wal", "items.sqlite-shm"):
        (idx / name).unlink(missing_ok=True)
    (idx / "items.sqlite").write_bytes(os.urandom(8192))
    assert_one_error_line(run_cli("info", "--index", idx), "is not a readable index database")


def test_a_database_another_process_holds_locked_is_reported_not_read_without_locks(
    source, tiny_model, tmp_path
) -> None:
    """Before: any failure of the read-only open, a writer's lock on a writable folder too, fell back to reading
    the file immutable, without locks, where a writer's changes show as torn pages."""
    idx = tmp_path / "idx"
    build(source, idx, tiny_model)
    before = results(idx)
    close_cleanly(idx)
    holder = sqlite3.connect(idx / "items.sqlite")
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")  # no shared memory: readers cannot get in at all
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(RetrievalError, match="another process holds it locked; wait for it to finish, then retry"):
            IndexStore.open(idx)
        line = assert_one_error_line(run_cli("info", "--index", idx), "(database is locked): another process holds it")
        assert "rebuild" not in line and "immutable" not in line
    finally:
        holder.rollback()
        holder.close()
    assert results(idx) == before


def test_an_immutable_reader_that_meets_a_changed_file_never_advises_a_rebuild(
    source, tiny_model, tmp_path, monkeypatch
) -> None:
    """A reader of a read-only folder opens the database immutable (no locks: nothing can write there). If the
    folder becomes writable and the file changes under it, it reads torn pages. Before: a raw DatabaseError
    ("malformed"), which the open-time check words as "rebuild the index", advice that destroys an intact index."""
    idx = tmp_path / "idx"
    build(source, idx, tiny_model)
    before = results(idx)
    with read_only(idx, monkeypatch):
        store = IndexStore.open(idx)
    assert isinstance(store.db, connect_module.ImmutableConnection)
    database = idx / "items.sqlite"
    intact = database.read_bytes()
    database.write_bytes(intact[:4096] + np.random.default_rng(0).bytes(len(intact) - 4096))  # all but its first page
    with pytest.raises(IndexChanged) as changed:
        store.counts()
    assert "in immutable mode" in str(changed.value) and "open the index again, or make the folder writable" in str(
        changed.value
    )
    assert "rebuild" not in str(changed.value)
    database.write_bytes(intact)
    assert results(idx) == before


# --- 9. a folder that is not an index ---------------------------------------------------------------------
def test_a_folder_that_is_not_an_index_is_refused_and_left_alone(source, tiny_model, tmp_path) -> None:
    """Before: a user's records.jsonl was overwritten, and a foreign items.sqlite got our tables and WAL mode."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "records.jsonl").write_text('{"mine": 1}\n')
    shutil.copy(json.loads(source.read_text().splitlines()[0])["image"], photos / "photo.jpg")
    listing = {p.name: p.read_bytes() for p in photos.iterdir()}
    result = run_cli("index", source, "--model", tiny_model, "--index", photos)
    assert_one_error_line(
        result,
        f"{photos} is not empty and is not an index (it holds photo.jpg, records.jsonl): "
        "choose an empty or new folder for --index",
    )
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == listing

    foreign = tmp_path / "app"
    foreign.mkdir()
    with sqlite3.connect(foreign / "items.sqlite") as db:
        db.execute("CREATE TABLE users (name TEXT)")
    db.close()
    with pytest.raises(RetrievalError, match=r"not an index \(it holds items.sqlite\)"):
        build(source, foreign, tiny_model)
    with sqlite3.connect(foreign / "items.sqlite") as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    db.close()
    assert sorted(p.name for p in foreign.iterdir()) == ["items.sqlite"]

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(RetrievalError, match="is a file, not a folder"):
        build(source, tmp_path / "a-file", tiny_model)

    escape = tmp_path / "escape"
    escape.mkdir()
    (escape / "a\x1b[2Jb.jpg").write_bytes(b"x")  # would clear the screen of whoever reads the message
    with pytest.raises(RetrievalError) as refused:
        IndexStore.open_writer(escape, lambda: Manifest("no-model", "0" * 16, 4))
    assert "it holds a\\x1b[2Jb.jpg" in str(refused.value) and "\x1b" not in str(refused.value)
    assert sorted(p.name for p in escape.iterdir()) == ["a\x1b[2Jb.jpg"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert build(source, empty, tiny_model).added == N  # an empty folder is fine
    assert build(source, empty, tiny_model).unchanged == N  # and so is an index
    assert_current(empty, N)


# --- minor: a copied FAISS file, a damaged manifest, a killed remove, stale .tmp files, knobs --------------
@pytest.mark.parametrize("index_type, n", [("flat", N), ("hnsw", N), ("ivf", 40)])  # ivf trains on >= 39 items
def test_a_faiss_file_copied_from_another_index_is_not_trusted_and_index_repairs_it(
    synth_data, tiny_model, tmp_path, index_type, n
) -> None:
    """Before: searches answered from the other index's vectors (same ids 1..n), or failed with "restart the
    server"; `index` said "n unchanged" and kept the file. Flat and HNSW copies were caught by comparing two
    vectors; an IVF copy (the same count and ids) was trusted."""
    a, b = tmp_path / "a", tmp_path / "b"
    source = write_source(synth_data, tmp_path / "pairs.jsonl", range(n))
    build(source, a, tiny_model, index_type=index_type)
    build(write_source(synth_data, tmp_path / "other.jsonl", range(n, 2 * n)), b, tiny_model, index_type=index_type)
    before = results(a)
    shutil.copy(b / "vectors.faiss", a / "vectors.faiss")
    assert results(a) == before  # rebuilt in memory from the database
    assert not IndexStore.open(a).derived_files_current()
    result = run_cli("index", source, "--model", tiny_model, "--index", a)
    assert result.exit_code == 0 and f"0 added, 0 updated, 0 removed, {n} unchanged" in result.output, result.output
    assert (a / "vectors.faiss").read_bytes() != (b / "vectors.faiss").read_bytes()
    assert_current(a, n)
    assert results(a) == before


def test_a_no_op_index_or_remove_does_not_read_the_faiss_file(source, tiny_model, tmp_path, monkeypatch) -> None:
    """Before: deciding that the derived files were current read the whole FAISS file and threw it away, on every
    no-op `index`, `remove` and merge (a flat index of 1M items: about 1 GB read to say "unchanged")."""
    idx = tmp_path / "idx"
    build(source, idx, tiny_model)
    real_read, reads = index_module.read_faiss, []

    def read_faiss(file: Path, mmap: bool = False) -> Any:
        reads.append(file)
        return real_read(file, mmap)

    monkeypatch.setattr(index_module, "read_faiss", read_faiss)
    assert build(source, idx, tiny_model).unchanged == N
    assert remove_items(idx, ["no-such-item"]) == ["no-such-item"]
    assert reads == []
    # a manifest from before the digest: the file is read and checked once, and what was read is kept for searching
    manifest = json.loads((idx / "manifest.json").read_text())
    del manifest["faiss_digest"]
    (idx / "manifest.json").write_text(json.dumps(manifest))
    store = IndexStore.open(idx)
    assert store.derived_files_current() and len(reads) == 1
    assert store.faiss.ntotal == N and len(reads) == 1


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("dim", "abc", 'dim is "abc", not a whole number'),
        ("params", [], "params is [], not an object"),
        ("generation", "x", 'generation is "x", not a whole number'),
        ("index_type", "bogus", 'index_type is "bogus", not one of flat'),
        (
            "calibration",
            {"item": 5},
            'calibration is {"item": 5}, its "item" entry is not a cutoff as `retrieval calibrate` stores it',
        ),
        (
            "calibration",
            {"item": {"rule": "flat"}},
            'calibration is {"item": {"rule": "flat"}}, its "item" entry is not a cutoff',
        ),
        (
            "calibration",
            {"text": {"rule": "flat", "theta": "0.3", "weight": 0.5}},
            'calibration is {"text": {"rule": "flat", "theta": "0.3", its "text" entry is',
        ),
    ],
)
def test_a_manifest_value_of_the_wrong_type_is_one_line(source, tiny_model, tmp_path, key, value, words) -> None:
    idx = tmp_path / "idx"
    build(source, idx, tiny_model)
    before = results(idx)
    good = (idx / "manifest.json").read_text()
    (idx / "manifest.json").write_text(json.dumps({**json.loads(good), key: value}))
    for args in (
        ["info", "--index", idx],
        ["search", "--index", idx, "--text", "a red circle"],
        ["index", source, "--model", tiny_model, "--index", idx],
    ):
        assert_one_error_line(run_cli(*args), f"manifest.json is damaged: {words}")
    (idx / "manifest.json").write_text(good)
    assert results(idx) == before


def test_calibration_entries_as_calibrate_stores_them_are_read(source, tiny_model, tmp_path) -> None:
    idx = tmp_path / "idx"
    build(source, idx, tiny_model)
    entries = {
        "item": {
            "rule": "flat",
            "theta": 0.25,
            "weight": 0.5,
            "n_queries": 30,
            "best_f1": 0.8,
            "heldout_f1": 0.75,
            "target_precision": None,
        },
        "text": {
            "rule": "top_relative",
            "margin": 0.05,
            "weight": 0.0,
            "n_queries": 30,
            "best_f1": 0.7,
            "heldout_f1": 0.6,
            "target_precision": 0.9,
        },
    }
    store = IndexStore.open(idx)
    with store.writer():
        for target, entry in entries.items():
            store.set_calibration(target, entry)
    assert read_manifest(idx).calibration == entries
    index = Index.open(idx)
    assert index.calibrated("item", 0.5) == (0.25, None) and index.calibrated("text", 0.0) == (None, 0.05)


def test_an_unreadable_manifest_is_one_line(source, tiny_model, tmp_path, monkeypatch) -> None:
    """Before: an I/O or permission error reading manifest.json was a traceback."""
    idx = tmp_path / "idx"
    build(source, idx, tiny_model)
    before = results(idx)
    real_read_text = Path.read_text

    def read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == idx / "manifest.json":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_read_text(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Path, "read_text", read_text)
        for args in (
            ["info", "--index", idx],
            ["search", "--index", idx, "--text", "a red circle"],
            ["index", source, "--model", tiny_model, "--index", idx],
            ["remove", "--index", idx, "synth-000001"],
        ):
            line = assert_one_error_line(
                run_cli(*args), f"cannot read {idx}/manifest.json ({os.strerror(errno.EIO)}): check the disk"
            )
            assert "rebuild" not in line
    assert results(idx) == before


def test_a_filesystem_without_file_locks_is_one_line_and_leaks_no_file(
    source, tiny_model, tmp_path, monkeypatch
) -> None:
    """Before: flock's ENOLCK (NFS without a lock daemon) was a traceback, and the lock file stayed open."""
    idx = tmp_path / "idx"
    build(source, idx, tiny_model)
    before = results(idx)
    opened: list[Any] = []

    def tracked_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = open(file, mode, *args, **kwargs)
        opened.append(f)
        return f

    def no_locks(fd: Any, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    with monkeypatch.context() as m:
        m.setattr(folder_module, "open", tracked_open, raising=False)
        m.setattr(fcntl, "flock", no_locks)
        reason = (
            f"cannot lock {idx}/.lock ({os.strerror(errno.ENOLCK)}): "
            "writing an index needs a filesystem with file locks"
        )
        with pytest.raises(RetrievalError, match=re.escape(reason)):
            build(source, idx, tiny_model)
        assert_one_error_line(run_cli("index", source, "--model", tiny_model, "--index", idx), reason)
        assert_one_error_line(run_cli("remove", "--index", idx, "synth-000001"), reason)
    assert opened and all(f.closed for f in opened)
    assert results(idx) == before
    assert_current(idx, N)


KILLED_REMOVE = """
import os, signal, sys
from retrieval.index.build import remove_items
real = os.replace
def replace(src, dst):  # kill -9 at the moment the records file would be renamed into place
    if str(dst).endswith("records.jsonl"):
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
remove_items(sys.argv[1], [sys.argv[2]])
"""


def test_remove_killed_while_writing_derived_files_is_completed_by_the_next_remove(
    source, tiny_model, tmp_path
) -> None:
    """Before: the kill left records.jsonl.tmp, and a second `remove` said "removed 0" and rewrote nothing."""
    idx = tmp_path / "idx"
    build(source, idx, tiny_model)
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_REMOVE, str(idx), "synth-000003"], capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (idx / "records.jsonl.tmp").exists()
    store = IndexStore.open(idx)
    assert store.counts()["items"] == N - 1 and store.manifest.generation != store.generation()
    result = run_cli("remove", "--index", idx, "synth-000003")
    assert result.exit_code == 0 and result.output.strip() == "removed 0 item(s); not found: synth-000003", (
        result.output
    )
    assert_current(idx, N - 1)
    assert "synth-000003" not in {i for i, _ in results(idx)[0]}


def test_the_next_writer_removes_stale_tmp_files(source, tiny_model, tmp_path) -> None:
    idx = tmp_path / "idx"
    build(source, idx, tiny_model)
    (idx / "vectors.npy.tmp").write_bytes(b"half a file")
    (idx / "manifest.json.tmp").write_text("{")
    assert build(source, idx, tiny_model).unchanged == N
    assert_current(idx, N)


def test_a_failed_atomic_write_removes_its_tmp_file(tmp_path) -> None:
    def half(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    (tmp_path / "f").write_text("old")
    with pytest.raises(OSError):
        atomic_module.atomic_write(tmp_path / "f", half)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"] and (tmp_path / "f").read_text() == "old"


@pytest.mark.parametrize("knob, value", [("ef_search", 2**31), ("nprobe", 0), ("ef_search", "12"), ("nprobe", True)])
def test_search_knobs_out_of_range_are_one_line(tmp_path, knob, value) -> None:
    import faiss

    index = faiss.index_factory(
        8, "IDMap2,HNSW32" if knob == "ef_search" else "IDMap2,IVF1,Flat", faiss.METRIC_INNER_PRODUCT
    )
    with pytest.raises(RetrievalError, match=f"{knob} must be a whole number from 1 to 2147483647"):
        set_search_params(index, {knob: value})


def test_knobs_and_memory_budgets_out_of_range_are_refused_before_anything_is_written(
    source, tiny_model, tmp_path
) -> None:
    idx = tmp_path / "idx"
    with pytest.raises(RetrievalError, match="ef_search must be a whole number from 1 to 2147483647"):
        build(source, idx, tiny_model, params={"ef_search": 2**31})
    assert not idx.exists()
    build(source, idx, tiny_model, index_type="hnsw")
    for budget in (float("nan"), float("inf"), 10**300, 0, 1.5):
        with pytest.raises(RetrievalError, match="--max-memory must be a size from 1 byte to 8 EiB"):
            IndexStore.open(idx, max_memory=budget)  # type: ignore[arg-type]
    index = Index.open(idx)
    index.store.tune({"ef_search": 2**31})
    with pytest.raises(RetrievalError, match="ef_search must be a whole number"):
        index.search_vector(np.ones(index.store.manifest.dim, np.float32), k=5)
    index.store.tune({"ef_search": 64})
    assert len(index.search_vector(np.ones(index.store.manifest.dim, np.float32), k=5)) == 5
