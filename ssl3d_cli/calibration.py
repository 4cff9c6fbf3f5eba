"""Calibration and uncertainty-quality metrics for segmentation: ECE, Brier, NLL, reliability bins, error/uncertainty overlap.

Inputs and shapes:
- ``probs``: (C, X, Y, Z) class probabilities that sum to 1 over the class axis at each voxel (float16/32/64;
  every sum is accumulated in float64). ``<case>_probabilities.nii.gz`` is stored (X, Y, Z, C): pass
  ``np.moveaxis(arr, -1, 0)``, a view, not a copy. Any number of spatial axes works, e.g. (C, N) and (N,).
- ``truth``: (X, Y, Z) integer class *indices* 0..C-1 (label values already mapped to indices).
- ``mask``: optional (X, Y, Z) bool; only voxels where it is True are scored (``None``: the whole scan).

Conventions:
- Prediction and confidence: ``pred = argmax_c p_c`` (ties go to the lower class index, as ``np.argmax``),
  ``confidence = max_c p_c``, a voxel is *correct* when ``pred == truth``.
- ECE (top-label expected calibration error) uses ``bins`` (default 15) equal-width confidence bins over
  (0, 1]; bin b is (b/B, (b+1)/B], closed on the right, so a confidence exactly on an inner edge belongs to
  the bin *below* it (0.6 with 15 bins is in bin 8 = (0.5333, 0.6], 1.0 is in the last bin). "Exactly"
  allows 1e-6 (``EDGE_TOLERANCE``): float32 0.6 is 0.60000002 and still counts as on the edge. Confidence 0
  (impossible for probabilities that sum to 1) goes to bin 0. With n scored voxels,
  ``ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|`` where acc is the fraction correct and conf the mean
  confidence in the bin; empty bins contribute nothing.
- Brier: multi-class, summed over classes and *not* divided by C: mean over voxels of
  ``sum_c (p_c - onehot_c)^2``, computed as ``sum_c p_c^2 - 2 p_truth + 1`` (no one-hot array). Range [0, 2].
- NLL: mean over voxels of ``-log(clip(p_truth, eps, 1))`` in nats, eps = 1e-7 (a probability of 0 costs 16.1).
- No scored voxels (an all-False mask, e.g. an empty region of interest): every metric is NaN (undefined),
  never 0; dataset means should skip NaN cases and say how many were skipped.
- Dataset level: per-case statistics are *sums* (per-bin count, confidence sum, correct count, Brier and NLL
  sums), so cases pool exactly (:class:`CalibrationAccumulator`): the pooled ECE is the ECE of all voxels of
  all cases taken together and equals ECE on the concatenated voxels. The mean of per-case ECEs is a different
  number (it weights cases equally, not voxels, and each case's bins are filled differently; ECE is not
  additive) and both are reported. Pooled Brier/NLL are voxel-weighted means, per-case means are case-weighted.
- Region of interest (:func:`region_of_interest`): whole-scan metrics are dominated by easy, confidently
  correct background voxels (ECE and Brier near 0 for any model); the ROI is the bounding box of the
  foreground (class index > 0) of truth and prediction together, grown by ``margin_mm`` (default 10 mm) on
  every side, ``floor(margin_mm / spacing)`` voxels along each axis, clipped to the volume. Both foregrounds
  empty: the ROI is empty and ROI metrics are NaN. Both whole-scan and ROI values are reported.
- Uncertainty/error overlap (:func:`uncertainty_error_overlap`): error mask ``E = pred != truth``, flagged mask
  ``F_t = uncertainty > t``; ``Dice_t = 2 |E & F_t| / (|E| + |F_t|)``, 1.0 when both are empty (as
  :func:`ssl3d_cli.metrics.dice`). Default thresholds: 50 evenly spaced from the minimum to the maximum of the
  uncertainty inside the mask, both included (t = max flags nothing). The best Dice is the largest over the
  thresholds (the lowest threshold on ties). So a perfect prediction (E empty) scores 1.0, at t = max,
  nothing flagged; errors with a constant uncertainty map score 0 (nothing can be singled out). The per-case
  best threshold is optimistic (chosen on the case itself); with a fixed common threshold list (e.g.
  ``np.linspace(0, log C, 50)`` for entropy in nats) the per-threshold counts pool across cases.

Everything runs on flattened voxel chunks (about a million voxels at a time) with numpy, so memory stays
bounded by the chunk whatever the scan size (a 512x512x300x3 float32 volume is 900 MB and is never copied).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ssl3d_cli.files import atomic_output

DEFAULT_BINS = 15
DEFAULT_EPS = 1e-7
DEFAULT_MARGIN_MM = 10.0
DEFAULT_THRESHOLDS = 50
EDGE_TOLERANCE = 1e-6  # confidences within this of a bin edge count as on it (the bin below)
_CHUNK_VOXELS = 1 << 20  # voxels per chunk: bounds every temporary array (C x 1M float64 = 24 MB for C = 3)


# --------------------------------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin sums of the reliability diagram; sums, so bins of several cases add (``a + b``) exactly.

    Attributes:
        count: (B,) int64 number of voxels per confidence bin; bin b is (b/B, (b+1)/B].
        confidence_sum: (B,) float64 sum of the confidences (max probability) in each bin.
        correct_sum: (B,) int64 number of correctly classified voxels (argmax == truth) in each bin.
    """

    count: np.ndarray
    confidence_sum: np.ndarray
    correct_sum: np.ndarray

    @classmethod
    def empty(cls, n_bins: int = DEFAULT_BINS) -> ReliabilityBins:
        """All-zero bins (nothing scored yet)."""
        _check_bins(n_bins)
        return cls(np.zeros(n_bins, np.int64), np.zeros(n_bins, np.float64), np.zeros(n_bins, np.int64))

    @property
    def n_bins(self) -> int:
        return int(self.count.shape[0])

    @property
    def n(self) -> int:
        """Number of voxels scored."""
        return int(self.count.sum())

    @property
    def edges(self) -> np.ndarray:
        """(B + 1,) float64 bin edges 0, 1/B, ..., 1."""
        return np.arange(self.n_bins + 1, dtype=np.float64) / self.n_bins

    @property
    def mean_confidence(self) -> np.ndarray:
        """(B,) float64 mean confidence per bin, NaN for empty bins."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.confidence_sum / self.count, np.nan)

    @property
    def accuracy(self) -> np.ndarray:
        """(B,) float64 fraction of correct voxels per bin, NaN for empty bins."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.correct_sum / self.count, np.nan)

    def ece(self) -> float:
        """Expected calibration error sum_b |B_b|/n |acc_b - conf_b| in [0, 1]; NaN when nothing was scored."""
        n = self.n
        if n == 0:
            return math.nan
        # |B_b| * |acc_b - conf_b| = |correct_b - confidence_sum_b|: no division per bin needed.
        return float(np.abs(self.correct_sum - self.confidence_sum).sum() / n)

    def rows(self) -> list[dict[str, float]]:
        """One dict per bin (lower, upper, count, mean_confidence, accuracy) for tables and JSON (NaN for empty bins)."""
        edges, conf, acc = self.edges, self.mean_confidence, self.accuracy
        return [{"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(self.count[b]),
                 "mean_confidence": float(conf[b]), "accuracy": float(acc[b])} for b in range(self.n_bins)]

    def __add__(self, other: ReliabilityBins) -> ReliabilityBins:
        if not isinstance(other, ReliabilityBins):
            return NotImplemented
        if other.n_bins != self.n_bins:
            raise ValueError(f"cannot add reliability bins with {self.n_bins} and {other.n_bins} bins")
        return ReliabilityBins(self.count + other.count, self.confidence_sum + other.confidence_sum, self.correct_sum + other.correct_sum)


