"""atomic.py, the one write-to-temp-then-rename: what a reader can see, what a failure leaves, what is fsynced."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from retrieval import atomic
from retrieval.atomic import (
    TMP_SUFFIX,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_stream,
    atomic_write_text,
    save_npy,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What os.fsync was called on, as "file NAME" or "dir NAME", in order."""
    calls: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        link = f"/proc/self/fd/{fd}"  # Linux: the path the descriptor was opened by
        calls.append(f"{'dir' if os.path.isdir(link) else 'file'} {Path(os.readlink(link)).name}")
        real(fd)

    monkeypatch.setattr(atomic.os, "fsync", record)
    return calls


@pytest.mark.parametrize("unique", [False, True])
def test_the_target_is_replaced_whole(tmp_path: Path, unique: bool) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old contents, longer than the new ones")
    atomic_write_bytes(target, b"new", unique=unique)
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"], "no temporary file is left"


def test_each_helper_writes_what_it_says(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "t.txt", "caf\u00e9\n")
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2]})
    atomic_write_stream(tmp_path / "s.bin", lambda f: f.write(b"xy"))
    atomic_write(tmp_path / "v.npy", lambda tmp: save_npy(tmp, np.arange(3, dtype=np.int64)))
    assert (tmp_path / "t.txt").read_bytes() == "caf\u00e9\n".encode()
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2]}
    assert (tmp_path / "j.json").read_text() == json.dumps({"a": [1, 2]}, indent=2)
    assert (tmp_path / "s.bin").read_bytes() == b"xy"
    assert np.load(tmp_path / "v.npy").tolist() == [0, 1, 2], "save_npy writes the name it is given, not NAME.npy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.json", "s.bin", "t.txt", "v.npy"]


@pytest.mark.parametrize("unique", [False, True])
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), KeyboardInterrupt()])
def test_a_write_that_raises_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, unique: bool, error: BaseException
) -> None:
    target = tmp_path / "f"
    target.write_text("old")
    seen: list[Path] = []

    def half(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"half")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, half, unique=unique)
    assert [p.name for p in tmp_path.iterdir()] == ["f"] and target.read_text() == "old"
    assert seen[0].parent == tmp_path and seen[0].name.startswith("f.") and seen[0].name.endswith(TMP_SUFFIX)


def test_a_missing_target_stays_missing_after_a_failed_write(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        atomic_write_stream(tmp_path / "new", lambda f: (f.write(b"x"), int("not a number")))
    assert list(tmp_path.iterdir()) == []


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(tmp_path: Path, fsynced: list[str]) -> None:
    target = tmp_path / "f.json"
    renamed_after: list[int] = []
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        renamed_after.append(len(fsynced))
        real_replace(src, dst)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(atomic.os, "replace", replace)
        atomic_write_json(target, [1])
    assert fsynced == [f"file f.json{TMP_SUFFIX}", f"dir {tmp_path.name}"]
    assert renamed_after == [1], "the data reaches the disk before the rename, the rename after it"


def test_a_unique_write_fsyncs_its_own_temp_file(tmp_path: Path, fsynced: list[str]) -> None:
    atomic_write_bytes(tmp_path / "t.jpg", b"jpeg", unique=True)
    assert len(fsynced) == 2 and fsynced[1] == f"dir {tmp_path.name}"
    assert (
        fsynced[0].startswith("file t.jpg.")
        and fsynced[0].endswith(TMP_SUFFIX)
        and fsynced[0] != f"file t.jpg{TMP_SUFFIX}"
    )


def test_unique_temp_names_keep_concurrent_writers_apart(tmp_path: Path) -> None:
    """Two writers of one target at once (two requests making the same thumbnail): each writes its own temporary
    file, so the target is always one writer's whole bytes, never a mix, and no temporary file is left."""
    target = tmp_path / "thumb.jpg"
    both_writing = threading.Barrier(2)
    names: list[str] = []

    def writer(payload: bytes) -> None:
        def write(tmp: Path) -> None:
            names.append(tmp.name)
            with open(tmp, "wb") as f:
                f.write(payload[:4])
                both_writing.wait(timeout=10)  # both temporary files are open and half written here
                f.write(payload[4:])

        atomic_write(target, write, unique=True)

    threads = [threading.Thread(target=writer, args=(bytes([b]) * 64,)) for b in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 2
    assert target.read_bytes() in (b"\x01" * 64, b"\x02" * 64)
    assert [p.name for p in tmp_path.iterdir()] == ["thumb.jpg"]


def test_a_unique_temp_file_gets_the_mode_open_would_give(tmp_path: Path) -> None:
    """mkstemp makes 0o600 files, which the rename would carry to a file others must read (a shared synth set)."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    atomic_write_bytes(tmp_path / "atomic", b"", unique=True)
    assert (tmp_path / "atomic").stat().st_mode == plain.stat().st_mode


@pytest.mark.slow  # a subprocess: a fresh interpreter is the only clean sys.modules
def test_atomic_is_a_leaf_that_loads_nothing_heavy() -> None:
    code = (
        "import sys, retrieval.atomic; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'faiss', 'numpy', 'retrieval')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "['retrieval', 'retrieval.atomic']"


def test_no_other_module_renames_by_itself() -> None:
    """atomic.py is the one copy: no other module of the package calls os.replace / os.rename / mkstemp."""
    offenders = [
        f"{p.name}: {needle}"
        for p in sorted((ROOT / "retrieval").rglob("*.py"))
        if p.name != "atomic.py"
        for needle in ("os.replace(", "os.rename(", "mkstemp(", "NamedTemporaryFile(", ".rename(")
        if needle in p.read_text()
    ]
    assert offenders == []


def test_a_rerun_clears_what_killed_shard_writers_left_and_nothing_else(tmp_path: Path) -> None:
    """Shards are written under a temporary name per attempt; the driver clears a pending shard's leftovers."""
    from retrieval.scale.shards import clear_partial

    left = ["shard-000001-ab.npy.tmp", "shard-000001-ab.parquet.1f2e3d4c5b6a.tmp"]
    kept = ["shard-000001-ab.npy", "shard-000002-cd.npy.0a0b0c0d0e0f.tmp", "shard-000002-cd.json"]
    for name in left + kept:
        (tmp_path / name).write_bytes(b"x")
    clear_partial(tmp_path, ["shard-000001-ab"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    clear_partial(tmp_path / "missing", ["shard-000001-ab"])  # no shard folder yet: nothing to do
