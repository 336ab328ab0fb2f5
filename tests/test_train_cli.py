"""End to end through the CLI, as a user runs it: synth -> train -> eval, resume, bad data, bad options."""

from __future__ import annotations

import json
import shutil
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import read_log, slowed

from retrieval.cli.main import main
from retrieval.models.encoder import use_bf16
from retrieval.train import loop
from retrieval.train.loop import lr_factor


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_synth_command_writes_a_collection(tmp_path: Path) -> None:
    code, out = run("synth", "--out", str(tmp_path / "s"), "--n", "12", "--seed", "3")
    assert code == 0, out
    lines = (tmp_path / "s" / "pairs.jsonl").read_text().splitlines()
    assert len(lines) == 12 and len(list((tmp_path / "s" / "images").iterdir())) == 12


@pytest.mark.slow
def test_train_then_eval_beats_chance(tiny_model: Path, synth_data: Path) -> None:
    code, out = run("eval", "--model", str(tiny_model), "--data", str(synth_data), "--split", "test", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["n_images"] == 60 and report["n_texts"] >= 120
    chance_r5 = 5 / report["n_images"]
    assert report["text_to_image"]["R@5"] > 3 * chance_r5
    assert report["image_to_text"]["R@5"] > 3 * chance_r5
    # the figures are those of the saved model's own embeddings, ranked by obvious code
    from retrieval.models.load import load_model

    test_ids = set(json.loads((synth_data.parent / "split.json").read_text())["test"])
    rows = [r for r in map(json.loads, synth_data.read_text().splitlines()) if r["id"] in test_ids]
    model = load_model(tiny_model)
    images = model.encode_image([synth_data.parent / r["image"] for r in rows]).astype(np.float64)  # (60, D)
    texts = model.encode_text([c for r in rows for c in r["captions"]]).astype(np.float64)  # (T, D)
    owner = np.array([i for i, r in enumerate(rows) for _ in r["captions"]])
    sims = texts @ images.T  # (T, 60)
    ranks = 1 + (sims > sims[np.arange(len(texts)), owner][:, None]).sum(1)  # rank of each caption's own image
    t2i = report["text_to_image"]
    assert t2i["n_queries"] == len(texts) == report["n_texts"]
    assert t2i["median_rank"] == pytest.approx(np.median(ranks), abs=0.5)
    for k in (1, 5, 10):
        assert t2i[f"R@{k}"] == pytest.approx(np.mean(ranks <= k), abs=1.5 / len(texts)), k


@pytest.mark.slow
def test_training_writes_a_loadable_model_dir_and_log(tiny_model: Path, synth_data: Path) -> None:
    names = {p.name for p in tiny_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_log.jsonl", "train_state.pt"} <= names
    log = read_log(tiny_model)
    assert [e["epoch"] for e in log] == list(range(1, len(log) + 1))
    assert log[-1]["loss"] < log[0]["loss"], "the loss should fall over training"
    test_ids = set(json.loads((synth_data.parent / "split.json").read_text())["test"])
    n_captions = sum(
        len(r["captions"]) for r in map(json.loads, synth_data.read_text().splitlines()) if r["id"] in test_ids
    )
    for e in log:  # held-out recall each epoch: the test split's 60 images and all their captions
        for direction, n in (("text_to_image", n_captions), ("image_to_text", 60)):
            val = e["val"][direction]
            assert val["n_queries"] == n and val["R@1"] <= val["R@5"] <= val["R@10"], (e["epoch"], direction, val)
    best = max(
        log,
        key=lambda e: sum(e["val"][d][k] for d in ("text_to_image", "image_to_text") for k in ("R@1", "R@5", "R@10")),
    )
    assert best["best"], "the best epoch by held-out rsum must be the one marked best"
    assert all(e["bf16"] == use_bf16(True) for e in log), "the log says which precision each epoch trained in"


@pytest.mark.slow
def test_eval_table_is_readable(tiny_model: Path, synth_data: Path) -> None:
    code, out = run("eval", "--model", str(tiny_model), "--data", str(synth_data), "--split", "test", "--k", "1,3")
    assert code == 0, out
    assert "text->image" in out and "image->text" in out and "R@3" in out


@pytest.mark.slow
def test_resume_continues_from_the_last_epoch(synth_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    args = ["train", "--data", str(synth_data), "--out", str(out), "--preset", "tiny"]
    assert run(*args, "--epochs", "2")[0] == 0
    code, text = run(*args, "--epochs", "3", "--resume")
    assert code == 0, text
    assert [e["epoch"] for e in read_log(out)] == [1, 2, 3]


@pytest.mark.slow
def test_image_size_and_one_caption_reach_the_run(synth_data: Path, tmp_path: Path) -> None:
    import torch

    from retrieval.models.load import load_model

    out = tmp_path / "m"
    code, text = run(
        "train",
        "--data",
        str(synth_data),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--epochs",
        "1",
        "--image-size",
        "40",
        "--one-caption",
    )
    assert code == 0, text
    model = load_model(out)
    assert model.config.image.image_size == 40 and model.transform.size == 40
    assert json.loads(torch.load(out / "train_state.pt", weights_only=True)["train_config"])["all_captions"] is False
    assert model.encode_image([synth_data.parent / "images" / "synth-000000.png"]).shape == (1, model.embed_dim)
    code, text = run(
        "train", "--data", str(synth_data), "--out", str(tmp_path / "hf"), "--init", "hf:/nowhere", "--image-size", "40"
    )
    assert code != 0 and "--image-size" in text


@pytest.mark.slow
def test_a_time_budget_ends_the_run_early_and_the_log_shows_it(
    synth_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--max-minutes 0.002 (120 ms) against the tiny preset's 8 epochs of 3 steps (240 pairs, batch 64): the
    schedule runs on time, so the first epoch stops within its steps once 120 ms have passed, and the run
    ends after that epoch's evaluation instead of going on to epoch 2. Each step takes at least 70 ms, so two
    pass the budget on any machine (a fast one ran all three tiny steps in under 120 ms)."""
    monkeypatch.setattr(loop, "_step", slowed(loop._step, 0.07))
    out = tmp_path / "m"
    code, text = run(
        "train", "--data", str(synth_data), "--out", str(out), "--preset", "tiny", "--max-minutes", "0.002"
    )
    assert code == 0, text
    log = read_log(out)
    assert [e["epoch"] for e in log] == [1], "the budget must end the run after the first epoch"
    assert 1 <= log[0]["step"] <= 2  # stopped inside the epoch of 3 steps; the whole run would have taken 24
    assert log[0]["elapsed_s"] >= 0.12 and log[0]["loss"] is not None
    assert (out / "model.safetensors").exists()  # the one epoch run is kept as the best


@pytest.mark.slow
def test_a_budget_spent_before_the_first_step_is_reported_not_a_traceback(synth_data: Path, tmp_path: Path) -> None:
    """Before: the epoch line formatted a loss of None (no step ran) and the CLI died with a TypeError."""
    out = tmp_path / "m"
    code, text = run(
        "train", "--data", str(synth_data), "--out", str(out), "--preset", "tiny", "--max-minutes", "1e-12"
    )
    assert code == 0 and "Traceback" not in text, text
    assert "epoch 1: loss -" in text and read_log(out)[0]["loss"] is None


@pytest.mark.slow
def test_our_model_trains_with_the_siglip_loss(synth_data: Path, tmp_path: Path) -> None:
    """--loss siglip on our own towers: it starts at t = 10, b = -10 (loss_init), the loss falls, the run is
    recorded as siglip, and held-out recall beats chance."""
    import torch

    from retrieval.models.load import load_model

    out = tmp_path / "m"
    code, text = run("train", "--data", str(synth_data), "--out", str(out), "--preset", "tiny", "--loss", "siglip")
    assert code == 0, text
    config = json.loads((out / "config.json").read_text())["model"]
    assert (config["logit_scale_init"], config["logit_bias_init"]) == (10.0, -10.0), config
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert json.loads(state["train_config"])["loss"] == "siglip"
    log = read_log(out)
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], [e["loss"] for e in log]
    assert load_model(out).logit_bias.item() != -10.0, "the bias is learned"
    code, printed = run("eval", "--model", str(out), "--data", str(synth_data), "--split", "test", "--json")
    assert code == 0, printed
    report = json.loads(printed)
    chance_r5 = 5 / report["n_images"]
    # measured: t2i R@5 0.71, i2t R@5 0.42 against chance 0.083 (the loss fell from 19.1 to 9.8)
    assert report["text_to_image"]["R@5"] > 3 * chance_r5 and report["image_to_text"]["R@5"] > 3 * chance_r5, report


def test_resume_without_a_run_says_so(synth_data: Path, tmp_path: Path) -> None:
    code, out = run("train", "--data", str(synth_data), "--out", str(tmp_path / "m"), "--preset", "tiny", "--resume")
    assert code == 1
    assert "nothing to resume" in out and "without --resume" in out


@pytest.mark.slow
def test_unreadable_images_are_skipped_and_listed(synth_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_data.parent, data)
    images = sorted((data / "images").iterdir())
    images[0].write_bytes(images[0].read_bytes()[:100])  # truncated
    images[1].write_text("not an image")
    images[2].unlink()  # missing
    out = tmp_path / "m"
    code, text = run(
        "train", "--data", str(data / "pairs.jsonl"), "--out", str(out), "--preset", "tiny", "--epochs", "1"
    )
    assert code == 0, text
    assert "skipped 3 unreadable image(s)" in text
    listed = (out / "skipped_images.txt").read_text()
    assert all(p.name in listed for p in images[:3])


def test_bad_manifest_row_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "pairs.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{broken\n')
    code, out = run("train", "--data", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "m"))
    assert code == 1
    assert "pairs.jsonl:2" in out and "Traceback" not in out


@pytest.mark.parametrize("ks", ["0", "a,b", ""])
@pytest.mark.slow
def test_eval_rejects_bad_k(tiny_model: Path, synth_data: Path, ks: str) -> None:
    code, out = run("eval", "--model", str(tiny_model), "--data", str(synth_data), "--k", ks)
    assert code == 1 and "--k must be" in out


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    assert lr_factor(0.0, 0.1) == 0.0
    assert lr_factor(0.05, 0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(0.55, 0.1) == pytest.approx(0.5)
    assert lr_factor(1.0, 0.1) == pytest.approx(0.0)
    values = [lr_factor(p / 100, 0.1) for p in range(10, 101)]
    assert all(a >= b for a, b in pairwise(values))


def test_help_explains_every_command() -> None:
    for command in ("synth", "train", "eval", "demo"):
        code, out = run(command, "--help")
        assert code == 0 and "Usage:" in out and len(out.splitlines()) > 4


@pytest.mark.parametrize(
    "text, size",
    [
        ("8G", 8 * 2**30),
        ("512M", 512 * 2**20),
        ("1.5G", 3 * 2**29),
        ("16K", 16 * 1024),
        ("2T", 2 * 2**40),
        ("100", 100),
        ("8g", 8 * 2**30),
        ("8GB", 8 * 2**30),
        ("8GiB", 8 * 2**30),
        (" 512m ", 512 * 2**20),
        ("0.5K", 512),
        ("1.7K", 1740),
        (4096, 4096),  # a fraction of a byte is dropped: int(1.7 * 1024) = 1740
    ],
)
def test_size_strings_are_powers_of_1024(text, size: int) -> None:
    from retrieval.cli.params import BytesParam

    assert BytesParam().convert(text, None, None) == size


@pytest.mark.parametrize(
    "text, message",
    [
        ("lots", "is not a size; write it like 512M or 8G"),
        ("G", "is not a size"),
        ("", "is not a size"),
        ("8X", "is not a size"),
        ("0", "must be at least one byte"),
        ("-1G", "must be at least one byte"),
        ("0.0001", "must be at least one byte"),
        ("8E", "is not a size"),
        ("9000000T", "is not a size a machine has"),  # 2^63 bytes and up
    ],
)
def test_bad_size_strings_say_how_to_write_one(text: str, message: str) -> None:
    import click

    from retrieval.cli.params import BytesParam

    with pytest.raises(click.BadParameter, match=message):
        BytesParam().convert(text, None, None)
