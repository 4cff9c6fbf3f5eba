"""Calibration metrics on hand-made cases whose values are worked out by hand below."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ssl3d_cli import calibration
from ssl3d_cli.calibration import (
    CalibrationAccumulator,
    ReliabilityBins,
    brier_score,
    calibration_stats,
    expected_calibration_error,
    negative_log_likelihood,
    predicted_classes,
    region_of_interest,
    reliability_figure,
    uncertainty_error_overlap,
)

# Eight voxels, two classes: (p0, p1) and the true class index.
#   voxel  p0    p1    truth  pred  conf  correct  15-bin index (bin b = (b/15, (b+1)/15])
#   1      0.1   0.9   1      1     0.9   yes      13.5 -> 13 = (0.8667, 0.9333]
#   2      0.9   0.1   1      0     0.9   no       13
#   3      0.4   0.6   1      1     0.6   yes      0.6 = 9/15 is ON the edge: closed on the right -> bin 8 = (0.5333, 0.6]
#   4      0.55  0.45  1      0     0.55  no       8.25 -> 8
#   5      0.3   0.7   1      1     0.7   yes      10.5 -> 10 = (0.6667, 0.7333]
#   6      0.5   0.5   1      0     0.5   no       tie -> lower class index 0; 7.5 -> 7 = (0.4667, 0.5333]
#   7      1.0   0.0   0      0     1.0   yes      1.0 is the top edge -> last bin 14
#   8      0.2   0.8   0      1     0.8   no       0.8 = 12/15 ON the edge -> bin 11 = (0.7333, 0.8]
P1 = [0.9, 0.1, 0.6, 0.45, 0.7, 0.5, 0.0, 0.8]
TRUTH = [1, 1, 1, 1, 1, 1, 0, 0]


def _case(dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The eight voxels as a (2, 2, 2, 2) probability volume and a (2, 2, 2) truth."""
    p1 = np.array(P1, dtype=dtype)
    probs = np.stack([1 - p1, p1]).reshape(2, 2, 2, 2)
    # voxel 4's p0 must be exactly 0.55 etc. in the dtype; 1 - p1 is how a 2-class softmax output looks anyway
    return probs, np.array(TRUTH, dtype=np.int64).reshape(2, 2, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ece_by_hand_with_bin_edges(dtype) -> None:
    probs, truth = _case(dtype)
    ece, bins = expected_calibration_error(probs, truth)
    # per bin |correct_b - sum conf_b| (= |B_b| * |acc_b - conf_b|):
    #   bin 7  {6}:    |0 - 0.5|          = 0.5
    #   bin 8  {3, 4}: |1 - (0.6 + 0.55)| = 0.15
    #   bin 10 {5}:    |1 - 0.7|          = 0.3
    #   bin 11 {8}:    |0 - 0.8|          = 0.8
    #   bin 13 {1, 2}: |1 - (0.9 + 0.9)|  = 0.8
    #   bin 14 {7}:    |1 - 1.0|          = 0
    # ECE = (0.5 + 0.15 + 0.3 + 0.8 + 0.8 + 0) / 8 = 2.55 / 8 = 0.31875
    # (were 0.6 put in bin 9 instead, bins 8 and 9 would give 0.55 + 0.4 and ECE 3.35 / 8)
    assert ece == pytest.approx(2.55 / 8, abs=1e-6)
    expected_count = np.zeros(15, int)
    expected_count[[7, 8, 10, 11, 13, 14]] = [1, 2, 1, 1, 2, 1]
    np.testing.assert_array_equal(bins.count, expected_count)
    assert bins.count[9] == 0 and bins.count[12] == 0  # the edge voxels went to the bin below
    np.testing.assert_allclose(bins.mean_confidence[[7, 8, 10, 11, 13, 14]], [0.5, 0.575, 0.7, 0.8, 0.9, 1.0], atol=1e-6)
    np.testing.assert_allclose(bins.accuracy[[7, 8, 10, 11, 13, 14]], [0.0, 0.5, 1.0, 0.0, 0.5, 1.0])
    assert np.isnan(bins.accuracy[0]) and np.isnan(bins.mean_confidence[0])  # empty bins are NaN, not 0
    assert bins.n == 8
    np.testing.assert_allclose(bins.edges[[0, 9, 12, 15]], [0.0, 0.6, 0.8, 1.0])
    rows = bins.rows()
    assert rows[8]["count"] == 2 and rows[8]["upper"] == pytest.approx(0.6)


def test_ece_with_mask_and_bin_count() -> None:
    probs, truth = _case()
    mask = np.zeros(8, bool)
    mask[:4] = True  # voxels 1-4
    # bin 8 {3, 4}: 0.15, bin 13 {1, 2}: 0.8 -> ECE = 0.95 / 4
    ece, bins = expected_calibration_error(probs, truth, mask=mask.reshape(2, 2, 2))
    assert ece == pytest.approx(0.95 / 4, abs=1e-6)
    assert bins.n == 4
    # one bin over (0, 1]: |correct - sum conf| = |4 - (0.9+0.9+0.6+0.55+0.7+0.5+1.0+0.8)| / 8 = |4 - 5.95| / 8
    ece1, bins1 = expected_calibration_error(probs, truth, bins=1)
    assert ece1 == pytest.approx(1.95 / 8, abs=1e-6)
    assert bins1.count.tolist() == [8]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_brier_by_hand(dtype) -> None:
    probs, truth = _case(dtype)
    # two classes: sum_c (p_c - onehot_c)^2 = 2 (1 - p_truth)^2; p_truth = 0.9 0.1 0.6 0.45 0.7 0.5 1.0 0.2
    #   2*(0.01 + 0.81 + 0.16 + 0.3025 + 0.09 + 0.25 + 0 + 0.64) = 2 * 2.2625 = 4.525; mean 4.525 / 8
    assert brier_score(probs, truth) == pytest.approx(4.525 / 8, abs=1e-6)
    # summed over classes, not divided by C: a confident wrong answer scores 2
    assert brier_score(np.array([[1.0], [0.0]]), np.array([1])) == pytest.approx(2.0)


def test_brier_three_classes() -> None:
    # p = (0.2, 0.5, 0.3), truth 2: (0.2)^2 + (0.5)^2 + (0.3 - 1)^2 = 0.04 + 0.25 + 0.49 = 0.78
    # p = (0.6, 0.3, 0.1), truth 0: (0.6 - 1)^2 + 0.09 + 0.01 = 0.16 + 0.1 = 0.26; mean (0.78 + 0.26) / 2 = 0.52
    probs = np.array([[0.2, 0.6], [0.5, 0.3], [0.3, 0.1]])
    assert brier_score(probs, np.array([2, 0])) == pytest.approx(0.52)


def test_nll_by_hand_and_clip() -> None:
    probs, truth = _case(np.float64)
    # -mean(log p_truth) over p_truth = 0.9 0.1 0.6 0.45 0.7 0.5 1.0 0.2
    by_hand = -(math.log(0.9) + math.log(0.1) + math.log(0.6) + math.log(0.45) + math.log(0.7) + math.log(0.5) + math.log(1.0) + math.log(0.2)) / 8
    assert negative_log_likelihood(probs, truth) == pytest.approx(by_hand)
    # p_truth = 0 is clipped to eps: -log(1e-7) = 16.118...
    assert negative_log_likelihood(np.array([[1.0], [0.0]]), np.array([1])) == pytest.approx(-math.log(1e-7))
    assert negative_log_likelihood(np.array([[1.0], [0.0]]), np.array([1]), eps=1e-3) == pytest.approx(-math.log(1e-3))


def test_calibration_stats_one_pass_matches_the_separate_functions() -> None:
    probs, truth = _case()
    stats = calibration_stats(probs, truth)
    assert stats.ece() == pytest.approx(expected_calibration_error(probs, truth).ece)
    assert stats.brier() == pytest.approx(brier_score(probs, truth))
    assert stats.nll() == pytest.approx(negative_log_likelihood(probs, truth))
    assert stats.summary("roi_") == {"roi_ece": stats.ece(), "roi_brier": stats.brier(), "roi_nll": stats.nll(), "roi_n_voxels": 8}


def test_empty_mask_gives_nan() -> None:
    probs, truth = _case()
    empty = np.zeros(truth.shape, bool)
    ece, bins = expected_calibration_error(probs, truth, mask=empty)
    assert math.isnan(ece) and bins.n == 0
    assert math.isnan(brier_score(probs, truth, empty))
    assert math.isnan(negative_log_likelihood(probs, truth, empty))
    stats = calibration_stats(probs, truth, mask=empty)
    assert math.isnan(stats.ece()) and math.isnan(stats.brier()) and math.isnan(stats.nll())


def test_chunked_and_non_contiguous_inputs_give_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(9, 7, 5, 3)).astype(np.float32)  # stored (X, Y, Z, C) as a probabilities file
    stored = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    truth = rng.integers(0, 3, size=(9, 7, 5))
    mask = rng.random((9, 7, 5)) < 0.6
    probs = np.moveaxis(stored, -1, 0)  # a view, class axis first
    whole = calibration_stats(np.ascontiguousarray(probs), truth, mask=mask)
    monkeypatch.setattr(calibration, "_CHUNK_VOXELS", 17)  # chunks of one X row of 35 voxels, and less than a row
    chunked = calibration_stats(probs, truth, mask=mask)
    np.testing.assert_array_equal(chunked.bins.count, whole.bins.count)
    assert chunked.ece() == pytest.approx(whole.ece())
    assert chunked.brier() == pytest.approx(whole.brier())
    assert chunked.nll() == pytest.approx(whole.nll())


