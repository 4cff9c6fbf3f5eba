"""Per-case preprocessing (paper Appendix B.1) and its exact inverse.

Forward, per case:
    file voxel order --reorient--> canonical RAS --crop (image-only foreground box)-->
    --normalise (native voxels)--> --resample to ``size``--> cache grid (C, D, H, W)

Inverse (:func:`restore_scores`, :func:`restore_label`): cache grid --resample to crop shape-->
--paste into the canonical volume--> --undo reorientation--> file voxel order, so the array lies
voxel for voxel on the source scan and is written with its header (:func:`nifti.write_like`).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ssl3d_cli.config import PreprocessConfig
from ssl3d_cli.data.spacing import canonical_spacing, native_size
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


def _apply_ornt_last3(array: np.ndarray, transform: np.ndarray, *, copy: bool = True) -> np.ndarray:
    """Flip/permute the last three axes; ``copy=False`` returns the (strided) view, for callers that copy it anyway."""
    lead = array.ndim - 3
    moved = np.moveaxis(array, list(range(lead)), list(range(3, 3 + lead))) if lead else array
    out = nib.orientations.apply_orientation(moved, transform)
    if lead:
        out = np.moveaxis(out, list(range(3, 3 + lead)), list(range(lead)))
    return np.ascontiguousarray(out) if copy else out


def _from_canonical_transform(axcodes: tuple[str, str, str]) -> np.ndarray:
    return nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(axcodes))


def file_box(geometry: CaseGeometry) -> tuple[slice, slice, slice]:
    """The crop box in the source file's voxel order: where :func:`from_canonical` puts the canonical box."""
    box: list[slice] = [slice(0, 0)] * 3
    canonical = geometry.canonical_shape
    for axis, (out_axis, flip) in enumerate(_from_canonical_transform(geometry.axcodes)):
        start, stop, n = geometry.crop_start[axis], geometry.crop_stop[axis], canonical[axis]
        box[int(out_axis)] = slice(start, stop) if flip > 0 else slice(n - stop, n - start)
    return tuple(box)  # type: ignore[return-value]


def paste_on_scan(crop: np.ndarray, geometry: CaseGeometry, fill: list[float] | float = 0.0) -> np.ndarray:
    """Place a canonical crop-box array onto the source scan's grid, ``fill`` elsewhere.

    The same array as pasting into a canonical volume and applying :func:`from_canonical`, without a second
    full-size copy: only the crop is reoriented, straight into its box in the file's voxel order.

    Args:
        crop: (..., *geometry.crop_shape) in canonical (RAS) order; leading axes (e.g. classes) are kept.
        fill: one value, or one per entry of the first leading axis (e.g. background probabilities per class).
    Returns:
        (..., X, Y, Z) of crop's dtype in the source file's voxel order.
    """
    lead = crop.shape[:-3]
    out = np.empty(lead + tuple(geometry.original_shape), dtype=crop.dtype)
    values = np.asarray(fill, dtype=crop.dtype).reshape(-1)
    if values.size == 1:
        out.fill(values[0])
    else:
        out[...] = values.reshape((-1,) + (1,) * (out.ndim - 1))
    out[(Ellipsis, *file_box(geometry))] = _apply_ornt_last3(crop, _from_canonical_transform(geometry.axcodes), copy=False)
    return out


