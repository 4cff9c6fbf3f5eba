"""Training augmentation for segmentation, applied identically to image and label, batched on the device.

Per sample: random flips along each axis (prob. 0.5), a small rotation about each axis
(U(-15, 15) degrees, prob. 0.3; nearest for the label), intensity scale U(0.9, 1.1) and shift
U(-0.1, 0.1) (prob. 0.5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssl3d_cli.augment.simclr import _rotation_matrices


def augment_pair(image: torch.Tensor, label: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """image (B, C, D, H, W) float, label (B, D, H, W) long -> both transformed the same way."""
    b, dev = image.shape[0], image.device
    flips = torch.rand(b, 3, generator=gen, device=dev) < 0.5
    for axis in range(3):
        sel = flips[:, axis]
        if sel.any():
            image = torch.where(sel.view(-1, 1, 1, 1, 1), image.flip(2 + axis), image)
            label = torch.where(sel.view(-1, 1, 1, 1), label.flip(1 + axis), label)
    rotate = torch.rand(b, generator=gen, device=dev) < 0.3
    angles = (torch.rand(b, 3, generator=gen, device=dev) * 2 - 1) * math.radians(15)
    if rotate.any():
        theta = torch.cat([_rotation_matrices(angles[rotate]), torch.zeros(int(rotate.sum()), 3, 1, device=dev)], 2)
        img = image[rotate]
        grid = F.affine_grid(theta.to(img.dtype), list(img.shape), align_corners=False)
        image = image.clone()
        label = label.clone()
        image[rotate] = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
        lab = label[rotate][:, None].to(img.dtype)
        label[rotate] = F.grid_sample(lab, grid, mode="nearest", padding_mode="border", align_corners=False)[:, 0].long()
    jitter = (torch.rand(b, generator=gen, device=dev) < 0.5).view(-1, 1, 1, 1, 1)
    scale = 0.9 + 0.2 * torch.rand(b, 1, 1, 1, 1, generator=gen, device=dev)
    shift = -0.1 + 0.2 * torch.rand(b, 1, 1, 1, 1, generator=gen, device=dev)
    image = torch.where(jitter, image * scale.to(image.dtype) + shift.to(image.dtype), image)
    return image, label