def test_input_errors() -> None:
    probs, truth = _case()
    with pytest.raises(ValueError, match="class axis first"):
        expected_calibration_error(np.full((2, 2, 2, 3), 1 / 3), truth)  # (X, Y, Z, C) as stored in the file
    with pytest.raises(ValueError, match="outside 0..1"):
        brier_score(probs, truth + 1)
    with pytest.raises(ValueError, match="integer"):
        negative_log_likelihood(probs, truth.astype(float))
    with pytest.raises(ValueError, match="mask"):
        calibration_stats(probs, truth, mask=np.ones((2, 2), bool))
    # an ignore label (-1) outside the mask is fine
    truth_ignore = truth.copy()
    truth_ignore[0, 0, 0] = -1
    mask = truth_ignore >= 0
    assert brier_score(probs, truth_ignore, mask) == pytest.approx(brier_score(probs.reshape(2, -1)[:, 1:], truth.reshape(-1)[1:]))


def test_predicted_classes_ties_go_to_lower_index() -> None:
    probs = np.array([[0.5, 0.2, 0.4], [0.5, 0.8, 0.2], [0.0, 0.0, 0.4]])  # (3 classes, 3 voxels)
    assert predicted_classes(probs).tolist() == [0, 1, 0]


def test_accumulator_pools_like_concatenation() -> None:
    rng = np.random.default_rng(1)
    cases = []
    for shape in [(6, 5, 4), (3, 7, 2), (4, 4, 4)]:
        logits = rng.normal(scale=2.0, size=(3, *shape))
        probs = np.exp(logits) / np.exp(logits).sum(0)
        cases.append((probs, rng.integers(0, 3, size=shape), rng.random(shape) < 0.7))
    acc = CalibrationAccumulator()
    per_case = [acc.update(p, t, m) for p, t, m in cases]
    flat_p = np.concatenate([p[:, m] for p, _, m in cases], axis=1)  # (3, N) voxels of all cases
    flat_t = np.concatenate([t[m] for _, t, m in cases])
    ece, bins = expected_calibration_error(flat_p, flat_t)
    assert acc.ece() == pytest.approx(ece)
    np.testing.assert_array_equal(acc.bins().count, bins.count)
    assert acc.brier() == pytest.approx(brier_score(flat_p, flat_t))
    assert acc.nll() == pytest.approx(negative_log_likelihood(flat_p, flat_t))
    assert acc.n_cases == 3 and acc.total().n == flat_t.size
    assert acc.mean_case_ece() == pytest.approx(np.mean([s.ece() for s in per_case]))
    # statistics computed elsewhere add the same way
    other = CalibrationAccumulator()
    for s in per_case:
        other.add(s)
    assert other.ece() == pytest.approx(acc.ece())
    with pytest.raises(ValueError, match="bins"):
        CalibrationAccumulator(n_bins=10).add(per_case[0])


