"""The Python API behind the CLI: whole jobs from paths to results, nothing printed.

`train_model` and `evaluate_model` read manifests and splits, call the engine parts (data, model,
train, evaluate) and return plain results; `run_demo` is the embedded default job.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import preset
from .data import Pair, image_caption_pairs, read_pairs, read_split, select
from .errors import ImageError, RetrievalError
from .evaluate import DEFAULT_KS, Embeddings, retrieval_report
from .images import load_pixels
from .model import DualEncoder, load_model
from .query import Hit

DEMO_ROOT = Path("index_data/demo")
DEMO_IMAGES = 2500  # the synthetic collection the demo trains and evaluates on (20% held out)
DEMO_MINUTES = 2.5  # the demo's training budget; with start-up and evaluation it stays under 3 minutes


def load_split_pairs(data: str | Path, split_file: str | Path | None, split: str | None) -> list[Pair]:
    """The pairs of one split; split_file defaults to split.json beside the manifest when there is one."""
    pairs = read_pairs(data)
    split_file = split_file or _default_split_file(data)
    if split is None:
        return pairs
    if split_file is None:
        raise RetrievalError(f"--split {split} needs a split file; none given and no split.json beside {data}")
    chosen = select(pairs, read_split(split_file, split))
    if not chosen:
        raise RetrievalError(f"split {split!r} of {split_file} matches no id in {data}")
    return chosen


def _default_split_file(data: str | Path) -> Path | None:
    candidate = Path(data).parent / "split.json" if Path(data).is_file() else Path(data) / "split.json"
    return candidate if candidate.is_file() else None


def train_model(
    data: str | Path,
    out: str | Path,
    preset_name: str = "default",
    split_file: str | Path | None = None,
    train_split: str = "train",
    val_split: str = "test",
    max_minutes: float | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train on the train split, select the best epoch on the validation split; return the run summary.

    `overrides` replace TrainConfig fields (epochs, batch_size, lr, loss, seed, ...); None means keep.
    Without any split file, every pair trains and the last epoch is kept.
    """
    from .train import train  # torch-heavy; imported only by the commands that train

    p = preset(preset_name)
    train_cfg = dataclasses.replace(p.train, **{k: v for k, v in overrides.items() if v is not None})
    has_split = split_file is not None or _default_split_file(data) is not None
    train_pairs = load_split_pairs(data, split_file, train_split if has_split else None)
    val_pairs = load_split_pairs(data, split_file, val_split) if has_split else []
    t0 = time.monotonic()
    train(train_pairs, val_pairs, out, p.model, train_cfg, max_minutes, resume, progress, on_epoch)
    summary = {"model": str(out), "minutes": (time.monotonic() - t0) / 60, "log": _read_log(Path(out))}
    (Path(out) / "train_done.json").write_text(json.dumps(summary, indent=2))
    return summary


def _read_log(out: Path) -> list[dict[str, Any]]:
    log = out / "train_log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


@dataclass
class Encoded:
    """Embeddings of the pairs whose images could be read, and the reasons for those that could not."""

    pairs: list[Pair]
    image_emb: Embeddings
    skipped: list[str]


def encode_pairs(model: DualEncoder, pairs: Sequence[Pair], batch_size: int = 128) -> Encoded:
    """Load, preprocess and encode the images of `pairs` a batch at a time; unreadable ones are skipped."""
    size = model.config.image.image_size
    kept, chunks, skipped = [], [], []
    for start in range(0, len(pairs), batch_size):
        arrays = []
        for pair in pairs[start : start + batch_size]:
            try:
                arrays.append(load_pixels(pair.image, size))
                kept.append(pair)
            except ImageError as e:
                skipped.append(str(e))
        if arrays:
            chunks.append(model.encode_image(np.stack(arrays), batch_size))
    emb = np.concatenate(chunks) if chunks else np.zeros((0, model.config.embed_dim), np.float32)
    return Encoded(kept, emb, skipped)


def evaluate_model(
    model: DualEncoder | str | Path, pairs: Sequence[Pair], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, Any]:
    """Recall@k and ranks in both directions over `pairs` (each image against every caption)."""
    model = load_model(model) if not isinstance(model, DualEncoder) else model
    pairs = image_caption_pairs(pairs)
    if not pairs:
        raise RetrievalError("no pairs with both an image and a caption to evaluate")
    enc = encode_pairs(model, pairs)
    if not enc.pairs:
        raise RetrievalError(f"none of the {len(pairs)} images could be read; first error: {enc.skipped[0]}")
    texts = [c for p in enc.pairs for c in p.captions]
    text_image = np.array([i for i, p in enumerate(enc.pairs) for _ in p.captions])
    report = retrieval_report(enc.image_emb, model.encode_text(texts), text_image, ks)
    report["skipped_images"] = len(enc.skipped)
    return report


@dataclass
class DemoResult:
    data: Path
    model: Path
    index: Path
    trained: bool  # False when an earlier run's model was reused
    train_minutes: float | None
    report: dict[str, Any]
    examples: list[tuple[str, str, list[Hit]]]  # (query, the id of the image it was written for, hits)


def run_demo(
    root: str | Path = DEMO_ROOT,
    n: int = DEMO_IMAGES,
    minutes: float = DEMO_MINUTES,
    preset_name: str = "default",
    progress: bool = True,
    n_examples: int = 3,
) -> DemoResult:
    """Synthesise the sample collection, train (or reuse) the default model, evaluate it, index and query it."""
    from .indexing import build_index
    from .query import Index
    from .synth import generate

    root = Path(root)
    manifest = root / "data" / "pairs.jsonl"
    if not manifest.is_file():
        generate(root / "data", n, seed=0)
    model_dir = root / "model"
    trained = not (model_dir / "train_done.json").is_file()
    train_minutes = None
    if trained:
        resume = (model_dir / "train_state.pt").is_file()
        train_minutes = train_model(
            manifest, model_dir, preset_name, max_minutes=minutes, resume=resume, progress=progress
        )["minutes"]
        shutil.rmtree(root / "index", ignore_errors=True)  # built with the previous model
    model = load_model(model_dir)
    test = image_caption_pairs(load_split_pairs(manifest, None, "test"))
    report = evaluate_model(model, test)
    build_index(manifest, model_dir, root / "index", progress=progress)
    index = Index.open(root / "index")
    picks = [test[i] for i in np.linspace(0, len(test) - 1, n_examples).astype(int)]
    examples = [(p.captions[0], p.id, index.search(text=p.captions[0], k=3, target="image")) for p in picks]
    return DemoResult(manifest.parent, model_dir, root / "index", trained, train_minutes, report, examples)
