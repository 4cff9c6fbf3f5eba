"""SimCLR augmentations for 3D patches, batched on the training device.

Every call transforms a whole batch (N, C, d, h, w) with per-sample random parameters drawn from
one ``torch.Generator``: no Python loop over patches (rotations by multiples of 90 degrees are
grouped by plane and turn count, at most 12 grouped calls).

A view is a random composite: each enabled transform is applied to a sample with probability
``p`` (default 0.5), in the order rotate -> colour -> blur -> noise -> sobel -> cutout. ``identity``
leaves a sample untouched with probability ``p`` regardless of the others.

Parameter ranges (documented in the README):
- rotate: with prob. 1/2 an exact 90/180/270 degree turn in a random plane; otherwise arbitrary angles,
  each axis independently rotated with prob. 1/2 by U(-30, 30) degrees (trilinear, border padding).
- colour: brightness + U(-0.4, 0.4) std, contrast x U(0.6, 1.4) about the mean,
  gamma U(0.7, 1.5) on min-max scaled intensities; the three in random order per sample.
- blur: Gaussian, sigma U(0.5, 1.5) voxels (kernel radius 3).
- noise: additive Gaussian, sigma U(0, 0.2) x the sample's std.
- sobel: 3D Sobel gradient magnitude per channel, re-standardised (constant patches give zeros).
- cutout: one box of side U(0.2, 0.5) x patch size set to the sample mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ORDER = ("rotate", "colour", "blur", "noise", "sobel", "cutout")


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1, 1)


def rotate90(x: torch.Tensor, chosen: torch.Tensor, plane: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Exact rotations: sample i (where chosen) is turned ``turns[i]`` x 90 degrees in plane ``plane[i]``.

    Planes are (d,h), (d,w), (h,w); only planes with equal sides are used (patches are usually cubes).
    """
    planes = [(2, 3), (2, 4), (3, 4)]
    out = x.clone()
    for p, dims in enumerate(planes):
        if x.shape[dims[0]] != x.shape[dims[1]]:
            continue
        for k in (1, 2, 3):
            sel = chosen & (plane == p) & (turns == k)
            if sel.any():
                out[sel] = torch.rot90(x[sel], k, dims)
    return out


def _rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """angles (N, 3) radians about the three axes -> (N, 3, 3) = Rz @ Ry @ Rx."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(-1, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(-1, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def rotate_arbitrary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each sample about its centre by ``angles`` (N, 3) radians; one grid_sample call."""
    theta = torch.cat([_rotation_matrices(angles.float()), torch.zeros(x.shape[0], 3, 1, device=x.device)], dim=2)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_distort(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and gamma in a random order per sample.

    Each of the three steps applies one op to each sample: the samples are split by which op they get
    at that step, so the work is three ops per sample (not nine) and still one call per op and step.
    """
    n, dev = x.shape[0], x.device
    dims = tuple(range(1, x.ndim))
    std = x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    bright = _bcast(_uniform(gen, n, -0.4, 0.4, dev)) * std
    contrast = _bcast(_uniform(gen, n, 0.6, 1.4, dev))
    gamma = _bcast(_uniform(gen, n, 0.7, 1.5, dev))
    order = torch.argsort(torch.rand(n, 3, generator=gen, device=dev), dim=1)  # a random permutation per sample

    def apply(op: int, v: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        if op == 0:
            return v + bright[sel]
        if op == 1:
            mean = v.mean(dim=dims, keepdim=True)
            return (v - mean) * contrast[sel] + mean
        lo = v.amin(dim=dims, keepdim=True)
        rng = (v.amax(dim=dims, keepdim=True) - lo).clamp_min(1e-6)
        return lo + rng * ((v - lo) / rng).clamp(0, 1) ** gamma[sel]

    x = x.clone()
    for step in range(3):
        for op in range(3):
            sel = (order[:, step] == op).nonzero().squeeze(1)
            if sel.numel():
                x[sel] = apply(op, x[sel], sel)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (N,), as three grouped convolutions."""
    n, c = x.shape[:2]
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].float()) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0).to(x.dtype)  # (N*C, 2r+1)
    v = x.reshape(1, n * c, *x.shape[2:])
    size = 2 * radius + 1
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = size
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        v = F.conv3d(F.pad(v, pad, mode="replicate"), k.view(n * c, 1, *shape), groups=n * c)
    return v.view_as(x)


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """3D Sobel gradient magnitude per channel, standardised per sample; constant input -> zeros."""
    n, c = x.shape[:2]
    smooth = torch.tensor([1.0, 2.0, 1.0], device=x.device)
    deriv = torch.tensor([-1.0, 0.0, 1.0], device=x.device)
    kernels = []
    for axis in range(3):
        parts = [deriv if a == axis else smooth for a in range(3)]
        kernels.append(parts[0][:, None, None] * parts[1][None, :, None] * parts[2][None, None, :])
    weight = torch.stack(kernels)[:, None].to(x.dtype)  # (3, 1, 3, 3, 3)
    v = F.pad(x.reshape(n * c, 1, *x.shape[2:]), [1] * 6, mode="replicate")
    grad = F.conv3d(v, weight)  # (N*C, 3, d, h, w)
    mag = torch.sqrt((grad.float() ** 2).sum(1) + 1e-12).view_as(x)
    dims = tuple(range(1, x.ndim))
    mean, std = mag.mean(dim=dims, keepdim=True), mag.std(dim=dims, keepdim=True)
    return ((mag - mean) / (std + 1e-6)).to(x.dtype)


