"""Native-resolution target spacing (nnU-Net's rule) and the size of a case's grid at it."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from ssl3d_cli.data.spacing import canonical_spacing, native_size, parse_spacing, target_spacing


def _affine(zooms: tuple[float, float, float], axes: tuple[int, int, int], signs: tuple[int, int, int]) -> np.ndarray:
    """Voxel axis i runs along world axis axes[i] with sign signs[i] and spacing zooms[i]."""
    a = np.eye(4)
    a[:3, :3] = 0
    for i, (w, s, z) in enumerate(zip(axes, signs, zooms)):
        a[w, i] = s * z
    return a


@pytest.mark.parametrize("axes,signs", [((0, 1, 2), (1, 1, 1)), ((0, 1, 2), (-1, -1, 1)), ((2, 0, 1), (1, -1, 1)), ((1, 2, 0), (-1, 1, -1))])
def test_canonical_spacing_follows_the_canonical_axes(axes, signs):
    zooms = (0.7, 1.3, 2.9)
    affine = _affine(zooms, axes, signs)
    img = nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), affine)
    expected = nib.as_closest_canonical(img).header.get_zooms()[:3]
    assert canonical_spacing(affine) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", ["example_ct_sm.nii.gz", "example_mr_sm.nii.gz"])
def test_canonical_spacing_of_the_real_scans_is_nibabels(name, real_dir):
    img = nib.load(str(real_dir / name))
    assert canonical_spacing(img.affine) == pytest.approx(nib.as_closest_canonical(img).header.get_zooms()[:3], rel=1e-6)


def test_target_spacing_is_the_median_per_axis():
    spacings = [(0.7, 0.8, 1.0), (0.9, 0.6, 1.2), (0.8, 0.7, 1.1), (1.0, 0.9, 1.5)]
    assert target_spacing(spacings, [(200, 200, 150)] * 4) == pytest.approx((0.85, 0.75, 1.15))


def test_target_spacing_keeps_more_slices_on_anisotropic_data():
    """Median slice thickness 5 mm > 3 x 0.8 mm and 40 x 3 slices < 512 voxels: the coarse axis takes its 10th
    percentile (nnU-Net v2's rule)."""
    thick = [1.0, 2.5, 5.0, 5.0, 5.0, 5.0, 6.0]
    spacings = [(0.8, 0.8, t) for t in thick]
    shapes = [(512, 512, 40)] * len(thick)
    expected_coarse = float(np.percentile(thick, 10))
    assert target_spacing(spacings, shapes) == pytest.approx((0.8, 0.8, expected_coarse))
    assert expected_coarse < 5.0
    assert target_spacing(spacings, shapes, anisotropy_ratio=10.0) == pytest.approx((0.8, 0.8, 5.0))  # below the ratio: the median
    # anisotropic spacing but not anisotropic voxel counts (200 slices x 3 > 512): the median
    assert target_spacing(spacings, [(512, 512, 200)] * len(thick)) == pytest.approx((0.8, 0.8, 5.0))


def test_target_spacing_matches_nnunet_on_mixed_cohorts():
    """Cases where comparing with the finest axis (rather than the largest other) or an unguarded percentile would
    differ from nnU-Net: (a) in-plane 0.7 x 1.0 and slices 2.5 mm: 2.5 < 3 x 1.0, so not anisotropic: the median;
    (b) a few isotropic 0.5 mm scans in a 5 mm cohort: the 10th percentile 0.5 is raised to just above 0.8."""
    a = [(0.7, 1.0, 2.5)] * 8 + [(0.7, 1.0, 1.25)] * 2
    assert target_spacing(a, [(512, 512, 60)] * 10) == pytest.approx((0.7, 1.0, 2.5))
    b = [(0.8, 0.8, 5.0)] * 8 + [(0.5, 0.5, 0.5)] * 2
    assert target_spacing(b, [(512, 512, 40)] * 8 + [(300, 300, 300)] * 2) == pytest.approx((0.8, 0.8, 0.80001))


def test_target_spacing_refuses_bad_input():
    with pytest.raises(ValueError, match="no scans"):
        target_spacing([], [])
    with pytest.raises(ValueError, match="finite and > 0"):
        target_spacing([(1.0, 0.0, 1.0)], [(10, 10, 10)])
    with pytest.raises(ValueError, match="1 spacings but 2 shapes"):
        target_spacing([(1.0, 1.0, 1.0)], [(10, 10, 10)] * 2)


def test_native_size_keeps_the_extent_in_millimetres():
    assert native_size((512, 512, 100), (0.7, 0.7, 2.5), (1.4, 1.4, 2.5)) == (256, 256, 100)
    assert native_size((10, 10, 3), (1.0, 1.0, 1.0), (3.0, 3.0, 5.0)) == (3, 3, 1)  # 3.33 -> 3; 0.6 -> 1 (never 0)
    size = native_size((301, 257, 83), (0.76, 0.76, 3.0), (0.8, 0.8, 2.0))
    for n, s, t, m in zip((301, 257, 83), (0.76, 0.76, 3.0), (0.8, 0.8, 2.0), size):
        assert abs(m * t - n * s) <= t / 2 + 1e-9  # within half a target voxel of the box's extent


def test_parse_spacing():
    assert parse_spacing("0.8,0.8,2.5") == (0.8, 0.8, 2.5)
    for bad in ("0.8,0.8", "a,b,c", "1,1,0", "1,1,-2", "1,1,inf"):
        with pytest.raises(ValueError, match="--spacing"):
            parse_spacing(bad)