def foreground_mask(image: np.ndarray, modality: str, *, ct_threshold_hu: float = -500.0) -> np.ndarray:
    """Foreground from the image alone (never the label, so prediction can make the same crop).

    Args:
        image: (C, D, H, W) raw intensities.
        modality: ``ct``: body mask = HU above the threshold, largest connected component (face-connected), holes
            (background not face-connected to the volume's border) filled; ``mr``: voxels nonzero in any channel.
    Returns:
        (D, H, W) bool mask.
    """
    start, stop, inner = foreground_box(image, modality, ct_threshold_hu=ct_threshold_hu)
    mask = np.zeros(image.shape[1:], dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = inner
    return mask


def foreground_box(image: np.ndarray, modality: str, *, ct_threshold_hu: float = -500.0
                   ) -> tuple[tuple[int, int, int], tuple[int, int, int], np.ndarray]:
    """The foreground's bounding box and the mask inside it: ``bounding_box(m)`` and ``m[box]`` of :func:`foreground_mask`.

    Returns:
        (start, stop, mask (stop - start) bool); the whole volume and an empty mask when nothing is foreground.
    """
    if modality != "ct":
        mask = np.any(image != 0, axis=0)
        start, stop = bounding_box(mask)
        return start, stop, mask[tuple(slice(a, b) for a, b in zip(start, stop))]
    body = image[0] > ct_threshold_hu
    if not body.any():
        return (0, 0, 0), tuple(int(s) for s in body.shape), body  # type: ignore[return-value]
    # Everything outside the thresholded region's box is background, so components found inside the box are those of
    # the whole volume (in the same raster order, so equal sizes rank alike) at a fraction of the cost.
    outer_start, outer_stop = bounding_box(body)
    largest, whole = _largest_component(body[tuple(slice(a, b) for a, b in zip(outer_start, outer_stop))])
    # one component: it is the thresholded region, whose box is the outer box
    inner_start, inner_stop = ((0, 0, 0), largest.shape) if whole else bounding_box(largest)
    inner = largest[tuple(slice(a, b) for a, b in zip(inner_start, inner_stop))]
    start = tuple(o + a for o, a in zip(outer_start, inner_start))
    stop = tuple(o + b for o, b in zip(outer_start, inner_stop))
    return start, stop, fill_holes(inner)  # type: ignore[return-value]


def _largest_component(mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """The largest face-connected component of ``mask`` (D, H, W) bool, as a (D, H, W) bool array, and whether it is
    the whole mask (``mask`` has at most one component).

    Equal to ``RelabelComponent(ConnectedComponent(mask), sortByObjectSize=True) == 1``: RelabelComponent ranks equal
    sizes by their ConnectedComponent number, as ``argmax`` picks the first of equal counts. Counting the labels
    (``bincount``) instead of relabelling the volume halves the cost, and a single component (a CT body, usually)
    needs no count at all (and is returned as it is: the result may be ``mask`` itself, or its contiguous copy).
    """
    mask = np.ascontiguousarray(mask)
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.view(np.uint8)))
    labels = sitk.GetArrayViewFromImage(components)  # a view: ``components`` stays referenced while it is used
    count = int(labels.max())
    if count <= 1:  # the mask is one component (or empty): it is its own largest
        return (mask if mask.dtype == bool else mask.astype(bool)), True
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    return labels == int(np.argmax(sizes[1:])) + 1, False


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled: background components (face-connected) that do not touch the array's border.

    Equal to ``sitk.BinaryFillhole`` (fullyConnected off). On a mask's bounding box it also equals hole filling on the
    whole volume: outside the box is background that reaches the border along any axis, so a background component in
    the box reaches the volume's border exactly when it touches the box's border. One connected-component pass of the
    background; the full-size lookup is skipped when no component is enclosed and is one comparison when a single
    background component touches the border (a body's outside air, usually).

    Args:
        mask: (D, H, W) bool.
    Returns:
        (D, H, W) bool, a new array.
    """
    if mask.size == 0 or min(mask.shape) <= 2:  # every voxel lies on the border: nothing is enclosed
        return mask.copy()
    background = sitk.ConnectedComponent(sitk.GetImageFromArray(np.logical_not(mask).view(np.uint8)))
    labels = sitk.GetArrayViewFromImage(background)  # a view: ``background`` stays referenced while it is used
    outside = np.zeros(int(labels.max()) + 1, dtype=bool)
    for axis in range(3):
        for index in (0, -1):
            outside[np.take(labels, index, axis=axis).ravel()] = True
    outside[0] = False  # label 0 is the mask itself
    touching = np.flatnonzero(outside)
    if touching.size == outside.size - 1:  # every background component reaches the border: no hole
        return mask.copy()
    if touching.size == 1:
        return labels != touching[0]
    return ~outside[labels]


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(start, stop) of the nonzero region of a (D, H, W) mask; the whole volume when the mask is empty.

    Two passes: one over the whole mask for the (D, H) plane of rows holding a voxel, one over that box for W.
    """
    plane = mask.any(axis=2)  # (D, H)
    if not plane.any():
        return (0, 0, 0), tuple(int(s) for s in mask.shape)  # type: ignore[return-value]
    d = np.flatnonzero(plane.any(axis=1))
    h = np.flatnonzero(plane.any(axis=0))
    w = np.flatnonzero(mask[d[0]:d[-1] + 1, h[0]:h[-1] + 1].any(axis=(0, 1)))
    return (int(d[0]), int(h[0]), int(w[0])), (int(d[-1]) + 1, int(h[-1]) + 1, int(w[-1]) + 1)


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
            lo, hi = tail_percentiles(fg, clip_percentiles)
            mean, std = clipped_mean_std(fg, lo, hi)
            del fg  # freed before the output is filled: fresh memory is the expensive part on a CT this size
            for rows in _slabs(chan.shape[0], chan[0].size):  # the same element-wise expression, without full-size temporaries
                out[c, rows] = (np.clip(chan[rows], lo, hi) - mean) / max(std, 1e-6)
            stats.append({"clip_low": float(lo), "clip_high": float(hi), "mean": mean, "std": std})
        else:
            nz = chan != 0
            vals = chan[nz] if nz.any() else chan.ravel()
            mean, std = float(vals.mean()), float(vals.std())
            out[c] = np.where(nz, (chan - mean) / max(std, 1e-6), 0.0)
            stats.append({"mean": mean, "std": std})
    return out, {"channels": stats}


def tail_percentiles(values: np.ndarray, percentiles: tuple[float, ...]) -> np.ndarray:
    """``np.percentile(values, percentiles)`` (method "linear"), bit for bit, without partitioning the whole array.

    The clip percentiles (0.5, 99.5) need four order statistics near the two ends. Each is selected from the tail
    beyond a bound read off a strided sample (one comparison pass and a small partition instead of an introselect of
    the millions of foreground voxels); a bound whose tail turns out too short, or a percentile near the middle, falls
    back to partitioning everything. The interpolation repeats NumPy's own (``_quantile`` and ``_lerp``, NumPy 2.x):
    the same float operations on the same dtypes, so the values are identical
    (``tests/test_preprocess_speed_equivalence.py::test_tail_percentiles_equal_numpy``).

    Args:
        values: (N,) finite floats, N >= 1; not modified.
        percentiles: in [0, 100].
    Returns:
        (len(percentiles),) float64, as ``np.percentile`` returns it.
    """
    n = values.size
    if n == 0:
        return np.percentile(values, percentiles)  # NumPy's own answer (an error) for no values
    quantiles = np.true_divide(np.asarray(percentiles, dtype=np.float64), 100)
    virtual = (n - 1) * quantiles
    previous = np.floor(virtual)
    following = previous + 1
    previous[virtual >= n - 1] = following[virtual >= n - 1] = -1  # above the last index: the maximum
    previous[virtual < 0] = following[virtual < 0] = 0
    previous_i, following_i = previous.astype(np.intp), following.astype(np.intp)
    order = _order_statistics(values, sorted({int(k) % n for k in np.concatenate([previous_i, following_i])}))
    a = np.asarray([order[int(k) % n] for k in previous_i], dtype=values.dtype)
    b = np.asarray([order[int(k) % n] for k in following_i], dtype=values.dtype)
    gamma = np.asanyarray(virtual - previous_i, dtype=virtual.dtype)
    diff = b - a
    result = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=result, where=gamma >= 0.5, casting="unsafe", dtype=result.dtype)
    return result


