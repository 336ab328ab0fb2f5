"""Batched training augmentation and the per-step batches: shapes, determinism, and what each knob does."""

import torch

from retrieval.data.pairs import Pair
from retrieval.models.config import Augment
from retrieval.train.augment import augment_batch, crop_thetas, jitter_colours
from retrieval.train.batches import batch_captions, epoch_batches

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _images(n: int = 4, side: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_augment_batch_is_deterministic_per_generator_and_varies_across_seeds() -> None:
    x = _images()
    a = augment_batch(x, 16, MEAN, STD, Augment(), torch.Generator().manual_seed(1))
    b = augment_batch(x, 16, MEAN, STD, Augment(), torch.Generator().manual_seed(1))
    c = augment_batch(x, 16, MEAN, STD, Augment(), torch.Generator().manual_seed(2))
    assert a.shape == (4, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_no_augmentation_is_a_plain_resize_and_normalise() -> None:
    x = torch.full((2, 3, 8, 8), 191, dtype=torch.uint8)
    out = augment_batch(x, 4, MEAN, STD, None, torch.Generator())
    torch.testing.assert_close(out, torch.full((2, 3, 4, 4), (191 / 255 - 0.5) / 0.25))


def test_crops_stay_inside_the_image_and_flip_mirrors_about_half() -> None:
    theta = crop_thetas(2000, 0.35, True, torch.Generator().manual_seed(3))
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]
    assert torch.all(theta[:, 0, 2].abs() + w <= 1 + 1e-6) and torch.all(theta[:, 1, 2].abs() + h <= 1 + 1e-6)
    assert torch.all(w * h >= 0.35 * 0.85)  # area share, less what the clamp of a side at 1 takes off
    mirrored = (theta[:, 0, 0] < 0).float().mean().item()
    assert 0.45 < mirrored < 0.55
    assert torch.all(crop_thetas(100, 0.35, False, torch.Generator().manual_seed(3))[:, 0, 0] > 0)


def test_flip_mirrors_the_pixels() -> None:
    x = torch.arange(8, dtype=torch.float32).repeat(1, 3, 8, 1) / 8  # brightness grows left to right
    theta = torch.tensor([[[-1.0, 0, 0], [0, 1.0, 0]]])
    grid = torch.nn.functional.affine_grid(theta, [1, 3, 8, 8], align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    torch.testing.assert_close(out, x.flip(-1))


def test_zero_jitter_is_identity_and_jitter_changes_colours_within_range() -> None:
    x = _images().float() / 255
    torch.testing.assert_close(jitter_colours(x, 0.0, torch.Generator()), x)
    out = jitter_colours(x, 0.4, torch.Generator().manual_seed(0))
    assert not torch.allclose(out, x) and out.min() >= 0 and out.max() <= 1


def test_epoch_batches_cover_each_image_once_and_repeat_per_epoch() -> None:
    batches = epoch_batches(10, 3, seed=0, epoch=2)
    rows = torch.cat(batches).tolist()
    assert [len(b) for b in batches] == [3, 3, 3] and len(set(rows)) == 9
    assert all(torch.equal(a, b) for a, b in zip(batches, epoch_batches(10, 3, seed=0, epoch=2), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(batches, epoch_batches(10, 3, seed=0, epoch=3), strict=True))


def test_batch_captions_takes_every_caption_or_one_each() -> None:
    pairs = [Pair(id=str(i), image=None, captions=tuple(f"c{i}.{k}" for k in range(i + 1))) for i in range(3)]
    texts, owner = batch_captions(pairs, torch.tensor([2, 0]), True, torch.Generator())
    assert texts == ["c2.0", "c2.1", "c2.2", "c0.0"] and owner.tolist() == [0, 0, 0, 1]
    texts, owner = batch_captions(pairs, torch.tensor([2, 0]), False, torch.Generator().manual_seed(0))
    assert len(texts) == 2 and texts[0] in pairs[2].captions and texts[1] == "c0.0" and owner.tolist() == [0, 1]
