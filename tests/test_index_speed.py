"""Faster indexing, same answers: decoding the next batch while this one encodes changes no item and no vector;
encode_image in fp32 (channels_last) equals the plain fp32 forward; bf16 stays close to fp32."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from retrieval.cli.main import main
from retrieval.data.pairs import Pair
from retrieval.errors import RetrievalError
from retrieval.index.build import BuildOptions, build_index, decode_ahead
from retrieval.index.format import Item
from retrieval.index.store import IndexStore
from retrieval.models.encoder import Encoder, use_bf16
from retrieval.models.load import load_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

BF16 = use_bf16(True)
# bf16 against fp32, per image, on the zero-shot model: these synthetic scenes measured 0.991-0.9998 on a Xeon
# with AMX and 0.985-0.9999 (mean 0.9943) on an AMD EPYC with AVX-512 bf16, whose kernels round differently (flat
# shapes scaled up 48 -> 224 px are far from ImageNet; Flickr8k photos: 0.993-1, mean 0.9993, R@1/5/10 on 300 test
# images within 0.5 points of fp32). A wrong layout or a dtype left in bf16 lands far below.
BF16_MIN_COSINE, BF16_MEAN_COSINE = 0.975, 0.99


@pytest.fixture(scope="module")
def folder(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """11 images, captions on every third, one copy of an earlier image (its vector is reused across batches)
    and one unreadable file: with batch_size 3, four batches."""
    rows = [json.loads(line) for line in synth_data.read_text().splitlines()][:10]
    src = tmp_path_factory.mktemp("photos")
    for i, row in enumerate(rows):
        shutil.copy(synth_data.parent / row["image"], src / f"{i:02d}.png")
        if i % 3 == 0:
            (src / f"{i:02d}.txt").write_text(row["captions"][0] + "\n")
    shutil.copy(src / "01.png", src / "10.png")
    (src / "11.jpg").write_bytes(b"not a jpeg")
    return src


@pytest.fixture(scope="module")
def zeroshot_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our pretrained EfficientNet-Lite0 tower (the zero-shot model needs no training)."""
    from retrieval.models.zeroshot import build_zeroshot

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return build_zeroshot(tmp_path_factory.mktemp("zeroshot") / "model")


def stored(index_path: Path) -> tuple[dict[str, Item], dict[str, np.ndarray]]:
    """Items by id (fid left out: it is the order of the commits) and their image vectors."""
    store = IndexStore.open(index_path)
    items = store.all_items()
    parts = store.part_vectors([it.fid for it in items.values()])
    vectors = {it.id: parts[it.fid][0] for it in items.values() if it.image_key}
    return {i: dataclasses.replace(it, fid=0) for i, it in items.items()}, vectors


def pixels_of(model: Encoder, folder: Path, n: int) -> np.ndarray:
    return np.stack([model.transform.load(folder / f"{i:02d}.png") for i in range(n)])  # (n, 3, S, S)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_decoding_runs_one_batch_ahead() -> None:
    """With prefetch, batch i + 1 is handed to the pool before batch i is given to the encoder; without, not."""
    submitted: list[str] = []

    class RecordingPool:
        def submit(self, fn, pair: Pair) -> Future:
            submitted.append(pair.id)
            future: Future = Future()
            future.set_result(fn(pair))
            return future

    batches = [[Pair(f"{b}{i}", None, ("a caption",)) for i in range(2)] for b in "abc"]
    for ahead, first_seen in ((1, ["a0", "a1", "b0", "b1"]), (0, ["a0", "a1"])):
        submitted.clear()
        order = []
        for batch, decoding in decode_ahead(SimpleNamespace(), batches, RecordingPool(), ahead):
            if not order:
                assert submitted == first_seen
            order.append([p.id for p in batch])
            assert [f.result() for f in decoding] == [(None, None, None)] * 2  # text-only items decode to nothing
        assert order == [["a0", "a1"], ["b0", "b1"], ["c0", "c1"]] and len(submitted) == 6


@pytest.mark.slow
def test_prefetching_build_equals_the_sequential_build_and_direct_encoding(
    folder: Path, tiny_model: Path, tmp_path: Path
) -> None:
    reports = {
        p: build_index(folder, tiny_model, tmp_path / str(p), BuildOptions(batch_size=3, progress=False), prefetch=p)
        for p in (True, False)
    }
    (items, vectors), (seq_items, seq_vectors) = stored(tmp_path / "True"), stored(tmp_path / "False")
    assert items == seq_items and len(items) == 11 and items["10.png"].image_key == items["01.png"].image_key
    assert all(np.array_equal(vectors[i], seq_vectors[i]) for i in vectors)
    assert [(r.added, len(r.skipped), r.precision) for r in reports.values()] == [(11, 1, "fp32")] * 2
    assert "11.jpg" in reports[True].skipped[0]
    model = load_model(tiny_model)
    for i, v in vectors.items():
        np.testing.assert_allclose(v, model.encode_image([folder / i])[0], atol=1e-6, rtol=0, err_msg=i)


