"""The index on disk: incremental updates, content addressing, model and writer guards, crash safety,
damaged files, index types, and the index / info / remove commands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

import retrieval.index.build as indexing
from retrieval.cli.main import main
from retrieval.errors import RetrievalError
from retrieval.index.build import BuildOptions, build_index, remove_items
from retrieval.index.faiss_ops import FLAT_MAX_ITEMS, choose_index_type
from retrieval.index.format import FORMAT_VERSION, Item, Manifest, read_manifest, upgraded
from retrieval.index.handle import Index
from retrieval.index.search import Hit
from retrieval.index.store import IndexStore
from retrieval.models.modeldir import fingerprint

pytestmark = pytest.mark.usefixtures("torch_single_thread")

N_FILES = 20


# --- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture
def folder(synth_data: Path, tmp_path: Path) -> Path:
    """20 synthetic images; the even ones have a sidecar caption file (their first caption)."""
    rows = [json.loads(line) for line in synth_data.read_text().splitlines()][:N_FILES]
    src = tmp_path / "photos"
    src.mkdir()
    for i, row in enumerate(rows):
        shutil.copy(synth_data.parent / row["image"], src / f"{row['id']}.png")
        if i % 2 == 0:
            (src / f"{row['id']}.txt").write_text(row["captions"][0] + "\n")
    return src


def build(source: Path, index_path: Path, model: Path, **options) -> indexing.IndexReport:
    return build_index(source, model, index_path, BuildOptions(progress=False, **options))


def summary(r: indexing.IndexReport) -> tuple[int, int, int, int]:
    return r.added, r.updated, r.removed, r.unchanged


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids each build sends to the encoder."""
    seen: list[str] = []
    real = indexing.encode_batch

    def spy(model, batch, *args):
        seen.extend(p.id for p in batch)
        return real(model, batch, *args)

    monkeypatch.setattr(indexing, "encode_batch", spy)
    return seen