class ECEResult(NamedTuple):
    """What :func:`expected_calibration_error` returns: ``ece, bins = expected_calibration_error(...)``."""

    ece: float
    bins: ReliabilityBins


@dataclass(frozen=True)
class CalibrationStats:
    """Sufficient statistics of one case (or of several, added with ``+``) for ECE, Brier and NLL.

    Attributes:
        bins: the reliability bins (their total count is the number of voxels scored).
        brier_sum: sum over voxels of sum_c (p_c - onehot_c)^2 (float64).
        nll_sum: sum over voxels of -log(clip(p_truth, eps, 1)) in nats (float64).
    """

    bins: ReliabilityBins
    brier_sum: float = 0.0
    nll_sum: float = 0.0

    @property
    def n(self) -> int:
        """Number of voxels scored."""
        return self.bins.n

    def ece(self) -> float:
        """Top-label ECE; NaN when no voxel was scored."""
        return self.bins.ece()

    def brier(self) -> float:
        """Mean multi-class Brier score (summed over classes, range [0, 2]); NaN when no voxel was scored."""
        return self.brier_sum / self.n if self.n else math.nan

    def nll(self) -> float:
        """Mean negative log-likelihood of the true class in nats; NaN when no voxel was scored."""
        return self.nll_sum / self.n if self.n else math.nan

    def summary(self, prefix: str = "") -> dict[str, float]:
        """``{prefix+"ece", prefix+"brier", prefix+"nll", prefix+"n_voxels"}`` for a results row."""
        return {f"{prefix}ece": self.ece(), f"{prefix}brier": self.brier(), f"{prefix}nll": self.nll(), f"{prefix}n_voxels": self.n}

    def __add__(self, other: CalibrationStats) -> CalibrationStats:
        if not isinstance(other, CalibrationStats):
            return NotImplemented
        return CalibrationStats(self.bins + other.bins, self.brier_sum + other.brier_sum, self.nll_sum + other.nll_sum)


