"""The batched augmentation: seeded, in range, and colour-correct."""

from __future__ import annotations

import torch

from dgkit.distill.augment import augment


def _images(n=6, size=24):
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 255
            ).to(torch.uint8)


def test_same_seed_same_batch_and_other_seed_differs():
    a = augment(_images(), torch.Generator().manual_seed(5), 16)
    b = augment(_images(), torch.Generator().manual_seed(5), 16)
    c = augment(_images(), torch.Generator().manual_seed(6), 16)
    assert a.shape == (6, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_gray_images_stay_gray():
    gray = _images()[:, :1].expand(-1, 3, -1, -1).contiguous()
    out = augment(gray, torch.Generator().manual_seed(0), 24)
    torch.testing.assert_close(out[:, 0], out[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 1], out[:, 2], atol=1e-5, rtol=0)


def test_a_flat_image_keeps_its_mean_under_the_crop():
    flat = torch.full((8, 3, 20, 20), 128, dtype=torch.uint8)
    out = augment(flat, torch.Generator().manual_seed(0), 12)
    # Crop and flip cannot change a flat image; only brightness (0.7-1.3x) can.
    per_image = out.mean((1, 2, 3))
    assert ((per_image > 0.7 * 128 / 255 - 1e-4) & (per_image < 1.3 * 128 / 255 + 1e-4)).all()
    assert torch.allclose(out.std((2, 3)), torch.zeros(8, 3), atol=1e-5)
