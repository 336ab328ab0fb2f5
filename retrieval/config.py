"""Typed configs for the dual encoder and its training, with named presets.

`tiny` is for tests (seconds on a CPU), `default` is what `retrieval demo` trains in under three
minutes on 2 cores, `large` is for real photo collections such as Flickr8k (an hour on 2 cores).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import RetrievalError

LOSSES = ("clip", "siglip")  # loss.py holds the functions; named here so the CLI need not import torch
TEXT_TOWERS = ("own", "minilm")  # own: trained here from scratch; minilm: pretrained all-MiniLM-L6-v2 (pretrained.py)
FINETUNE_LR = 1e-5  # peak learning rate when fine-tuning a pretrained CLIP/SigLIP (--init): it must not forget
PRETRAINED_CONTEXT = 128  # wordpiece tokens per caption for a pretrained text tower (its tokenizer's own cut)


@dataclass(frozen=True)
class ImageTowerConfig:
    image_size: int = 64  # input side in pixels; the CNN is sized for 64-128 px
    widths: tuple[int, ...] = (32, 64, 128, 256)  # channels per ResNet stage; each stage after the first halves H, W
    blocks_per_stage: int = 1  # basic blocks (two 3x3 convs + skip) per stage


@dataclass(frozen=True)
class TextTowerConfig:
    kind: str = "own"  # "own" (below, from scratch) or "minilm" (pretrained, locked as in LiT; Zhai et al. 2022)
    trainable_layers: int = 0  # pretrained towers: how many of the last layers train; 0 = locked, outputs cached
    context_length: int = 32  # tokens per caption, [BOS] and [EOS] included; longer captions are cut
    width: int = 128  # transformer model dimension
    layers: int = 2  # transformer encoder layers
    heads: int = 4  # attention heads; width must divide by it
    dropout: float = 0.0  # in attention and MLP; regularises the text tower on small caption sets
    vocab_size: int = 0  # set from the tokenizer trained on the captions, never by hand
    # for a pretrained tower, width, layers, heads and vocab_size are copied from its checkpoint's config


@dataclass(frozen=True)
class ModelConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 128  # the shared space both towers project into
    logit_scale_init: float = 1 / 0.07  # CLIP's temperature; learnable, clamped at 100
    logit_bias_init: float = 0.0  # only the sigmoid (SigLIP) loss uses the bias


@dataclass(frozen=True)
class Augment:
    """How much a training image may change (augment.py applies it). Defaults suit small photo sets."""

    min_area: float = 0.35  # a random crop keeps at least this share of the image's area
    flip: bool = True  # mirror half the images: 0.4% of Flickr8k captions say "left" or "right"
    jitter: float = 0.4  # brightness, contrast, saturation scale by factors in [1-x, 1+x]; no hue: captions name colours


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128  # contrastive losses see batch_size - 1 negatives per pair
    lr: float = 2e-3  # peak AdamW learning rate, reached after warm-up
    weight_decay: float = 0.1  # on weight matrices only; norms, biases and the temperature are not decayed
    warmup_fraction: float = 0.05  # share of all steps spent in linear warm-up before the cosine decay
    grad_clip: float = 1.0  # max global gradient norm
    loss: str = "clip"  # "clip" (symmetric InfoNCE) or "siglip" (sigmoid)
    seed: int = 0
    bf16: bool = True  # bf16 autocast where the CPU has bf16 kernels (AVX-512): ~3x fp32; on AVX2 it is ~8x slower, so fp32 there
    augment: bool = True  # random resized crop, flip and colour jitter on training images, as `augmentation` says
    augmentation: Augment = field(default_factory=Augment)
    all_captions: bool = True  # a step trains on every caption of its images (a locked text tower makes them cheap)
    eval_batch_size: int = 256


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    train: TrainConfig


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        ModelConfig(
            image=ImageTowerConfig(image_size=32, widths=(16, 32, 64)),
            text=TextTowerConfig(context_length=24, width=64, layers=1, heads=2),
            embed_dim=64,
        ),
        TrainConfig(epochs=8, batch_size=64, lr=3e-3),
    ),
    "default": Preset(ModelConfig(), TrainConfig()),
    "large": Preset(
        ModelConfig(
            image=ImageTowerConfig(image_size=96, widths=(64, 128, 256, 512)),
            text=TextTowerConfig(context_length=32, width=256, layers=4, heads=4, dropout=0.1),
            embed_dim=256,
        ),
        TrainConfig(epochs=100, batch_size=128, lr=1e-3, weight_decay=0.2),
    ),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise RetrievalError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def loss_init(config: ModelConfig, loss: str) -> ModelConfig:
    """SigLIP starts at t=10, b=-10 (Zhai et al. 2023), so the many negatives don't swamp the first steps."""
    if loss == "siglip":
        return dataclasses.replace(config, logit_scale_init=10.0, logit_bias_init=-10.0)
    return config


def with_text_tower(config: ModelConfig, kind: str, trainable_layers: int = 0) -> ModelConfig:
    """The model config with the chosen text tower; a pretrained tower's sizes are filled in when it loads."""
    if kind not in TEXT_TOWERS:
        raise RetrievalError(f"unknown text tower {kind!r}; choose one of {', '.join(TEXT_TOWERS)}")
    if trainable_layers < 0 or (kind == "own" and trainable_layers):
        raise RetrievalError("--text-trainable-layers is for a pretrained text tower (--text-tower minilm), and at least 0")
    if kind == "own":
        return config
    text = TextTowerConfig(kind=kind, trainable_layers=trainable_layers, context_length=PRETRAINED_CONTEXT)
    return dataclasses.replace(config, text=text)


def model_config_to_dict(config: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of model_config_to_dict; unknown keys are an error so a newer file fails loudly."""
    try:
        image = ImageTowerConfig(**{**d["image"], "widths": tuple(d["image"]["widths"])})
        text = TextTowerConfig(**d["text"])
        rest = {k: v for k, v in d.items() if k not in ("image", "text")}
        config = ModelConfig(image=image, text=text, **rest)
    except (KeyError, TypeError) as e:
        raise RetrievalError(f"model config does not match this version of retrieval ({e}); retrain or upgrade") from e
    if config.text.width % config.text.heads or not math.isfinite(config.logit_scale_init):
        raise RetrievalError("model config is inconsistent: text width must divide by heads")
    if config.text.kind not in TEXT_TOWERS:
        raise RetrievalError(f"model has text tower {config.text.kind!r}, unknown to this version of retrieval: upgrade it")
    return config
