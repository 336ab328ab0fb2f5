"""Hugging Face CLIP and SigLIP through hf:<dir>: the same embeddings as the checkpoint's own
get_image_features / get_text_features, preprocessing as its own image processor, index / search / eval,
fine-tuning (--init), and the error messages. Tiny random checkpoints, built offline (hf_tiny.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import read_log
from hf_tiny import tiny_checkpoint
from PIL import Image
from safetensors.torch import load_file

from retrieval.cli.main import main
from retrieval.data.synth import generate
from retrieval.errors import RetrievalError
from retrieval.index.handle import Index
from retrieval.models.hf import processor_transform
from retrieval.models.load import load_model
from retrieval.models.modeldir import fingerprint

pytestmark = pytest.mark.usefixtures("torch_single_thread")
TEXTS = ["a red circle left of a dog", "the star", "BLUE", "a " * 40]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module", params=["clip", "siglip"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", request.param)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("clip") / "ckpt", "clip")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 scenes (32 train / 8 test): two steps an epoch at batch 16."""
    return generate(tmp_path_factory.mktemp("small"), 40, seed=2, size=40)


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(50, 70), (64, 33), (32, 32)]]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.mark.slow
def test_embeddings_equal_the_checkpoints_own_features(checkpoint: Path) -> None:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    ours = load_model(f"hf:{checkpoint}")
    hf, tokenizer = AutoModel.from_pretrained(checkpoint).eval(), AutoTokenizer.from_pretrained(checkpoint)
    siglip = hf.config.model_type == "siglip"
    inputs = tokenizer(TEXTS, padding="max_length" if siglip else True, truncation=True, return_tensors="pt")
    mask = {} if siglip else {"attention_mask": inputs["attention_mask"]}  # as each model's processor is used
    pixels = AutoImageProcessor.from_pretrained(checkpoint)(pictures(), return_tensors="np")["pixel_values"]
    with torch.no_grad():
        text_ref = F.normalize(hf.get_text_features(input_ids=inputs["input_ids"], **mask).pooler_output, dim=-1)
        image_ref = F.normalize(hf.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output, dim=-1)
    np.testing.assert_allclose(np.stack([ours.transform.preprocess(p) for p in pictures()]), pixels, atol=1e-6)
    np.testing.assert_allclose(ours.encode_text(TEXTS), text_ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours.encode_image(pictures()), image_ref.numpy(), atol=1e-5)
    assert ours.encode_text(TEXTS).dtype == np.float32 and ours.encode_image(pictures()).shape[1] == ours.embed_dim


@pytest.mark.slow
def test_index_search_and_eval_through_the_cli(checkpoint: Path, small_data: Path, tmp_path: Path) -> None:
    index = tmp_path / "index"
    code, out = run("index", str(small_data), "--model", f"hf:{checkpoint}", "--index", str(index))
    assert code == 0 and "40 added" in out, out
    code, out = run("search", "--index", str(index), "--text", "a red circle", "--k", "3")
    assert code == 0 and len(out.splitlines()) == 3, out
    query = load_model(f"hf:{checkpoint}").encode_text(["a red circle"])[0]
    np.testing.assert_allclose(Index.open(index).embed_text("a red circle"), query, atol=1e-6)
    code, out = run("eval", "--model", f"hf:{checkpoint}", "--data", str(small_data), "--json", "--no-thresholds")
    assert code == 0 and json.loads(out)["n_images"] == 40, out


@pytest.mark.slow
def test_index_refuses_another_checkpoint(clip: Path, small_data: Path, tmp_path: Path) -> None:
    assert run("index", str(small_data), "--model", f"hf:{clip}", "--index", str(tmp_path / "i"))[0] == 0
    other = tiny_checkpoint(tmp_path / "other", "clip", seed=1)
    assert fingerprint(f"hf:{other}") != fingerprint(f"hf:{clip}")
    with pytest.raises(RetrievalError, match="model mismatch"):
        Index.open(tmp_path / "i", f"hf:{other}")