@dataclass(frozen=True)
class ErrorOverlap:
    """Dice between the error mask and the thresholded uncertainty, per threshold (see the module docstring).

    Attributes:
        thresholds: (T,) float64 ascending thresholds t (in the uncertainty's units, e.g. nats); flagged = u > t.
        flagged: (T,) int64 |F_t|, voxels with uncertainty > t.
        hits: (T,) int64 |E & F_t|, misclassified voxels that are flagged.
        n_errors: |E|, misclassified voxels (pred != truth).
        n_voxels: voxels scored (inside the mask).
    """

    thresholds: np.ndarray
    flagged: np.ndarray
    hits: np.ndarray
    n_errors: int
    n_voxels: int

    @property
    def dice(self) -> np.ndarray:
        """(T,) float64 Dice(E, F_t); 1.0 where both are empty."""
        denom = self.n_errors + self.flagged
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, 2.0 * self.hits / np.maximum(denom, 1), 1.0)

    @property
    def best_index(self) -> int | None:
        """Index of the best threshold (the lowest one on ties); None when undefined (no voxels scored)."""
        if self.n_voxels == 0 or self.thresholds.size == 0:
            return None
        return int(np.argmax(self.dice))

    @property
    def best_dice(self) -> float:
        """Largest Dice over the thresholds; NaN when no voxel was scored."""
        i = self.best_index
        return math.nan if i is None else float(self.dice[i])

    @property
    def best_threshold(self) -> float:
        """The threshold of :attr:`best_dice`; NaN when no voxel was scored."""
        i = self.best_index
        return math.nan if i is None else float(self.thresholds[i])

    def __add__(self, other: ErrorOverlap) -> ErrorOverlap:
        """Pool two cases scored with the same thresholds (pass ``thresholds=`` explicitly for that)."""
        if not isinstance(other, ErrorOverlap):
            return NotImplemented
        if self.thresholds.shape != other.thresholds.shape or not np.array_equal(self.thresholds, other.thresholds):
            raise ValueError("error/uncertainty overlaps pool only over identical thresholds: pass the same thresholds= for every case")
        return ErrorOverlap(self.thresholds, self.flagged + other.flagged, self.hits + other.hits,
                            self.n_errors + other.n_errors, self.n_voxels + other.n_voxels)


# --------------------------------------------------------------------------------------------------------------------
# Input checks and chunking
# --------------------------------------------------------------------------------------------------------------------


def _check_bins(bins: int) -> None:
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")


def _as_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask has shape {mask.shape}, expected the spatial shape {shape}")
    return mask if mask.dtype == bool else mask.astype(bool)


def _check_inputs(probs: np.ndarray, truth: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    probs, truth = np.asarray(probs), np.asarray(truth)
    if probs.ndim < 2:
        raise ValueError(f"probs must be (C, X, Y, Z) (class axis first), got shape {probs.shape}")
    if probs.shape[1:] != truth.shape:
        raise ValueError(f"probs has shape {probs.shape} but truth {truth.shape}: probs must be (C, *truth.shape), class axis first "
                         "(a (X, Y, Z, C) probabilities file needs np.moveaxis(arr, -1, 0))")
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"probs must be floating point, got {probs.dtype}")
    if not (np.issubdtype(truth.dtype, np.integer) or truth.dtype == bool):
        raise ValueError(f"truth must hold integer class indices, got {truth.dtype}")
    return probs, truth, _as_mask(mask, truth.shape)


