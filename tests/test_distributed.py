"""Distributed indexing: embedding shards, their merge into one IVF index (in memory and on disk), search
under --max-memory, and the Ray engine against the single-machine path (Ray on this machine, 2 CPUs).

The Ray tests skip when ray is not installed (`pip install 'retrieval[distributed]'`); the merge tests
need only pyarrow, which comes with it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import awkward_rows

from retrieval.cli.main import main
from retrieval.errors import RetrievalError
from retrieval.index.faiss_ops import fused
from retrieval.index.format import Item, Manifest
from retrieval.index.handle import Index
from retrieval.index.store import IndexStore

pytest.importorskip("pyarrow", reason="shards are Parquet: pip install 'retrieval[distributed]'")

from retrieval.scale.merge import merge_shards
from retrieval.scale.shards import FORMAT_VERSION as SHARD_FORMAT
from retrieval.scale.shards import plan_shards, read_shard, read_skipped, write_shard

pytestmark = pytest.mark.usefixtures("torch_single_thread")
SHARD_SIZE = 80


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def run_cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def ranking(hits) -> list[tuple[str, float]]:
    return [(h.id, round(h.score, 5)) for h in hits]


# --- the merge, without Ray --------------------------------------------------------------------------
@pytest.fixture
def random_shards(tmp_path: Path) -> tuple[Path, list[str], list[Item], dict[str, np.ndarray]]:
    """900 items with random image and caption vectors (d = 16) in three shards; some items lack a part."""
    rng, d, n = np.random.default_rng(0), 16, 900
    images, texts = unit(rng.standard_normal((n, d))), unit(rng.standard_normal((n, d)))
    no_image, no_text = [j % 7 == 3 for j in range(n)], [j % 5 == 2 and j % 7 != 3 for j in range(n)]
    items = [
        Item(
            0,
            f"item{j}",
            None if no_image[j] else f"/x/{j}.png",
            [] if no_text[j] else [f"caption {j}"],
            None if no_image[j] else f"i{j}",
            None if no_text[j] else f"t{j}",
            extra={"j": j},
        )
        for j in range(n)
    ]
    vectors = {**{f"i{j}": v for j, v in enumerate(images)}, **{f"t{j}": v for j, v in enumerate(texts)}}
    names = []
    for k in range(3):
        part = items[300 * k : 300 * (k + 1)]
        rows = np.stack([fused(vectors.get(it.image_key), vectors.get(it.text_key)) for it in part])
        write_shard(tmp_path / "shards", f"s{k}", part, rows, [f"cannot read image /x/bad{k}.png"])
        names.append(f"s{k}")
    return tmp_path / "shards", names, items, vectors


def flat_store(path: Path, items: list[Item], vectors: dict[str, np.ndarray]) -> IndexStore:
    store = IndexStore.create(path, Manifest("no-model", "0" * 16, 16, "flat"))
    store.commit(items, vectors)
    store.rebuild()
    return IndexStore.open(path)


@pytest.mark.parametrize("on_disk", [False, True])
def test_merged_shards_answer_as_one_flat_index(random_shards, tmp_path: Path, on_disk: bool) -> None:
    shard_dir, names, items, vectors = random_shards
    store = IndexStore.create(tmp_path / "merged", Manifest("no-model", "0" * 16, 16, "ivf", {"nprobe": 10_000}))
    with store.writer():
        report = merge_shards(store, shard_dir, names, on_disk=on_disk)
    assert (report.added, report.removed, report.on_disk) == (900, 0, on_disk)
    assert report.skipped == [f"cannot read image /x/bad{k}.png" for k in range(3)]

    merged = IndexStore.open(tmp_path / "merged")
    assert merged.manifest.generation == merged.generation() and merged.manifest.counts["items"] == 900
    ivf = faiss.extract_index_ivf(merged.faiss)
    assert isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists) == on_disk
    assert (len(list((tmp_path / "merged").glob("*.ivfdata"))) == 1) == on_disk
    # the derived files are those a rebuild from SQLite would write: FAISS ids are the items' fids
    fids, from_db = merged.all_vectors()
    assert np.array_equal(merged.vectors[0], fids) and np.array_equal(np.asarray(merged.vectors[1]), from_db)
    from_file = merged.result_records(fids)
    merged._records = False  # as for a damaged records file: SQLite answers
    assert merged.result_records(fids) == from_file
    flat = Index(flat_store(tmp_path / "flat", items, vectors), tmp_path)
    ann = Index(merged, tmp_path)
    qs = unit(np.random.default_rng(1).standard_normal((8, 16)))
    for target in ("item", "image", "text"):  # the same answers; scores to float rounding (BLAS sums in its order)
        for args in ({"k": 10}, {"k": None, "theta": 0.3}):
            for a, b in zip(
                ann.search_vectors(qs, target=target, **args),
                flat.search_vectors(qs, target=target, **args),
                strict=True,
            ):
                assert [h.id for h in a] == [h.id for h in b]
                np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


def test_a_repeated_merge_is_skipped_and_a_smaller_one_removes_items(random_shards, tmp_path: Path) -> None:
    shard_dir, names, _, _ = random_shards
    store = IndexStore.create(tmp_path / "merged", Manifest("no-model", "0" * 16, 16, "ivf"))
    with store.writer():
        merge_shards(store, shard_dir, names, on_disk=True)
        again = merge_shards(store, shard_dir, names, on_disk=True)
        assert (again.added, again.unchanged) == (0, 900)
        fewer = merge_shards(store, shard_dir, names[:2], max_memory=2**40)  # fits the budget: back in memory
    assert (fewer.updated, fewer.removed, fewer.on_disk) == (600, 300, False)
    assert not list((tmp_path / "merged").glob("*.ivfdata"))  # the old on-disk lists went with their generation
    merged = IndexStore.open(tmp_path / "merged")
    assert merged.counts()["items"] == 600 and merged.faiss.ntotal == 600
    assert set(merged.all_items()) == {f"item{j}" for j in range(600)}


def test_a_damaged_shard_is_an_error_naming_it(random_shards, tmp_path: Path) -> None:
    shard_dir, _, _, _ = random_shards
    np.save(shard_dir / "s1.npy", np.zeros((5, 32), np.float32))  # the marker says 300 rows
    with pytest.raises(RetrievalError, match=r"s1 is damaged.*delete its files and re-run"):
        read_shard(shard_dir, "s1")


def test_shards_carry_a_format_version_and_a_newer_one_is_refused(random_shards) -> None:
    shard_dir, _, items, _ = random_shards
    marker = shard_dir / "s1.json"
    summary = json.loads(marker.read_text())
    assert summary["format_version"] == SHARD_FORMAT == 1
    del summary["format_version"]  # as written before shards carried a version: read as format 1
    marker.write_text(json.dumps(summary))
    assert [it.id for it in read_shard(shard_dir, "s1").items] == [it.id for it in items[300:600]]
    marker.write_text(json.dumps({**summary, "format_version": SHARD_FORMAT + 1}))
    for read in (read_shard, read_skipped):
        with pytest.raises(RetrievalError, match=r"s1 is format 2.*upgrade retrieval, or delete the shard folder"):
            read(shard_dir, "s1")


def test_shard_names_follow_content(synth_data: Path) -> None:
    from retrieval.index.build import list_source

    pairs = list_source(synth_data)
    a, b = plan_shards(pairs, 100, "fp"), plan_shards(pairs, 100, "other-fp")
    assert [len(p) for _, p in a] == [100, 100, 100] and a == plan_shards(pairs, 100, "fp")
    assert all(x[0] != y[0] for x, y in zip(a, b, strict=True))  # another model: other shards
    changed = [pairs[0].__class__(pairs[0].id, pairs[0].image, ("new caption",)), *pairs[1:]]
    assert [n for n, _ in plan_shards(changed, 100, "fp")][1:] == [n for n, _ in a][1:]
    assert plan_shards(changed, 100, "fp")[0][0] != a[0][0]


# --- search under a memory budget ----------------------------------------------------------------------
def test_an_ivf_index_over_max_memory_is_searched_memory_mapped(random_shards, tmp_path: Path) -> None:
    _, _, items, vectors = random_shards
    store = IndexStore.create(tmp_path / "ivf", Manifest("no-model", "0" * 16, 16, "ivf", {"nprobe": 10_000}))
    store.commit(items, vectors)
    store.rebuild()
    qs = unit(np.random.default_rng(2).standard_normal((4, 16)))
    in_memory = Index(IndexStore.open(tmp_path / "ivf"), tmp_path)
    mapped = Index(IndexStore.open(tmp_path / "ivf", max_memory=1024), tmp_path)
    assert isinstance(
        faiss.downcast_InvertedLists(faiss.extract_index_ivf(mapped.store.faiss).invlists), faiss.OnDiskInvertedLists
    )
    assert [ranking(h) for h in mapped.search_vectors(qs, k=10)] == [
        ranking(h) for h in in_memory.search_vectors(qs, k=10)
    ]
    with pytest.raises(RetrievalError, match=r"exact answer .* over --max-memory .*raise --max-memory"):
        mapped.search_vectors(qs, k=10, exact=True)
    flat = flat_store(tmp_path / "flat", items, vectors)
    with pytest.raises(RetrievalError, match=r"the flat index .*only ivf and ivfpq search from disk"):
        Index(IndexStore.open(flat.path, max_memory=1024), tmp_path).search_vectors(qs, k=1)


# --- the Ray engine ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    """Ray on this machine with 2 CPUs, started once for the module (the engine uses it as it finds it)."""
    ray = pytest.importorskip("ray", reason="pip install 'retrieval[distributed]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def source(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 300 scenes with conftest's awkward cases, and one truncated image file."""
    root = tmp_path_factory.mktemp("source")
    rows = awkward_rows(synth_data)
    data = Path(rows[0]["image"]).read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 3])
    rows.append({"id": "truncated", "image": str(root / "truncated.png"), "captions": ["a broken file"]})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pairs.jsonl"


