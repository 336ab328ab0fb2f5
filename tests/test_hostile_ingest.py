"""Hostile sources (issue 14): whatever a user feeds `index`, a bad item is skipped and listed with a one-line
reason, the rest of its batch is kept, and the index stays intact and searchable afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from retrieval.cli.main import main
from retrieval.data.pairs import read_pairs
from retrieval.errors import ImageError, RetrievalError
from retrieval.index.build import image_key
from retrieval.index.store import IndexStore

pytestmark = pytest.mark.usefixtures("torch_single_thread")

N = 6  # good items in each source


# --- helpers -------------------------------------------------------------------------------------------------
def synth_rows(synth_data: Path) -> list[dict]:
    """The first N scenes as manifest rows with absolute image paths."""
    rows = [json.loads(line) for line in synth_data.read_text().splitlines()][:N]
    return [{**row, "image": str(synth_data.parent / row["image"])} for row in rows]


@pytest.fixture
def photos(synth_data: Path, tmp_path: Path) -> Path:
    """A folder of N images, each with a UTF-8 sidecar caption."""
    src = tmp_path / "photos"
    src.mkdir()
    for row in synth_rows(synth_data):
        shutil.copy(row["image"], src / f"{row['id']}.png")
        (src / f"{row['id']}.txt").write_text(row["captions"][0] + "\n", encoding="utf-8")
    return src


def run_cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def index_ok(source: Path | str, model: Path, idx: Path, *extra: object) -> Result:
    """`retrieval index` that must succeed, with no traceback."""
    result = run_cli("index", source, "--model", model, "--index", idx, *extra)
    assert result.exit_code == 0 and result.exception is None, result.output
    return result


def skipped_lines(result: Result) -> list[str]:
    """The messages the CLI lists under 'skipped N ...:', each one line."""
    lines = result.output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("skipped ")), len(lines))
    return [line.strip() for line in lines[start + 1 :]]


def assert_intact(idx: Path, ids: set[str]) -> None:
    """The index holds exactly these ids, and info, search, remove and a search after it all work."""
    assert set(IndexStore.open(idx).all_items()) == ids
    info = run_cli("info", "--index", idx)
    assert info.exit_code == 0, info.output
    hits = run_cli("search", "--index", idx, "--text", "a red circle", "--json", "--k", "3")
    assert hits.exit_code == 0, hits.output
    assert {json.loads(line)["id"] for line in hits.output.splitlines()} <= ids
    victim = sorted(ids)[0]
    removed = run_cli("remove", "--index", idx, victim)
    assert removed.exit_code == 0, removed.output
    again = run_cli("search", "--index", idx, "--text", "a red circle", "--json", "--k", "3")
    assert again.exit_code == 0, again.output
    assert set(IndexStore.open(idx).all_items()) == ids - {victim}


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    """Rows as JSON lines; a str is written as it is (Python's json writes NaN and Infinity unquoted)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# --- 1. NaN and Infinity in a manifest -----------------------------------------------------------------------
def test_non_finite_numbers_skip_their_row_and_the_rest_is_indexed(synth_data, tiny_model, tmp_path) -> None:
    rows = synth_rows(synth_data)
    bad = [
        {**rows[0], "id": "nan", "score": float("nan")},
        {**rows[1], "id": "nested", "meta": {"scores": [1.0, float("inf")]}},
        {**rows[2], "id": "minus", "score": float("-inf")},
        json.dumps({**rows[3], "id": "overflow"})[:-1] + ', "big": 1e400}',  # parses to inf
        '{"id": "broken", "caption": "missing brace"',
    ]
    manifest = write_jsonl(tmp_path / "pairs.jsonl", [*rows, *bad])
    idx = tmp_path / "idx"
    result = index_ok(manifest, tiny_model, idx)
    assert f"{N} added" in result.output
    messages = skipped_lines(result)
    assert len(messages) == 5, result.output
    for line_no, message in zip(range(N + 1, N + 5), messages[:4], strict=True):
        assert f"pairs.jsonl:{line_no}: " in message and "use null or a string" in message, message
    assert f"pairs.jsonl:{N + 5}: not valid JSON" in messages[4]
    again = index_ok(manifest, tiny_model, idx)
    assert f"{N} unchanged" in again.output
    assert_intact(idx, {r["id"] for r in rows})


def test_an_index_an_older_version_broke_with_a_nan_is_mended_by_the_next_index(
    synth_data, tiny_model, tmp_path
) -> None:
    """Before this fix a NaN reached items.extra, and from then on every read failed with SQLite's 'malformed
    JSON', re-indexing the corrected source included. The next writer now mends the row, and that re-index stores
    the item again (its vectors reused)."""
    import sqlite3

    rows = synth_rows(synth_data)
    manifest = write_jsonl(tmp_path / "pairs.jsonl", rows)
    idx = tmp_path / "idx"
    index_ok(manifest, tiny_model, idx)
    with sqlite3.connect(idx / "items.sqlite") as db:  # what the old version wrote, and its failed publish
        db.execute("UPDATE items SET extra = '{\"score\": NaN}' WHERE id = ?", (rows[0]["id"],))
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
    with pytest.raises(sqlite3.OperationalError, match="malformed JSON"):
        IndexStore.open(idx).all_items()
    rows[0]["score"] = 0.5  # the corrected source
    result = index_ok(write_jsonl(manifest, rows), tiny_model, idx)
    assert "1 updated" in result.output and f"{N - 1} unchanged" in result.output, result.output
    assert IndexStore.open(idx).items_by_id([rows[0]["id"]])[rows[0]["id"]].extra["score"] == 0.5
    assert_intact(idx, {r["id"] for r in rows})


def test_an_indexed_item_whose_row_or_sidecar_turns_bad_is_kept_not_removed(
    synth_data, tiny_model, photos, tmp_path
) -> None:
    """A row that gains a NaN, or a sidecar re-saved as Latin-1, is skipped this time; the item indexed before
    stays as it was (it used to be removed, while the output said only "skipped")."""
    rows = synth_rows(synth_data)
    manifest = write_jsonl(tmp_path / "pairs.jsonl", rows)
    index_ok(manifest, tiny_model, tmp_path / "a")
    write_jsonl(manifest, [{**rows[0], "score": float("nan")}, *rows[1:]])
    result = index_ok(manifest, tiny_model, tmp_path / "a")
    assert "0 removed" in result.output and len(skipped_lines(result)) == 1, result.output
    assert set(IndexStore.open(tmp_path / "a").all_items()) == {r["id"] for r in rows}

    index_ok(photos, tiny_model, tmp_path / "b")
    sidecar = sorted(photos.glob("*.txt"))[0]
    sidecar.write_bytes(sidecar.read_text().encode() + "café\n".encode("latin-1"))
    result = index_ok(photos, tiny_model, tmp_path / "b")
    assert "0 removed" in result.output and len(skipped_lines(result)) == 1, result.output
    assert len(IndexStore.open(tmp_path / "b").all_items()) == N


def test_a_manifest_with_no_readable_row_is_refused_not_emptied_into_the_index(
    synth_data, tiny_model, tmp_path
) -> None:
    manifest = write_jsonl(tmp_path / "pairs.jsonl", synth_rows(synth_data))
    idx = tmp_path / "idx"
    index_ok(manifest, tiny_model, idx)
    write_jsonl(manifest, ["not json", '{"caption": "x", "score": NaN}'])
    result = run_cli("index", manifest, "--model", tiny_model, "--index", idx)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.splitlines()[-1].startswith("Error: ") and "pairs.jsonl: no readable row" in result.output
    assert len(IndexStore.open(idx).all_items()) == N


def test_bad_rows_are_skipped_alike_in_jsonl_and_csv(tmp_path) -> None:
    jsonl = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"id": "a", "caption": "fine"},
            '{"id": "b", "caption": "x", "s": NaN}',
            {"id": "c", "image": 3},
            {"id": "a", "caption": "again"},
            '{"id": "d", "caption": "lone \\udce9 surrogate"}',
            "[1, 2]",
            "{",
        ],
    )
    skipped: list[str] = []
    assert [p.id for p in read_pairs(jsonl, skipped)] == ["a"]
    assert [m.split(": ", 1)[0][-len("pairs.jsonl:7") :] for m in skipped[:-1]] == [
        "pairs.jsonl:2",
        "pairs.jsonl:3",
        "pairs.jsonl:5",
        "pairs.jsonl:6",
        "pairs.jsonl:7",
    ]
    assert "id 'a' appears twice" in skipped[-1] and all("\n" not in m for m in skipped)
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_bytes(b"id,image,caption\na,,fine\nb,,caf\xe9\nc,,\n" + b"d,," + b"x" * 200_000 + b"\ne,,last\n")
    skipped = []
    assert [p.id for p in read_pairs(csv_file, skipped)] == ["a", "e"]
    assert [m.split(": ", 1)[0][-len("pairs.csv:3") :] for m in skipped] == [
        "pairs.csv:3",
        "pairs.csv:4",
        "pairs.csv:5",
    ]
    assert "not UTF-8" in skipped[0]
    with pytest.raises(RetrievalError, match=r"pairs\.csv:3: .*not UTF-8"):  # training still refuses the file
        read_pairs(csv_file)