def test_pooled_ece_differs_from_mean_of_case_eces() -> None:
    # case A: one voxel, confidence 0.9, correct           -> ECE_A = |1 - 0.9| / 1 = 0.1
    # case B: three voxels, confidence 0.9, all wrong       -> ECE_B = |0 - 2.7| / 3 = 0.9
    # mean of case ECEs = (0.1 + 0.9) / 2 = 0.5
    # pooled: bin 13 holds 4 voxels, 1 correct, confidence sum 3.6 -> |1 - 3.6| / 4 = 0.65
    acc = CalibrationAccumulator()
    acc.update(np.array([[0.1], [0.9]]), np.array([1]))
    acc.update(np.array([[0.1, 0.1, 0.1], [0.9, 0.9, 0.9]]), np.array([0, 0, 0]))
    assert acc.mean_case_ece() == pytest.approx(0.5)
    assert acc.ece() == pytest.approx(0.65)
    # an empty case (empty ROI) adds nothing to the pooled value and is skipped by the case mean
    acc.update(np.array([[0.1], [0.9]]), np.array([0]), np.array([False]))
    assert acc.ece() == pytest.approx(0.65) and acc.mean_case_ece() == pytest.approx(0.5)
    summary = acc.summary("roi_")
    assert summary["roi_n_cases"] == 3 and summary["roi_n_cases_scored"] == 2 and summary["roi_ece_pooled"] == pytest.approx(0.65)
    assert math.isnan(CalibrationAccumulator().ece()) and math.isnan(CalibrationAccumulator().mean_case_ece())


