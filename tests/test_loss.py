"""The contrastive losses against naive double-loop definitions, plus the properties training relies on."""

from __future__ import annotations

import math

import pytest
import torch

from retrieval.train.loss import clip_loss, siglip_loss


def _batch(b: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = torch.randn(b, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)


def _dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v, strict=True))


def _reference_clip(x: list[list[float]], y: list[list[float]], t: float) -> float:
    """Row-by-row softmax cross-entropy with the diagonal as the label, image->text and text->image averaged."""
    b = len(x)

    def direction(q: list[list[float]], c: list[list[float]]) -> float:
        total = 0.0
        for i in range(b):
            logits = [t * _dot(q[i], c[j]) for j in range(b)]
            m = max(logits)
            log_z = m + math.log(sum(math.exp(z - m) for z in logits))
            total += log_z - logits[i]
        return total / b

    return (direction(x, y) + direction(y, x)) / 2


def _reference_siglip(x: list[list[float]], y: list[list[float]], t: float, bias: float) -> float:
    """Sum over every (i, j) of -log sigmoid(z_ij * (t x_i.y_j + b)), z = +1 on the diagonal, -1 off it; over B."""
    b = len(x)
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            s = z * (t * _dot(x[i], y[j]) + bias)
            total += -math.log(1.0 / (1.0 + math.exp(-s)))
    return total / b


@pytest.mark.parametrize("b,d,t", [(1, 4, 10.0), (2, 3, 1.0), (5, 8, 14.3), (16, 32, 100.0)])
def test_clip_loss_matches_naive_cross_entropy(b: int, d: int, t: float) -> None:
    x, y = _batch(b, d, seed=b)
    got = clip_loss(x, y, torch.tensor(t, dtype=torch.float64)).item()
    assert got == pytest.approx(_reference_clip(x.tolist(), y.tolist(), t), abs=1e-6, rel=1e-6)


@pytest.mark.parametrize("b,d,t,bias", [(1, 4, 10.0, -10.0), (2, 3, 1.0, 0.0), (5, 8, 10.0, -10.0), (16, 32, 3.0, 2.5)])
def test_siglip_loss_matches_naive_pairwise_sigmoid(b: int, d: int, t: float, bias: float) -> None:
    x, y = _batch(b, d, seed=100 + b)
    got = siglip_loss(x, y, torch.tensor(t, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)).item()
    assert got == pytest.approx(_reference_siglip(x.tolist(), y.tolist(), t, bias), abs=1e-6, rel=1e-6)


def test_clip_loss_is_symmetric_in_its_two_inputs() -> None:
    # Swapping the modalities swaps the two directions, whose mean is the loss: this catches a one-direction loss.
    x, y = _batch(6, 5, seed=7)
    t = torch.tensor(5.0, dtype=torch.float64)
    one_way = torch.nn.functional.cross_entropy(t * x @ y.T, torch.arange(6)).item()
    assert clip_loss(x, y, t).item() == pytest.approx(clip_loss(y, x, t).item(), abs=1e-12)
    assert clip_loss(x, y, t).item() != pytest.approx(one_way, abs=1e-6)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_aligned_pairs_score_lower_than_shuffled_ones(loss: str) -> None:
    # Orthonormal rows: the positive scores t, every negative 0, so at a high scale both losses are nearly solved.
    q, _ = torch.linalg.qr(torch.randn(16, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    x = q.T.contiguous()  # (8, 16)
    shuffled = x[torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])]
    t = torch.tensor(50.0, dtype=torch.float64)
    bias = torch.tensor(-5.0, dtype=torch.float64)

    def f(a: torch.Tensor, b: torch.Tensor) -> float:
        return (clip_loss(a, b, t) if loss == "clip" else siglip_loss(a, b, t, bias)).item()

    aligned, wrong = f(x, x), f(x, shuffled)
    assert aligned < 0.1 * wrong
    assert aligned < 0.1


def test_clip_loss_of_identical_candidates_is_log_batch_size() -> None:
    # Every logit equal -> uniform softmax -> cross-entropy log(B), whatever the scale.
    x = torch.nn.functional.normalize(torch.ones(4, 3, dtype=torch.float64), dim=1)
    assert clip_loss(x, x, torch.tensor(30.0, dtype=torch.float64)).item() == pytest.approx(math.log(4), abs=1e-12)