# --- 2. sidecars that are not UTF-8 --------------------------------------------------------------------------
def test_a_sidecar_that_is_not_utf8_skips_its_image_and_exclude_avoids_reading_it(photos, tiny_model, tmp_path) -> None:
    shutil.copy(photos / "synth-000000.png", photos / "latin1.png")
    (photos / "latin1.png").with_suffix(".txt").write_bytes("un caf\xe9 cr\xe8me\n".encode("latin-1"))
    good = {p.name for p in photos.glob("synth-*.png")}
    idx = tmp_path / "idx"
    result = index_ok(photos, tiny_model, idx)
    (message,) = skipped_lines(result)
    assert "latin1.txt: " in message and "not UTF-8" in message and "as UTF-8" in message, message
    assert_intact(idx, good)
    excluded = index_ok(photos, tiny_model, tmp_path / "idx2", "--exclude", "latin1*")
    assert "skipped" not in excluded.output and f"{N} added" in excluded.output
    with pytest.raises(RetrievalError, match=r"latin1\.txt: .*not UTF-8"):  # training: one line, no traceback
        read_pairs(photos)


# --- 3. file names that are not UTF-8 ------------------------------------------------------------------------
def test_a_file_name_that_is_not_utf8_is_skipped_and_its_batch_kept(photos, tiny_model, tmp_path) -> None:
    bad = os.path.join(os.fsencode(photos), b"caf\xe9.png")
    try:
        shutil.copy(photos / "synth-000001.png", bad)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    good = {p.name for p in photos.glob("synth-*.png")}
    idx = tmp_path / "idx"
    result = index_ok(photos, tiny_model, idx, "--batch-size", str(N + 1))  # one batch: its good items must survive
    (message,) = skipped_lines(result)
    assert "caf\\xe9.png" in message and "rename it" in message, message
    result.output.encode("utf-8")  # shown escaped: nothing undecodable reaches the terminal
    assert_intact(idx, good)


