"""Shared fixtures: one small synthetic collection and one tiny model trained on it, made once per session.

Tests come in two tiers (pyproject.toml registers the marker): `pytest -m "not slow"` runs the fast unit tier,
plain `pytest` runs everything. Mark a test `slow` when it trains a model, builds an index with one, or starts
a server, Ray, a browser or a subprocess. A test that asks for a trained model (TRAINED_FIXTURES) is marked
slow here too, so a new test cannot pull a training run into the fast tier by accident.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from retrieval.cli.main import main
from retrieval.data.synth import generate
from retrieval.index import scan
from retrieval.index.format import Item, Manifest
from retrieval.index.store import IndexStore

TRAINED_FIXTURES = frozenset({"tiny_model", "served_index"})  # each trains the tiny model (about 10 s on 2 cores)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINED_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 synthetic scenes (240 train / 60 test): pairs.jsonl path."""
    return generate(tmp_path_factory.mktemp("synth"), 300, seed=1, size=48)


@pytest.fixture(scope="session")
def tiny_model(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset trained through the CLI, as a user would."""
    out = tmp_path_factory.mktemp("model") / "tiny"
    result = CliRunner().invoke(main, ["train", "--data", str(synth_data), "--out", str(out), "--preset", "tiny"])
    assert result.exit_code == 0, result.output
    return out


def read_log(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "train_log.jsonl").read_text().splitlines()]


def slowed(fn: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    """fn, taking at least `seconds` longer: a test that needs work to overlap or a clock to pass gets it on any
    machine, however fast."""

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return slow


SPLIT_FLOATS = 800  # the least a slice of a split scan holds under the `split` fixture


@pytest.fixture
def split(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Slices of SPLIT_FLOATS floats on up to 4 threads, so a small scan splits as a large one does. The list it
    gives grows each time a split hands a slice to the pool."""
    monkeypatch.setattr(scan, "SLICE_FLOATS", SPLIT_FLOATS)
    monkeypatch.setattr(scan, "slice_threads", lambda floats: 4)
    handed, pool = [], scan.scan_pool
    monkeypatch.setattr(scan, "scan_pool", lambda: handed.append(1) or pool())
    return handed


def faiss_flat(fids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
    """FAISS's own flat inner-product index of these vectors with these ids: the reference a scan is checked against."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(fids, dtype=np.int64))
    return index


def same_ranking(got: list[tuple[str, float]], want: list[tuple[str, float]], tol: float = 1e-5) -> None:
    """(id, score) lists alike: scores to float rounding, ids in the same order except where scores tie within
    that rounding (a batched call may add up a score in another order, so such items may change places)."""
    assert len(got) == len(want)
    assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=tol)
    for (i, _), (j, score) in zip(got, want, strict=True):
        if i != j:
            assert any(k == i and abs(t - score) <= tol for k, t in want), (i, j)


def store_of(path: Path, index_type: str, images: np.ndarray, texts: np.ndarray, parts: str = "") -> IndexStore:
    """Item j has images[j] and texts[j]; parts[j] == "i" (or "t") gives item j its image (or caption) only."""
    store = IndexStore.create(path, Manifest("no-model", "0" * 16, images.shape[1], index_type))
    items = [
        Item(
            0,
            f"item{j}",
            f"/x/{j}.png",
            [f"caption {j}"] * (kind != "i"),
            None if kind == "t" else f"i{j}",
            None if kind == "i" else f"t{j}",
        )
        for j, kind in enumerate(parts.ljust(len(images), "b"))
    ]
    store.commit(items, {**{f"i{j}": v for j, v in enumerate(images)}, **{f"t{j}": v for j, v in enumerate(texts)}})
    store.rebuild()
    return IndexStore.open(path)  # reads the FAISS file back, as a search process does


@pytest.fixture(scope="module")
def torch_single_thread():
    """One torch thread while a module encodes: on a 2-core machine shared with a training job, two
    OpenMP threads make each small encode about 100x slower (0.1 s per caption instead of 1 ms)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def awkward_rows(synth_data: Path) -> list[dict]:
    """The 300 scenes as manifest rows (absolute image paths) with the awkward cases: a text-only item
    (scene 3), an image-only item (scene 5), and ids that look like paths ("sub dir/scene 7", "../escape")."""
    rows = []
    for i, line in enumerate(synth_data.read_text().splitlines()):
        row = json.loads(line)
        row["image"] = str(synth_data.parent / row["image"])
        if i == 3:
            del row["image"]
        elif i == 5:
            del row["captions"]
        row["id"] = {7: "sub dir/scene 7", 8: "../escape"}.get(i, row["id"])
        rows.append(row)
    return rows


@pytest.fixture(scope="session")
def served_index(synth_data: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 300 scenes indexed for the server tests, with the awkward cases a server meets (`awkward_rows`)."""
    import torch

    from retrieval.index.build import BuildOptions, build_index

    root = tmp_path_factory.mktemp("served")
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in awkward_rows(synth_data)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see torch_single_thread
    try:
        report = build_index(root / "pairs.jsonl", tiny_model, root / "index", BuildOptions(progress=False))
    finally:
        torch.set_num_threads(threads)
    assert report.added == 300 and not report.skipped
    return root / "index"