def test_gradients_reach_the_logit_scale_and_the_bias() -> None:
    x, y = _batch(6, 8, seed=11)
    x.requires_grad_(True)
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    clip_loss(x, y, log_scale.exp()).backward()
    assert log_scale.grad is not None and log_scale.grad.abs().item() > 1e-8
    assert x.grad is not None and x.grad.abs().sum().item() > 1e-8

    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    siglip_loss(x.detach(), y, log_scale.exp(), bias).backward()
    assert log_scale.grad is not None and log_scale.grad.abs().item() > 1e-8
    assert bias.grad is not None and bias.grad.abs().item() > 1e-8


def test_siglip_bias_gradient_matches_the_closed_form() -> None:
    # d/db of sum_ij -log sigmoid(z_ij l_ij) / B is sum_ij -z_ij sigmoid(-z_ij l_ij) / B.
    x, y = _batch(4, 6, seed=5)
    t, b = 7.0, -3.0
    bias = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    siglip_loss(x, y, torch.tensor(t, dtype=torch.float64), bias).backward()
    xs, ys = x.tolist(), y.tolist()
    expected = 0.0
    for i in range(4):
        for j in range(4):
            z = 1.0 if i == j else -1.0
            logit = t * _dot(xs[i], ys[j]) + b
            expected += -z / (1.0 + math.exp(z * logit))
    assert bias.grad.item() == pytest.approx(expected / 4, abs=1e-9)


def _reference_multi_caption_clip(x: list[list[float]], y: list[list[float]], owner: list[int], t: float) -> float:
    """Captions: cross-entropy over the images. Images: -log of the softmax mass on their own captions."""
    logits = [[t * _dot(xi, yc) for yc in y] for xi in x]
    text_side = [
        -logits[owner[c]][c] + math.log(sum(math.exp(logits[i][c]) for i in range(len(x)))) for c in range(len(y))
    ]
    image_side = [
        math.log(sum(math.exp(v) for v in row))
        - math.log(sum(math.exp(row[c]) for c in range(len(y)) if owner[c] == i))
        for i, row in enumerate(logits)
    ]
    return (sum(image_side) / len(x) + sum(text_side) / len(y)) / 2


def test_clip_loss_with_several_captions_per_image_matches_the_naive_sums() -> None:
    x, _ = _batch(3, 6, seed=21)
    y, _ = _batch(7, 6, seed=22)
    owner = [0, 0, 1, 2, 2, 2, 1]
    t = 9.0
    got = clip_loss(x, y, torch.tensor(t, dtype=torch.float64), torch.tensor(owner)).item()
    assert got == pytest.approx(_reference_multi_caption_clip(x.tolist(), y.tolist(), owner, t), abs=1e-9)


def test_one_caption_each_is_the_default_owner() -> None:
    x, y = _batch(5, 4, seed=23)
    t, bias = torch.tensor(6.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    assert clip_loss(x, y, t, torch.arange(5)).item() == pytest.approx(clip_loss(x, y, t).item(), abs=1e-12)
    assert siglip_loss(x, y, t, bias, torch.arange(5)).item() == pytest.approx(
        siglip_loss(x, y, t, bias).item(), abs=1e-12
    )


def test_siglip_loss_with_several_captions_marks_each_own_caption_positive() -> None:
    x, _ = _batch(2, 5, seed=24)
    y, _ = _batch(3, 5, seed=25)
    owner, t, b = [1, 0, 1], 4.0, -1.0
    z = [[1.0 if owner[c] == i else -1.0 for c in range(3)] for i in range(2)]
    terms = [
        math.log(1 + math.exp(-z[i][c] * (t * _dot(x[i].tolist(), y[c].tolist()) + b)))
        for i in range(2)
        for c in range(3)
    ]
    expected = sum(terms) / 2
    got = siglip_loss(
        x, y, torch.tensor(t, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), torch.tensor(owner)
    ).item()
    assert got == pytest.approx(expected, abs=1e-9)