# --- 5. huge files that are not images -----------------------------------------------------------------------
def test_a_huge_non_image_is_refused_from_its_header_without_reading_it(photos, tiny_model, tmp_path) -> None:
    big = photos / "huge.jpg"
    with big.open("wb") as f:
        f.truncate(2 * 2**30)  # sparse: 2 GB of zeros that take no disk
    probe = (
        "import resource, sys; from concurrent.futures import ThreadPoolExecutor; from pathlib import Path\n"
        "from types import SimpleNamespace; from retrieval.data.pairs import Pair\n"
        "from retrieval.data.images import Transform\n"
        "from retrieval.index.build import decode_batch\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "with ThreadPoolExecutor(1) as pool:\n"
        "    (f,) = decode_batch(SimpleNamespace(transform=Transform(32)), [Pair('x', Path(sys.argv[1]), ())], pool)\n"
        "    print(f.result()[2])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(big)], capture_output=True, text=True, timeout=120, check=True
    )
    error, grown_kib = out.stdout.splitlines()
    assert "huge.jpg: not a recognised image format" in error, out.stdout
    assert int(grown_kib) < 64 * 1024, f"hashing grew the peak RSS by {int(grown_kib) // 1024} MiB"
    idx = tmp_path / "idx"
    (message,) = skipped_lines(index_ok(photos, tiny_model, idx))
    assert "huge.jpg" in message and "not a recognised image format" in message
    assert_intact(idx, {p.name for p in photos.glob("*.png")})