@pytest.fixture(scope="module")
def built(
    ray_local, source: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, str]:
    """The source indexed on one machine (flat) and with Ray through the CLI (IVF, 4 shards of 80)."""
    from retrieval.index.build import BuildOptions, build_index

    root = tmp_path_factory.mktemp("built")
    build_index(source, tiny_model, root / "local", BuildOptions(progress=False))
    result = run_cli(
        "index", source, "--model", tiny_model, "--index", root / "ray", "--engine", "ray", "--shard-size", SHARD_SIZE
    )
    assert result.exit_code == 0, result.output
    return root / "local", root / "ray", result.output


@pytest.mark.slow
def test_ray_gives_the_content_of_the_single_machine_path(built) -> None:
    local, ray_index, output = built
    assert "300 added" in output and "(ivf," in output
    assert "skipped 1 item(s), each with its reason:" in output and "truncated.png" in output
    a, b = IndexStore.open(local), IndexStore.open(ray_index)
    assert len(list((ray_index / "shards").glob("*.json"))) == 4
    fa, ids_a, img_a, txt_a = a.id_table()
    fb, ids_b, img_b, txt_b = b.id_table()
    assert ids_a == ids_b and np.array_equal(img_a, img_b) and np.array_equal(txt_a, txt_b)
    assert np.abs(a.fused_vectors(fa.tolist()) - b.fused_vectors(fb.tolist())).max() < 1e-5
    assert a.all_items().keys() == b.all_items().keys()
    assert [(i.path, i.captions, i.mtime_ns, i.size) for i in a.all_items().values()] == [
        (i.path, i.captions, i.mtime_ns, i.size) for i in b.all_items().values()
    ]

    one, many = Index.open(local), Index.open(ray_index)
    many.tune(nprobe=10_000)  # every list: IVF-Flat is then exact
    queries = np.concatenate(
        [
            one.embed_texts(["a red circle", "a small blue square left of a green triangle", "two yellow shapes"]),
            a.fused_vectors([1, 2, 3])[:, : a.manifest.dim],
        ]
    )
    for target in ("item", "image", "text"):
        want = one.search_vectors(queries, k=10, target=target)
        got = many.search_vectors(queries, k=10, target=target)
        for w, g in zip(want, got, strict=True):
            assert [h.id for h in g] == [h.id for h in w]
            assert np.allclose([h.score for h in g], [h.score for h in w], atol=1e-5)
        theta = float(np.median([h.score for hits in want for h in hits]))
        assert [{h.id for h in hits} for hits in many.search_vectors(queries, k=None, theta=theta, target=target)] == [
            {h.id for h in hits} for hits in one.search_vectors(queries, k=None, theta=theta, target=target)
        ]