def cutout(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Set one random box per sample (side 20-50 % of the patch) to the sample mean."""
    n, dev = x.shape[0], x.device
    mask = torch.ones(n, 1, 1, 1, 1, dtype=torch.bool, device=dev)
    for axis, size in enumerate(x.shape[2:]):
        side = (_uniform(gen, n, 0.2, 0.5, dev) * size).long().clamp_min(1)
        start = (torch.rand(n, generator=gen, device=dev) * (size - side + 1).float()).long()
        pos = torch.arange(size, device=dev)
        inside = (pos[None] >= start[:, None]) & (pos[None] < (start + side)[:, None])  # (N, size)
        shape = [n, 1, 1, 1, 1]
        shape[2 + axis] = size
        mask = mask & inside.view(shape)
    mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.where(mask, mean, x)


def augment_view(x: torch.Tensor, *, augmentations: tuple[str, ...], gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """One random composite augmentation per sample of x (N, C, d, h, w); same shape, dtype, device."""
    n, dev = x.shape[0], x.device
    out = x
    keep = torch.zeros(n, dtype=torch.bool, device=dev)
    if "identity" in augmentations:
        keep = torch.rand(n, generator=gen, device=dev) < p
    for name in ORDER:
        if name not in augmentations:
            continue
        chosen = (torch.rand(n, generator=gen, device=dev) < p) & ~keep
        if name == "rotate":
            exact = torch.rand(n, generator=gen, device=dev) < 0.5
            plane = torch.randint(0, 3, (n,), generator=gen, device=dev)
            turns = torch.randint(1, 4, (n,), generator=gen, device=dev)
            on_axis = torch.rand(n, 3, generator=gen, device=dev) < 0.5
            angles = _uniform(gen, 3 * n, -math.pi / 6, math.pi / 6, dev).view(n, 3) * on_axis
            free = chosen & ~exact
            new = rotate90(out, chosen & exact, plane, turns)
            if free.any():
                new[free] = rotate_arbitrary(out[free], angles[free])
            out = new
            continue
        # compute the transform on the chosen samples only (about half the work of a masked select)
        sel = chosen.nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        sub = out[sel]
        m = sel.numel()
        if name == "colour":
            new = colour_distort(sub, gen)
        elif name == "blur":
            new = gaussian_blur(sub, _uniform(gen, m, 0.5, 1.5, dev))
        elif name == "noise":
            std = sub.std(dim=tuple(range(1, sub.ndim)), keepdim=True)
            sigma = _bcast(_uniform(gen, m, 0.0, 0.2, dev)) * std
            new = sub + sigma * torch.randn(sub.shape, generator=gen, device=dev, dtype=sub.dtype)
        elif name == "sobel":
            new = sobel_magnitude(sub)
        else:
            new = cutout(sub, gen)
        if out is x:  # never write into the caller's tensor
            out = x.clone()
        out[sel] = new
    return out


def split_into_patches(volumes: torch.Tensor, k: int) -> torch.Tensor:
    """(M, C, D, H, W) -> (M*k^3, C, D/k, H/k, W/k): k^3 equal, non-overlapping patches per volume, volume-major."""
    m, c, d, h, w = volumes.shape
    pd, ph, pw = d // k, h // k, w // k
    v = volumes.view(m, c, k, pd, k, ph, k, pw)
    return v.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(m * k**3, c, pd, ph, pw)
