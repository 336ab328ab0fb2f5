"""Zero-shot classification: hand-worked probabilities and accuracy, and the CLI against the model's own numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval.cli.main import main
from retrieval.evaluation.classify import (
    classification_report,
    confusion_matrix,
    probabilities,
    top_k_accuracy,
    top_labels,
)
from retrieval.prompts import prompts

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_probabilities_are_the_scaled_softmax() -> None:
    labels = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    items = np.array([[0.8, 0.6]], dtype=np.float32)
    p = probabilities(labels, items, scale=10.0)
    want = np.exp([8.0, 6.0]) / np.exp([8.0, 6.0]).sum()
    np.testing.assert_allclose(p[0], want, rtol=1e-6)
    assert probabilities(labels, items, scale=1000.0)[0, 0] == pytest.approx(1.0)  # no overflow at large scales


def test_accuracy_and_confusion_hand_worked() -> None:
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # true 0, predicted 0
            [0.5, 0.3, 0.2],  # true 1, predicted 0, second choice 1
            [0.1, 0.1, 0.8],  # true 2, predicted 2
            [0.4, 0.35, 0.25],
        ]
    )  # true 2, predicted 0, third choice
    truth = np.array([0, 1, 2, 2])
    assert top_k_accuracy(probs, truth, 1) == 0.5
    assert top_k_accuracy(probs, truth, 2) == 0.75
    assert confusion_matrix(truth, probs.argmax(1), 3).tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 1]]
    report = classification_report(probs, truth, ["a", "b", "c"])
    assert report["chance_top1"] == pytest.approx(1 / 3) and report["majority_top1"] == 0.5
    assert report["per_label"]["c"] == {"n": 2, "top1": 0.5} and report["per_label"]["b"]["top1"] == 0.0


def test_top_labels_hand_worked() -> None:
    probs = np.array([[0.1, 0.6, 0.3], [0.4, 0.2, 0.4]])
    top = top_labels(probs, ["cat", "dog", "fox"], ["a.jpg", "b.jpg"], k=2)
    assert top == {"a.jpg": [["dog", 0.6], ["fox", 0.3]], "b.jpg": [["cat", 0.4], ["fox", 0.4]]}  # a tie: label order


def test_prompts() -> None:
    assert prompts(["food-drink", "red_circle"]) == ["a photo of a food drink", "a photo of a red circle"]
    assert prompts(["x"], "{label}") == ["x"]
    with pytest.raises(ValueError, match="must contain"):
        prompts(["x"], "no placeholder")


@pytest.fixture(scope="module")
def labelled(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-object synthetic scenes with their shape's colour as a label field."""
    rows = []
    for line in synth_data.read_text().splitlines():
        row = json.loads(line)
        if len(row["objects"]) == 1:
            row["image"] = str(synth_data.parent / row["image"])
            row["colour"] = row["objects"][0]["colour"]
            rows.append(json.dumps(row))
    out = tmp_path_factory.mktemp("classify") / "single.jsonl"
    out.write_text("\n".join(rows) + "\n")
    return out


@pytest.mark.slow
def test_cli_report_equals_the_models_own_probabilities(labelled: Path, tiny_model: Path, tmp_path: Path) -> None:
    from retrieval.models.load import load_model

    result = CliRunner().invoke(
        main,
        [
            "classify",
            "--model",
            str(tiny_model),
            "--data",
            str(labelled),
            "--label-field",
            "colour",
            "--template",
            "a {label} shape",
            "--plot",
            str(tmp_path),
            "--out",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "r.json").read_text())
    report, labels = saved["report"], saved["labels"]
    assert labels == sorted({"red", "green", "blue", "yellow", "purple", "orange"} & set(labels)) and len(labels) >= 5
    rows = [json.loads(line) for line in labelled.read_text().splitlines()]
    model = load_model(tiny_model)
    label_emb = model.encode_text([f"a {label} shape" for label in labels])
    image_emb = model.encode_image([r["image"] for r in rows])
    logits = float(model.inverse_temperature().detach()) * image_emb @ label_emb.T
    predicted = logits.argmax(1)
    truth = np.array([labels.index(r["colour"]) for r in rows])
    assert report["top1"] == pytest.approx(np.mean(predicted == truth))
    assert report["n_items"] == len(rows)
    assert report["top1"] > 2 * report["chance_top1"], report  # colour is the easiest thing the model learns
    assert (tmp_path / "confusion.png").stat().st_size > 10_000
    assert "top-1" in result.output and "chance" in result.output


@pytest.mark.slow
def test_a_weight_below_one_fuses_image_and_caption(labelled: Path, tiny_model: Path, tmp_path: Path) -> None:
    """--weight 0.3: each item is 0.3 e(image) + 0.7 e(captions), the captions' normalised mean; its labels'
    probabilities are the scaled softmax of the prompts' cosines with that vector, computed here by hand."""
    from retrieval.models.load import load_model

    result = CliRunner().invoke(
        main,
        [
            "classify",
            "--model",
            str(tiny_model),
            "--data",
            str(labelled),
            "--label-field",
            "colour",
            "--template",
            "a {label} shape",
            "--weight",
            "0.3",
            "--out",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["weight"] == 0.3 and saved["template"] == "a {label} shape" and saved["skipped"] == 0
    labels, rows = saved["labels"], [json.loads(line) for line in labelled.read_text().splitlines()]
    model = load_model(tiny_model)
    label_emb = model.encode_text([f"a {label} shape" for label in labels]).astype(np.float64)  # (L, D)
    image_emb = model.encode_image([r["image"] for r in rows]).astype(np.float64)  # (N, D)
    caption_emb = np.stack([model.encode_text(r["captions"]).astype(np.float64).mean(0) for r in rows])
    caption_emb /= np.linalg.norm(caption_emb, axis=1, keepdims=True)
    logits = float(model.inverse_temperature().detach()) * (0.3 * image_emb + 0.7 * caption_emb) @ label_emb.T  # (N, L)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    truth = np.array([labels.index(r["colour"]) for r in rows])
    assert saved["report"]["top1"] == pytest.approx(np.mean(probs.argmax(1) == truth), abs=1.5 / len(rows))
    for row, p in zip(rows, probs, strict=True):
        top = saved["top"][row["id"]]
        assert top[0][0] == labels[int(p.argmax())] and top[0][1] == pytest.approx(p.max(), abs=1e-4), row["id"]


@pytest.mark.slow
def test_cli_files_print_their_top_labels(synth_data: Path, tiny_model: Path) -> None:
    files = sorted((synth_data.parent / "images").iterdir())[:2]
    result = CliRunner().invoke(
        main, ["classify", "--model", str(tiny_model), "--labels", "circle,square,star", *[str(f) for f in files]]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and all(line.count(",") == 2 for line in lines)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give image FILES or --data"),
        (["--labels", "a"], "at least two labels"),
        (["--labels", "a,b", "--template", "nothing"], "must contain {label}"),
    ],
)
@pytest.mark.slow
def test_bad_classify_options(args, message, synth_data: Path, tiny_model: Path) -> None:
    files = [] if not args else [str(sorted((synth_data.parent / "images").iterdir())[0])]
    result = CliRunner().invoke(main, ["classify", "--model", str(tiny_model), *args, *files])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