@pytest.mark.slow
def test_a_rerun_skips_finished_shards_and_redoes_a_half_written_one(
    built, source: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """As if a worker was killed while writing shard 1, before the merge: its files lack the marker."""
    from retrieval.index.build import BuildOptions
    from retrieval.scale.ray import build_index_ray

    local, ray_index, _ = built
    shards = tmp_path / "idx" / "shards"
    shutil.copytree(ray_index / "shards", shards)
    names = sorted(p.stem for p in shards.glob("*.json"))
    half = shards / f"{names[1]}.npy"
    half.write_bytes(half.read_bytes()[:100])
    (shards / f"{names[1]}.json").unlink()
    (shards / f"{names[1]}.parquet.tmp").write_bytes(b"half a parquet file")
    before = {p.name: p.stat().st_mtime_ns for p in shards.iterdir() if names[1] not in p.name}

    r = build_index_ray(source, tiny_model, tmp_path / "idx", BuildOptions(progress=False), shard_size=SHARD_SIZE)
    assert (r.added, r.removed, len(r.skipped)) == (300, 0, 1)
    assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir() if names[1] not in p.name} == before  # not redone
    assert sorted(p.stem for p in shards.glob("*.json")) == names and not list(shards.glob("*.tmp"))
    a, b = IndexStore.open(local), IndexStore.open(tmp_path / "idx")
    assert a.id_table()[1] == b.id_table()[1]
    assert np.abs(a.fused_vectors(a.id_table()[0].tolist()) - b.fused_vectors(b.id_table()[0].tolist())).max() < 1e-5

    again = build_index_ray(source, tiny_model, tmp_path / "idx", BuildOptions(progress=False), shard_size=SHARD_SIZE)
    assert (again.added, again.unchanged, len(again.skipped)) == (0, 300, 1)


