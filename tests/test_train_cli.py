"""End to end through the CLI, as a user runs it: synth -> train -> eval, resume, bad data, bad options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import read_log
from retrieval.cli import main
from retrieval.model import use_bf16
from retrieval.train import lr_factor


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_synth_command_writes_a_collection(tmp_path: Path) -> None:
    code, out = run("synth", "--out", str(tmp_path / "s"), "--n", "12", "--seed", "3")
    assert code == 0, out
    lines = (tmp_path / "s" / "pairs.jsonl").read_text().splitlines()
    assert len(lines) == 12 and len(list((tmp_path / "s" / "images").iterdir())) == 12


def test_train_then_eval_beats_chance(tiny_model: Path, synth_data: Path) -> None:
    code, out = run("eval", "--model", str(tiny_model), "--data", str(synth_data), "--split", "test", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["n_images"] == 60 and report["n_texts"] >= 120
    chance_r5 = 5 / report["n_images"]
    assert report["text_to_image"]["R@5"] > 3 * chance_r5
    assert report["image_to_text"]["R@5"] > 3 * chance_r5
    assert report["text_to_image"]["median_rank"] >= 1


def test_training_writes_a_loadable_model_dir_and_log(tiny_model: Path) -> None:
    names = {p.name for p in tiny_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_log.jsonl", "train_state.pt"} <= names
    log = read_log(tiny_model)
    assert [e["epoch"] for e in log] == list(range(1, len(log) + 1))
    assert log[-1]["loss"] < log[0]["loss"], "the loss should fall over training"
    assert all(e["val"]["text_to_image"]["R@1"] >= 0 for e in log)
    best = max(log, key=lambda e: sum(e["val"][d][k] for d in ("text_to_image", "image_to_text") for k in ("R@1", "R@5", "R@10")))
    assert best["best"], "the best epoch by held-out rsum must be the one marked best"
    assert all(e["bf16"] == use_bf16(True) for e in log), "the log says which precision each epoch trained in"


def test_eval_table_is_readable(tiny_model: Path, synth_data: Path) -> None:
    code, out = run("eval", "--model", str(tiny_model), "--data", str(synth_data), "--split", "test", "--k", "1,3")
    assert code == 0, out
    assert "text->image" in out and "image->text" in out and "R@3" in out


def test_resume_continues_from_the_last_epoch(synth_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    args = ["train", "--data", str(synth_data), "--out", str(out), "--preset", "tiny"]
    assert run(*args, "--epochs", "2")[0] == 0
    code, text = run(*args, "--epochs", "3", "--resume")
    assert code == 0, text
    assert [e["epoch"] for e in read_log(out)] == [1, 2, 3]


def test_image_size_and_one_caption_reach_the_run(synth_data: Path, tmp_path: Path) -> None:
    import torch

    from retrieval.model import load_model

    out = tmp_path / "m"
    code, text = run("train", "--data", str(synth_data), "--out", str(out), "--preset", "tiny", "--epochs", "1",
                     "--image-size", "40", "--one-caption")
    assert code == 0, text
    model = load_model(out)
    assert model.config.image.image_size == 40 and model.transform.size == 40
    assert json.loads(torch.load(out / "train_state.pt", weights_only=True)["train_config"])["all_captions"] is False
    assert model.encode_image([synth_data.parent / "images" / "synth-000000.png"]).shape == (1, model.embed_dim)
    code, text = run("train", "--data", str(synth_data), "--out", str(tmp_path / "hf"), "--init", "hf:/nowhere", "--image-size", "40")
    assert code != 0 and "--image-size" in text


def test_resume_without_a_run_says_so(synth_data: Path, tmp_path: Path) -> None:
    code, out = run("train", "--data", str(synth_data), "--out", str(tmp_path / "m"), "--preset", "tiny", "--resume")
    assert code == 1
    assert "nothing to resume" in out and "without --resume" in out


def test_unreadable_images_are_skipped_and_listed(synth_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_data.parent, data)
    images = sorted((data / "images").iterdir())
    images[0].write_bytes(images[0].read_bytes()[:100])  # truncated
    images[1].write_text("not an image")
    images[2].unlink()  # missing
    out = tmp_path / "m"
    code, text = run("train", "--data", str(data / "pairs.jsonl"), "--out", str(out), "--preset", "tiny", "--epochs", "1")
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
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_help_explains_every_command() -> None:
    for command in ("synth", "train", "eval", "demo"):
        code, out = run(command, "--help")
        assert code == 0 and "Usage:" in out and len(out.splitlines()) > 4
