import nibabel as nib
import numpy as np
import pytest

from ssl3d_cli.config import PreprocessConfig
from ssl3d_cli.data.nifti import load_label, load_scan, write_like
from ssl3d_cli.data.preprocessing import (
    bounding_box,
    foreground_mask,
    from_canonical,
    map_labels,
    normalise,
    preprocess_arrays,
    resample_label,
    restore_label,
    restore_scores,
    to_canonical,
    unmap_labels,
)
from ssl3d_cli.errors import InputDataError


def lps_affine():
    aff = np.diag([-2.0, -1.0, 3.0, 1.0])
    aff[:3, 3] = [10, 20, 30]
    return aff


def test_canonical_round_trip_is_exact():
    arr = np.random.rand(2, 5, 6, 7)
    aff = lps_affine()
    canon = to_canonical(arr, aff)
    assert canon.shape == (2, 5, 6, 7)
    np.testing.assert_array_equal(canon[:, ::-1, ::-1, :], arr)  # L->R and P->A are flips
    np.testing.assert_array_equal(from_canonical(canon, nib.aff2axcodes(aff)), arr)
    perm = np.zeros((4, 4))
    perm[0, 2], perm[1, 0], perm[2, 1], perm[3, 3] = 2.0, 1.0, 1.5, 1.0  # axes permuted
    canon = to_canonical(arr, perm)
    assert canon.shape == (2, 7, 5, 6)  # RAS order: voxel axes (k, i, j)
    np.testing.assert_array_equal(from_canonical(canon, nib.aff2axcodes(perm)), arr)


def test_bounding_box_and_ct_body_mask_uses_image_only():
    img = np.full((1, 20, 20, 10), -1000.0, np.float32)
    img[0, 4:15, 5:12, 2:8] = 40.0
    img[0, 8:10, 8:10, 4:6] = -900.0  # air pocket inside the body: hole filled
    img[0, 18, 18, 9] = 100.0  # a speck outside: not the largest component
    mask = foreground_mask(img, "ct")
    assert bounding_box(mask) == ((4, 5, 2), (15, 12, 8))
    assert mask[8, 8, 4]
    mr = np.zeros((2, 10, 10, 10), np.float32)
    mr[1, 2:5, 3:7, 1:9] = 1
    assert bounding_box(foreground_mask(mr, "mr")) == ((2, 3, 1), (5, 7, 9))
    assert bounding_box(np.zeros((3, 4, 5), bool)) == ((0, 0, 0), (3, 4, 5))


def test_normalise_ct_and_mr():
    rng = np.random.default_rng(0)
    ct = rng.normal(50, 10, (1, 10, 10, 10)).astype(np.float32)
    mask = np.ones((10, 10, 10), bool)
    out, stats = normalise(ct, mask, "ct", (0.5, 99.5))
    assert abs(out.mean()) < 1e-4 and abs(out.std() - 1) < 1e-3
    assert stats["channels"][0]["clip_low"] == pytest.approx(np.percentile(ct, 0.5))
    mr = np.zeros((1, 10, 10, 10), np.float32)
    mr[0, 2:8, 2:8, 2:8] = rng.uniform(100, 200, (6, 6, 6))
    out, _ = normalise(mr, mask, "mr", (0.5, 99.5))
    fg = out[0, 2:8, 2:8, 2:8]
    assert abs(fg.mean()) < 1e-4 and abs(fg.std() - 1) < 1e-3 and out[0, 0, 0, 0] == 0


def test_label_resampling_is_nearest_and_mapping_round_trips():
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[2:5, 2:5, 2:5] = 3
    out = resample_label(lab, (16, 16, 16))
    assert set(np.unique(out)) == {0, 3}
    brats = np.array([0, 1, 2, 4, 4])
    mapped = map_labels(brats, [0, 1, 2, 4], "x")
    np.testing.assert_array_equal(mapped, [0, 1, 2, 3, 3])
    np.testing.assert_array_equal(unmap_labels(mapped, [0, 1, 2, 4]), brats)
    with pytest.raises(InputDataError, match="seg.nii.gz.*\\[7\\]"):
        map_labels(np.array([0, 7]), [0, 1], "seg.nii.gz")


@pytest.mark.parametrize("permuted", [False, True])
def test_restore_scores_background_and_shape(permuted):
    img = np.zeros((1, 12, 10, 8), np.float32)
    img[0, 3:9, 2:8, 1:7] = 5
    affine = lps_affine()
    if permuted:
        affine = np.zeros((4, 4))
        affine[0, 2], affine[1, 0], affine[2, 1], affine[3, 3] = -2.0, 1.0, 1.5, 1.0
    case = preprocess_arrays(img, affine, modality="mr", config=PreprocessConfig(size=(16, 16, 16)))
    assert case.geometry.canonical_shape == to_canonical(img, affine).shape[1:]
    probs = np.zeros((2, 16, 16, 16), np.float32)
    probs[1] = 1.0
    back = restore_scores(probs, case.geometry, background=[1.0, 0.0])
    assert back.shape == (2, 12, 10, 8)
    assert back[1, 3:9, 2:8, 1:7].min() == pytest.approx(1.0) and back[1].sum() == pytest.approx(6 * 6 * 6)
    assert back[0, 0, 0, 0] == 1.0


@pytest.mark.parametrize("image,seg", [("example_ct_sm.nii.gz", "example_seg.nii.gz"),
                                       ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz")])
def test_real_scans_round_trip(real_dir, tmp_path, image, seg):
    """Preprocess a real label map to 128^3, restore it, write it: Dice >= 0.9 per organ > 1000 voxels, same geometry."""
    scan = load_scan([real_dir / image])
    raw = load_label(real_dir / seg, shape=scan.spatial_shape, affine=scan.affine, image_path=real_dir / image)
    values = sorted(np.unique(raw).tolist())
    mapped = map_labels(raw, values, seg)
    modality = "ct" if "ct" in image else "mr"
    case = preprocess_arrays(scan.data, scan.affine, modality=modality, config=PreprocessConfig(), label=mapped)
    assert case.image.shape == (1, 128, 128, 128) and case.label.shape == (128, 128, 128)
    restored = unmap_labels(restore_label(case.label, case.geometry, len(values)), values)
    out = write_like(restored, real_dir / seg, tmp_path / "restored.nii.gz")
    ref_img, out_img = nib.load(str(real_dir / seg)), nib.load(str(out))
    assert out_img.shape == ref_img.shape
    np.testing.assert_array_equal(out_img.affine, ref_img.affine)
    back = np.asarray(out_img.dataobj)
    checked = 0
    for value in values[1:]:
        a, b = raw == value, back == value
        if a.sum() > 1000:
            checked += 1
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.9, value
    assert checked >= 3
