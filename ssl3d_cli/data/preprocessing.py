"""Per-case preprocessing (paper Appendix B.1) and its exact inverse.

Forward, per case:
    file voxel order --reorient--> canonical RAS --crop (image-only foreground box)-->
    --normalise (native voxels)--> --resample to ``size``--> cache grid (C, D, H, W)

Inverse (:func:`restore_scores`, :func:`restore_label`): cache grid --resample to crop shape-->
--paste into the canonical volume--> --undo reorientation--> file voxel order, so the array lies
voxel for voxel on the source scan and is written with its header (:func:`nifti.write_like`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ssl3d_cli.config import PreprocessConfig
from ssl3d_cli.errors import InputDataError


@dataclass
class CaseGeometry:
    """Everything needed to map a cache-grid array back onto the source scan.

    Attributes:
        original_shape: (X, Y, Z) of the source file.
        affine: (4, 4) of the source file.
        axcodes: orientation of the source voxel axes, e.g. ("L", "P", "S").
        crop_start / crop_stop: the foreground box in canonical (RAS) voxel coordinates.
        size: the cache grid (D, H, W).
    """

    original_shape: tuple[int, int, int]
    affine: list[list[float]]
    axcodes: tuple[str, str, str]
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]
    size: tuple[int, int, int]

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.crop_start, self.crop_stop))  # type: ignore[return-value]

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        ornt = nib.orientations.axcodes2ornt(self.axcodes)
        shape = [0, 0, 0]
        for i, (axis, _) in enumerate(_to_ras(ornt)):
            shape[int(axis)] = self.original_shape[i]
        return tuple(shape)  # type: ignore[return-value]

    @property
    def scale_factors(self) -> tuple[float, float, float]:
        """Original voxels per cache voxel along each canonical axis."""
        return tuple(c / s for c, s in zip(self.crop_shape, self.size))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {
            "original_shape": list(self.original_shape),
            "affine": self.affine,
            "axcodes": list(self.axcodes),
            "crop_start": list(self.crop_start),
            "crop_stop": list(self.crop_stop),
            "size": list(self.size),
            "scale_factors": list(self.scale_factors),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaseGeometry:
        return cls(tuple(d["original_shape"]), d["affine"], tuple(d["axcodes"]),  # type: ignore[arg-type]
                   tuple(d["crop_start"]), tuple(d["crop_stop"]), tuple(d["size"]))  # type: ignore[arg-type]


def _to_ras(ornt: np.ndarray) -> np.ndarray:
    return nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(("R", "A", "S")))


def to_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder/flip the last three axes of (..., X, Y, Z) into RAS order (exact, no interpolation)."""
    transform = _to_ras(nib.orientations.io_orientation(affine))
    return _apply_ornt_last3(array, transform)


def from_canonical(array: np.ndarray, axcodes: tuple[str, str, str]) -> np.ndarray:
    """Inverse of :func:`to_canonical` for (..., D, H, W) arrays."""
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ras, nib.orientations.axcodes2ornt(axcodes))
    return _apply_ornt_last3(array, transform)


