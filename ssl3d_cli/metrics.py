"""Dice, HD95 (mm) and BraTS regions, on label maps in original label values.

Conventions (written down because peers differ):
- Dice of a class absent from both prediction and truth is 1.0 (empty vs empty is a perfect answer).
- HD95 is the symmetric 95th-percentile surface distance, max(P95(d(A->B)), P95(d(B->A))), in mm using
  the voxel spacing. Both empty: 0. Exactly one empty: the length of the volume's diagonal in mm (the
  largest distance possible on that grid), so means stay finite and a miss is penalised maximally.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    a, b = pred.astype(bool), truth.astype(bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((a & b).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.BinaryContour(img, fullyConnected=True)).astype(bool)


def _distance_to(mask: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Euclidean distance (mm) from every voxel to the nearest voxel of ``mask``."""
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_mm)))  # sitk is (x, y, z) for a (z, y, x) array
    dist = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(dist), 0.0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing_mm: tuple[float, float, float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (see module docstring for empty masks)."""
    a, b = pred.astype(bool), truth.astype(bool)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float(np.sqrt(sum((n * s) ** 2 for n, s in zip(a.shape, spacing_mm))))
    sa, sb = _surface(a), _surface(b)
    d_ab = _distance_to(sb, spacing_mm)[sa]
    d_ba = _distance_to(sa, spacing_mm)[sb]
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def case_metrics(pred: np.ndarray, truth: np.ndarray, *, label_values: list[int], class_names: list[str],
                 spacing_mm: tuple[float, float, float], regions: dict[str, list[int]] | None = None,
                 with_hd95: bool = True) -> dict[str, float]:
    """Per-class (and per-region) Dice and HD95 for one case, plus the foreground mean Dice.

    Args:
        pred, truth: (X, Y, Z) label maps in original label values.
    """
    out: dict[str, float] = {}
    fg_dice = []
    for value, name in zip(label_values[1:], class_names[1:]):
        a, b = pred == value, truth == value
        out[f"dice_{name}"] = dice(a, b)
        fg_dice.append(out[f"dice_{name}"])
        if with_hd95:
            out[f"hd95_{name}"] = hd95(a, b, spacing_mm)
    for region, values in (regions or {}).items():
        a, b = np.isin(pred, values), np.isin(truth, values)
        out[f"dice_{region}"] = dice(a, b)
        if with_hd95:
            out[f"hd95_{region}"] = hd95(a, b, spacing_mm)
    out["dice_mean_fg"] = float(np.mean(fg_dice)) if fg_dice else 1.0
    return out


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every numeric key over cases."""
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float))] if rows else []
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def dice_per_class_indices(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float]:
    """Dice per class on index maps (cache grid), classes 0..C-1."""
    return [dice(pred == c, truth == c) for c in range(num_classes)]