@pytest.fixture
def model_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many images and texts the model encodes: content seen before must not be encoded again."""
    from retrieval.models.dual_encoder import DualEncoder

    calls = {"images": 0, "texts": 0}
    real_image, real_text = DualEncoder.encode_image, DualEncoder.encode_text

    def encode_image(self, images, *args, **kwargs):
        calls["images"] += len(images)
        return real_image(self, images, *args, **kwargs)

    def encode_text(self, texts, *args, **kwargs):
        calls["texts"] += len(texts)
        return real_text(self, texts, *args, **kwargs)

    monkeypatch.setattr(DualEncoder, "encode_image", encode_image)
    monkeypatch.setattr(DualEncoder, "encode_text", encode_text)
    return calls


def all_ids(index_path: Path) -> set[str]:
    return set(IndexStore.open(index_path).all_items())


def search_ids(index_path: Path, q: np.ndarray) -> list[str]:
    return [h.id for h in Index.open(index_path).search_vector(q, k=1000)]


def run_cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error_line(result, message: str) -> None:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error:") and message in lines[-1], result.output
    assert "Traceback" not in result.output


# --- incremental updates -------------------------------------------------------------------------
@pytest.mark.slow
def test_second_build_reports_all_unchanged_and_encodes_nothing(folder, tiny_model, tmp_path, encoded) -> None:
    idx = tmp_path / "idx"
    r = build(folder, idx, tiny_model)
    assert summary(r) == (N_FILES, 0, 0, 0) and r.skipped == [] and r.index_type == "flat"
    assert len(encoded) == N_FILES
    generation, faiss_mtime = IndexStore.open(idx).generation(), (idx / "vectors.faiss").stat().st_mtime_ns
    encoded.clear()
    r = build(folder, idx, tiny_model)
    assert summary(r) == (0, 0, 0, N_FILES)
    assert encoded == []
    assert IndexStore.open(idx).generation() == generation
    assert (idx / "vectors.faiss").stat().st_mtime_ns == faiss_mtime


@pytest.mark.slow
def test_add_change_delete(folder, synth_data, tiny_model, tmp_path, encoded, model_calls) -> None:
    idx = tmp_path / "idx"
    build(folder, idx, tiny_model)
    counts0 = IndexStore.open(idx).counts()
    assert counts0["items"] == N_FILES and counts0["with_text"] == N_FILES // 2

    # a new file: only it is encoded
    encoded.clear()
    shutil.copy(synth_data.parent / "images" / "synth-000100.png", folder / "new.png")
    r = build(folder, idx, tiny_model)
    assert summary(r) == (1, 0, 0, N_FILES) and encoded == ["new.png"]

    # a changed caption: the caption is encoded, the image (already stored) is not
    encoded.clear()
    (folder / "synth-000002.txt").write_text("a completely different caption\n")
    model_calls.update(images=0, texts=0)
    r = build(folder, idx, tiny_model)
    assert summary(r) == (0, 1, 0, N_FILES) and encoded == ["synth-000002.png"]
    assert model_calls == {"images": 0, "texts": 1}
    store = IndexStore.open(idx)
    assert store.items_by_id(["synth-000002.png"])["synth-000002.png"].captions == ["a completely different caption"]
    assert (
        store.counts()["stored_vectors"] == counts0["stored_vectors"] + 1
    )  # new.png; the old caption's vector is gone

    # a deleted sidecar: the item loses its text part, and its caption vector is collected
    (folder / "synth-000004.txt").unlink()
    r = build(folder, idx, tiny_model)
    assert summary(r) == (0, 1, 0, N_FILES)
    store = IndexStore.open(idx)
    item = store.items_by_id(["synth-000004.png"])["synth-000004.png"]
    assert item.text_key is None and item.captions == []
    assert store.counts()["stored_vectors"] == counts0["stored_vectors"]

    # a deleted file: removed, and gone from search, even for a query that is its own image vector
    gone = store.items_by_id(["synth-000007.png"])["synth-000007.png"]
    q = store.part_vectors([gone.fid])[gone.fid][0]
    assert search_ids(idx, q)[0] == "synth-000007.png"
    (folder / "synth-000007.png").unlink()
    r = build(folder, idx, tiny_model)
    assert summary(r) == (0, 0, 1, N_FILES)
    assert "synth-000007.png" not in all_ids(idx)
    assert "synth-000007.png" not in search_ids(idx, q)
    assert len(search_ids(idx, q)) == N_FILES


@pytest.mark.slow
def test_identical_files_store_one_image_vector(folder, tiny_model, tmp_path, model_calls) -> None:
    idx = tmp_path / "idx"
    build(folder, idx, tiny_model)
    assert model_calls == {"images": N_FILES, "texts": N_FILES // 2}
    before = IndexStore.open(idx).counts()
    assert before["stored_vectors"] == N_FILES + N_FILES // 2  # 20 distinct images, 10 distinct captions
    shutil.copy(folder / "synth-000003.png", folder / "copy-of-3.png")
    model_calls.update(images=0, texts=0)
    r = build(folder, idx, tiny_model)
    assert summary(r) == (1, 0, 0, N_FILES)
    assert model_calls == {"images": 0, "texts": 0}  # its content is already stored
    store = IndexStore.open(idx)
    after = store.counts()
    assert after["items"] == before["items"] + 1 and after["with_image"] == before["with_image"] + 1
    assert after["stored_vectors"] == before["stored_vectors"]
    items = store.items_by_id(["synth-000003.png", "copy-of-3.png"])
    assert items["synth-000003.png"].image_key == items["copy-of-3.png"].image_key


@pytest.mark.slow
def test_exclude_glob(folder, tiny_model, tmp_path) -> None:
    idx = tmp_path / "idx"
    r = build(folder, idx, tiny_model, exclude=["synth-00000[0-4].png", "*-000019.*"])
    assert summary(r) == (N_FILES - 6, 0, 0, 0)
    ids = all_ids(idx)
    assert not any(i.startswith(("synth-000000", "synth-000004", "synth-000019")) for i in ids)
    assert "synth-000005.png" in ids
    # leaving the glob out again brings the files in; excluding one later removes it
    assert summary(build(folder, idx, tiny_model)) == (6, 0, 0, N_FILES - 6)
    result = run_cli("index", folder, "--model", tiny_model, "--index", idx, "--exclude", "synth-000011.png")
    assert result.exit_code == 0, result.output
    assert "0 added, 0 updated, 1 removed, 19 unchanged" in result.output
    assert "synth-000011.png" not in all_ids(idx)


# --- guards: model, writer ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with slightly perturbed weights: same architecture, a different fingerprint."""
    import torch

    from retrieval.models.dual_encoder import save_model
    from retrieval.models.load import load_model

    model = load_model(tiny_model)
    with torch.no_grad():
        model.text_proj.weight.add_(1e-3 * torch.randn_like(model.text_proj.weight))
    return save_model(model, tmp_path_factory.mktemp("other") / "model")


