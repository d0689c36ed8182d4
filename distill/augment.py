"""Batched training augmentation on whatever device holds the images.

DomainBed's recipe (random resized crop with scale 0.7-1.0, horizontal flip, colour jitter 0.3,
random grayscale 0.1) done for a whole batch at once with one `grid_sample`, so decoded images
can stay on the GPU and the loader is never the bottleneck. Hue jitter is left out. Every random
number comes from a CPU generator seeded per step, so a resumed run sees the same crops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCALE = (0.7, 1.0)
RATIO = (3 / 4, 4 / 3)
JITTER = 0.3
GRAYSCALE_P = 0.1
_LUMA = (0.299, 0.587, 0.114)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def augment(images: torch.Tensor, gen: torch.Generator, out_size: int) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float [B, 3, out, out] in [0, 1]."""
    b = images.shape[0]
    area = _uniform(b, *SCALE, gen)
    ratio = torch.exp(_uniform(b, math.log(RATIO[0]), math.log(RATIO[1]), gen))
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = _uniform(b, -1, 1, gen) * (1 - w)
    cy = _uniform(b, -1, 1, gen) * (1 - h)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    brightness, contrast, saturation = (_uniform(b, 1 - JITTER, 1 + JITTER, gen) for _ in range(3))
    gray = torch.rand(b, generator=gen) < GRAYSCALE_P

    dev = images.device
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta.to(dev), [b, 3, out_size, out_size], align_corners=False)
    x = F.grid_sample(images.float() / 255.0, grid, mode="bilinear", padding_mode="reflection",
                      align_corners=False)
    luma = torch.tensor(_LUMA, device=dev).view(1, 3, 1, 1)
    x = x * brightness.to(dev).view(b, 1, 1, 1)
    mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = (x - mean) * contrast.to(dev).view(b, 1, 1, 1) + mean
    y = (x * luma).sum(1, keepdim=True)
    x = (x - y) * saturation.to(dev).view(b, 1, 1, 1) + y
    x = torch.where(gray.to(dev).view(b, 1, 1, 1), (x * luma).sum(1, keepdim=True).expand_as(x), x)
    return x.clamp_(0.0, 1.0)
