"""The files a training run keeps beside its model: the resume state, the epoch log, the unreadable images.

The state is saved after every epoch so `--resume` loses at most one; the log gets one JSON line per epoch,
trimmed on resume to the epochs the state holds. Only plain values and tensors are stored, so the state loads
with torch.load(weights_only=True).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from retrieval.atomic import atomic_write, atomic_write_text
from retrieval.data.pairs import Pair
from retrieval.errors import RetrievalError
from retrieval.models.config import TrainConfig, model_config_to_dict
from retrieval.models.dual_encoder import DualEncoder
from retrieval.models.encoder import Encoder
from retrieval.models.tokenizer import Tokenizer

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
SKIPPED_FILE = "skipped_images.txt"


def save_state(
    out: Path,
    model: Encoder,
    opt: torch.optim.Optimizer,
    epoch: int,
    best: float,
    elapsed: float,
    train_cfg: TrainConfig,
) -> None:
    """Everything --resume needs, loadable with torch.load(weights_only=True): tensors and plain values only.
    A pretrained tokenizer or checkpoint is not stored: it loads again from its package or hf: path."""
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "vocab": model.tokenizer.vocab if isinstance(model.tokenizer, Tokenizer) else [],
        "epoch": epoch,
        "best": best,
        "elapsed": elapsed,
        "model_config": json.dumps(model_config_to_dict(model.config)) if isinstance(model, DualEncoder) else "",
        "train_config": json.dumps(dataclasses.asdict(train_cfg)),
    }
    atomic_write(out / STATE_FILE, lambda tmp: torch.save(state, tmp))


def load_state(out: Path) -> dict[str, Any]:
    """The state save_state left in `out`; a missing or unreadable one says to start without --resume."""
    path = out / STATE_FILE
    if not path.is_file():
        raise RetrievalError(f"nothing to resume: {path} does not exist; start without --resume")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch raises several types
        raise RetrievalError(f"cannot resume from {path} ({str(e).splitlines()[0]}); start without --resume") from e


def trim_log(out: Path, epochs_done: int) -> None:
    """Keep only the log lines of the epochs the saved state has (none for a new run).

    An epoch's line is appended before its state is saved, so a run killed between the two has a line for an
    epoch that --resume runs again; without this the log would hold that epoch twice. A line cut short by
    the kill is dropped too.
    """
    log = out / LOG_FILE
    if not log.is_file():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("epoch"), int) and entry["epoch"] <= epochs_done:
            kept.append(line + "\n")
    atomic_write_text(log, "".join(kept))


def append_log(out: Path, entry: dict[str, Any]) -> None:
    """One epoch's line, appended as soon as the epoch ends."""
    with (out / LOG_FILE).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def read_log(out: Path) -> list[dict[str, Any]]:
    """The epochs' lines of the run in `out` (none when it has no log)."""
    log = out / LOG_FILE
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def write_skipped(out: Path, skipped: list[tuple[Pair, str]]) -> None:
    """List the unreadable images beside the model so a user can fix or remove them."""
    path = out / SKIPPED_FILE
    if skipped:
        path.write_text("".join(f"{reason}\n" for _, reason in skipped))
    elif path.exists():
        path.unlink()