@pytest.mark.slow
def test_fine_tuning_keeps_the_best_epoch_and_loads_as_a_checkpoint(
    clip: Path, small_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tuned"
    code, text = run(
        "train",
        "--data",
        str(small_data),
        "--out",
        str(out),
        "--init",
        f"hf:{clip}",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
    )
    assert code == 0, text
    log = read_log(out)
    assert [e["epoch"] for e in log] == [1, 2] and log[0]["best"] and log[-1]["lr"] < 1e-3
    tuned, original = load_file(out / "model.safetensors"), load_file(clip / "model.safetensors")
    assert any(not torch.equal(tuned[k], original[k]) for k in original)
    last = torch.load(out / "train_state.pt", weights_only=True)["model"]  # the last epoch's weights
    assert all(torch.equal(last[f"hf.{k}"], tuned[k]) for k in tuned) == log[-1]["best"], "the best epoch is kept"
    code, text = run(
        "eval", "--model", f"hf:{out}", "--data", str(small_data), "--split", "test", "--json", "--no-thresholds"
    )
    assert code == 0 and json.loads(text)["n_images"] == 8, text
    assert fingerprint(f"hf:{out}") != fingerprint(f"hf:{clip}")


@pytest.mark.parametrize(
    "freeze, locked",
    [("text", ("text_model.", "text_projection.")), ("image", ("vision_model.", "visual_projection."))],
)
@pytest.mark.slow
def test_a_frozen_side_does_not_change(
    clip: Path, small_data: Path, tmp_path: Path, freeze: str, locked: tuple[str, ...]
) -> None:
    out = tmp_path / "tuned"
    code, text = run(
        "train",
        "--data",
        str(small_data),
        "--out",
        str(out),
        "--init",
        f"hf:{clip}",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--freeze",
        freeze,
    )
    assert code == 0, text
    tuned, original = load_file(out / "model.safetensors"), load_file(clip / "model.safetensors")
    assert all(torch.equal(tuned[k], original[k]) for k in original if k.startswith(locked))
    assert any(not torch.equal(tuned[k], original[k]) for k in original if not k.startswith(locked))


@pytest.mark.slow
def test_siglip_fine_tunes_with_its_own_loss_and_resumes(small_data: Path, tmp_path: Path) -> None:
    siglip = tiny_checkpoint(tmp_path / "siglip", "siglip")
    args = ["train", "--data", str(small_data), "--out", str(tmp_path / "t"), "--batch-size", "16"]
    code, text = run(*args, "--init", f"hf:{siglip}", "--epochs", "1")
    assert code == 0, text
    assert load_model(f"hf:{tmp_path / 't'}").family == "siglip"
    code, text = run(*args, "--init", f"hf:{siglip}", "--epochs", "2", "--resume")
    assert code == 0 and [e["epoch"] for e in read_log(tmp_path / "t")] == [1, 2], text
    code, text = run(*args, "--epochs", "3", "--resume")
    assert code == 1 and "resume it with the same --init" in text
    code, text = run(*args, "--init", f"hf:{siglip}", "--loss", "clip")
    assert code == 1 and "--loss siglip" in text


def test_processor_settings_old_and_unsupported() -> None:
    old = {"size": 40, "crop_size": 32, "do_center_crop": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    t = processor_transform(old, Path("p.json"))
    assert (t.resize, t.resize_to, t.size) == ("shortest_edge", 40, 32)
    with pytest.raises(RetrievalError, match="not supported"):
        processor_transform({"size": {"height": 32, "width": 48}}, Path("p.json"))


@pytest.mark.slow
def test_errors_say_what_to_do(clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RetrievalError, match="no such directory"):
        load_model(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(RetrievalError, match="not in the local cache"):
        load_model("hf:nobody/no-such-model")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(RetrievalError, match="takes clip or siglip"):
        load_model(f"hf:{bert}")
    with pytest.raises(RetrievalError, match=f"give it as hf:{clip}"):
        load_model(clip)
    code, text = run("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--freeze", "text")
    assert code == 1 and "--freeze is for fine-tuning" in text
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(RetrievalError, match=r"pip install 'retrieval\[hf\]'"):
        load_model(f"hf:{clip}")