def _chunk_slices(shape: tuple[int, ...]) -> Iterator[slice]:
    """Slices along the first spatial axis covering about ``_CHUNK_VOXELS`` voxels each."""
    if len(shape) == 0 or shape[0] == 0:
        return
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, _CHUNK_VOXELS // per_row)
    for start in range(0, shape[0], step):
        yield slice(start, min(start + step, shape[0]))


def _voxel_chunks(probs: np.ndarray, truth: np.ndarray, mask: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (C, n) float64 probabilities and (n,) intp class indices of the scored voxels, chunk by chunk."""
    n_classes = probs.shape[0]
    for sl in _chunk_slices(truth.shape):
        t = truth[sl].reshape(-1)
        p = probs[:, sl].reshape(n_classes, -1)  # a copy of this chunk only when probs is not C-contiguous
        if mask is not None:
            m = mask[sl].reshape(-1)
            if not m.any():
                continue
            t, p = t[m], p[:, m]
        if t.size == 0:
            continue
        t = t.astype(np.intp, copy=False)
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(f"truth holds class index {lo if lo < 0 else hi} outside 0..{n_classes - 1} (probs has {n_classes} classes); "
                             "map label values to class indices first")
        yield p.astype(np.float64, copy=False), t


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each confidence: b with b/B < c <= (b+1)/B, edges within EDGE_TOLERANCE counting as on the edge."""
    b = np.ceil((confidence - EDGE_TOLERANCE) * n_bins).astype(np.intp) - 1
    return np.clip(b, 0, n_bins - 1)


def _chunk_bins(p: np.ndarray, t: np.ndarray, n_bins: int) -> ReliabilityBins:
    pred = p.argmax(0)  # first maximum: ties go to the lower class index
    confidence = np.take_along_axis(p, pred[None], 0)[0]
    correct = pred == t
    b = _bin_index(confidence, n_bins)
    return ReliabilityBins(np.bincount(b, minlength=n_bins).astype(np.int64),
                           np.bincount(b, weights=confidence, minlength=n_bins),
                           np.bincount(b[correct], minlength=n_bins).astype(np.int64))


def _p_truth(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.take_along_axis(p, t[None], 0)[0]


def _brier_sum(p: np.ndarray, t: np.ndarray) -> float:
    # sum_c (p_c - onehot_c)^2 = sum_c p_c^2 - 2 p_truth + 1, per voxel
    return float(np.einsum("cn,cn->", p, p) - 2.0 * _p_truth(p, t).sum() + t.size)


def _nll_sum(p: np.ndarray, t: np.ndarray, eps: float) -> float:
    return float(-np.log(np.clip(_p_truth(p, t), eps, 1.0)).sum())


# --------------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------------


def calibration_stats(probs: np.ndarray, truth: np.ndarray, *, mask: np.ndarray | None = None, bins: int = DEFAULT_BINS,
                      eps: float = DEFAULT_EPS) -> CalibrationStats:
    """ECE bins, Brier and NLL sums of one case in a single pass (what an evaluation loop should call).

    Args:
        probs: (C, X, Y, Z) float class probabilities summing to 1 per voxel, class axis first.
        truth: (X, Y, Z) int class indices 0..C-1.
        mask: optional (X, Y, Z) bool; only True voxels are scored (None: all voxels).
        bins: number of equal-width confidence bins over (0, 1].
        eps: NLL clip of the true-class probability from below.

    Returns:
        The case's :class:`CalibrationStats` (``.ece()``, ``.brier()``, ``.nll()``; NaN when nothing is scored).

    Raises:
        ValueError: shapes do not match, truth is not integer or holds an index outside 0..C-1 (inside the mask).
    """
    _check_bins(bins)
    probs, truth, mask = _check_inputs(probs, truth, mask)
    stats = CalibrationStats(ReliabilityBins.empty(bins))
    for p, t in _voxel_chunks(probs, truth, mask):
        stats = stats + CalibrationStats(_chunk_bins(p, t, bins), _brier_sum(p, t), _nll_sum(p, t, eps))
    return stats


def expected_calibration_error(probs: np.ndarray, truth: np.ndarray, *, mask: np.ndarray | None = None, bins: int = DEFAULT_BINS) -> ECEResult:
    """Top-label expected calibration error with equal-width confidence bins over (0, 1].

    confidence = max_c p_c; correct = (argmax_c p_c == truth), ties to the lower class index; bin b is
    (b/B, (b+1)/B] (a confidence on an inner edge goes to the bin below, within 1e-6);
    ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|.

    Args:
        probs: (C, X, Y, Z) float class probabilities summing to 1 per voxel, class axis first.
        truth: (X, Y, Z) int class indices 0..C-1.
        mask: optional (X, Y, Z) bool; only True voxels are scored (None: all voxels).
        bins: number of bins B (default 15).

    Returns:
        ``ECEResult(ece, bins)``: ECE in [0, 1] (NaN when no voxel is scored) and the :class:`ReliabilityBins`
        (per-bin count, mean confidence, accuracy; sums that add across cases).
    """
    _check_bins(bins)
    probs, truth, mask = _check_inputs(probs, truth, mask)
    total = ReliabilityBins.empty(bins)
    for p, t in _voxel_chunks(probs, truth, mask):
        total = total + _chunk_bins(p, t, bins)
    return ECEResult(total.ece(), total)


def brier_score(probs: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Multi-class Brier score: mean over voxels of sum_c (p_c - onehot_c)^2, summed over classes, not divided by C.

    Range [0, 2]: 0 for a confident correct answer, 2 for a confident wrong one. Computed per voxel as
    sum_c p_c^2 - 2 p_truth + 1, accumulated in float64, without a one-hot array.

    Args:
        probs: (C, X, Y, Z) float class probabilities summing to 1 per voxel, class axis first.
        truth: (X, Y, Z) int class indices 0..C-1.
        mask: optional (X, Y, Z) bool; only True voxels are scored.

    Returns:
        The mean Brier score; NaN when no voxel is scored.
    """
    probs, truth, mask = _check_inputs(probs, truth, mask)
    total, n = 0.0, 0
    for p, t in _voxel_chunks(probs, truth, mask):
        total += _brier_sum(p, t)
        n += t.size
    return total / n if n else math.nan


def negative_log_likelihood(probs: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None, eps: float = DEFAULT_EPS) -> float:
    """Mean over voxels of -log(clip(p_truth, eps, 1)), in nats.

    Args:
        probs: (C, X, Y, Z) float class probabilities summing to 1 per voxel, class axis first.
        truth: (X, Y, Z) int class indices 0..C-1.
        mask: optional (X, Y, Z) bool; only True voxels are scored.
        eps: lower clip of the true-class probability (1e-7: a zero probability costs -log(1e-7) = 16.1 nats).

    Returns:
        The mean NLL; NaN when no voxel is scored.
    """
    probs, truth, mask = _check_inputs(probs, truth, mask)
    total, n = 0.0, 0
    for p, t in _voxel_chunks(probs, truth, mask):
        total += _nll_sum(p, t, eps)
        n += t.size
    return total / n if n else math.nan


def predicted_classes(probs: np.ndarray) -> np.ndarray:
    """(X, Y, Z) argmax over the class axis of (C, X, Y, Z) probabilities, ties to the lower index, as uint8 (int16 if C > 256)."""
    probs = np.asarray(probs)
    out = np.empty(probs.shape[1:], dtype=np.uint8 if probs.shape[0] <= 256 else np.int16)
    for sl in _chunk_slices(out.shape):
        out[sl] = probs[:, sl].argmax(0)
    return out


def region_of_interest(truth: np.ndarray, pred: np.ndarray, *, spacing_mm: Sequence[float], margin_mm: float = DEFAULT_MARGIN_MM) -> np.ndarray:
    """The voxels around the foreground of truth and prediction: their joint bounding box grown by a margin in mm.

    Foreground is class index > 0 (any nonzero value) in either map. The box of the union is grown on each
    side by ``floor(margin_mm / spacing_mm[axis])`` voxels along each axis (the voxels whose centre is within
    ``margin_mm`` of the box along that axis), then clipped to the volume.

    Args:
        truth: (X, Y, Z) int class indices (or label values; only zero vs nonzero matters).
        pred: (X, Y, Z) int predicted class indices, same shape.
        spacing_mm: voxel size in mm along each axis, e.g. (0.8, 0.8, 2.5).
        margin_mm: margin on every side of the box (default 10 mm; 0: the bare bounding box).

    Returns:
        (X, Y, Z) bool mask; all False when both truth and prediction have no foreground (metrics over it are NaN).
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and pred {pred.shape} differ in shape")
    if len(spacing_mm) != truth.ndim:
        raise ValueError(f"spacing_mm has {len(spacing_mm)} values for a {truth.ndim}-D volume")
    if margin_mm < 0 or any(s <= 0 for s in spacing_mm):
        raise ValueError(f"margin_mm must be >= 0 and spacing_mm positive, got {margin_mm} and {tuple(spacing_mm)}")
    foreground = truth != 0
    foreground |= pred != 0
    roi = np.zeros(truth.shape, dtype=bool)
    box = []
    for axis, spacing in enumerate(spacing_mm):
        where = np.flatnonzero(np.any(foreground, axis=tuple(a for a in range(truth.ndim) if a != axis)))
        if where.size == 0:
            return roi
        grow = int(math.floor(margin_mm / float(spacing) + 1e-9))
        box.append(slice(max(int(where[0]) - grow, 0), min(int(where[-1]) + grow + 1, truth.shape[axis])))
    roi[tuple(box)] = True
    return roi


def _threshold_counts(uncertainty: np.ndarray, error: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|u > t| and |(u > t) & error| for every t, by counting each voxel's number of thresholds below it."""
    k = np.searchsorted(thresholds, uncertainty, side="left")  # number of thresholds strictly below u
    n_t = thresholds.size
    above = np.bincount(k, minlength=n_t + 1)
    above_err = np.bincount(k[error], minlength=n_t + 1)
    # voxel with k thresholds below it is flagged at thresholds 0..k-1: |F_j| = #{k > j}
    flagged = above[::-1].cumsum()[::-1][1:]
    hits = above_err[::-1].cumsum()[::-1][1:]
    return flagged.astype(np.int64), hits.astype(np.int64)


def uncertainty_error_overlap(uncertainty: np.ndarray, pred: np.ndarray, truth: np.ndarray, *, mask: np.ndarray | None = None,
                              thresholds: Sequence[float] | np.ndarray | None = None, n_thresholds: int = DEFAULT_THRESHOLDS) -> ErrorOverlap:
    """How well thresholded uncertainty finds the segmentation errors: Dice(pred != truth, uncertainty > t) per t.

    Conventions: Dice is 1.0 when both the error mask and the flagged mask are empty; the best threshold is
    the one of the largest Dice, the lowest on ties. Default thresholds: ``n_thresholds`` evenly spaced from
    min to max of the uncertainty inside the mask, both ends included (t = max flags nothing, so a perfect
    prediction scores 1.0 there); a constant map gives the single threshold [min].

    Args:
        uncertainty: (X, Y, Z) finite float map, larger = less certain (e.g. predictive entropy in nats).
        pred: (X, Y, Z) predicted class indices.
        truth: (X, Y, Z) true class indices (same encoding as pred).
        mask: optional (X, Y, Z) bool; only True voxels are scored (e.g. :func:`region_of_interest`).
        thresholds: explicit thresholds (sorted here); give the same list for every case to pool cases with ``+``.
        n_thresholds: number of default thresholds (ignored when ``thresholds`` is given).

    Returns:
        :class:`ErrorOverlap`: ``.best_dice``, ``.best_threshold``, ``.thresholds`` and ``.dice`` (the curve);
        the best values are NaN when no voxel is scored.
    """
    uncertainty, pred, truth = np.asarray(uncertainty), np.asarray(pred), np.asarray(truth)
    if not uncertainty.shape == pred.shape == truth.shape:
        raise ValueError(f"uncertainty {uncertainty.shape}, pred {pred.shape} and truth {truth.shape} must have the same shape")
    mask = _as_mask(mask, truth.shape)
    if thresholds is not None:
        grid = np.sort(np.asarray(thresholds, dtype=np.float64).reshape(-1))
    else:
        if int(n_thresholds) != n_thresholds or n_thresholds < 1:
            raise ValueError(f"n_thresholds must be a positive integer, got {n_thresholds!r}")
        lo, hi = math.inf, -math.inf
        for sl in _chunk_slices(truth.shape):
            u = uncertainty[sl] if mask is None else uncertainty[sl][mask[sl]]
            if u.size:
                lo, hi = min(lo, float(u.min())), max(hi, float(u.max()))
        if lo > hi:  # nothing scored
            grid = np.empty(0, np.float64)
        else:
            grid = np.linspace(lo, hi, int(n_thresholds)) if hi > lo else np.array([lo])
    flagged = np.zeros(grid.size, np.int64)
    hits = np.zeros(grid.size, np.int64)
    n_errors = n_voxels = 0
    for sl in _chunk_slices(truth.shape):
        u, e = uncertainty[sl].reshape(-1), (pred[sl] != truth[sl]).reshape(-1)
        if mask is not None:
            m = mask[sl].reshape(-1)
            u, e = u[m], e[m]
        if u.size == 0:
            continue
        f, h = _threshold_counts(u.astype(np.float64, copy=False), e, grid)
        flagged += f
        hits += h
        n_errors += int(e.sum())
        n_voxels += int(u.size)
    return ErrorOverlap(grid, flagged, hits, n_errors, n_voxels)


# --------------------------------------------------------------------------------------------------------------------
# Dataset level
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CalibrationAccumulator:
    """Pools calibration statistics over cases: voxel-weighted dataset ECE, Brier and NLL, plus per-case means.

    ``ece()`` is the ECE of the summed bins, i.e. of all scored voxels of all cases together (identical to ECE
    on the concatenated voxels); ``mean_case_ece()`` is the mean of the per-case ECEs, a different number.
    Report both. Cases with no scored voxel (empty ROI) add nothing to the pooled values and are skipped by the
    per-case means (``n_cases_scored`` says how many were used).

    Example::

        acc = CalibrationAccumulator()
        for probs, truth, roi in cases:
            row = acc.update(probs, truth, roi).summary("roi_")
        acc.ece(), acc.mean_case_ece(), acc.bins()
    """

    n_bins: int = DEFAULT_BINS
    eps: float = DEFAULT_EPS
    cases: list[CalibrationStats] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_bins(self.n_bins)

    def update(self, probs: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> CalibrationStats:
        """Score one case (shapes as :func:`calibration_stats`) and add it; returns the case's own statistics."""
        stats = calibration_stats(probs, truth, mask=mask, bins=self.n_bins, eps=self.eps)
        self.cases.append(stats)
        return stats

    def add(self, stats: CalibrationStats) -> None:
        """Add statistics computed elsewhere (e.g. by a worker process) with the same number of bins."""
        if stats.bins.n_bins != self.n_bins:
            raise ValueError(f"statistics have {stats.bins.n_bins} bins, the accumulator {self.n_bins}")
        self.cases.append(stats)

    @property
    def n_cases(self) -> int:
        return len(self.cases)

    @property
    def n_cases_scored(self) -> int:
        """Cases with at least one scored voxel."""
        return sum(1 for s in self.cases if s.n > 0)

    def total(self) -> CalibrationStats:
        """The summed statistics of all cases."""
        out = CalibrationStats(ReliabilityBins.empty(self.n_bins))
        for s in self.cases:
            out = out + s
        return out

    def bins(self) -> ReliabilityBins:
        """Pooled reliability bins (for the dataset's reliability diagram)."""
        return self.total().bins

    def ece(self) -> float:
        """Pooled (voxel-weighted) ECE; NaN when nothing was scored."""
        return self.total().ece()

    def brier(self) -> float:
        """Pooled (voxel-weighted) mean Brier score; NaN when nothing was scored."""
        return self.total().brier()

    def nll(self) -> float:
        """Pooled (voxel-weighted) mean NLL in nats; NaN when nothing was scored."""
        return self.total().nll()

    def _mean_over_cases(self, values: list[float]) -> float:
        kept = [v for v in values if not math.isnan(v)]
        return float(np.mean(kept)) if kept else math.nan

    def mean_case_ece(self) -> float:
        """Mean of the per-case ECEs over the scored cases (each case weighs the same); NaN when none."""
        return self._mean_over_cases([s.ece() for s in self.cases])

    def mean_case_brier(self) -> float:
        """Mean of the per-case Brier scores over the scored cases; NaN when none."""
        return self._mean_over_cases([s.brier() for s in self.cases])

    def mean_case_nll(self) -> float:
        """Mean of the per-case NLLs over the scored cases; NaN when none."""
        return self._mean_over_cases([s.nll() for s in self.cases])

    def summary(self, prefix: str = "") -> dict[str, float]:
        """Pooled and case-mean values in one dict (keys ``ece_pooled``, ``ece_case_mean``, ... with ``prefix``)."""
        return {f"{prefix}ece_pooled": self.ece(), f"{prefix}ece_case_mean": self.mean_case_ece(),
                f"{prefix}brier_pooled": self.brier(), f"{prefix}brier_case_mean": self.mean_case_brier(),
                f"{prefix}nll_pooled": self.nll(), f"{prefix}nll_case_mean": self.mean_case_nll(),
                f"{prefix}n_voxels": self.total().n, f"{prefix}n_cases": self.n_cases, f"{prefix}n_cases_scored": self.n_cases_scored}


#: Per-case calibration figures reported beside Dice: over the whole scan and over the region of interest.
CASE_KEYS = ("ece", "brier", "nll", "roi_ece", "roi_brier", "roi_nll")


def case_calibration(probs: np.ndarray, truth: np.ndarray, *, spacing_mm: Sequence[float],
                     margin_mm: float = DEFAULT_MARGIN_MM) -> tuple[dict[str, float], CalibrationStats, CalibrationStats]:
    """ECE, Brier and NLL of one case over the whole scan and over its region of interest.

    Args:
        probs: (C, X, Y, Z) class probabilities on the label's grid.
        truth: (X, Y, Z) true class indices.
        spacing_mm: voxel size, for the region's margin.
    Returns:
        ({key: value for key in :data:`CASE_KEYS`}, whole-scan statistics, region statistics) — the
        statistics add up across cases into pooled values (:class:`CalibrationAccumulator`).
    """
    whole = calibration_stats(probs, truth)
    roi = calibration_stats(probs, truth, mask=region_of_interest(truth, predicted_classes(probs), spacing_mm=spacing_mm, margin_mm=margin_mm))
    values = {"ece": whole.ece(), "brier": whole.brier(), "nll": whole.nll(), "roi_ece": roi.ece(), "roi_brier": roi.brier(), "roi_nll": roi.nll()}
    return values, whole, roi


# --------------------------------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------------------------------


def reliability_figure(bins: ReliabilityBins, out_path: Path | str, *, title: str) -> Path:
    """Reliability diagram as PNG: accuracy per confidence bin against the diagonal, voxel counts per bin below.

    Top: a bar per non-empty bin at its accuracy, the gap to the bin's mean confidence outlined in red, and
    the diagonal (perfect calibration); the ECE and voxel count are in the title. Bottom: voxels per bin on a
    log axis (background voxels pile up in the top bin).

    Args:
        bins: the reliability bins (one case's or pooled :meth:`CalibrationAccumulator.bins`).
        out_path: the PNG to write (atomically; parent folders are created).
        title: first line of the title, e.g. "Task09_Spleen, ROI, 20 MC samples".

    Returns:
        ``out_path`` as a Path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_path = Path(out_path)
    edges, width = bins.edges, 1.0 / bins.n_bins
    filled = bins.count > 0
    left = edges[:-1][filled]
    acc, conf = bins.accuracy[filled], bins.mean_confidence[filled]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.0, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    try:
        top.bar(left, acc, width=width, align="edge", color="tab:blue", edgecolor="black", linewidth=0.5, label="accuracy")
        top.bar(left, conf - acc, bottom=acc, width=width, align="edge", color="none", edgecolor="tab:red", linewidth=1.0,
                hatch="//", label="gap to mean confidence")
        top.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="perfect calibration")
        top.set_xlim(0.0, 1.0)
        top.set_ylim(0.0, 1.0)
        top.set_ylabel("accuracy")
        top.legend(loc="upper left", fontsize="small")
        ece = bins.ece()
        ece_text = "undefined" if math.isnan(ece) else f"{ece:.4f}"
        top.set_title(f"{title}\nECE {ece_text} ({bins.n_bins} bins, {bins.n} voxels)", fontsize="medium")
        if filled.any():
            bottom.bar(left, bins.count[filled], width=width, align="edge", color="tab:gray", edgecolor="black", linewidth=0.5)
            bottom.set_yscale("log")
        bottom.set_xlabel("confidence (max class probability)")
        bottom.set_ylabel("voxels")
        fig.tight_layout()
        # An explicit format: what is written must not depend on the temporary file's name.
        with atomic_output(out_path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)  # also when saving fails: pyplot keeps every open figure alive
    return out_path