@pytest.mark.slow
def test_an_index_over_max_memory_is_merged_on_disk_and_searched_from_it(
    built, source: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """--max-memory at build time puts the lists on disk; `search --json` stays clean JSON on stdout
    (FAISS prints notes about on-disk lists with C printf, which a subprocess would show)."""
    _, ray_index, _ = built
    shutil.copytree(ray_index / "shards", tmp_path / "idx" / "shards")
    result = run_cli(
        "index",
        source,
        "--model",
        tiny_model,
        "--index",
        tmp_path / "idx",
        "--engine",
        "ray",
        "--shard-size",
        SHARD_SIZE,
        "--max-memory",
        "16K",
    )
    assert result.exit_code == 0, result.output
    assert "(ivf (on disk)," in result.output and len(list((tmp_path / "idx").glob("*.ivfdata"))) == 1
    cli = Path(sys.executable).parent / "retrieval"
    args = ["search", "--index", tmp_path / "idx", "--text", "a red circle", "--nprobe", "10000", "--json"]
    done = subprocess.run([cli, *map(str, args), "--max-memory", "16K"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    want = Index.open(ray_index)
    want.tune(nprobe=10_000)
    assert [json.loads(line)["id"] for line in done.stdout.splitlines()] == [
        h.id for h in want.search(text="a red circle", k=10)
    ]


# --- errors --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_without_ray_the_error_says_what_to_install(
    source: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    result = run_cli("index", source, "--model", tiny_model, "--index", tmp_path / "idx", "--engine", "ray")
    assert result.exit_code == 1 and "pip install 'retrieval[distributed]'" in result.output.splitlines()[-1]
    assert not (tmp_path / "idx").exists()


@pytest.mark.slow
def test_option_mistakes_are_one_line_errors(source: Path, tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    result = run_cli(
        "index", source, "--model", tiny_model, "--index", tmp_path / "i", "--engine", "ray", "--index-type", "hnsw"
    )
    assert result.exit_code == 1 and "--engine ray builds a merged IVF index" in result.output
    result = run_cli("index", source, "--model", tiny_model, "--index", tmp_path / "i", "--address", "auto")
    assert result.exit_code == 1 and "--address only apply with --engine ray" in result.output
    result = run_cli("search", "--index", tmp_path, "--text", "x", "--max-memory", "lots")
    assert result.exit_code == 2 and "write it like 512M or 8G" in result.output


@pytest.mark.slow
def test_a_failing_worker_is_an_error_line_that_names_the_cause(
    ray_local, source: Path, tiny_model: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes()[:1000])
    result = run_cli(
        "index", source, "--model", broken, "--index", tmp_path / "idx", "--engine", "ray", "--shard-size", SHARD_SIZE
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    # Ray's raylet may still print the worker's traceback on stderr, asynchronously; our message is one line
    line = next(x for x in result.output.splitlines() if x.startswith("Error:"))
    assert (
        line.startswith("Error: a Ray worker failed") and "cannot load weights" in line and "re-running resumes" in line
    )
