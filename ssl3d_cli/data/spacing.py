"""Target spacing of a dataset for the native-resolution mode (issue 15), nnU-Net's rule.

Spacings and shapes are per axis of the canonical (RAS) voxel order, so scans stored in different orientations are
compared axis by axis as they will be resampled. The target is the per-axis median over the dataset's scans, except
on strongly anisotropic data, as nnU-Net (v2, ``determine_fullres_target_spacing``) decides it: when the coarsest
median spacing is more than ``ANISOTROPY_RATIO`` times the largest of the other two AND that axis' median voxel count
times ``ANISOTROPY_RATIO`` is below the smaller of the other two counts, the coarse axis takes the 10th percentile of
its spacings (kept above the largest other spacing), so thick-slice cohorts are resampled to the finer of their slice
thicknesses and lose fewer slices. One difference: nnU-Net's shapes are those after cropping to the nonzero region;
ssl3d passes the whole scans' shapes (the crop is not known before preprocessing). The size of a case's cache grid is
its crop box's extent in millimetres over the target spacing, per axis (:func:`native_size`).

This module imports neither torch nor nibabel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: A dataset is anisotropic when its coarsest median spacing exceeds this many times its finest (nnU-Net: 3).
ANISOTROPY_RATIO = 3.0
#: Percentile of the coarse axis' spacings used as its target on anisotropic data (nnU-Net: 10).
COARSE_AXIS_PERCENTILE = 10.0

Spacing = tuple[float, float, float]


def canonical_spacing(affine: np.ndarray) -> Spacing:
    """Voxel spacing (mm) along the canonical (RAS) axes of a scan with this voxel-to-world ``affine`` (4, 4).

    Canonical axis k is the voxel axis whose direction is closest to world axis k (nibabel's ``io_orientation``), so an
    LPS or sagittal scan reports its spacings in the order its canonical array has.
    """
    import nibabel as nib  # the module stays importable without nibabel's cost for callers that only use the rule

    affine = np.asarray(affine, dtype=np.float64)
    per_voxel_axis = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ornt = nib.orientations.io_orientation(affine)  # row i: voxel axis i -> world axis ornt[i, 0]
    out = [0.0, 0.0, 0.0]
    for voxel_axis, (world_axis, _) in enumerate(ornt):
        out[int(world_axis)] = float(per_voxel_axis[voxel_axis])
    return out[0], out[1], out[2]


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]], *, anisotropy_ratio: float = ANISOTROPY_RATIO,
                   coarse_percentile: float = COARSE_AXIS_PERCENTILE) -> Spacing:
    """The dataset's target spacing from its scans' canonical spacings (n, 3) in mm and shapes (n, 3) in voxels (module
    docstring).

    Raises:
        ValueError: no spacings, a non-positive or non-finite one, or shapes that do not match them.
    """
    values = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
    sizes = np.asarray(shapes, dtype=np.float64).reshape(-1, 3)
    if values.shape[0] == 0:
        raise ValueError("target_spacing: no scans")
    if sizes.shape != values.shape:
        raise ValueError(f"target_spacing: {values.shape[0]} spacings but {sizes.shape[0]} shapes")
    if not (np.isfinite(values).all() and (values > 0).all()):
        raise ValueError(f"target_spacing: spacings must be finite and > 0, got {values[~(np.isfinite(values) & (values > 0)).all(1)][0]}")
    target = np.median(values, axis=0)
    median_size = np.median(sizes, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(3) if a != coarse]
    largest_other = float(max(target[a] for a in others))
    anisotropic_spacing = target[coarse] > anisotropy_ratio * largest_other
    anisotropic_voxels = median_size[coarse] * anisotropy_ratio < min(median_size[a] for a in others)
    if anisotropic_spacing and anisotropic_voxels:
        chosen = float(np.percentile(values[:, coarse], coarse_percentile))
        if chosen < largest_other:  # never finer than the in-plane spacing (nnU-Net's guard)
            chosen = largest_other + 1e-5
        target[coarse] = chosen
    return float(target[0]), float(target[1]), float(target[2])


def native_size(crop_shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, int, int]:
    """Voxels per axis of a crop box of ``crop_shape`` voxels at ``spacing`` mm resampled to ``target`` mm (at least 1).

    Rounded to the nearest integer, so the resampled voxels are within half a voxel of the target over the box's extent.
    """
    sizes = [max(1, int(np.floor(n * s / t + 0.5))) for n, s, t in zip(crop_shape, spacing, target)]
    return sizes[0], sizes[1], sizes[2]


def parse_spacing(text: str | Sequence[float], *, option: str = "--spacing") -> Spacing:
    """``"0.8,0.8,2.5"`` (or a sequence) -> three positive millimetre values along the canonical (R, A, S) axes.

    Raises:
        ValueError: not three positive finite numbers (the message names ``option`` and an example).
    """
    parts = [p for p in text.split(",")] if isinstance(text, str) else list(text)
    try:
        values = [float(p) for p in parts]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{option} {text!r}: give three spacings in mm along R, A, S, e.g. 0.8,0.8,2.5")
    return values[0], values[1], values[2]
