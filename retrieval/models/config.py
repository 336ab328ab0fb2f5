"""Typed configs for the dual encoder and its training, with named presets.

`tiny` is for tests (seconds on a CPU), `default` is what `retrieval demo` trains in under three
minutes on 2 cores, `large` is for real photo collections such as Flickr8k (an hour on 2 cores).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from retrieval.errors import RetrievalError

LOSSES = ("clip", "siglip")  # loss.py holds the functions; named here so the CLI need not import torch
TEXT_TOWERS = ("own", "minilm")  # own: trained here from scratch; minilm: pretrained all-MiniLM-L6-v2 (minilm.py)
# resnet: ours, from scratch; efficientnet-lite*: ImageNet-pretrained (efficientnet.py), with their native input sides
PRETRAINED_IMAGE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
ENSEMBLE = "efficientnet-lite0+efficientnet-lite2"  # both networks' pooled features side by side
IMAGE_TOWERS = ("resnet", *PRETRAINED_IMAGE_SIZES, ENSEMBLE)
IMAGE_HEADS = ("linear", "mlp", "conse")  # conse: the zero-shot head (zeroshot.py), never trained
ZEROSHOT_TEMPERATURE = (
    2.0  # ConSE's softmax temperature; Flickr8k test t2i R@10: 21.6% at 1, 23.7% at 2 (Lite0, top 10)
)
TEXT_HEADS = ("linear", "identity")  # identity: the text tower's own space (the zero-shot model's)
FINETUNE_LR = 1e-5  # peak learning rate when fine-tuning a pretrained CLIP/SigLIP (--init): it must not forget
PRETRAINED_CONTEXT = 128  # wordpiece tokens per caption for a pretrained text tower (its tokenizer's own cut)


@dataclass(frozen=True)
class ImageTowerConfig:
    kind: str = "resnet"  # "resnet" (below, from scratch) or a pretrained "efficientnet-lite0/1/2"
    trainable_blocks: int = 0  # pretrained towers: how many of the last blocks train; 0 = locked, outputs cached
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
class HeadConfig:
    """The projections from each tower into the shared space."""

    image: str = (
        "linear"  # "linear", "mlp" (Linear-GELU-Dropout-Linear: room to adapt a locked tower's features), "conse"
    )
    text: str = "linear"  # "linear" or "identity"
    hidden: int = 1024  # mlp: hidden width
    dropout: float = 0.0  # mlp: dropout after the hidden layer
    input_dropout: float = 0.0  # mlp: dropout on the tower's features, before the first layer
    top: int = 10  # conse: the image embeds as the probability-weighted mean of its top classes' text embeddings
    temperature: float = (
        1.0  # conse: the classifier's softmax temperature (> 1 spreads the weight over the top classes)
    )


@dataclass(frozen=True)
class ModelConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    embed_dim: int = 128  # the shared space both towers project into
    logit_scale_init: float = 1 / 0.07  # CLIP's temperature; learnable, clamped at 100
    logit_bias_init: float = 0.0  # only the sigmoid (SigLIP) loss uses the bias


@dataclass(frozen=True)
class Augment:
    """How much a training image may change (augment.py applies it). Defaults suit small photo sets."""

    min_area: float = 0.35  # a random crop keeps at least this share of the image's area
    flip: bool = True  # mirror half the images: 0.4% of Flickr8k captions say "left" or "right"
    jitter: float = (
        0.4  # brightness, contrast, saturation scale by factors in [1-x, 1+x]; no hue: captions name colours
    )


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
    # bf16 autocast where the CPU has bf16 kernels (AVX-512): ~3x fp32; on AVX2 it is ~8x slower, so fp32 there
    bf16: bool = True
    augment: bool = True  # random resized crop, flip and colour jitter on training images, as `augmentation` says
    augmentation: Augment = field(default_factory=Augment)
    all_captions: bool = True  # a step trains on every caption of its images (a locked text tower makes them cheap)
    views: int = (
        4  # a locked pretrained image tower: outputs cached per image for the centre and views-1 augmented crops
    )
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
    # ImageNet EfficientNet-Lite0 and -Lite2 side by side, and MiniLM, all locked and run once (4 views per
    # image), so the epochs train only the projections: about 20 minutes on 2 cores for Flickr8k's 6,000
    # photos, most of it the towers. An MLP image head with strong dropout: on cached features the head
    # overfits first (on Flickr8k dev, dropout 0.7-0.8 and input dropout 0.2 beat 0.5 by 2-4 points of R@10).
    "pretrained": Preset(
        ModelConfig(
            image=ImageTowerConfig(kind=ENSEMBLE, image_size=PRETRAINED_IMAGE_SIZES["efficientnet-lite2"]),
            text=TextTowerConfig(kind="minilm", context_length=PRETRAINED_CONTEXT),
            head=HeadConfig(image="mlp", hidden=1024, dropout=0.8, input_dropout=0.2),
            embed_dim=256,
        ),
        TrainConfig(epochs=60, batch_size=256, lr=1e-3, weight_decay=0.1, views=4),
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
        raise RetrievalError(
            "--text-trainable-layers is for a pretrained text tower (--text-tower minilm), and at least 0"
        )
    if kind == "own":
        return config if config.text.kind == "own" else dataclasses.replace(config, text=TextTowerConfig())
    text = TextTowerConfig(kind=kind, trainable_layers=trainable_layers, context_length=PRETRAINED_CONTEXT)
    return dataclasses.replace(config, text=text)


def with_image_tower(config: ModelConfig, kind: str, trainable_blocks: int = 0) -> ModelConfig:
    """The model config with the chosen image tower; a pretrained tower takes its native input side."""
    if kind not in IMAGE_TOWERS:
        raise RetrievalError(f"unknown image tower {kind!r}; choose one of {', '.join(IMAGE_TOWERS)}")
    if trainable_blocks < 0 or (kind == "resnet" and trainable_blocks):
        raise RetrievalError(
            "--image-trainable-blocks is for a pretrained image tower (--image-tower efficientnet-lite0), "
            "and at least 0"
        )
    if kind == "resnet":
        return config if config.image.kind == "resnet" else dataclasses.replace(config, image=ImageTowerConfig())
    image = ImageTowerConfig(kind=kind, trainable_blocks=trainable_blocks, image_size=pretrained_image_size(kind))
    return dataclasses.replace(config, image=image)


def pretrained_image_size(kind: str) -> int:
    """A pretrained tower's native input side; an ensemble's is its largest network's."""
    return max(PRETRAINED_IMAGE_SIZES[name] for name in kind.split("+"))