@pytest.mark.slow
def test_model_mismatch_is_refused_naming_both_fingerprints(folder, tiny_model, other_model, tmp_path) -> None:
    idx = tmp_path / "idx"
    build(folder, idx, tiny_model)
    built_with, other = fingerprint(tiny_model), fingerprint(other_model)
    assert built_with != other
    with pytest.raises(RetrievalError, match="model mismatch") as e:
        build(folder, idx, other_model)
    assert built_with in str(e.value) and other in str(e.value)
    with pytest.raises(RetrievalError, match="model mismatch") as e:
        Index.open(idx, model=other_model)
    assert built_with in str(e.value) and other in str(e.value)
    assert Index.open(idx, model=tiny_model).store.counts()["items"] == N_FILES


@pytest.mark.slow
def test_second_writer_is_refused(folder, tiny_model, tmp_path) -> None:
    """flock belongs to the open file description, so a second open() conflicts even in one process."""
    idx = tmp_path / "idx"
    build(folder, idx, tiny_model)
    (folder / "synth-000001.png").unlink()
    store = IndexStore.open(idx)
    with store.writer():
        with pytest.raises(RetrievalError, match="another process is writing"):
            build(folder, idx, tiny_model)
        with pytest.raises(RetrievalError, match="another process is writing"):
            remove_items(idx, ["synth-000002.png"])
        assert len(all_ids(idx)) == N_FILES
    # released: the writer's change goes through now
    assert summary(build(folder, idx, tiny_model)) == (0, 0, 1, N_FILES - 1)


# --- crash safety ------------------------------------------------------------------------------------
CRASH_SCRIPT = """
import sys, time
import torch
torch.set_num_threads(1)
import retrieval.index.build as indexing
real = indexing.encode_batch
def slow(*args):  # widen the window between commits so the kill lands mid-build
    time.sleep(0.2)
    return real(*args)
indexing.encode_batch = slow
indexing.build_index(sys.argv[1], sys.argv[2], sys.argv[3], indexing.BuildOptions(batch_size=64, progress=False))
print("finished")
"""


def committed_items(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.Error:
        return 0  # not created yet


@pytest.mark.slow
def test_killed_build_leaves_a_readable_index_and_resumes(tiny_model, tmp_path) -> None:
    from retrieval.data.synth import generate

    n = 1500
    pairs = generate(tmp_path / "big", n, seed=3, size=48)
    idx = tmp_path / "idx"
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_SCRIPT, str(pairs), str(tiny_model), str(idx)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while committed_items(idx / "items.sqlite") < 2 * 64:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the build never committed two batches"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and "finished" not in out

    done = committed_items(idx / "items.sqlite")
    assert 2 * 64 <= done < n and done % 64 == 0, done  # whole batches only
    store = IndexStore.open(idx)
    assert store.counts()["items"] == done
    assert not (idx / "vectors.faiss").exists()  # the FAISS cache is written at the end only

    index = Index.open(idx)
    rng = np.random.default_rng(0)
    q = rng.standard_normal(store.manifest.dim).astype(np.float32)
    q /= np.linalg.norm(q)
    hits = index.search_vector(q, k=n)  # every FAISS hit must have its metadata row
    assert len(hits) == done and {h.id for h in hits} == set(store.all_items())
    assert len(index.search_vector(q, k=None, theta=-1.0, target="text")) == done

    r = build(pairs, idx, tiny_model, batch_size=64)
    assert (r.added, r.unchanged, r.updated, r.removed) == (n - done, done, 0, 0)
    store = IndexStore.open(idx)
    assert store.counts()["items"] == n and store.manifest.generation == store.generation()
    assert len(Index.open(idx).search_vector(q, k=n)) == n


# --- damaged or foreign folders ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "file, damage",
    [
        *[
            (f, d)
            for f in ("vectors.faiss", "fids.npy", "vectors.npy", "records.npy", "records.jsonl")
            for d in ("truncated", "garbage", "empty")
        ],
    ],
)
@pytest.mark.slow
def test_damaged_derived_file_is_rebuilt_from_sqlite(folder, tiny_model, tmp_path, file: str, damage: str) -> None:
    idx = tmp_path / "idx"
    build(folder, idx, tiny_model)
    store = IndexStore.open(idx)
    qs = [v for fid in (1, 2, 3) for v in store.part_vectors([fid])[fid] if v is not None]

    def results(index: Index) -> list:
        return [
            [
                (h.id, h.path, h.captions, h.extra, h.score, h.image_score, h.text_score)
                for h in index.search_vector(q, k=10, target=t)
            ]
            for q in qs
            for t in ("item", "text")
        ]

    before = results(Index.open(idx))
    if file != "vectors.faiss":
        assert (idx / file).is_file(), f"expected the index to write {file}"
    data = (idx / file).read_bytes()
    (idx / file).write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage]
    )
    assert results(Index.open(idx)) == before


