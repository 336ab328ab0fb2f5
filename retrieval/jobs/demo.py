"""The demo job: synthesise a sample collection, train (or reuse) the default model, evaluate, index, query."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.data.pairs import image_caption_pairs, load_split_pairs
from retrieval.index.search import Hit
from retrieval.jobs.evaluate import as_encoder, evaluate_model
from retrieval.jobs.train import DONE_FILE, train_model

DEMO_ROOT = Path("index_data/demo")
DEMO_IMAGES = 2500  # the synthetic collection the demo trains and evaluates on (20% held out)
DEMO_MINUTES = 2.5  # the demo's training budget; with start-up and evaluation it stays under 3 minutes


@dataclass
class DemoResult:
    """What the demo made and found, for the CLI to report."""

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
    from retrieval.data.synth import generate
    from retrieval.index.build import BuildOptions, build_index
    from retrieval.index.handle import Index

    root = Path(root)
    manifest = root / "data" / "pairs.jsonl"
    if not manifest.is_file():
        generate(root / "data", n, seed=0)
    model_dir = root / "model"
    trained = not (model_dir / DONE_FILE).is_file()
    train_minutes = None
    if trained:
        from retrieval.train.checkpoint import STATE_FILE  # torch, which training loads anyway

        resume = (model_dir / STATE_FILE).is_file()
        train_minutes = train_model(
            manifest, model_dir, preset_name, max_minutes=minutes, resume=resume, progress=progress
        )["minutes"]
        shutil.rmtree(root / "index", ignore_errors=True)  # built with the previous model
    model = as_encoder(model_dir)
    test = image_caption_pairs(load_split_pairs(manifest, None, "test"))
    report = evaluate_model(model, test)
    build_index(manifest, model_dir, root / "index", BuildOptions(progress=progress))
    index = Index.open(root / "index")
    picks = [test[i] for i in np.linspace(0, len(test) - 1, n_examples).astype(int)]
    examples = [(p.captions[0], p.id, index.search(text=p.captions[0], k=3, target="image")) for p in picks]
    return DemoResult(manifest.parent, model_dir, root / "index", trained, train_minutes, report, examples)
