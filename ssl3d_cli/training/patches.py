"""Patch training on a native-resolution cache (issue 15): cases of different sizes, patches cut on the device.

The loader hands whole cases (a list per batch, since sizes differ); each step cuts one patch per case with the step's
own generator, so the patches of a step are a function of (seed, epoch, step) and a resumed run draws the same ones.
A share ``foreground`` of the patches (nnU-Net: 1/3) is centred on a voxel of a foreground class present in the case
(the class drawn uniformly among those present, then the voxel uniformly among its voxels); the others are centred on a
uniformly drawn voxel. A window that would leave the case is shifted inside; a case smaller than the patch along an axis
is padded at its end (image: the case's minimum per channel, label: class 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: nnU-Net's share of patches centred on a foreground voxel.
DEFAULT_FOREGROUND = 1.0 / 3.0
#: Voxels of the default patch (128^3, the paper's grid): what one U-Net pass is sized for.
DEFAULT_PATCH_VOXELS = 128**3


def default_patch_size(case_shapes: Sequence[Sequence[int]], levels: int, budget_voxels: int = DEFAULT_PATCH_VOXELS) -> tuple[int, int, int]:
    """A patch for cases of these (D, H, W) shapes: the median shape, shrunk by one factor on every axis until it fits
    ``budget_voxels``, each side rounded down to a multiple of 2^(levels - 1) (at least that; and the longest axis
    twice that when every side would be it, so the bottleneck keeps more than one voxel).

    Keeping the median shape's proportions gives an anisotropic dataset a flat patch, as nnU-Net does.
    """
    factor = 2 ** (levels - 1)
    shapes = torch.tensor([list(s) for s in case_shapes], dtype=torch.float64)
    median = shapes.median(dim=0).values.tolist()
    scale = min(1.0, (budget_voxels / max(math.prod(median), 1.0)) ** (1.0 / 3.0))
    sides = [max(factor, int(m * scale) // factor * factor) for m in median]
    if all(side == factor for side in sides):  # a 1x1x1 bottleneck: instance norm cannot train on a single voxel
        sides[max(range(3), key=lambda a: median[a])] = 2 * factor
    return sides[0], sides[1], sides[2]


def collate_cases(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A batch of (image (C, D, H, W), label (D, H, W)) pairs of different sizes as two lists (no stacking)."""
    return [image for image, _ in items], [label for _, label in items]


def _centre(label: torch.Tensor, foreground: float, gen: torch.Generator) -> list[int]:
    """A patch centre in ``label`` (D, H, W): on a drawn foreground class's voxel with probability ``foreground``."""
    dev = label.device
    on_foreground = bool(torch.rand((), generator=gen, device=dev) < foreground)
    if on_foreground:
        present = torch.unique(label)
        present = present[present > 0]
        if present.numel():
            cls = present[int(torch.randint(present.numel(), (), generator=gen, device=dev))]
            voxels = (label == cls).nonzero()
            pick = voxels[int(torch.randint(voxels.shape[0], (), generator=gen, device=dev))]
            return [int(v) for v in pick]
    return [int(torch.randint(n, (), generator=gen, device=dev)) for n in label.shape]


