"""The train job: a manifest and its splits in, a trained (or fine-tuned) model directory and its summary out.

It turns the user's choices (preset, towers, heads, image size, an hf: checkpoint to fine-tune) into the
configs the training loop takes, and checks up front the combinations that make no sense.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retrieval.data.pairs import default_split_file, load_split_pairs
from retrieval.errors import RetrievalError
from retrieval.models.config import FINETUNE_LR, ModelConfig, preset, with_heads, with_image_tower, with_text_tower
from retrieval.models.modeldir import hf_config, hf_name
from retrieval.threads import prepare_openmp

DONE_FILE = "train_done.json"  # written last: its presence says the run finished


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
    text_tower: str | None = None,
    text_trainable_layers: int = 0,
    init: str | None = None,
    freeze: str | None = None,
    image_size: int | None = None,
    image_tower: str | None = None,
    image_trainable_blocks: int = 0,
    image_head: str | None = None,
    head_dropout: float | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train on the train split, select the best epoch on the validation split; return the run summary.

    `overrides` replace TrainConfig fields (epochs, batch_size, lr, loss, seed, views, ...); None means keep.
    The towers, heads and image size are the preset's unless given: text_tower "minilm" is the pretrained
    all-MiniLM-L6-v2, locked or with its last text_trainable_layers layers trained; image_tower
    "efficientnet-lite0/1/2" is an ImageNet-pretrained tower, locked or with its last image_trainable_blocks
    blocks trained; image_head "linear" or "mlp" (head_dropout: the MLP's dropout). image_size replaces the
    input side (a checkpoint given to init keeps its own). init ("hf:<dir or name>") fine-tunes a CLIP or
    SigLIP checkpoint instead (its own loss, lr 1e-5 unless given; freeze "image" or "text" locks a side);
    the result is a Hugging Face checkpoint in `out`, loadable as hf:<out>. Without any split file, every
    pair trains and the last epoch is kept.
    """
    prepare_openmp()  # before torch loads, for Python callers (the CLI has done it)
    from retrieval.train.checkpoint import read_log  # torch-heavy; imported only by the commands that train
    from retrieval.train.loop import train

    p = preset(preset_name)
    if init is not None and (image_size is not None or image_tower is not None or image_head is not None):
        raise RetrievalError(
            "--image-size, --image-tower and --image-head are for our own model; "
            "a checkpoint given to --init keeps its own"
        )
    model_cfg = model_config(
        p.model,
        text_tower,
        text_trainable_layers,
        image_tower,
        image_trainable_blocks,
        image_size,
        image_head,
        head_dropout,
    )
    defaults = finetune_defaults(init, freeze, text_tower, overrides.get("loss"))
    train_cfg = dataclasses.replace(p.train, **{**defaults, **{k: v for k, v in overrides.items() if v is not None}})
    has_split = split_file is not None or default_split_file(data) is not None
    train_pairs = load_split_pairs(data, split_file, train_split if has_split else None)
    val_pairs = load_split_pairs(data, split_file, val_split) if has_split else []
    t0 = time.monotonic()
    train(train_pairs, val_pairs, out, model_cfg, train_cfg, max_minutes, resume, progress, on_epoch, init, freeze)
    summary = {"model": str(out), "minutes": (time.monotonic() - t0) / 60, "log": read_log(Path(out))}
    (Path(out) / DONE_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def model_config(
    base: ModelConfig,
    text_tower: str | None,
    text_trainable_layers: int,
    image_tower: str | None,
    image_trainable_blocks: int,
    image_size: int | None,
    image_head: str | None,
    head_dropout: float | None,
) -> ModelConfig:
    """A preset's model config with the towers, input side and head the user chose (None: the preset's)."""
    config = base
    if text_tower is not None or text_trainable_layers:
        config = with_text_tower(config, text_tower or config.text.kind, text_trainable_layers)
    if image_tower is not None or image_trainable_blocks:
        config = with_image_tower(config, image_tower or config.image.kind, image_trainable_blocks)
    if image_size is not None:
        config = dataclasses.replace(config, image=dataclasses.replace(config.image, image_size=image_size))
    return with_heads(config, image_head, head_dropout)


def finetune_defaults(init: str | None, freeze: str | None, text_tower: str | None, loss: str | None) -> dict[str, Any]:
    """TrainConfig fields that fine-tuning a checkpoint changes: a low learning rate, and its own loss."""
    if init is None:
        if freeze:
            raise RetrievalError(
                "--freeze is for fine-tuning (--init hf:...); our own text tower locks with --text-tower minilm"
            )
        return {}
    if hf_name(init) is None:
        raise RetrievalError(f"--init takes a Hugging Face checkpoint, hf:<dir or name>; got {init!r}")
    if text_tower is not None:
        raise RetrievalError("--text-tower builds our own model; it does not combine with --init")
    family = hf_config(init)["model_type"]  # clip or siglip: the names of the losses they were trained with
    if loss not in (None, family):
        raise RetrievalError(f"{init} is a {family} model: fine-tune it with its own loss (--loss {family})")
    return {"lr": FINETUNE_LR, "loss": family}