def _order_statistics(values: np.ndarray, ranks: list[int], sample: int = 1 << 16) -> dict[int, Any]:
    """The ``rank``-th smallest of ``values`` (N,) for each rank (0-based), each exact.

    A rank in the lowest or highest tenth is read from the values beyond a bound: the sample's order statistic a margin
    further out (several standard deviations of its rank, plus a constant); the bound is checked by counting the tail,
    and the whole array is partitioned when any check fails.
    """
    n = values.size
    out: dict[int, Any] = {}
    if n <= 4 * sample or any(n // 10 <= r < n - n // 10 for r in ranks):
        part = np.partition(values, ranks)
        return {r: part[r] for r in ranks}
    picked = np.sort(values[:: n // sample])
    m = picked.size
    low = [r for r in ranks if r < n // 2]
    high = [r for r in ranks if r >= n // 2]
    if low:
        fraction = (max(low) + 2) / n
        k = min(m - 1, int(fraction * m + 6 * math.sqrt(fraction * m) + 16))
        tail = values[values <= picked[k]]
        if tail.size < max(low) + 2:
            return _order_statistics(values, ranks, sample=n)  # the bound fell short: partition everything
        part = np.partition(tail, low)
        out.update({r: part[r] for r in low})
    if high:
        fraction = (n - min(high) + 1) / n
        k = max(0, m - 1 - int(fraction * m + 6 * math.sqrt(fraction * m) + 16))
        tail = values[values >= picked[k]]
        if tail.size < n - min(high) + 1:
            return _order_statistics(values, ranks, sample=n)
        shift = n - tail.size
        part = np.partition(tail, [r - shift for r in high])
        out.update({r: part[r - shift] for r in high})
    return out


#: Elements summed by one NumPy call in :func:`_pairwise_sum` (any size >= 128 gives the same sums).
_PAIRWISE_LEAF = 1 << 16


def clipped_mean_std(values: np.ndarray, lo: np.floating, hi: np.floating) -> tuple[float, float]:
    """``x = np.clip(values, lo, hi)`` (float64: the bounds are float64), then ``(float(x.mean()), float(x.std()))``,
    bit for bit, without the full-size float64 ``x``.

    NumPy sums a contiguous float64 array pairwise: halves (the first a multiple of 8) down to blocks of 128.
    :func:`_pairwise_sum` splits the same way and hands each piece of at most ``_PAIRWISE_LEAF`` elements to NumPy,
    clipped (and, for the variance, centred and squared as ``_var`` does) into a small buffer, so every partial sum is
    the one NumPy forms. The full-size float64 copy (and ``std``'s second one) cost more than the arithmetic here:
    140 MB of fresh memory for a CT body (``tests/test_preprocess_speed_equivalence.py::
    test_clipped_mean_std_equals_numpy``).

    Args:
        values: (N,) float, N >= 1 (the foreground voxels, in mask order).
        lo, hi: the clip bounds (float64 scalars, as :func:`tail_percentiles` gives them).
    """
    n = values.size
    buffer = np.empty(min(n, _PAIRWISE_LEAF), dtype=np.float64)

    def clipped(start: int, stop: int) -> np.ndarray:
        return np.clip(values[start:stop], lo, hi, out=buffer[: stop - start])

    mean = _pairwise_sum(clipped, 0, n) / n  # _mean: sum / count

    def squared_deviations(start: int, stop: int) -> np.ndarray:  # _var: (x - mean) ** 2 as x * x, in place
        x = clipped(start, stop)
        np.subtract(x, mean, out=x)
        return np.multiply(x, x, out=x)

    return float(mean), float(np.sqrt(_pairwise_sum(squared_deviations, 0, n) / n))


def _pairwise_sum(piece: Any, start: int, n: int) -> np.floating:
    """NumPy's pairwise sum of the float64 elements [start, start + n) of a virtual array; ``piece(a, b)`` gives them."""
    if n <= _PAIRWISE_LEAF:
        return np.add.reduce(piece(start, start + n), initial=0.0)  # one NumPy pairwise sum of this node
    half = n // 2
    half -= half % 8
    return _pairwise_sum(piece, start, half) + _pairwise_sum(piece, start + half, n - half)


def _slabs(rows: int, per_row: int, voxels: int = 1 << 20) -> list[slice]:
    """Slices of the first axis holding about ``voxels`` elements each."""
    step = max(1, voxels // max(per_row, 1))
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _linear_source(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Torch's linear interpolation along one axis (align_corners=False): per output index the two source indices
    (i0, i1) and the weight of i1 (float32, as torch computes them).

    The source position scale * (i + 0.5) - 0.5 is rounded once to float32, as torch's fused multiply-add computes it
    (the product of two float32 values is exact in float64); rounding twice moves it by up to an ulp (4e-5 of a value
    step at 431 -> 300). Negative positions are clamped at 0; i1 = i0 + 1 except at the last index.
    """
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.float64(scale) * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)).astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0.astype(np.float32)


@functools.lru_cache(maxsize=64)
def _axis_operator(n_in: int, n_out: int) -> torch.Tensor | None:
    """The 1-D linear map (n_out, n_in) of one axis of :func:`resample_image`; None when it is the identity.

    It is the anti-aliasing Gaussian (sigma (f - 1) / 2, radius ceil(3 sigma), replicate padding; only when shrinking by
    f = n_in / n_out > 1.5) followed by torch's linear interpolation (:func:`_linear_source`), composed in float64,
    kept as float32. Each case's crop has its own size, so this is built per case and must cost little: the blur
    matrix is one ``bincount`` (tap by tap into each cell, as repeated ``np.add.at`` adds them), and the composition
    mixes two blur rows per output row, what the product with the two-entry interpolation rows computes (a BLAS
    product is slower here: its threads wait on each other for a matrix this small; the two agree within one float32
    ulp, ``tests/test_preprocess_speed_equivalence.py::test_axis_operator_equals_add_at_construction``).
    """
    factor = n_in / n_out
    if n_in == n_out:
        return None  # identity interpolation, and no blur at factor 1
    blur = np.eye(n_in)
    if factor > 1.5:
        kernel = _gaussian_kernel((factor - 1) / 2).double().numpy()
        radius = kernel.size // 2
        rows = np.arange(n_in)
        cols = np.clip(rows[None, :] + np.arange(kernel.size)[:, None] - radius, 0, n_in - 1)  # (taps, n_in)
        flat = (rows[None, :] * n_in + cols).ravel()
        blur = np.bincount(flat, weights=np.repeat(kernel, n_in), minlength=n_in * n_in).reshape(n_in, n_in)
    i0, i1, lam1 = _linear_source(n_in, n_out)
    lam = lam1.astype(np.float64)[:, None]
    same = (i0 == i1)[:, None]  # the last index: both weights fall on one source row, summed first
    w0 = np.where(same, (1.0 - lam) + lam, 1.0 - lam)
    w1 = np.where(same, 0.0, lam)
    return torch.from_numpy(w0 * blur[i0] + w1 * blur[i1]).to(torch.float32)  # cached: callers never write to it


def _apply_axis(volume: torch.Tensor, operator: torch.Tensor, axis: int) -> torch.Tensor:
    """Apply an (n_out, n_in) operator along ``axis`` (1..3) of a contiguous (C, D, H, W) volume.

    Each axis is one (batched) matrix product on the volume as it lies in memory, so no axis is moved and no
    transposed copy is made: D: op @ (C, D, H*W); H: op @ (C*D, H, W); W: (C*D*H, W) @ op^T.
    Returns:
        (C, D, H, W) with ``axis`` of length n_out, contiguous.
    """
    c, d, h, w = volume.shape
    if axis == 1:
        return torch.matmul(operator, volume.reshape(c, d, h * w)).reshape(c, -1, h, w)
    if axis == 2:
        return torch.matmul(operator, volume)
    return torch.matmul(volume.reshape(c * d * h, w), operator.t()).reshape(c, d, h, -1)


def _axis_order(shape: tuple[int, ...], size: tuple[int, int, int], axes: list[int]) -> list[int]:
    """The order of ``axes`` (1..3 of a (C, D, H, W) shape) that resamples to ``size`` with the fewest multiply-adds:
    each step costs (voxels at that point) x (output length of its axis)."""
    def cost(order: tuple[int, ...]) -> int:
        current, total = list(shape), 0
        for axis in order:
            total += math.prod(current) * size[axis - 1]
            current[axis] = size[axis - 1]
        return total
    return list(min(itertools.permutations(axes), key=cost))


def resample_image(image: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """(C, d, h, w) -> (C, *size), trilinear, anti-aliased when shrinking. float32.

    Equal (up to float rounding: within 1e-5 of unit-scale values) to a separable Gaussian blur along each axis shrunk by
    more than 1.5x followed by ``F.interpolate(mode="trilinear", align_corners=False)``, but computed as one small
    matrix per axis (blur and interpolation composed), in the cheapest axis order: the blur is never evaluated at full
    resolution (a 512 x 512 x 96 CT: 0.1 s instead of 1.3 s on two cores).
    """
    vol = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    operators = {axis: _axis_operator(image.shape[axis], size[axis - 1]) for axis in (1, 2, 3)}
    for axis in _axis_order(tuple(vol.shape), size, [a for a, op in operators.items() if op is not None]):
        vol = _apply_axis(vol, operators[axis], axis)  # type: ignore[arg-type]
    return vol.numpy()


@functools.lru_cache(maxsize=64)
def _nearest_source(n_in: int, n_out: int) -> np.ndarray:
    """Per output index the source index of ``F.interpolate(mode="nearest-exact")`` along one axis, (n_out,) int64.

    Taken from torch itself (a 1-D interpolation of the indices, exact in float32 below 2**24): the 3-D nearest-exact
    interpolation computes each axis's index alone, so gathering along each axis with these gives its result.
    """
    ramp = torch.arange(n_in, dtype=torch.float32)[None, None]
    index = F.interpolate(ramp, size=n_out, mode="nearest-exact")[0, 0].to(torch.int64).numpy()
    index.setflags(write=False)  # cached and shared
    return index


def resample_label(label: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """(d, h, w) class indices -> (*size), nearest neighbour (never linear). uint8.

    Equal to ``F.interpolate(label.float(), size, mode="nearest-exact")`` (values 0..255): a gather along each axis
    (:func:`_nearest_source`), on any strided view (a reoriented crop of the file's array) without copying it whole.
    """
    out = label
    for axis in range(3):
        out = out[(slice(None),) * axis + (_nearest_source(label.shape[axis], size[axis]),)]
    return np.ascontiguousarray(out, dtype=np.uint8)


def map_labels(label: np.ndarray, label_values: list[int], path: str) -> np.ndarray:
    """Original label values -> contiguous class indices (uint8); undeclared values are an error.

    Args:
        label: (X, Y, Z) integers, any memory order (a NIfTI's Fortran order is kept: no reordering copy).
    Returns:
        (X, Y, Z) uint8 in ``label``'s memory order.
    """
    unknown = _undeclared_values(label, label_values)
    if unknown:
        raise InputDataError(f"{path}: label value(s) {unknown} are not declared (declared: {label_values}); fix the labels or dataset.json")
    if label.size == 0:
        return label.astype(np.uint8)
    lo, hi = int(label.min()), int(label.max())
    index = {value: i for i, value in enumerate(label_values)}
    changed = [v for v in range(lo, hi + 1) if v in index and index[v] != v]
    if 0 <= lo and hi < 256 and len(changed) <= 8:  # a cast, then one masked write per value that moves (BraTS: 4 -> 3)
        out = label.astype(np.uint8)
        if changed:
            source = out.copy()
            for value in changed:
                out[source == value] = index[value]
        return out
    lut = np.zeros(max(max(label_values), hi) + 1, dtype=np.uint8)
    for i, value in enumerate(label_values):
        lut[value] = i
    return lut[label]


def _undeclared_values(label: np.ndarray, label_values: list[int]) -> list[int]:
    """The sorted values of ``label`` not in ``label_values``.

    From the range alone when every value in [min, max] is declared (the usual case: two passes instead of counting
    or sorting hundreds of millions of voxels); a few undeclared candidates in the range are looked for one by one;
    otherwise the values are counted (non-negative) or sorted (``np.unique``).
    """
    if label.size == 0:
        return []
    declared = set(label_values)
    lo, hi = int(label.min()), int(label.max())
    if hi - lo < 1 << 16:
        candidates = [v for v in range(lo, hi + 1) if v not in declared]
        if len(candidates) <= 8:
            return [v for v in candidates if v in (lo, hi) or bool((label == v).any())]
    if lo >= 0:  # counting is O(n); np.unique sorts (O(n log n)) and is ~10x slower here
        present = np.flatnonzero(np.bincount(label.ravel(order="K")))  # "K": no C-order copy of a NIfTI's Fortran-order array
    else:
        present = np.unique(label)
    return sorted(set(present.tolist()) - declared)


def unmap_labels(classes: np.ndarray, label_values: list[int]) -> np.ndarray:
    """Contiguous class indices -> original label values (uint8 when they fit, else int16)."""
    lut = np.asarray(label_values, dtype=np.int16 if max(label_values) > 255 else np.uint8)
    if np.array_equal(lut, np.arange(len(lut))) and classes.size and classes.min() >= 0 and classes.max() < len(lut):
        return classes.astype(lut.dtype)  # values 0..C-1 map to themselves: a cast, not a lookup through a 64-bit index copy
    return np.take(lut, classes)


@dataclass
class PreprocessedCase:
    """Cache-grid arrays of one case: image (C, D, H, W) float, label (D, H, W) uint8 or None."""

    image: np.ndarray
    label: np.ndarray | None
    geometry: CaseGeometry
    intensity: dict[str, Any]


def cache_grid_size(crop_shape: tuple[int, int, int], affine: np.ndarray, config: PreprocessConfig) -> tuple[int, int, int]:
    """The cache grid of a crop box (canonical order): ``config.size``, or in the native-resolution mode the box's extent
    over the target spacing (``data.spacing.native_size``; the resize and its inverse are the same functions either way)."""
    if not config.native:
        return tuple(config.size)  # type: ignore[return-value]
    if not isinstance(config.spacing, tuple):
        raise ValueError(f"preprocess_arrays: the target spacing must be resolved to three values first, not {config.spacing!r}")
    return native_size(crop_shape, canonical_spacing(affine), config.spacing)


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
    # Views, not copies: the reorientation is only flips and axis swaps, and every step below reads its input once
    # (the image's crop is copied by the normalisation, the label's crop is gathered to the cache grid directly).
    to_ras = _to_ras(nib.orientations.io_orientation(affine))
    canon = _apply_ornt_last3(image, to_ras, copy=False)
    start, stop, mask_in_box = foreground_box(canon, modality, ct_threshold_hu=config.ct_body_threshold_hu)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    crop = canon[(slice(None),) + box]
    size = cache_grid_size(tuple(b - a for a, b in zip(start, stop)), affine, config)
    normed, intensity = normalise(crop, mask_in_box, modality, tuple(config.clip_percentiles))  # type: ignore[arg-type]
    out_image = resample_image(normed, size)  # type: ignore[arg-type]
    out_label = None
    if label is not None:
        out_label = resample_label(_apply_ornt_last3(label, to_ras, copy=False)[box], size)  # type: ignore[arg-type]
    axcodes = tuple(nib.orientations.aff2axcodes(affine))
    geometry = CaseGeometry(tuple(int(s) for s in image.shape[1:]), np.asarray(affine).tolist(), axcodes,  # type: ignore[arg-type]
                            start, stop, size)  # type: ignore[arg-type]
    return PreprocessedCase(out_image, out_label, geometry, intensity)


def resample_to_crop(scores: torch.Tensor, geometry: CaseGeometry) -> torch.Tensor:
    """(C, D, H, W) cache-grid maps -> (C, *crop_shape) float32, trilinear, on the maps' own device (canonical order)."""
    return F.interpolate(scores.to(torch.float32)[None], size=geometry.crop_shape, mode="trilinear", align_corners=False)[0]


def lookup_on_crop(volume: torch.Tensor, geometry: CaseGeometry) -> torch.Tensor:
    """(D, H, W) cache-grid values -> (*crop_shape): each crop voxel takes the value at the lower cache-grid neighbour
    (i0 along each axis, within one index of torch's own, see :func:`_linear_source`) of :func:`resample_to_crop`."""
    out = volume
    for axis in (2, 1, 0):  # the last axis first, while the volume is small: whole rows are copied after that
        i0 = torch.from_numpy(_linear_source(geometry.size[axis], geometry.crop_shape[axis])[0]).to(volume.device)
        out = out.index_select(axis, i0)
    return out


def restore_scores(scores: torch.Tensor | np.ndarray, geometry: CaseGeometry, *, background: list[float] | float = 0.0) -> np.ndarray:
    """Map per-class maps from the cache grid back onto the source scan's voxel grid.

    Args:
        scores: (C, D, H, W) per-class probabilities, vote fractions or any score, on the cache grid.
        background: value per channel outside the crop box (e.g. probability 1 for class 0).
    Returns:
        (C, X, Y, Z) float32 in the source file's voxel order.
    """
    crop = resample_to_crop(torch.as_tensor(scores, dtype=torch.float32), geometry)
    return paste_on_scan(crop.cpu().numpy(), geometry, background)


def restore_label(label: np.ndarray | torch.Tensor, geometry: CaseGeometry, num_classes: int | None = None) -> np.ndarray:
    """Map a cache-grid label map (D, H, W) of class indices back onto the source grid (X, Y, Z).

    Each class's indicator is resampled linearly and the largest wins (smoother than nearest
    neighbour, and exact where the grids coincide); one class at a time keeps memory at a few
    volumes whatever the number of classes. Outside the crop box: class 0.
    """
    lab = torch.as_tensor(np.asarray(label), dtype=torch.long)
    n = int(num_classes if num_classes is not None else int(lab.max()) + 1)
    best = torch.full(geometry.crop_shape, -1.0)
    arg = torch.zeros(geometry.crop_shape, dtype=torch.long)
    for c in range(n):
        ind = (lab == c).float()[None, None]
        if c > 0 and not bool(ind.any()):
            continue
        up = F.interpolate(ind, size=geometry.crop_shape, mode="trilinear", align_corners=False)[0, 0]
        better = up > best
        best = torch.where(better, up, best)
        arg.masked_fill_(better, c)
    return paste_on_scan(arg.numpy(), geometry, 0)