def with_heads(config: ModelConfig, image_head: str | None = None, dropout: float | None = None) -> ModelConfig:
    """The model config with the chosen image head and MLP dropout (None: keep)."""
    if image_head is not None and image_head not in ("linear", "mlp"):
        raise RetrievalError(f"--image-head takes linear or mlp, got {image_head!r}")
    if dropout is not None and not 0 <= dropout < 1:
        raise RetrievalError(f"--head-dropout must be in [0, 1), got {dropout}")
    head = dataclasses.replace(
        config.head, image=image_head or config.head.image, dropout=config.head.dropout if dropout is None else dropout
    )
    return dataclasses.replace(config, head=head)


def model_config_to_dict(config: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of model_config_to_dict; unknown keys are an error so a newer file fails loudly."""
    try:
        image = ImageTowerConfig(**{**d["image"], "widths": tuple(d["image"]["widths"])})
        text = TextTowerConfig(**d["text"])
        head = HeadConfig(**d.get("head", {}))  # format 1 models before heads were configurable: linear, linear
        rest = {k: v for k, v in d.items() if k not in ("image", "text", "head")}
        config = ModelConfig(image=image, text=text, head=head, **rest)
    except (KeyError, TypeError) as e:
        raise RetrievalError(f"model config does not match this version of retrieval ({e}); retrain or upgrade") from e
    if config.text.width % config.text.heads or not math.isfinite(config.logit_scale_init):
        raise RetrievalError("model config is inconsistent: text width must divide by heads")
    for part, known in (
        (config.text.kind, TEXT_TOWERS),
        (config.image.kind, IMAGE_TOWERS),
        (config.head.image, IMAGE_HEADS),
        (config.head.text, TEXT_HEADS),
    ):
        if part not in known:
            raise RetrievalError(f"model has a part {part!r} unknown to this version of retrieval: upgrade retrieval")
    return config