def test_result_records_file_equals_the_database(tmp_path) -> None:
    """The memory-mapped records and SQLite give the same rows: images, text-only items, extra fields, unicode."""
    store = IndexStore.create(tmp_path / "idx", Manifest("no-model", "0" * 16, 4, "flat"))
    v = np.eye(4, dtype=np.float32)
    store.commit(
        [
            Item(0, "a", "/x/a.png", ["un chat \u00e9", "line\nbreak"], "i0", "t0", extra={"n": 1, "tags": ["x"]}),
            Item(0, "b", None, ["text only"], None, "t1"),
            Item(0, "c", "/x/c.png", [], "i2", None),
        ],
        {"i0": v[0], "t0": v[1], "t1": v[2], "i2": v[3]},
    )
    store.rebuild()
    store = IndexStore.open(tmp_path / "idx")
    fids = [3, 1, 2, 1]  # in the order asked, a repeat included
    assert store.records is not None
    from_file = store.result_records(fids)
    store._records = None
    store._files_current = lambda: False  # as when the files lag the database: SQLite answers
    assert store.records is None
    assert from_file == store.result_records(fids)
    assert from_file[1] == Hit(
        id="a",
        path="/x/a.png",
        captions=["un chat \u00e9", "line\nbreak"],
        has_image=True,
        has_caption=True,
        extra={"n": 1, "tags": ["x"]},
    )
    assert from_file[3] == from_file[1] and from_file[3] is not from_file[1]  # each result is scored on its own
    assert (from_file[2].path, from_file[2].captions, from_file[2].has_image, from_file[2].has_caption) == (
        None,
        ["text only"],
        False,
        True,
    )
    assert (from_file[0].has_image, from_file[0].has_caption) == (True, False)
    assert {(h.score, h.image_score, h.text_score) for h in from_file} == {(0.0, None, None)}  # not yet scored


@pytest.mark.parametrize(
    "damaged",
    [
        b'["b",null,["t"],0,1,{},7.0,0.99]',  # parses, with values for fields the file never holds
        b'["b",null,["t"],0,1,{}],["c",null,[],1,0,{}]',  # parses, as two records
    ],
)
def test_a_damaged_records_line_never_reaches_a_result(tmp_path, damaged: bytes) -> None:
    """Before: the first line gave a text-only item an image score of 0.99, the second crashed the search."""
    store = IndexStore.create(tmp_path / "idx", Manifest("no-model", "0" * 16, 4, "flat"))
    v = np.eye(4, dtype=np.float32)
    store.commit(
        [Item(0, "a", "/x/a.png", ["c"], "i0", "t0"), Item(0, "b", None, ["t"], None, "t1")],
        {"i0": v[0], "t0": v[1], "t1": v[2]},
    )
    store.rebuild()
    index = Index(IndexStore.open(tmp_path / "idx"), tmp_path)
    want = [(h.id, h.score, h.image_score, h.text_score) for h in index.search_vector(v[2], k=5)]
    assert want[0] == ("b", pytest.approx(1.0), None, pytest.approx(1.0))
    lines = bytes(index.store.records[1]).splitlines()
    lines[1] = damaged
    index.store._records = (np.cumsum([0] + [len(line) + 1 for line in lines]), b"".join(x + b"\n" for x in lines))
    assert [(h.id, h.score, h.image_score, h.text_score) for h in index.search_vector(v[2], k=5)] == want