def _pad_to(image: torch.Tensor, label: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad image (C, D, H, W) and label (D, H, W) at the end of each axis shorter than the patch."""
    short = [max(0, p - n) for p, n in zip(patch, label.shape)]
    if not any(short):
        return image, label
    pad = [0, short[2], 0, short[1], 0, short[0]]
    low = image.flatten(1).amin(dim=1)  # (C,)
    padded = torch.stack([F.pad(image[c], pad, value=float(low[c])) for c in range(image.shape[0])])
    return padded, F.pad(label, pad, value=0)


def sample_patches(images: list[torch.Tensor], labels: list[torch.Tensor], patch: Sequence[int], *, foreground: float,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One patch per case: images (C, D_i, H_i, W_i) and labels (D_i, H_i, W_i) -> (B, C, *patch), (B, *patch).

    Draws from ``gen`` in case order (see the module docstring); the tensors stay on their device.
    """
    out_images, out_labels = [], []
    for image, label in zip(images, labels):
        image, label = _pad_to(image, label, patch)
        centre = _centre(label, foreground, gen)
        starts = [min(max(c - p // 2, 0), n - p) for c, p, n in zip(centre, patch, label.shape)]
        box = tuple(slice(s, s + p) for s, p in zip(starts, patch))
        out_images.append(image[(slice(None),) + box])
        out_labels.append(label[box])
    return torch.stack(out_images), torch.stack(out_labels)


# --- SimCLR pretraining on a native-resolution cache ----------------------------------------------------------------
# Each step draws one random region per case with the step's generator (uniform position: every window inside the case
# is equally likely; a case smaller than the region is padded at its end with its minimum, as ``_pad_to`` does); the
# regions are then split into the K^3 non-overlapping patches of the paper, so a positive pair is still two augmented
# views of one patch. Draws: per case in batch order, one start per axis (D, H, W), so the regions of a step are a
# function of (seed, epoch, step, rank) and a resumed run draws the same ones.


def default_region_size(case_shapes: Sequence[Sequence[int]], levels: int, patches_per_side: int,
                        budget_voxels: int = DEFAULT_PATCH_VOXELS) -> tuple[int, int, int]:
    """A pretraining region for cases of these (D, H, W) shapes: the median shape, shrunk by one factor on every axis
    until it fits ``budget_voxels`` (the paper's 128^3 volume), each side rounded down to a multiple of
    K * 2^(levels - 1) and at least K * 2^levels (K = ``patches_per_side``).

    So the region splits into K^3 equal patches, each a multiple of 2^(levels - 1) (a size the U-Net takes, as a
    fine-tuning patch) with at least 2 voxels per axis at the bottleneck (what ``PretrainConfig.validate`` asks).
    """
    step = patches_per_side * 2 ** (levels - 1)
    least = patches_per_side * 2**levels
    shapes = torch.tensor([list(s) for s in case_shapes], dtype=torch.float64)
    median = shapes.median(dim=0).values.tolist()
    scale = min(1.0, (budget_voxels / max(math.prod(median), 1.0)) ** (1.0 / 3.0))
    sides = [max(least, int(m * scale) // step * step) for m in median]
    return sides[0], sides[1], sides[2]


def collate_images(items: list[torch.Tensor]) -> list[torch.Tensor]:
    """A batch of images (C, D_i, H_i, W_i) of different sizes as a list (no stacking): pretraining's items."""
    return list(items)


def _pad_image_to(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Image (C, D, H, W) padded at the end of each axis shorter than ``size`` with its minimum per channel.

    The values ``_pad_to`` gives, built on the device without reading the minimum back to the host (no sync).
    """
    shape = list(image.shape[1:])
    if all(n >= s for n, s in zip(shape, size)):
        return image
    target = [max(n, s) for n, s in zip(shape, size)]
    low = image.flatten(1).amin(dim=1)  # (C,)
    out = low.view(-1, 1, 1, 1).expand(image.shape[0], *target).clone()
    out[:, : shape[0], : shape[1], : shape[2]] = image
    return out


def sample_regions(images: list[torch.Tensor], region: Sequence[int], *, gen: torch.Generator) -> torch.Tensor:
    """One random region per case: images (C, D_i, H_i, W_i) -> (M, C, *region), in the images' dtype and device.

    Draws from ``gen`` in case order, one start per axis (see the section comment above). The windows are cut by
    ``index_select`` with the starts left on the device, so a GPU step does not wait for the draw.
    """
    out = []
    for image in images:
        image = _pad_image_to(image, region)
        dev = image.device
        for axis, (n, r) in enumerate(zip(image.shape[1:], region)):
            start = torch.randint(n - r + 1, (1,), generator=gen, device=dev)  # uniform over the windows inside the case
            image = image.index_select(axis + 1, start + torch.arange(r, device=dev))
        out.append(image)
    return torch.stack(out)
