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


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without a pageable copy, which would wait for the GPU to drain."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]


def augment(images: torch.Tensor, gen: torch.Generator, out_size: int) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float [B, 3, out, out] in [0, 1]."""
    b, dev = images.shape[0], images.device
    # Every draw for the batch in one host tensor, sent in one copy.
    u = to_device(torch.rand(9, b, generator=gen), dev)
    area = SCALE[0] + (SCALE[1] - SCALE[0]) * u[0]
    ratio = torch.exp(math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * u[1])
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    flip = torch.where(u[4] < 0.5, -1.0, 1.0)
    brightness, contrast, saturation = (1 - JITTER + 2 * JITTER * u[i] for i in (5, 6, 7))
    gray = (u[8] < GRAYSCALE_P).view(b, 1, 1, 1)

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
    x = torch.where(gray, _gray(x).expand_as(x), x)
    return x.clamp_(0.0, 1.0)