@pytest.mark.slow
def test_newer_format_asks_to_upgrade(folder, tiny_model, tmp_path) -> None:
    idx = tmp_path / "idx"
    build(folder, idx, tiny_model)
    manifest = json.loads((idx / "manifest.json").read_text())
    (idx / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    for open_it in (IndexStore.open, Index.open, lambda p: build(folder, p, tiny_model)):
        with pytest.raises(RetrievalError, match=r"format 99.*upgrade retrieval"):
            open_it(idx)
    assert_one_error_line(run_cli("info", "--index", idx), "upgrade retrieval")


@pytest.mark.slow
def test_a_format_1_index_is_read_and_written_as_the_current_format(folder, tiny_model, tmp_path) -> None:
    """Format 2 adds manifest fields a format 1 reader would fail on; a format 1 index (without them) is read as
    it is, and its next change writes the current format, so an older retrieval says to upgrade."""
    idx = tmp_path / "idx"
    build(folder, idx, tiny_model)
    manifest = json.loads((idx / "manifest.json").read_text())
    old = {k: v for k, v in manifest.items() if k not in ("image_precision", "faiss_digest")} | {"format_version": 1}
    (idx / "manifest.json").write_text(json.dumps(old))
    assert Index.open(idx).search(text="a red circle", k=3)
    remove_items(idx, [next(iter(IndexStore.open(idx).all_items()))])
    assert json.loads((idx / "manifest.json").read_text())["format_version"] == FORMAT_VERSION == 3


def test_upgraded_fills_in_what_later_formats_added() -> None:
    old = {"format_version": 1, "model": "m", "fingerprint": "f", "dim": 4, "generation": 3}
    assert upgraded(old) == {**old, "format_version": 3, "image_precision": "", "faiss_digest": ""}
    current = {**old, "format_version": 3, "image_precision": "bf16", "faiss_digest": "abc"}
    assert upgraded(current) == current  # nothing to fill in: the stored values stand
    assert upgraded({**current, "format_version": 2}) == current  # 2 -> 3 only adds an index type


def test_a_format_0_manifest_is_refused(tmp_path) -> None:
    idx = tmp_path / "idx"
    IndexStore.create(idx, Manifest("m", "f", 4))
    manifest = json.loads((idx / "manifest.json").read_text())
    (idx / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(RetrievalError, match="format 0, which never existed; rebuild"):
        read_manifest(idx)


def test_folder_that_is_not_an_index(tmp_path) -> None:
    (tmp_path / "photos").mkdir()
    for open_it in (IndexStore.open, Index.open):
        with pytest.raises(RetrievalError, match="is not an index"):
            open_it(tmp_path / "photos")
    assert_one_error_line(run_cli("search", "--index", tmp_path / "photos", "--text", "a red circle"), "not an index")
    assert_one_error_line(run_cli("remove", "--index", tmp_path / "photos", "x.png"), "not an index")


@pytest.mark.slow
def test_unreadable_source_files_are_skipped_and_listed(folder, tiny_model, tmp_path) -> None:
    data = (folder / "synth-000001.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 3])
    (folder / "notes.jpg").write_text("this is a text file with a .jpg name\n")
    idx = tmp_path / "idx"
    r = build(folder, idx, tiny_model)
    assert summary(r) == (N_FILES, 0, 0, 0)
    assert len(r.skipped) == 2
    assert any("truncated.png" in m for m in r.skipped) and any("notes.jpg" in m for m in r.skipped)
    assert all_ids(idx) == {f"synth-{i:06d}.png" for i in range(N_FILES)}
    result = run_cli("index", folder, "--model", tiny_model, "--index", tmp_path / "idx2")
    assert result.exit_code == 0, result.output
    assert "skipped 2 item(s), each with its reason:" in result.output and "notes.jpg" in result.output


@pytest.mark.slow
def test_empty_source_folder(tiny_model, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RetrievalError, match="no images found"):
        build(tmp_path / "empty", tmp_path / "idx", tiny_model)
    assert not (tmp_path / "idx").exists()


# --- index types --------------------------------------------------------------------------------------
def test_choose_index_type() -> None:
    gib = 2**30
    assert choose_index_type(0, 128, 4 * gib) == "flat"
    assert choose_index_type(FLAT_MAX_ITEMS, 128, 4 * gib) == "flat"
    assert choose_index_type(FLAT_MAX_ITEMS + 1, 128, 4 * gib) == "hnsw"
    assert choose_index_type(1_000_000, 128, 4 * gib) == "hnsw"  # 1M x (1 KiB vectors + 512 B graph) fits
    assert choose_index_type(1_000_000, 128, 1 * gib) == "ivfpq"
    assert choose_index_type(10_000_000, 256, 4 * gib) == "ivfpq"


def clustered_store(path: Path, index_type: str, rng_seed: int = 0, n: int = 2000, d: int = 32) -> IndexStore:
    """n items whose image and caption vectors scatter around 40 shared centres."""
    rng = np.random.default_rng(rng_seed)
    centres = rng.standard_normal((40, d))

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    images = unit(centres[np.arange(n) % 40] + 0.6 * rng.standard_normal((n, d)))
    texts = unit(centres[np.arange(n) % 40] + 0.6 * rng.standard_normal((n, d)))
    store = IndexStore.create(path, Manifest("no-model", "0" * 16, d, index_type))
    vectors = {**{f"i{j}": v for j, v in enumerate(images)}, **{f"t{j}": v for j, v in enumerate(texts)}}
    store.commit([Item(0, f"item{j}", f"/x/{j}.png", [f"caption {j}"], f"i{j}", f"t{j}") for j in range(n)], vectors)
    store.rebuild()
    return IndexStore.open(path)


@pytest.mark.parametrize("index_type, inner", [("hnsw", faiss.IndexHNSW), ("ivf", faiss.IndexIVF)])
def test_approximate_index_recall_against_flat(tmp_path, index_type: str, inner: type) -> None:
    flat = Index(clustered_store(tmp_path / "flat", "flat"), tmp_path)
    ann = Index(clustered_store(tmp_path / index_type, index_type), tmp_path)
    assert isinstance(faiss.downcast_index(ann.store.faiss.index), inner)
    rng = np.random.default_rng(1)
    recalls = []
    for q in rng.standard_normal((40, 32)).astype(np.float32):
        q /= np.linalg.norm(q)
        want = {h.id for h in flat.search_vector(q, k=10)}
        got = [h.id for h in ann.search_vector(q, k=10)]
        assert len(got) == 10
        recalls.append(len(want & set(got)) / 10)
    assert np.mean(recalls) >= 0.9, np.mean(recalls)


@pytest.mark.parametrize("index_type, knob, low, high", [("hnsw", "ef_search", 1, 512), ("ivf", "nprobe", 1, 10_000)])
def test_tuning_the_search_knob_trades_recall(tmp_path, index_type: str, knob: str, low: int, high: int) -> None:
    """At the lowest setting an ANN index misses neighbours; at the highest it finds what flat finds."""
    flat = Index(clustered_store(tmp_path / "flat", "flat"), tmp_path)
    ann = Index(clustered_store(tmp_path / index_type, index_type), tmp_path)
    qs = np.random.default_rng(1).standard_normal((40, 32)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    want = [{h.id for h in hits} for hits in flat.search_vectors(qs, k=10)]

    def recall() -> float:
        return float(
            np.mean(
                [len(w & {h.id for h in hits}) / 10 for w, hits in zip(want, ann.search_vectors(qs, k=10), strict=True)]
            )
        )

    ann.tune(**{knob: low})
    low_recall = recall()
    ann.tune(**{knob: high})
    assert recall() == 1.0 and low_recall < 0.9, low_recall
    with pytest.raises(RetrievalError, match=f"{knob} must be a whole number from 1 to 2147483647, got 0"):
        ann.tune(**{knob: 0})


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
@pytest.mark.parametrize("target", ["item", "text"])
def test_exact_on_an_ann_index_equals_flat(tmp_path, index_type: str, target: str) -> None:
    """With the knob at its worst, θ and top-k miss items; exact=True finds exactly what flat finds."""
    flat = Index(clustered_store(tmp_path / "flat", "flat"), tmp_path)
    ann = Index(clustered_store(tmp_path / index_type, index_type), tmp_path)
    ann.tune(ef_search=1, nprobe=1)
    q = np.random.default_rng(2).standard_normal(32).astype(np.float32)
    q /= np.linalg.norm(q)
    theta = flat.search_vector(q, k=200, target=target)[-1].score
    for k, th in [(None, theta), (50, theta), (100, None)]:
        want = [(h.id, round(h.score, 5)) for h in flat.search_vector(q, k=k, theta=th, target=target)]
        assert [
            (h.id, round(h.score, 5)) for h in ann.search_vector(q, k=k, theta=th, target=target, exact=True)
        ] == want
        assert len(ann.search_vector(q, k=k, theta=th, target=target)) <= len(want)
    above = len(flat.search_vector(q, k=None, theta=theta, target=target))
    assert len(ann.search_vector(q, k=None, theta=theta, target=target)) < above  # approximate: some are missed


# --- CLI ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_index_info_remove(folder, tiny_model, tmp_path) -> None:
    idx = tmp_path / "idx"
    result = run_cli("index", folder, "--model", tiny_model, "--index", idx)
    assert result.exit_code == 0, result.output
    assert f"{N_FILES} added, 0 updated, 0 removed, 0 unchanged (flat" in result.output

    result = run_cli("info", "--index", idx)
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["counts"]["items"] == N_FILES and info["counts"]["with_text"] == N_FILES // 2
    assert info["index_type"] == "flat" and info["fingerprint"] == fingerprint(tiny_model)
    assert info["dim"] == 64 and info["format_version"] == FORMAT_VERSION

    result = run_cli("remove", "--index", idx, "synth-000003.png", "nope.png")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "removed 1 item(s); not found: nope.png"
    assert "synth-000003.png" not in all_ids(idx)
    store = IndexStore.open(idx)
    assert store.counts()["items"] == N_FILES - 1 and store.manifest.counts["items"] == N_FILES - 1
    q = np.ones(64, np.float32) / 8
    assert "synth-000003.png" not in search_ids(idx, q) and len(search_ids(idx, q)) == N_FILES - 1

    result = run_cli("remove", "--index", idx, "nope.png")
    assert result.exit_code == 0 and result.output.strip() == "removed 0 item(s); not found: nope.png"


# --- regressions: bugs found and fixed -----------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field, value",
    [({"index_type": "hnsw"}, "index_type", "hnsw"), ({"params": {"ef_search": 7}}, "params", {"ef_search": 7})],
)
@pytest.mark.slow
def test_changing_type_or_params_of_an_unchanged_index_is_applied(
    folder, tiny_model, tmp_path, kwargs, field, value
) -> None:
    idx = tmp_path / "idx"
    build(folder, idx, tiny_model)
    r = build(folder, idx, tiny_model, **kwargs)
    assert summary(r) == (0, 0, 0, N_FILES)
    assert getattr(read_manifest(idx), field) == value


@pytest.mark.slow
def test_unknown_index_type_is_refused_before_anything_is_written(folder, tiny_model, tmp_path) -> None:
    with pytest.raises(RetrievalError, match="unknown index type"):
        build(folder, tmp_path / "idx", tiny_model, index_type="bogus")
    assert not (tmp_path / "idx" / "manifest.json").exists()


@pytest.mark.slow
def test_ivfpq_on_a_small_collection_is_refused_with_the_fix(folder, tiny_model, tmp_path) -> None:
    """ivfpq trains 256 centroids per sub-quantizer: 20 items are refused before anything is written."""
    result = run_cli("index", folder, "--model", tiny_model, "--index", tmp_path / "idx", "--index-type", "ivfpq")
    assert result.exit_code == 1, result.output
    assert f"ivfpq needs at least 256 items to train on, the source has {N_FILES}; use flat" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "idx" / "manifest.json").exists()


@pytest.mark.slow
def test_ivf_on_too_few_items_is_refused_before_anything_is_written(folder, tiny_model, tmp_path) -> None:
    result = run_cli("index", folder, "--model", tiny_model, "--index", tmp_path / "idx", "--index-type", "ivf")
    assert result.exit_code == 1 and "needs at least 39 items" in result.output and "use flat" in result.output
    assert not (tmp_path / "idx" / "manifest.json").exists()


@pytest.mark.slow
def test_removing_every_item_of_an_ivf_index(synth_data, tiny_model, tmp_path) -> None:
    """The index shrinks below what IVF can train on: it falls back to exact search, never a traceback."""
    idx = tmp_path / "idx"
    build(synth_data, idx, tiny_model, index_type="ivf")
    ids = sorted(all_ids(idx))
    assert run_cli("remove", "--index", idx, *ids[:-5]).exit_code == 0
    assert len(Index.open(idx).search(like=ids[-1], k=10)) == 5
    result = run_cli("remove", "--index", idx, *ids[-5:])
    assert result.exit_code == 0, repr(result.exception)
    assert IndexStore.open(idx).counts()["items"] == 0


@pytest.mark.slow
def test_sub_second_mtimes_survive_the_round_trip(folder, tiny_model, tmp_path) -> None:
    for path in folder.iterdir():
        os.utime(path, ns=(path.stat().st_mtime_ns, 1_700_000_000_123_456_789))
    idx = tmp_path / "idx"
    build(folder, idx, tiny_model)
    item = IndexStore.open(idx).all_items()["synth-000000.png"]
    assert item.mtime_ns == (folder / "synth-000000.png").stat().st_mtime_ns
    assert summary(build(folder, idx, tiny_model)) == (0, 0, 0, N_FILES)


@pytest.mark.slow
def test_manifest_rows_with_extra_fields_are_unchanged_on_a_rerun(synth_data, tiny_model, tmp_path) -> None:
    """Extra fields (floats included) come back from the database exactly, so unchanged rows stay unchanged."""
    rows = [json.loads(line) for line in synth_data.read_text().splitlines()][:5]
    (tmp_path / "images").mkdir()
    for row in rows:
        shutil.copy(synth_data.parent / row["image"], tmp_path / row["image"])
        row["score"], row["tags"] = 0.12345678901234567, {"nested": [1.5e-300, "x"]}
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    idx = tmp_path / "idx"
    build(tmp_path / "pairs.jsonl", idx, tiny_model)
    extra = IndexStore.open(idx).all_items()[rows[0]["id"]].extra
    assert extra["score"] == 0.12345678901234567 and extra["tags"] == {"nested": [1.5e-300, "x"]}
    assert summary(build(tmp_path / "pairs.jsonl", idx, tiny_model)) == (0, 0, 0, 5)


@pytest.mark.parametrize("kept", [(*range(50), 60), (0, 600, 1199)])  # dense ids: the row table; sparse: binary search
def test_rows_of_maps_ids_to_rows_and_a_missing_id_means_the_index_changed(tmp_path, kept) -> None:
    """rows_of answers from a fid -> row table while ids are dense, by binary search once removals made them
    sparse; either way an id the store does not hold says the index changed since it was opened."""
    n = 1200
    vecs = np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)
    store = IndexStore.create(tmp_path / "idx", Manifest("m", "f", 4))
    store.commit(
        [Item(0, f"x{i}", None, [f"c{i}"], None, f"t{i}") for i in range(n)], {f"t{i}": vecs[i] for i in range(n)}
    )
    store.commit([], {}, [f"x{i}" for i in range(n) if i not in kept])
    fids = store.vectors[0]
    assert fids.tolist() == [i + 1 for i in kept]
    assert (store._row_table(fids) is None) == (len(kept) == 3)  # 3 items with ids up to 1200: no table
    wanted = fids[::-1]
    assert store.rows_of(wanted).tolist() == list(range(len(fids)))[::-1]
    assert np.array_equal(store.fused_vectors(wanted)[:, 4:], vecs[wanted - 1])
    for missing in [56, 0, n + 1, -1, -7, 2**63 - 1]:  # removed (in the table's range if any), never was, negative
        with pytest.raises(RetrievalError, match="changed since it was opened"):
            store.rows_of([int(fids[0]), missing])
