"""Dice, HD95 and normalised surface Dice (NSD), in mm, and BraTS regions, on label maps in original label values.

Conventions (written down because peers differ; :func:`conventions` returns them for result files):

- Masks are boolean arrays of shape (X, Y, Z); ``spacing_mm`` is the voxel size along those same three axes, in mm.
- Surface: a foreground voxel is a surface voxel when at least one of its 6 face neighbours is background, and the
  outside of the array counts as background (a mask touching the array border has a surface there). This is the
  surface of MONAI (``get_mask_edges``) and medpy: the mask minus its erosion by the 6-connected cross with a
  background border.
- Surface distance: the Euclidean distance in mm between voxel centres, from a surface voxel of one mask to the
  nearest surface voxel of the other (exact, anisotropic spacing).
- HD95: max(P95 of d(S_A -> S_B), P95 of d(S_B -> S_A)), each P95 the 95th percentile of the directed distances
  with linear interpolation between order statistics (``numpy.percentile``'s default, as MONAI's
  ``compute_hausdorff_distance(percentile=95)``; note medpy's ``hd95`` pools both directions into one percentile
  and DeepMind's ``compute_robust_hausdorff`` weights surface elements by area, so they differ slightly).
  Both empty: 0. Exactly one empty: the length of the volume's diagonal in mm, sqrt(sum((n_i * s_i)^2)) (as BraTS
  reports 373.13 mm for 240 x 240 x 155 at 1 mm), so means stay finite and a miss is penalised maximally.
- NSD at tolerance tau (mm): (|S_A within tau of S_B| + |S_B within tau of S_A|) / (|S_A| + |S_B|), counting surface
  voxels ("within" is d <= tau), as MONAI's ``compute_surface_dice`` without sub-voxels; DeepMind's
  ``compute_surface_dice_at_tolerance`` weights by surface-element area instead. Both empty: 1. One empty: 0.
- Dice of a class absent from both prediction and truth is 1.0 (empty vs empty is a perfect answer).

Surface distances are computed on the joint bounding box of both masks padded by one background voxel: every
surface voxel lies inside that box and the pad realises "outside is background", so the crop cannot change a result.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

Spacing = tuple[float, float, float]
DEFAULT_NSD_TOLERANCE_MM = 2.0
# ITK's distance maps are float32; a distance equal to tau on paper may land a few ulps above it.
_NSD_RELATIVE_SLACK = 1e-6


def conventions(nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM, *, with_surface: bool = True) -> dict[str, str | float]:
    """The metric conventions in words, for result files (JSON), so every output says what its numbers are.

    ``with_surface=False`` (Dice only): just the Dice convention.
    """
    if not with_surface:
        return {"dice": "both empty: 1", "surface_metrics": "not computed (Dice only)"}
    return {
        "dice": "both empty: 1",
        "surface": "6-connected (a foreground voxel with a background face neighbour), outside the array is background",
        "distance": "Euclidean, in mm between voxel centres, with the voxel spacing (anisotropic)",
        "hd95": "max of the two directed 95th percentiles (numpy.percentile, linear); both empty: 0; one empty: volume diagonal in mm",
        "nsd": "surface voxels within tolerance (d <= tau) of the other surface over all surface voxels of both; both empty: 1; one empty: 0",
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
    }


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape; 1.0 when both are empty."""
    a, b = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((a & b).sum()) / total


def volume_diagonal_mm(shape: tuple[int, ...], spacing_mm: Spacing) -> float:
    """Length (mm) of the diagonal of a volume of ``shape`` voxels of ``spacing_mm``: sqrt(sum((n_i * s_i)^2))."""
    return float(np.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing_mm))))


def bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Tight bounding box of the True voxels of a (X, Y, Z) mask as slices, or None when empty.

    Reads the whole array once along the first axis, then only the slab that holds the mask.
    """
    boxes: list[slice] = []
    sub = mask
    for axis in range(3):
        others = tuple(i for i in range(3) if i != axis)
        hits = np.flatnonzero(sub.any(axis=others))
        if hits.size == 0:
            return None
        box = slice(int(hits[0]), int(hits[-1]) + 1)
        boxes.append(box)
        sub = sub[(slice(None),) * axis + (box,)]
    return boxes[0], boxes[1], boxes[2]


def surface(mask: np.ndarray) -> np.ndarray:
    """6-connected surface of a (X, Y, Z) boolean mask, the outside of the array counted as background.

    Returns a boolean array of the same shape: True where ``mask`` is True and a face neighbour is not.
    """
    p = np.pad(mask.astype(bool), 1, constant_values=False)
    core = p[1:-1, 1:-1, 1:-1]
    interior = core.copy()
    for axis in range(3):
        for step in (-1, 1):
            neighbour = [slice(1, -1)] * 3
            neighbour[axis] = slice(1 + step, p.shape[axis] - 1 + step)
            interior &= p[tuple(neighbour)]
    return core & ~interior


def _distance_to(target: np.ndarray, spacing_mm: Spacing) -> np.ndarray:
    """Exact Euclidean distance (mm, float32, same shape) from every voxel centre to the nearest True voxel centre.

    ``target`` must not touch the array border (ITK's own contour step treats the outside as foreground).
    """
    img = sitk.GetImageFromArray(target.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_mm)))  # sitk is (x, y, z) for a (z, y, x) array
    dist = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(dist), 0.0)  # inside the target (<= 0) is distance 0


def _joint_box(box_a: tuple[slice, ...], box_b: tuple[slice, ...]) -> tuple[slice, ...]:
    """Smallest box (slices) holding both boxes."""
    return tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(box_a, box_b))


def _distances_in_box(a: np.ndarray, b: np.ndarray, box: tuple[slice, ...], spacing_mm: Spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances of two masks computed on ``box`` (their joint bounding box) padded by one background voxel."""
    ca, cb = (np.pad(m[box], 1, constant_values=False) for m in (a, b))
    sa, sb = surface(ca), surface(cb)
    d_ab = _distance_to(sb, spacing_mm)[sa].astype(np.float64)
    d_ba = _distance_to(sa, spacing_mm)[sb].astype(np.float64)
    return d_ab, d_ba


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing_mm: Spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (mm, float64, 1-D): d(S_pred -> S_truth) per pred surface voxel and the reverse.

    Both masks (X, Y, Z) must be non-empty. Works on their joint bounding box padded by one background voxel.
    """
    a, b = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    box_a, box_b = bounding_box(a), bounding_box(b)
    if box_a is None or box_b is None:
        raise ValueError("surface_distances needs two non-empty masks")
    return _distances_in_box(a, b, _joint_box(box_a, box_b), spacing_mm)


def hd95_from_distances(d_ab: np.ndarray, d_ba: np.ndarray) -> float:
    """HD95 (mm) from the two non-empty directed distance arrays: max of their 95th percentiles (linear)."""
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def nsd_from_distances(d_ab: np.ndarray, d_ba: np.ndarray, tolerance_mm: float) -> float:
    """NSD from the two directed distance arrays (mm): the fraction of both surfaces' voxels within ``tolerance_mm``."""
    limit = float(tolerance_mm) * (1.0 + _NSD_RELATIVE_SLACK)
    total = d_ab.size + d_ba.size
    return float((np.count_nonzero(d_ab <= limit) + np.count_nonzero(d_ba <= limit)) / total) if total else 1.0


def surface_metrics(pred: np.ndarray, truth: np.ndarray, spacing_mm: Spacing,
                    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> tuple[float, float]:
    """(HD95 in mm, NSD at ``nsd_tolerance_mm``) of two (X, Y, Z) masks, sharing one pair of distance maps.

    Empty masks: both empty -> (0.0, 1.0); exactly one empty -> (volume diagonal in mm, 0.0).
    """
    if not nsd_tolerance_mm >= 0:  # also refuses NaN
        raise ValueError(f"NSD tolerance must be >= 0 mm, got {nsd_tolerance_mm}")
    a, b = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    box_a, box_b = bounding_box(a), bounding_box(b)
    if box_a is None and box_b is None:
        return 0.0, 1.0
    if box_a is None or box_b is None:
        return volume_diagonal_mm(a.shape, spacing_mm), 0.0
    d_ab, d_ba = _distances_in_box(a, b, _joint_box(box_a, box_b), spacing_mm)
    return hd95_from_distances(d_ab, d_ba), nsd_from_distances(d_ab, d_ba, nsd_tolerance_mm)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing_mm: Spacing) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) of two (X, Y, Z) masks (module docstring: conventions)."""
    return surface_metrics(pred, truth, spacing_mm)[0]


def nsd(pred: np.ndarray, truth: np.ndarray, spacing_mm: Spacing, tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> float:
    """Normalised surface Dice of two (X, Y, Z) masks at ``tolerance_mm`` (in [0, 1]; module docstring: conventions)."""
    return surface_metrics(pred, truth, spacing_mm, tolerance_mm)[1]


def case_metrics(pred: np.ndarray, truth: np.ndarray, *, label_values: list[int], class_names: list[str],
                 spacing_mm: Spacing, regions: dict[str, list[int]] | None = None,
                 with_hd95: bool = True, nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> dict[str, float]:
    """Per-class (and per-region) Dice, HD95 and NSD for one case, plus the foreground mean Dice.

    Args:
        pred, truth: (X, Y, Z) label maps in original label values.
        spacing_mm: voxel size along X, Y, Z in mm.
        with_hd95: also the surface metrics ``hd95_<name>`` (mm) and ``nsd_<name>`` (they share the distance maps).
        nsd_tolerance_mm: NSD tolerance in mm.
    Returns:
        {"dice_<name>", ["hd95_<name>", "nsd_<name>"], ..., "dice_mean_fg"} for classes then regions.
    """
    out: dict[str, float] = {}
    fg_dice = []
    for value, name in zip(label_values[1:], class_names[1:]):
        out.update(_pair_metrics(name, pred == value, truth == value, spacing_mm, with_hd95, nsd_tolerance_mm))
        fg_dice.append(out[f"dice_{name}"])
    for region, values in (regions or {}).items():
        out.update(_pair_metrics(region, np.isin(pred, values), np.isin(truth, values), spacing_mm, with_hd95, nsd_tolerance_mm))
    out["dice_mean_fg"] = float(np.mean(fg_dice)) if fg_dice else 1.0
    return out


def _pair_metrics(name: str, a: np.ndarray, b: np.ndarray, spacing_mm: Spacing, with_surface: bool, nsd_tolerance_mm: float) -> dict[str, float]:
    """{"dice_<name>"[, "hd95_<name>", "nsd_<name>"]} of two (X, Y, Z) masks."""
    out = {f"dice_{name}": dice(a, b)}
    if with_surface:
        out[f"hd95_{name}"], out[f"nsd_{name}"] = surface_metrics(a, b, spacing_mm, nsd_tolerance_mm)
    return out


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every numeric key over cases; NaN values (a metric undefined for a case, e.g. calibration over
    an empty region) are left out, and a key that is NaN in every case stays NaN."""
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float))] if rows else []
    out = {}
    for k in keys:
        vals = np.asarray([r[k] for r in rows if r.get(k) is not None], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        out[k] = float(vals.mean()) if vals.size else float("nan")
    return out


def dice_per_class_indices(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float]:
    """Dice per class on index maps (cache grid), classes 0..C-1."""
    return [dice(pred == c, truth == c) for c in range(num_classes)]
