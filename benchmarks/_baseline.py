"""The code paths as they were before issue 14's speed work, frozen here so benchmarks time before and after in one run.

Each function is a verbatim copy of the version it replaced (same names, same results); the package's current
functions are compared with these by the benchmarks (timings) and by ``tests/test_speed_paths.py`` (outputs).
Not used by the tool itself.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ssl3d_cli.config import PreprocessConfig
from ssl3d_cli.data.preprocessing import CaseGeometry, PreprocessedCase, from_canonical, to_canonical


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    if not mask.any():
        return (0, 0, 0), tuple(int(s) for s in mask.shape)  # type: ignore[return-value]
    start, stop = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        start.append(int(idx[0]))
        stop.append(int(idx[-1]) + 1)
    return tuple(start), tuple(stop)  # type: ignore[return-value]


def resample_label(label: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    t = torch.from_numpy(label.astype(np.float32))[None, None]
    out = F.interpolate(t, size=size, mode="nearest-exact")
    return out[0, 0].numpy().astype(np.uint8)


def foreground_mask(image: np.ndarray, modality: str, *, ct_threshold_hu: float = -500.0) -> np.ndarray:
    if modality == "ct":
        body = image[0] > ct_threshold_hu
        if not body.any():
            return body
        itk = sitk.GetImageFromArray(body.astype(np.uint8))
        components = sitk.RelabelComponent(sitk.ConnectedComponent(itk), sortByObjectSize=True)
        largest = sitk.BinaryFillhole(sitk.Equal(components, 1))
        return sitk.GetArrayFromImage(largest).astype(bool)
    return np.any(image != 0, axis=0)


def normalise(image: np.ndarray, mask: np.ndarray, modality: str, clip_percentiles: tuple[float, float]) -> tuple[np.ndarray, dict]:
    out = np.empty_like(image, dtype=np.float32)
    stats: list[dict[str, float]] = []
    for c in range(image.shape[0]):
        chan = image[c]
        if modality == "ct":
            fg = chan[mask] if mask.any() else chan.ravel()
            lo, hi = np.percentile(fg, clip_percentiles)
            fg = np.clip(fg, lo, hi)
            mean, std = float(fg.mean()), float(fg.std())
            out[c] = (np.clip(chan, lo, hi) - mean) / max(std, 1e-6)
            stats.append({"clip_low": float(lo), "clip_high": float(hi), "mean": mean, "std": std})
        else:
            nz = chan != 0
            vals = chan[nz] if nz.any() else chan.ravel()
            mean, std = float(vals.mean()), float(vals.std())
            out[c] = np.where(nz, (chan - mean) / max(std, 1e-6), 0.0)
            stats.append({"mean": mean, "std": std})
    return out, {"channels": stats}


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _antialias(volume: torch.Tensor, factors: tuple[float, float, float]) -> torch.Tensor:
    channels = volume.shape[1]
    for axis, factor in enumerate(factors):
        if factor <= 1.5:
            continue
        k = _gaussian_kernel((factor - 1) / 2)
        shape = [1, 1, 1]
        shape[axis] = k.numel()
        weight = k.view(1, 1, *shape).repeat(channels, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = k.numel() // 2
        volume = F.conv3d(F.pad(volume, pad, mode="replicate"), weight, groups=channels)
    return volume


def resample_image(image: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    vol = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    factors = tuple(s / t for s, t in zip(image.shape[1:], size))
    vol = _antialias(vol, factors)  # type: ignore[arg-type]
    out = F.interpolate(vol, size=size, mode="trilinear", align_corners=False)
    return out[0].numpy()


def preprocess_arrays(image: np.ndarray, affine: np.ndarray, *, modality: str, config: PreprocessConfig,
                      label: np.ndarray | None = None) -> PreprocessedCase:
    import nibabel as nib

    size = tuple(config.size)
    canon = to_canonical(image, affine)
    mask = foreground_mask(canon, modality, ct_threshold_hu=config.ct_body_threshold_hu)
    start, stop = bounding_box(mask)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    crop = canon[(slice(None),) + box]
    normed, intensity = normalise(crop, mask[box], modality, tuple(config.clip_percentiles))  # type: ignore[arg-type]
    out_image = resample_image(normed, size)  # type: ignore[arg-type]
    out_label = None
    if label is not None:
        out_label = resample_label(to_canonical(label, affine)[box], size)  # type: ignore[arg-type]
    axcodes = tuple(nib.orientations.aff2axcodes(affine))
    geometry = CaseGeometry(tuple(int(s) for s in image.shape[1:]), np.asarray(affine).tolist(), axcodes,  # type: ignore[arg-type]
                            start, stop, size)  # type: ignore[arg-type]
    return PreprocessedCase(out_image, out_label, geometry, intensity)


def restore_scores(scores: torch.Tensor | np.ndarray, geometry: CaseGeometry, *, background: list[float] | float = 0.0) -> np.ndarray:
    t = torch.as_tensor(scores, dtype=torch.float32)
    crop = F.interpolate(t[None], size=geometry.crop_shape, mode="trilinear", align_corners=False)[0]
    bg = torch.as_tensor(background, dtype=torch.float32).reshape(-1)
    if bg.numel() == 1:
        bg = bg.expand(t.shape[0])
    full = bg.view(-1, 1, 1, 1).expand(t.shape[0], *geometry.canonical_shape).clone()
    box = tuple(slice(a, b) for a, b in zip(geometry.crop_start, geometry.crop_stop))
    full[(slice(None),) + box] = crop
    return from_canonical(full.numpy(), geometry.axcodes)


def restore_label(label: np.ndarray | torch.Tensor, geometry: CaseGeometry, num_classes: int | None = None) -> np.ndarray:
    lab = torch.as_tensor(np.asarray(label), dtype=torch.long)
    n = int(num_classes if num_classes is not None else int(lab.max()) + 1)
    box = tuple(slice(a, b) for a, b in zip(geometry.crop_start, geometry.crop_stop))
    best = torch.full(geometry.crop_shape, -1.0)
    arg = torch.zeros(geometry.crop_shape, dtype=torch.long)
    for c in range(n):
        ind = (lab == c).float()[None, None]
        if c > 0 and not bool(ind.any()):
            continue
        up = F.interpolate(ind, size=geometry.crop_shape, mode="trilinear", align_corners=False)[0, 0]
        better = up > best
        best = torch.where(better, up, best)
        arg = torch.where(better, torch.full_like(arg, c), arg)
    full = np.zeros(geometry.canonical_shape, dtype=np.int64)
    full[box] = arg.numpy()
    return from_canonical(full, geometry.axcodes)


def decide(scores: torch.Tensor, mean_prob: torch.Tensor, *, rel_tol: float = 1e-6) -> torch.Tensor:
    top = scores.max(0, keepdim=True).values
    tied = scores >= top - rel_tol * top.abs().clamp_min(1.0)
    masked = torch.where(tied, mean_prob, torch.full_like(mean_prob, -1.0))
    return masked.argmax(0)


def apply_union(labels: torch.Tensor, any_vote: torch.Tensor, union_classes: list[int]) -> torch.Tensor:
    out = labels.clone()
    for c in reversed(union_classes):
        out[any_vote[c]] = c
    return out


class VoteAccumulator:
    """Every rule's sums for every sample (the accumulator before issue 14)."""

    def __init__(self, num_classes: int, weights: torch.Tensor | None = None, track_entropy: bool = False) -> None:
        self.num_classes, self.weights, self.track_entropy = num_classes, weights, track_entropy
        self.votes = self.wp_votes = self.borda = self.prob_sum = self.entropy_sum = None
        self.n = 0

    def _init(self, probs: torch.Tensor) -> None:
        shape = (self.num_classes, *probs.shape[2:])
        dev = probs.device
        self.votes = torch.zeros(shape, device=dev)
        self.wp_votes = torch.zeros(shape, device=dev)
        self.borda = torch.zeros(shape, device=dev)
        self.prob_sum = torch.zeros(shape, device=dev)
        if self.track_entropy:
            self.entropy_sum = torch.zeros(shape[1:], device=dev)
        w = torch.ones(self.num_classes) if self.weights is None else self.weights
        self.weights = w.to(dev, torch.float32)
        self._class_ids = torch.arange(self.num_classes, device=dev).view(1, -1, *([1] * (probs.ndim - 2)))

    def _count(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels[:, None] == self._class_ids).sum(0, dtype=torch.float32)

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> None:
        if self.votes is None:
            self._init(probs)
        probs = probs.float()
        self.votes += self._count(probs.argmax(1))
        self.wp_votes += self._count((probs * self.weights.view(1, -1, *([1] * (probs.ndim - 2)))).argmax(1))
        self.borda += probs.argsort(1).argsort(1).sum(0, dtype=torch.float32)
        self.prob_sum += probs.sum(0)
        if self.entropy_sum is not None:
            self.entropy_sum += -(probs * torch.log(probs.clamp_min(1e-12))).sum(1).sum(0)
        self.n += probs.shape[0]

    def mean_prob(self) -> torch.Tensor:
        return self.prob_sum / max(self.n, 1)

    def scores(self, rule: str) -> torch.Tensor:
        if rule in ("majority", "union"):
            return self.votes
        if rule == "weighted":
            return self.votes * self.weights.view(-1, *([1] * (self.votes.ndim - 1)))
        if rule == "weighted-probs":
            return self.wp_votes
        if rule == "borda":
            return self.borda
        if rule == "mean":
            return self.mean_prob()
        raise ValueError(rule)


def scan_labels(acc, geometry: CaseGeometry, rule: str, union_classes: list[int] | None = None) -> np.ndarray:
    """``ScanVotes(acc, geometry).labels(rule)`` as it was: C maps resampled onto the full grid, decided there."""
    fill = [1.0] + [0.0] * (acc.num_classes - 1)

    def restore(scores: torch.Tensor, background: list[float] | float) -> torch.Tensor:
        return torch.from_numpy(restore_scores(scores.cpu(), geometry, background=background))

    mean = restore(acc.mean_prob(), fill)
    if acc.n <= 1 or rule == "mean":
        return decide(mean, mean).numpy()
    labels = decide(restore(acc.scores(rule), fill), mean)
    if rule == "union" and union_classes:
        labels = apply_union(labels, restore((acc.votes > 0).float(), 0.0) >= 0.5, union_classes)
    return labels.numpy()
