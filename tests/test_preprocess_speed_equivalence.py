"""The preprocessing fast paths of issue 14 (goal 4) give exactly the answers of the code they replaced.

Every comparison here is exact (bit for bit), against an independent reference written in the test (NumPy, torch,
SimpleITK) or against the replaced function frozen in ``benchmarks/_baseline.py``, with two stated exceptions: the
resample operator may differ from the BLAS product it replaced by one float32 ulp (none did over 284 operators,
225172 nonzero entries, when this was written), and the cache image is compared within the resample's
``RESAMPLE_ATOL`` of ``tests/test_speed_paths.py`` (the matrices are applied in another axis order and layout, so
float32 sums may round differently). On the six benchmark scans (``benchmarks/preprocess.py``) the float16 cache,
labels, crop boxes and statistics came out identical to the code before this change.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ssl3d_cli.config import PreprocessConfig
from ssl3d_cli.data.preprocessing import (
    _axis_operator,
    _gaussian_kernel,
    _largest_component,
    _linear_source,
    bounding_box,
    clipped_mean_std,
    fill_holes,
    map_labels,
    preprocess_arrays,
    resample_label,
    tail_percentiles,
)
from ssl3d_cli.data.synthetic import make_ct_case
from ssl3d_cli.errors import InputDataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _baseline as before  # noqa: E402

RESAMPLE_ATOL = 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# percentiles

@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1001, 300_000, 1_000_003])
def test_tail_percentiles_equal_numpy(n):
    """Bit for bit ``np.percentile`` on small arrays (full partition) and large ones (tail selection), continuous data,
    integer-valued data with many ties (CT HU), and the percentiles at the ends and in the middle."""
    rng = np.random.default_rng(n)
    arrays = [rng.normal(0, 300, n).astype(np.float32), np.round(rng.normal(-50, 200, n)).astype(np.float32),
              rng.standard_cauchy(n).astype(np.float32), rng.normal(0, 1, n)]
    for values in arrays:
        kept = values.copy()
        for q in [(0.5, 99.5), (0.0, 100.0), (5.0, 95.0), (50.0,), (0.1, 12.5, 87.5, 99.9), (99.5, 0.5)]:
            got, expected = tail_percentiles(values, q), np.percentile(values, q)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert np.array_equal(got, expected), (n, q, got, expected)
        assert np.array_equal(values, kept)  # the input is not reordered (its order fixes the float sums that follow)


def test_tail_percentiles_fall_back_when_the_sample_misleads(monkeypatch):
    """A strided sample that sees only the smallest values gives a low bound whose tail is too short: the whole array
    is partitioned instead, still exact."""
    import ssl3d_cli.data.preprocessing as preprocessing

    calls: list[int] = []
    original = preprocessing._order_statistics

    def spy(values, ranks, sample=1 << 16):
        calls.append(sample)
        return original(values, ranks, sample)

    monkeypatch.setattr(preprocessing, "_order_statistics", spy)
    n = 1 << 22
    values = np.random.default_rng(0).normal(0, 1, n).astype(np.float32)
    values[:: n // (1 << 16)] = -1e6  # exactly the sampled positions, fewer than the ranks asked for
    for q in [(5.0, 95.0), (2.0, 99.5)]:
        calls.clear()
        assert np.array_equal(tail_percentiles(values, q), np.percentile(values, q))
        assert calls == [1 << 16, n]  # the tail fell short, then everything was partitioned


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 127, 128, 129, 8191, 8193, 65_536, 65_537, 131_080, 1_000_003, 3_000_001])
def test_clipped_mean_std_equals_numpy(n):
    """Bit for bit the statistics of ``np.clip(values, lo, hi)`` (float64) by ``mean()`` and ``std()``, for sizes
    around the pairwise block and leaf sizes, bounds that float32 cannot hold, data with and without ties."""
    rng = np.random.default_rng(n)
    for values in [rng.normal(-20, 100, n).astype(np.float32), np.round(rng.normal(0, 300, n)).astype(np.float32),
                   (rng.standard_cauchy(n) * 50).astype(np.float32)]:
        lo, hi = np.percentile(values, (0.5, 99.5)) + np.array([1e-9, -1e-9])
        for bounds in [(np.float64(lo), np.float64(hi)), (np.float64(-1e9), np.float64(1e9))]:
            clipped = np.clip(values, *bounds)
            assert clipped.dtype == np.float64
            assert clipped_mean_std(values, *bounds) == (float(clipped.mean()), float(clipped.std()))


# ----------------------------------------------------------------------------------------------------------------------
# labels

def _reference_map(label: np.ndarray, label_values: list[int]) -> np.ndarray:
    """Value by value, with a dict: the class index of each voxel."""
    index = {v: i for i, v in enumerate(label_values)}
    return np.vectorize(lambda v: index[int(v)], otypes=[np.uint8])(label)


@pytest.mark.parametrize("label_values", [[0, 1, 2], [0, 1, 2, 4], [0, 2, 1], [0, 3, 7, 9, 1, 2, 4, 5, 6, 8],
                                          [0, 300, 500], [5, 6], list(range(0, 40, 2))])
def test_map_labels_equals_a_lookup_and_keeps_memory_order(label_values):
    rng = np.random.default_rng(len(label_values))
    label = np.asfortranarray(rng.choice(label_values, size=(9, 8, 7)).astype(np.int32))
    got = map_labels(label, label_values, "x")
    assert got.dtype == np.uint8 and got.flags.f_contiguous
    assert np.array_equal(got, _reference_map(label, label_values))


@pytest.mark.parametrize("present,declared,unknown", [
    ([0, 1, 7], [0, 1], [7]),  # above the declared range
    ([0, 3, 5], [0, 1, 2, 4], [3, 5]),  # inside the range, and its maximum
    ([0, 1, 2], [1, 2], [0]),  # the minimum
    ([-1, 0, 1], [0, 1], [-1]),  # negative
    (list(range(0, 60, 3)), [0, 3], list(range(6, 60, 3))),  # many: counted
])
def test_map_labels_names_every_undeclared_value(present, declared, unknown):
    label = np.array(present * 4, dtype=np.int32).reshape(-1, 2, 2)
    with pytest.raises(InputDataError, match=r"seg\.nii\.gz: label value\(s\) " + str(unknown).replace("[", r"\[").replace("]", r"\]")):
        map_labels(label, declared, "seg.nii.gz")


@pytest.mark.parametrize("shape,size", [((40, 31, 17), (16, 16, 16)), ((10, 12, 9), (23, 5, 9)), ((7, 7, 7), (7, 7, 7))])
def test_resample_label_equals_nearest_exact_on_strided_views(shape, size):
    """The gather equals F.interpolate(nearest-exact) on the contiguous copy, for flipped and permuted views."""
    rng = np.random.default_rng(0)
    label = np.asfortranarray(rng.integers(0, 5, shape).astype(np.uint8))
    views = [label, label[::-1, :, ::-1], label.transpose(2, 0, 1)[:, ::-1], label[2:-1, 1:, ::-1]]
    for view in views:
        expected = F.interpolate(torch.from_numpy(np.ascontiguousarray(view).astype(np.float32))[None, None], size=size,
                                 mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
        got = resample_label(view, size)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        assert np.array_equal(got, expected)


# ----------------------------------------------------------------------------------------------------------------------
# body mask

def _sitk_largest(mask: np.ndarray) -> np.ndarray:
    components = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))), sortByObjectSize=True)
    return sitk.GetArrayFromImage(components) == 1


def test_largest_component_equals_relabel_component_including_ties():
    rng = np.random.default_rng(0)
    cases = [rng.random((14, 12, 10)) < 0.35 for _ in range(5)]  # many components of every size
    tie = np.zeros((10, 10, 10), bool)
    tie[1:4, 1:4, 1:4] = tie[6:9, 6:9, 6:9] = True  # two of equal size: RelabelComponent keeps the first numbered
    tie[0, 9, 9] = True
    single = np.zeros((6, 6, 6), bool)
    single[1:5, 2:4, 1:3] = True
    for mask in [*cases, tie, single, np.zeros((3, 4, 5), bool), np.ones((3, 4, 5), bool)]:
        largest, whole = _largest_component(mask)
        assert np.array_equal(largest, _sitk_largest(mask))
        assert whole == (len(np.unique(sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)))))) <= 2)


def test_bounding_box_equals_the_nonzero_extent():
    rng = np.random.default_rng(0)
    masks = [rng.random((9, 11, 7)) < p for p in (0.0, 0.001, 0.01, 0.3)]
    single = np.zeros((6, 5, 4), bool)
    single[5, 0, 3] = True
    for mask in [*masks, single, np.ones((2, 3, 4), bool)]:
        nz = np.nonzero(mask)
        expected = (((0, 0, 0), mask.shape) if not mask.any() else
                    (tuple(int(i.min()) for i in nz), tuple(int(i.max()) + 1 for i in nz)))
        assert bounding_box(mask) == expected


def test_fill_holes_equals_binary_fillhole_on_each_path():
    """No hole (copy), one background component reaching the border (a comparison), several (the lookup)."""
    def binary_fillhole(mask: np.ndarray) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(mask.astype(np.uint8)))).astype(bool)

    shell = np.zeros((12, 12, 12), bool)
    shell[2:10, 2:10, 2:10] = True
    shell[4:7, 4:7, 4:7] = False  # a hole; the outside is one component
    solid = shell.copy()
    solid[4:7, 4:7, 4:7] = True  # no hole
    split = shell.copy()
    split[:, 6, :] = True  # a wall across the whole array: two outside components, and the hole
    split[4:7, 4:6, 4:7] = False
    for mask in [shell, solid, split, np.ones((5, 5, 5), bool), np.zeros((5, 5, 5), bool)]:
        got = fill_holes(mask)
        assert np.array_equal(got, binary_fillhole(mask))
        assert got is not mask


# ----------------------------------------------------------------------------------------------------------------------
# resample operators and the whole forward pass on reoriented scans

@pytest.mark.parametrize("n_in,n_out", [(431, 128), (301, 128), (86, 128), (50, 9), (9, 50), (64, 41), (20, 20)])
def test_axis_operator_equals_add_at_construction(n_in, n_out):
    """The operator equals the np.add.at construction and BLAS product it replaced within one float32 ulp (the blur
    matrix is the same bit for bit; the product's float64 sums may round once more or less, FMA or not)."""
    got = _axis_operator(n_in, n_out)
    if n_in == n_out:
        assert got is None
        return
    blur = np.eye(n_in)
    if n_in / n_out > 1.5:
        kernel = _gaussian_kernel((n_in / n_out - 1) / 2).double().numpy()
        radius, rows = kernel.size // 2, np.arange(n_in)
        blur = np.zeros((n_in, n_in))
        for tap, weight in enumerate(kernel):
            np.add.at(blur, (rows, np.clip(rows + tap - radius, 0, n_in - 1)), weight)
    i0, i1, lam1 = _linear_source(n_in, n_out)
    interp = np.zeros((n_out, n_in))
    np.add.at(interp, (np.arange(n_out), i0), 1.0 - lam1.astype(np.float64))
    np.add.at(interp, (np.arange(n_out), i1), lam1.astype(np.float64))
    expected = torch.from_numpy(interp @ blur).to(torch.float32)
    np.testing.assert_array_max_ulp(got.numpy(), expected.numpy(), maxulp=1)
    assert (got == expected).float().mean() > 0.999


def _affines() -> list[np.ndarray]:
    lps = np.diag([-0.8, -0.8, 2.5, 1.0])
    permuted = np.zeros((4, 4))
    permuted[0, 2], permuted[1, 0], permuted[2, 1], permuted[3, 3] = -2.0, 0.9, -0.9, 1.0
    return [np.diag([0.8, 0.8, 2.5, 1.0]), lps, permuted]


@pytest.mark.parametrize("affine_index", [0, 1, 2])
def test_forward_pass_on_reoriented_views_equals_the_copying_one(affine_index):
    """Crop box, geometry, statistics and labels exactly as before, image within the resample tolerance, whatever the
    scan's orientation (the reorientation is now a view)."""
    case = make_ct_case(np.random.default_rng(3), (120, 110, 30))
    image, label = case.image[None].astype(np.float32), case.label
    affine = _affines()[affine_index]
    config = PreprocessConfig(size=(40, 48, 24))
    new = preprocess_arrays(image, affine, modality="ct", config=config, label=label)
    old = before.preprocess_arrays(image, affine, modality="ct", config=config, label=label)
    assert new.geometry == old.geometry and new.intensity == old.intensity
    assert np.array_equal(new.label, old.label)
    np.testing.assert_allclose(new.image, old.image, rtol=0, atol=RESAMPLE_ATOL)
    assert new.image.flags.c_contiguous and new.label.flags.c_contiguous