def test_calibrated_sampling_gives_small_ece_and_overconfidence_a_large_one() -> None:
    rng = np.random.default_rng(2024)
    n = 200_000
    logits = rng.normal(scale=1.5, size=(3, n))
    probs = np.exp(logits) / np.exp(logits).sum(0)
    # truth drawn from the probabilities themselves: perfectly calibrated by construction
    u = rng.random(n)
    truth = (u[None] > np.cumsum(probs, 0)[:-1]).sum(0)
    ece_calibrated, _ = expected_calibration_error(probs, truth)
    assert ece_calibrated < 0.01
    # the same truth with sharpened probabilities (temperature 0.4): overconfident
    sharp = probs ** (1 / 0.4)
    sharp /= sharp.sum(0)
    ece_over, bins_over = expected_calibration_error(sharp, truth)
    assert ece_over > 0.05 and ece_over > 5 * ece_calibrated
    filled = bins_over.count > 1000
    assert np.all(bins_over.mean_confidence[filled][-3:] > bins_over.accuracy[filled][-3:])  # confidence above accuracy at the top
    assert brier_score(sharp, truth) > brier_score(probs, truth)
    assert negative_log_likelihood(sharp, truth) > negative_log_likelihood(probs, truth)


def test_region_of_interest_box_and_anisotropic_margin() -> None:
    truth = np.zeros((40, 30, 12), np.uint8)
    pred = np.zeros_like(truth)
    truth[15, 10, 9] = 1
    pred[17, 12, 10] = 2
    # union box x 15..17, y 10..12, z 9..10; spacing (1.0, 3.0, 4.0) mm, margin 10 mm:
    #   grow floor(10/1) = 10, floor(10/3) = 3 (9 mm; a 4th voxel would be 12 mm away), floor(10/4) = 2 voxels
    #   x 5..27, y 7..15, z 7..12 clipped to 7..11 (the volume ends at z = 11)
    roi = region_of_interest(truth, pred, spacing_mm=(1.0, 3.0, 4.0), margin_mm=10.0)
    expected = np.zeros_like(roi)
    expected[5:28, 7:16, 7:12] = True
    np.testing.assert_array_equal(roi, expected)
    assert roi.sum() == 23 * 9 * 5
    # default margin is 10 mm
    np.testing.assert_array_equal(region_of_interest(truth, pred, spacing_mm=(1.0, 3.0, 4.0)), roi)
    # margin 0: the bare bounding box of truth and prediction together
    bare = region_of_interest(truth, pred, spacing_mm=(1.0, 3.0, 4.0), margin_mm=0)
    assert bare.sum() == 3 * 3 * 2 and bare[15:18, 10:13, 9:11].all()
    # nothing in either: an empty ROI, so ROI metrics are NaN
    empty = region_of_interest(np.zeros_like(truth), np.zeros_like(pred), spacing_mm=(1.0, 3.0, 4.0))
    assert not empty.any()
    probs = np.stack([np.ones(truth.shape), np.zeros(truth.shape)])
    assert math.isnan(expected_calibration_error(probs, np.zeros(truth.shape, int), mask=empty).ece)


