"""Batched training augmentation on whatever device holds the images.

torchvision's random resized crop, horizontal flip, colour jitter and random grayscale, with the
ranges of an `Augmentation` preset (DomainBed's, RISE's), done for a whole batch at once with one
`grid_sample`, so decoded images can stay on the GPU and the loader is never the bottleneck. The
jitter runs in a fixed order (brightness, contrast, saturation, hue) where torchvision shuffles
it per image. Every random number comes from a CPU generator seeded per step, so a resumed run
sees the same crops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dgkit.train_config import AUGMENTATIONS, Augmentation

RATIO = (3 / 4, 4 / 3)
_LUMA = (0.299, 0.587, 0.114)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without a pageable copy, which would wait for the GPU to drain."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue for a batch: RGB -> HSV, h += shift (in turns), HSV -> RGB."""
    top, argmax = x.max(dim=1)
    bottom = x.min(dim=1).values
    chroma = top - bottom
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x.unbind(1)
    h = torch.where(argmax == 0, ((g - b) / safe) % 6,
                    torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    h = torch.where(chroma > 0, h, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    s = torch.where(top > 0, chroma / torch.where(top > 0, top, torch.ones_like(top)),
                    torch.zeros_like(top))
    # hsv -> rgb: channel n is v - v s max(0, min(k, 4 - k, 1)), k = (n + 6 h) mod 6
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
         + 6 * h.unsqueeze(1)) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0.0, 1.0)
    return top.unsqueeze(1) * (1 - s.unsqueeze(1) * ramp)


def augment(images: torch.Tensor, gen: torch.Generator, out_size: int,
            preset: Augmentation = AUGMENTATIONS["domainbed-nohue"]) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float [B, 3, out, out] in [0, 1]."""
    b, dev = images.shape[0], images.device
    scale, jitter = preset.scale, preset.jitter
    # Every draw for the batch in one host tensor, sent in one copy.
    u = to_device(torch.rand(9, b, generator=gen), dev)
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    ratio = torch.exp(math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * u[1])
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    flip = torch.where(u[4] < 0.5, -1.0, 1.0)
    brightness, contrast, saturation = (1 - jitter + 2 * jitter * u[i] for i in (5, 6, 7))
    gray = (u[8] < preset.grayscale).view(b, 1, 1, 1)

    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, (2 * u[2] - 1) * (1 - w)
    theta[:, 1, 1], theta[:, 1, 2] = h, (2 * u[3] - 1) * (1 - h)
    grid = F.affine_grid(theta, [b, 3, out_size, out_size], align_corners=False)
    x = F.grid_sample(images.float() / 255.0, grid, mode="bilinear", padding_mode="reflection",
                      align_corners=False)
    x = x * brightness.view(b, 1, 1, 1)
    mean = _gray(x).mean((2, 3), keepdim=True)
    x = (x - mean) * contrast.view(b, 1, 1, 1) + mean
    y = _gray(x)
    x = (x - y) * saturation.view(b, 1, 1, 1) + y
    if preset.hue:  # drawn after the others, so presets without hue keep their crops
        hue = to_device(torch.rand(b, generator=gen), dev)
        x = shift_hue(x.clamp(0.0, 1.0), (2 * hue - 1) * preset.hue)
    x = torch.where(gray, _gray(x).expand_as(x), x)
    return x.clamp_(0.0, 1.0)