def test_image_key_hashes_in_chunks_to_the_same_key_as_before(photos, tmp_path) -> None:
    image = photos / "synth-000002.png"
    assert image_key(image) == "img:" + hashlib.sha256(image.read_bytes()).hexdigest()
    with pytest.raises(ImageError, match=r"(?i)cannot read image .*missing\.png: no such file"):
        image_key(tmp_path / "missing.png")


# --- 8. relative sources -------------------------------------------------------------------------------------
def test_a_relative_source_stores_absolute_paths(photos, tiny_model, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(photos.parent)
    idx = tmp_path / "idx"
    index_ok(Path(photos.name), tiny_model, idx)
    items = IndexStore.open(idx).all_items().values()
    assert all(it.path is not None and Path(it.path).is_absolute() and Path(it.path).is_file() for it in items)
    monkeypatch.chdir(tmp_path.parent)
    assert f"0 updated, 0 removed, {N} unchanged" in index_ok(photos, tiny_model, idx).output
    assert_intact(idx, {p.name for p in photos.glob("*.png")})


def test_a_relative_manifest_stores_absolute_paths(tmp_path, monkeypatch) -> None:
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "pairs.jsonl", [{"id": "x", "image": "img/x.png", "caption": "c"}])
    monkeypatch.chdir(tmp_path)
    (pair,) = read_pairs(Path("data") / "pairs.jsonl")
    assert pair.image == tmp_path / "data" / "img" / "x.png"


# --- an index inside its own source --------------------------------------------------------------------------
def test_an_index_inside_the_source_folder_is_not_indexed(photos, tiny_model) -> None:
    idx = photos / "index"
    index_ok(photos, tiny_model, idx)
    (idx / "thumbs").mkdir(exist_ok=True)
    shutil.copy(photos / "synth-000000.png", idx / "thumbs" / "0123abcd.jpg")  # as the server caches them
    result = index_ok(photos, tiny_model, idx)
    assert f"0 added, 0 updated, 0 removed, {N} unchanged" in result.output
    assert_intact(idx, {p.name for p in photos.glob("*.png")})


def test_the_index_marker_files_are_the_stores_own() -> None:
    from retrieval.data.pairs import INDEX_FILES
    from retrieval.index.format import DB_FILE, MANIFEST_FILE

    assert set(INDEX_FILES) == {MANIFEST_FILE, DB_FILE}


# --- names shown to a terminal -------------------------------------------------------------------------------
def test_shown_escapes_control_characters_and_bytes_that_are_not_utf8() -> None:
    from retrieval.errors import shown

    assert shown("photos/café 1.png") == "photos/café 1.png"
    assert shown("a\nb\x1b[31mc") == "a\\nb\\x1b[31mc"
    assert shown(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"