@pytest.mark.slow
def test_pretrained_tower_indexes_in_fp32_as_encoded_directly_and_in_auto_within_bf16(
    folder: Path, zeroshot_model: Path, tmp_path: Path
) -> None:
    """precision="fp32" gives encode_image's vectors; "auto" runs bf16 where the CPU has bf16 kernels."""
    fp32 = build_index(
        folder, zeroshot_model, tmp_path / "fp32", BuildOptions(batch_size=3, progress=False), precision="fp32"
    )
    auto = build_index(folder, zeroshot_model, tmp_path / "auto", BuildOptions(batch_size=3, progress=False))
    assert (fp32.precision, auto.precision) == ("fp32", "bf16" if BF16 else "fp32")
    (items, vectors), (auto_items, auto_vectors) = stored(tmp_path / "fp32"), stored(tmp_path / "auto")
    assert items == auto_items
    ids = sorted(vectors)
    direct = load_model(zeroshot_model).encode_image([folder / i for i in ids])
    np.testing.assert_allclose(np.stack([vectors[i] for i in ids]), direct, atol=1e-5, rtol=0)
    assert cosines(np.stack([auto_vectors[i] for i in ids]), direct).min() > BF16_MIN_COSINE


@pytest.mark.parametrize("which", ["tiny", "pretrained"])
@pytest.mark.slow
def test_fp32_encode_image_equals_the_plain_fp32_forward(
    which: str, folder: Path, tiny_model: Path, zeroshot_model: Path
) -> None:
    """channels_last changes the memory layout, not the maths."""
    model = load_model(tiny_model if which == "tiny" else zeroshot_model)
    pixels = pixels_of(model, folder, 6)
    with torch.no_grad():
        plain = model.image_features(torch.from_numpy(pixels)).numpy()  # NCHW, no autocast: the path before
    np.testing.assert_allclose(model.encode_image(pixels, precision="fp32"), plain, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(model.encode_image(pixels), model.encode_image(pixels, precision="fp32"))


@pytest.mark.skipif(not BF16, reason="this CPU has no bf16 kernels (AVX2 only): bf16 would be emulated")
@pytest.mark.slow
def test_bf16_stays_close_to_fp32(folder: Path, zeroshot_model: Path) -> None:
    model = load_model(zeroshot_model)
    pixels = pixels_of(model, folder, 10)
    fp32, bf16 = model.encode_image(pixels, precision="fp32"), model.encode_image(pixels, precision="bf16")
    assert not np.array_equal(fp32, bf16)  # autocast did run
    cos = cosines(bf16, fp32)
    assert cos.min() > BF16_MIN_COSINE and cos.mean() > BF16_MEAN_COSINE, cos


@pytest.mark.slow
def test_auto_precision_is_bf16_only_for_the_pretrained_tower_on_a_bf16_cpu(
    tiny_model: Path, zeroshot_model: Path
) -> None:
    tiny, pretrained = load_model(tiny_model), load_model(zeroshot_model)
    assert tiny.image_precision("auto") == "fp32" and tiny.image_precision("bf16") == "bf16"
    assert pretrained.image_precision("auto") == ("bf16" if BF16 else "fp32")
    assert pretrained.image_precision("fp32") == "fp32"
    with pytest.raises(RetrievalError, match="unknown precision 'fp16'; choose one of auto, fp32, bf16"):
        tiny.encode_image(np.zeros((1, 3, 32, 32), np.float32), precision="fp16")


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.slow
def test_auto_precision_keeps_the_index_own_where_it_is_native(
    tiny_model: Path, zeroshot_model: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """An index records what its images were encoded in; "auto" keeps that, so the index holds one precision and
    queries match it, except bf16 on a CPU that would emulate it (8x slower), which falls back to fp32."""
    import retrieval.models.encoder

    monkeypatch.setattr(retrieval.models.encoder, "use_bf16", lambda requested: requested and native)
    tiny, pretrained = load_model(tiny_model), load_model(zeroshot_model)
    assert tiny.image_precision("auto", "bf16") == ("bf16" if native else "fp32")
    assert pretrained.image_precision("auto", "fp32") == "fp32"  # on a bf16 CPU too: the index stays fp32
    assert pretrained.image_precision("auto", "") == ("bf16" if native else "fp32")  # a new index: this CPU's choice
    assert pretrained.image_precision("fp32", "bf16") == "fp32"  # asked for: as asked


@pytest.mark.slow
def test_index_command_says_which_precision_ran(folder: Path, tiny_model: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["index", str(folder), "--model", str(tiny_model), "--index", str(tmp_path / "i")]
    )
    assert result.exit_code == 0, result.output
    assert "11 added, 0 updated, 0 removed, 0 unchanged (flat, images in fp32, " in result.output


@pytest.mark.slow
def test_bench_index_runs_and_writes_its_rows(folder: Path, tiny_model: Path, tmp_path: Path) -> None:
    """The benchmark at a tiny size (our ResNet at 32 px, 10 images, one thread); the lead runs the real one."""
    out = tmp_path / "bench.json"
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_index.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--model",
            str(tiny_model),
            "--sizes",
            "32,40",
            "--images",
            str(folder),
            "--n",
            "10",
            "--index-batch",
            "4",
            "--reps",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["machine"]["bf16_kernels"] == BF16 and result["machine"]["threads"] == 1
    rows = {(r["size"], r["path"], r["precision"]): r for r in result["rows"]}
    precisions = ["fp32", "bf16"] if BF16 else ["fp32"]
    for size in (32, 40):
        assert rows[size, "forward", "fp32"]["images_per_s"] > 0
        for precision in precisions:
            for path in (f"index {folder.parent.name}/photos0", f"index {folder.parent.name}/photos0 (no prefetch)"):
                assert rows[size, path, precision]["vs_bound"] > 0, (size, path, precision)
    assert "images/s" in done.stdout and "vs bound" in done.stdout
