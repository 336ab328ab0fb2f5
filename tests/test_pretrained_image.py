"""Pretrained image towers (--image-tower efficientnet-lite0) trained as a user would: locked towers run once and
cached, only the heads (and any unlocked blocks) train; and the zero-shot model through index, search, classify."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import read_log
from PIL import Image
from safetensors.torch import load_file

from retrieval.cli.main import main
from retrieval.errors import RetrievalError
from retrieval.index.build import BuildOptions, build_index
from retrieval.index.handle import Index
from retrieval.models.config import PRESETS, with_image_tower
from retrieval.models.efficientnet import PretrainedImageTower, packaged_state_dict
from retrieval.models.load import load_model
from retrieval.prompts import prompts

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def train(data: Path, out: Path, *extra: str) -> None:
    args = [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--preset",
        "pretrained",
        "--image-tower",
        "efficientnet-lite0",
        "--image-size",
        "64",
        "--epochs",
        "2",
        "--views",
        "2",
        "--batch-size",
        "64",
    ]
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def locked_model(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lite") / "model"
    train(synth_data, out)
    return out


def tower_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    prefix = "image_tower.nets.0."
    return {k[len(prefix) :]: v for k, v in load_file(model_dir / "model.safetensors").items() if k.startswith(prefix)}


@pytest.mark.slow
def test_locked_tower_keeps_the_package_weights_and_the_heads_learn(locked_model: Path) -> None:
    config = json.loads((locked_model / "config.json").read_text())["model"]
    assert config["image"]["kind"] == "efficientnet-lite0" and config["head"]["image"] == "mlp"
    saved, packaged = tower_weights(locked_model), packaged_state_dict("efficientnet-lite0")
    assert saved.keys() == packaged.keys()
    for key, tensor in packaged.items():
        torch.testing.assert_close(saved[key], tensor, rtol=0, atol=0, msg=key)
    log = read_log(locked_model)
    assert len(log) == 2 and log[-1]["loss"] < log[0]["loss"]
    assert log[-1]["val"]["text_to_image"]["R@10"] > 0.3  # 60 held-out images: chance R@10 is 1/6


@pytest.mark.slow
def test_cached_path_equals_the_whole_tower(locked_model: Path, synth_data: Path) -> None:
    """Training runs the head on cached tower outputs; indexing runs the whole model: the same function."""
    model = load_model(locked_model)
    images = sorted((synth_data.parent / "images").iterdir())[:6]
    pixels = torch.from_numpy(np.stack([model.transform.load(p) for p in images]))
    with torch.no_grad():
        cached = model.project_image_outputs(model.image_locked_outputs(pixels))
    np.testing.assert_allclose(cached, model.encode_image(images), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_unlocked_blocks_train_and_the_rest_stays(synth_data: Path, tmp_path: Path) -> None:
    train(synth_data, tmp_path / "m", "--image-trainable-blocks", "2", "--epochs", "1")
    saved, packaged = tower_weights(tmp_path / "m"), packaged_state_dict("efficientnet-lite0")
    changed = {
        k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks.") else "")
        for k in packaged
        if not torch.equal(saved[k], packaged[k])
    }
    assert changed and changed <= {"blocks.14", "blocks.15", "head"}, changed
    running_stats = [k for k in packaged if k.endswith(("running_mean", "running_var"))]
    assert all(torch.equal(saved[k], packaged[k]) for k in running_stats)  # BatchNorm stays in eval mode


@pytest.mark.slow
def test_trained_pretrained_model_resumes(synth_data: Path, tmp_path: Path) -> None:
    train(synth_data, tmp_path / "m", "--epochs", "1")
    train(synth_data, tmp_path / "m", "--epochs", "2", "--resume")
    assert [e["epoch"] for e in read_log(tmp_path / "m")] == [1, 2]


@pytest.mark.slow
def test_bad_tower_choices_are_one_line(synth_data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["train", "--data", str(synth_data), "--out", str(tmp_path / "m")]
    result = runner.invoke(main, [*base, "--image-tower", "vit-h14"])
    assert result.exit_code == 2 and "efficientnet-lite0" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, [*base, "--preset", "tiny", "--image-trainable-blocks", "2"])
    assert result.exit_code != 0 and "pretrained image tower" in result.output
    result = runner.invoke(
        main, [*base, "--preset", "pretrained", "--image-tower", "efficientnet-lite0", "--image-trainable-blocks", "17"]
    )
    assert result.exit_code != 0 and "0..16" in result.output
    result = runner.invoke(main, [*base, "--preset", "pretrained", "--image-trainable-blocks", "2"])
    assert result.exit_code != 0 and "not an ensemble" in result.output
    with pytest.raises(RetrievalError, match=r"0\.\.16"):
        PretrainedImageTower(with_image_tower(PRESETS["pretrained"].model, "efficientnet-lite0", 17).image)


# --- the zero-shot model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zeroshot_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zeroshot") / "model"
    result = CliRunner().invoke(main, ["zeroshot", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_zeroshot_image_embedding_is_conse(zeroshot_model: Path, synth_data: Path) -> None:
    """The image vector is the probability-weighted mean of its top-10 classes' prompt embeddings (softmax at
    the default temperature 2)."""
    from retrieval.models.zeroshot import imagenet_class_names

    model = load_model(zeroshot_model)
    image = sorted((synth_data.parent / "images").iterdir())[0]
    pixels = torch.from_numpy(model.transform.load(image))[None]
    with torch.no_grad():
        probs = (model.image_tower.net.logits(model.image_tower(pixels)) / 2).softmax(-1)[0]  # (1000,), temperature 2
    p, classes = probs.topk(10)
    names = imagenet_class_names()
    class_emb = model.encode_text(prompts([names[c] for c in classes.tolist()]))  # (10, D)
    want = (p.numpy()[:, None] * class_emb).sum(0)
    np.testing.assert_allclose(model.encode_image([image])[0], want / np.linalg.norm(want), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_zeroshot_model_indexes_and_searches_a_folder(zeroshot_model: Path, tmp_path: Path) -> None:
    """A fresh machine, no pairs: index a folder, search it with text; the scores are the model's cosines."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, colour in (("orange", (255, 140, 0)), ("sky", (90, 160, 255)), ("grass", (40, 160, 40))):
        pixels = np.clip(np.array(colour) + rng.normal(0, 12, (96, 96, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    report = build_index(folder, zeroshot_model, tmp_path / "index", BuildOptions(progress=False))
    assert report.added == 3
    hits = Index.open(tmp_path / "index").search(text="an orange", k=3, target="image")
    assert {h.id for h in hits} == {"orange.png", "sky.png", "grass.png"}
    model = load_model(zeroshot_model)
    want = (
        model.encode_image([folder / h.id for h in hits], precision=report.precision)
        @ model.encode_text(["an orange"])[0]
    )
    np.testing.assert_allclose([h.score for h in hits], want, atol=1e-4, rtol=0)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_zeroshot_bad_template_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["zeroshot", "--out", str(tmp_path / "z"), "--template", "a photo"])
    assert result.exit_code != 0 and "{label}" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_zeroshot_classify_over_imagenet_labels_is_its_own_classifier(zeroshot_model: Path, synth_data: Path) -> None:
    from retrieval.data.pairs import read_pairs
    from retrieval.jobs.classify import classify_pairs
    from retrieval.models.zeroshot import imagenet_class_names

    names = imagenet_class_names()
    labels = [names[i] for i in (0, 1, 963, 954)]  # tench, goldfish, pizza, banana
    pairs = read_pairs(synth_data)[:4]
    result = classify_pairs(zeroshot_model, pairs, labels)
    assert result["classifier"] == "imagenet"
    model = load_model(zeroshot_model)
    pixels = torch.from_numpy(np.stack([model.transform.load(p.image) for p in pairs]))
    with torch.no_grad():
        want = model.image_tower.net.logits(model.image_tower(pixels))[:, [0, 1, 963, 954]].softmax(-1).numpy()
    np.testing.assert_allclose(result["probabilities"], want, atol=1e-5, rtol=0)
    prompted = classify_pairs(zeroshot_model, pairs, [*labels[:3], "a red circle"])  # not all ImageNet: prompts
    assert "classifier" not in prompted and prompted["template"] == "a photo of a {label}"


def test_ensemble_tower_is_its_networks_side_by_side() -> None:
    """Lite0 + Lite2: each network sees the input at its share of the side, features concatenated."""
    import torch.nn.functional as F

    from retrieval.models.config import ENSEMBLE

    cfg = with_image_tower(PRESETS["pretrained"].model, ENSEMBLE).image
    assert cfg.image_size == 260
    tower = PretrainedImageTower(dataclasses.replace(cfg, image_size=130))
    tower.load_packaged()
    assert tower.sides == [112, 130] and tower.out_dim == 2560
    pixels = torch.randn(2, 3, 130, 130)
    with torch.no_grad():
        got = tower(pixels)
        lite0 = tower.nets[0](
            F.interpolate(pixels, size=(112, 112), mode="bilinear", antialias=True, align_corners=False)
        )
        lite2 = tower.nets[1](pixels)
    torch.testing.assert_close(got, torch.cat([lite0, lite2], dim=1))
    with pytest.raises(RetrievalError, match="single pretrained image tower"):
        PretrainedImageTower(dataclasses.replace(cfg, trainable_blocks=1))
