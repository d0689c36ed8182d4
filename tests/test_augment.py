"""The batched augmentation: seeded, in range, and colour-correct."""

from __future__ import annotations

import torch
from torchvision.transforms.functional import adjust_hue

from dgkit.distill.augment import augment, shift_hue
from dgkit.train_config import AUGMENTATIONS


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


def test_hue_shift_is_torchvision_adjust_hue():
    x = torch.rand(7, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    x[0] = 0.5  # gray: no hue to shift
    x[1, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    shifts = torch.tensor([0.3, -0.5, -0.4, -0.1, 0.0, 0.25, 0.5])
    expected = torch.stack([adjust_hue(x[i], float(shifts[i])) for i in range(7)])
    torch.testing.assert_close(shift_hue(x, shifts), expected, atol=1e-5, rtol=0)


def test_presets_without_hue_keep_their_crops_and_hue_changes_colours():
    images = _images()
    plain = augment(images, torch.Generator().manual_seed(3), 16)
    nohue = augment(images, torch.Generator().manual_seed(3), 16, AUGMENTATIONS["domainbed-nohue"])
    assert torch.equal(plain, nohue)  # the fast recipe's default, as before hue existed
    hue = augment(images, torch.Generator().manual_seed(3), 16, AUGMENTATIONS["domainbed"])
    assert not torch.allclose(hue, plain)