def test_uncertainty_error_overlap_explicit_thresholds() -> None:
    # ten voxels, uncertainty 0.0 .. 0.9; errors at voxels 2, 6, 8, 9 (|E| = 4)
    u = (np.arange(10) / 10).reshape(10, 1, 1)
    truth = np.zeros((10, 1, 1), int)
    pred = truth.copy()
    pred[[2, 6, 8, 9]] = 1
    # t     flagged (u > t)       |F|  hits  Dice = 2 hits / (4 + |F|)
    # 0.05  voxels 1..9            9    4     8/13 = 0.615
    # 0.25  voxels 3..9            7    3     6/11 = 0.545
    # 0.45  voxels 5..9            5    3     6/9  = 0.667  <- best
    # 0.65  voxels 7..9            3    2     4/7  = 0.571
    # 0.85  voxel 9                1    1     2/5  = 0.4
    res = uncertainty_error_overlap(u, pred, truth, thresholds=[0.85, 0.05, 0.25, 0.65, 0.45])  # sorted inside
    np.testing.assert_allclose(res.thresholds, [0.05, 0.25, 0.45, 0.65, 0.85])
    assert res.flagged.tolist() == [9, 7, 5, 3, 1]
    assert res.hits.tolist() == [4, 3, 3, 2, 1]
    np.testing.assert_allclose(res.dice, [8 / 13, 6 / 11, 6 / 9, 4 / 7, 2 / 5])
    assert res.best_dice == pytest.approx(6 / 9) and res.best_threshold == pytest.approx(0.45)
    assert res.n_errors == 4 and res.n_voxels == 10
    # two cases scored on the same thresholds pool by adding counts
    pooled = res + res
    assert pooled.flagged.tolist() == [18, 14, 10, 6, 2] and pooled.best_dice == pytest.approx(6 / 9)
    with pytest.raises(ValueError, match="identical thresholds"):
        res + uncertainty_error_overlap(u, pred, truth, thresholds=[0.5])


def test_uncertainty_error_overlap_default_grid_and_mask() -> None:
    u = (np.arange(10) / 10).reshape(10, 1, 1)
    truth = np.zeros((10, 1, 1), int)
    pred = truth.copy()
    pred[[2, 6, 8, 9]] = 1
    # default: 50 thresholds evenly from min 0.0 to max 0.9. Best: flag {6, 7, 8, 9} (3 hits): 6/8 = 0.75,
    # for any t in [0.5, 0.6); the lowest grid point there is 28 * 0.9 / 49 = 0.514
    res = uncertainty_error_overlap(u, pred, truth)
    np.testing.assert_allclose(res.thresholds, np.linspace(0.0, 0.9, 50))
    assert res.best_dice == pytest.approx(0.75)
    assert res.best_threshold == pytest.approx(28 * 0.9 / 49)
    assert res.flagged[-1] == 0  # t = max flags nothing
    # a mask leaving out voxel 2: errors {6, 8, 9} in voxels 3..9; flag {8, 9} (t in [0.7, 0.8)): 4/5 = 0.8,
    # flag {6..9}: 6/7 = 0.857 -> best; the grid now runs from 0.3 to 0.9
    mask = np.zeros((10, 1, 1), bool)
    mask[3:] = True
    masked = uncertainty_error_overlap(u, pred, truth, mask=mask)
    assert masked.thresholds[0] == pytest.approx(0.3) and masked.n_voxels == 7
    assert masked.best_dice == pytest.approx(6 / 7)
    assert 0.5 <= masked.best_threshold < 0.6


def test_uncertainty_error_overlap_conventions() -> None:
    u = (np.arange(10) / 10).reshape(10, 1, 1)
    truth = np.zeros((10, 1, 1), int)
    # perfect prediction: Dice 1.0 where nothing is flagged (t = max), 0 elsewhere
    perfect = uncertainty_error_overlap(u, truth.copy(), truth)
    assert perfect.best_dice == 1.0 and perfect.best_threshold == pytest.approx(0.9)
    assert perfect.dice[0] == 0.0
    # errors with a constant uncertainty map: one threshold (the constant), nothing flagged, Dice 0
    pred = truth.copy()
    pred[3] = 1
    flat = uncertainty_error_overlap(np.full((10, 1, 1), 0.2), pred, truth)
    assert flat.thresholds.tolist() == [0.2] and flat.best_dice == 0.0
    # nothing scored: NaN
    none = uncertainty_error_overlap(u, pred, truth, mask=np.zeros((10, 1, 1), bool))
    assert math.isnan(none.best_dice) and math.isnan(none.best_threshold) and none.thresholds.size == 0


def test_reliability_figure_writes_png(tmp_path) -> None:
    probs, truth = _case()
    _, bins = expected_calibration_error(probs, truth)
    out = reliability_figure(bins, tmp_path / "figs" / "reliability.png", title="hand-made case")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["reliability.png"]  # no temporary file left behind
    empty = reliability_figure(ReliabilityBins.empty(), tmp_path / "empty.png", title="nothing scored")
    assert empty.read_bytes()[:4] == b"\x89PNG"