def _apply_ornt_last3(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    lead = array.ndim - 3
    moved = np.moveaxis(array, list(range(lead)), list(range(3, 3 + lead))) if lead else array
    out = nib.orientations.apply_orientation(moved, transform)
    if lead:
        out = np.moveaxis(out, list(range(3, 3 + lead)), list(range(lead)))
    return np.ascontiguousarray(out)


def foreground_mask(image: np.ndarray, modality: str, *, ct_threshold_hu: float = -500.0) -> np.ndarray:
    """Foreground from the image alone (never the label, so prediction can make the same crop).

    Args:
        image: (C, D, H, W) raw intensities.
        modality: ``ct``: body mask = HU above the threshold, largest connected component, holes
            filled; ``mr``: voxels nonzero in any channel.
    Returns:
        (D, H, W) bool mask.
    """
    if modality == "ct":
        body = image[0] > ct_threshold_hu
        if not body.any():
            return body
        itk = sitk.GetImageFromArray(body.astype(np.uint8))
        components = sitk.RelabelComponent(sitk.ConnectedComponent(itk), sortByObjectSize=True)
        largest = sitk.BinaryFillhole(sitk.Equal(components, 1))
        return sitk.GetArrayFromImage(largest).astype(bool)
    return np.any(image != 0, axis=0)


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(start, stop) of the nonzero region; the whole volume when the mask is empty."""
    if not mask.any():
        return (0, 0, 0), tuple(int(s) for s in mask.shape)  # type: ignore[return-value]
    start, stop = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        start.append(int(idx[0]))
        stop.append(int(idx[-1]) + 1)
    return tuple(start), tuple(stop)  # type: ignore[return-value]


def normalise(image: np.ndarray, mask: np.ndarray, modality: str, clip_percentiles: tuple[float, float]) -> tuple[np.ndarray, dict[str, Any]]:
    """Intensity normalisation on native voxels.

    CT: clip to the foreground's percentiles, z-score with the clipped foreground statistics.
    MR: z-score each channel over its nonzero voxels; background stays 0.

    Args:
        image: (C, D, H, W) float32 (cropped).
        mask: (D, H, W) foreground.
    Returns:
        Normalised image and the statistics used (recorded per case).
    """
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
    """Separable Gaussian blur along axes that are downsampled by more than 1.5x (avoids aliasing)."""
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
    """(C, d, h, w) -> (C, *size), trilinear, anti-aliased when shrinking. float32."""
    vol = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    factors = tuple(s / t for s, t in zip(image.shape[1:], size))
    vol = _antialias(vol, factors)  # type: ignore[arg-type]
    out = F.interpolate(vol, size=size, mode="trilinear", align_corners=False)
    return out[0].numpy()


def resample_label(label: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """(d, h, w) class indices -> (*size), nearest neighbour (never linear). uint8."""
    t = torch.from_numpy(label.astype(np.float32))[None, None]
    out = F.interpolate(t, size=size, mode="nearest-exact")
    return out[0, 0].numpy().astype(np.uint8)


def map_labels(label: np.ndarray, label_values: list[int], path: str) -> np.ndarray:
    """Original label values -> contiguous class indices (uint8); undeclared values are an error."""
    if label.size and label.min() >= 0:  # counting is O(n); np.unique sorts (O(n log n)) and is ~10x slower here
        present = np.flatnonzero(np.bincount(label.ravel()))
    else:
        present = np.unique(label)
    unknown = sorted(set(present.tolist()) - set(label_values))
    if unknown:
        raise InputDataError(f"{path}: label value(s) {unknown} are not declared (declared: {label_values}); fix the labels or dataset.json")
    lut = np.zeros(max(max(label_values), int(present.max())) + 1, dtype=np.uint8)
    for index, value in enumerate(label_values):
        lut[value] = index
    return lut[label]


def unmap_labels(classes: np.ndarray, label_values: list[int]) -> np.ndarray:
    """Contiguous class indices -> original label values (uint8 when they fit, else int16)."""
    lut = np.asarray(label_values, dtype=np.int16 if max(label_values) > 255 else np.uint8)
    return lut[classes]


@dataclass
class PreprocessedCase:
    """Cache-grid arrays of one case: image (C, D, H, W) float, label (D, H, W) uint8 or None."""

    image: np.ndarray
    label: np.ndarray | None
    geometry: CaseGeometry
    intensity: dict[str, Any]


def preprocess_arrays(
    image: np.ndarray,
    affine: np.ndarray,
    *,
    modality: str,
    config: PreprocessConfig,
    label: np.ndarray | None = None,
) -> PreprocessedCase:
    """Run the forward pipeline on one case.

    Args:
        image: (C, X, Y, Z) raw intensities in file voxel order.
        affine: (4, 4) of the file.
        modality: ``ct`` or ``mr``.
        label: (X, Y, Z) class indices (already mapped), optional.
    """
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
    """Map per-class maps from the cache grid back onto the source scan's voxel grid.

    Args:
        scores: (C, D, H, W) per-class probabilities, vote fractions or any score, on the cache grid.
        background: value per channel outside the crop box (e.g. probability 1 for class 0).
    Returns:
        (C, X, Y, Z) float32 in the source file's voxel order.
    """
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
    """Map a cache-grid label map (D, H, W) of class indices back onto the source grid (X, Y, Z).

    Each class's indicator is resampled linearly and the largest wins (smoother than nearest
    neighbour, and exact where the grids coincide); one class at a time keeps memory at a few
    volumes whatever the number of classes. Outside the crop box: class 0.
    """
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
